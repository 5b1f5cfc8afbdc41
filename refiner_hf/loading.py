"""
Checked loading of model directories, shared by every command that loads one (export, fine-tuning, the examples).

transformers loads a directory whose weights do not fit its configuration (tensors missing, left over or of another
shape) after a warning, leaving those parameters randomly initialised; here that is an error, as are weights with NaN
or infinite values and a weights file that is not a whole safetensors file. An image processor configuration that is
there but invalid is an error naming the file; only an absent one falls back to the default processor.

- [`check_safetensors_file`]: a safetensors file's header checked against the file (before anything is read).
- [`load_model_checked`]: a Refiner-ViT classifier whose every tensor came from the weights, all finite.
- [`load_image_processor_checked`]: a directory's image processor, or the default one when it has none.
"""

from __future__ import annotations

import json
import math
import os
import pickle
import re
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path

import torch
from safetensors import SafetensorError
from transformers import PreTrainedConfig
from transformers.utils import cached_file
from transformers.utils import logging as transformers_logging

from .cli import DataError, UsageError, check_model_path, loading_error, one_line
from .configuration_refiner_vit import RefinerViTConfig
from .image_processing_refiner_vit import image_processor_for_config
from .modeling_refiner_vit import RefinerViTForImageClassification


WEIGHTS_NAME = "model.safetensors"
WEIGHTS_INDEX_NAME = "model.safetensors.index.json"
PROCESSOR_NAME = "preprocessor_config.json"
SAFETENSORS_MAX_HEADER = 100_000_000  # safetensors' own limit on its JSON header
# Bits per value of each dtype a safetensors header may name.
SAFETENSORS_DTYPE_BITS = {
    "BOOL": 8, "U8": 8, "I8": 8, "F8_E5M2": 8, "F8_E4M3": 8, "F8_E8M0": 8, "F4": 4, "F6_E2M3": 6, "F6_E3M2": 6,
    "I16": 16, "U16": 16, "F16": 16, "BF16": 16, "I32": 32, "U32": 32, "F32": 32, "C64": 64, "F64": 64, "I64": 64,
    "U64": 64,
}  # fmt: skip
KEYS_SHOWN = 3
_HEAD_PREFIXES = ("classifier.", "aux_classifier.")
# How the note of [`load_image_processor_checked`] starts when the source has no image processor.
NO_IMAGE_PROCESSOR = "no image processor there"
_BLOCK_KEY = re.compile(r"(?:refiner_vit\.)?layers\.(\d+)\.attention\.(qkv|q_proj|k_proj|refiner)\.")


class ModelWeightsError(DataError, ValueError):
    """Weights that cannot be trusted: a damaged file, tensors that do not fit the configuration, non-finite values."""


class ImageProcessorConfigError(DataError, ValueError):
    """A `preprocessor_config.json` that is there but cannot be loaded or fails the processor's own checks."""


def describe_keys(keys: Iterable[str], shown: int = KEYS_SHOWN) -> str:
    """'3 (a, b, c)' or '74 (a, b, c, ...)': how many, and the first few in sorted order."""
    keys = sorted(keys)
    listed = ", ".join(f"'{key}'" for key in keys[:shown]) + (", ..." if len(keys) > shown else "")
    return f"{len(keys)} ({listed})"


def _where(path: Path) -> str:
    """The path, and where it leads when it is a symbolic link."""
    return f"{path} (a link to {os.path.realpath(path)})" if path.is_symlink() else str(path)


def check_safetensors_file(
    path: str | os.PathLike, error: type[Exception] = ModelWeightsError, advice: str = ""
) -> dict[str, dict]:
    """
    Checks a safetensors file against its own header before anything is loaded from it: the 8-byte header length
    within the file (and safetensors' limit), the header valid JSON, every tensor's dtype one safetensors knows, its
    shape whole numbers, and its data offsets inside the file and as long as its shape and dtype need. A truncated
    file, a link to a file of another kind or a header declaring a tensor larger than the file is refused here rather
    than as a traceback from the loader (or an allocation of what the header claims).

    Args:
        path: the file.
        error: the exception class raised (the converter raises its `CheckpointError`).
        advice: what the user should do, appended to the message (default: re-save or re-convert the model).

    Returns:
        The header: tensor name to `{"dtype", "shape", "data_offsets"}`, without `__metadata__`.

    Raises:
        `error`: one line naming the file and what is wrong with it.
    """
    path = Path(path)
    advice = advice or "re-save the model with save_pretrained, or re-convert its original checkpoint"

    def refuse(problem: str) -> Exception:
        return error(f"{_where(path)}: {problem}; {advice}.")

    size = path.stat().st_size
    with path.open("rb") as file:
        head = file.read(8)
        if len(head) < 8:
            raise refuse(f"not a safetensors file ({size} bytes, too short for its header)")
        header_size = int.from_bytes(head, "little")
        if header_size > min(size - 8, SAFETENSORS_MAX_HEADER):
            raise refuse(
                f"a safetensors header of {header_size:,} bytes in a {size:,}-byte file: the file is truncated, or "
                "not a safetensors file"
            )
        raw = file.read(header_size)
    try:
        header = json.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError):
        raise refuse(
            "not a safetensors file: its header is not JSON (the file is damaged or of another kind)"
        ) from None
    if not isinstance(header, dict):
        raise refuse("not a safetensors file: its header is not a JSON object")
    data_size = size - 8 - header_size
    tensors = {}
    for name, entry in header.items():
        if name == "__metadata__":
            continue
        if not isinstance(entry, dict) or not {"dtype", "shape", "data_offsets"} <= set(entry):
            raise refuse(f"the header's entry of tensor {name!r} is not a tensor description")
        dtype, shape, offsets = entry["dtype"], entry["shape"], entry["data_offsets"]
        if dtype not in SAFETENSORS_DTYPE_BITS:
            raise refuse(f"tensor {name!r} has the unknown dtype {dtype!r}")
        if not isinstance(shape, list) or not all(isinstance(n, int) and n >= 0 for n in shape):
            raise refuse(f"tensor {name!r} has the shape {shape!r}, not a list of whole numbers")
        if not (
            isinstance(offsets, list) and len(offsets) == 2 and all(isinstance(n, int) and n >= 0 for n in offsets)
        ):
            raise refuse(f"tensor {name!r} has the data offsets {offsets!r}, not two whole numbers")
        begin, end = offsets
        needed = math.ceil(math.prod(shape) * SAFETENSORS_DTYPE_BITS[dtype] / 8)
        if end > data_size or begin > end:
            raise refuse(
                f"tensor {name!r} ({dtype} {shape}, {needed:,} bytes) lies at bytes {begin:,} to {end:,} of "
                f"{data_size:,} bytes of data (the file is truncated or damaged)"
            )
        if end - begin != needed:
            raise refuse(
                f"tensor {name!r} ({dtype} {shape}) needs {needed:,} bytes but is given {end - begin:,} (the file is "
                "damaged)"
            )
        tensors[name] = entry
    return tensors


def weights_files(directory: Path) -> list[Path]:
    """
    The safetensors files a model directory's weights are in: `model.safetensors`, or the shards its index names;
    empty when it has neither (transformers then looks for other formats and says what is missing).

    Raises:
        `ModelWeightsError`: an index that cannot be read, or naming a shard that is not there.
    """
    single = directory / WEIGHTS_NAME
    if single.exists() or single.is_symlink():
        return [single]
    index = directory / WEIGHTS_INDEX_NAME
    if not index.is_file():
        return []
    try:
        weight_map = json.loads(index.read_text())["weight_map"]
        shards = sorted(set(weight_map.values()))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError, KeyError, TypeError, AttributeError) as error:
        raise ModelWeightsError(
            f"{index}: not a readable weights index ({one_line(error)}); re-save the model with save_pretrained."
        ) from None
    absent = [name for name in shards if not (directory / name).is_file()]
    if absent:
        raise ModelWeightsError(
            f"{directory}: the weights index names shards that are not there: {describe_keys(absent)}; copy the "
            "whole model directory, or re-save it with save_pretrained."
        )
    return [directory / name for name in shards]


def block_types_of_weights(names: Iterable[str]) -> list[str] | None:
    """
    The block pattern a complete set of tensor names was saved from (`"plain"`: queries and keys, no refinement;
    `"refined"`: both; `"shared"`: a refinement without queries and keys), or `None` when the names hold no blocks.
    """
    found: dict[int, set[str]] = {}
    for name in names:
        match = _BLOCK_KEY.match(name)
        if match:
            found.setdefault(int(match.group(1)), set()).add(match.group(2))
    if not found:
        return None
    kinds = []
    for index in range(max(found) + 1):
        parts = found.get(index, set())
        queries = bool(parts - {"refiner"})  # shared blocks compute no queries or keys
        kinds.append("shared" if not queries else "refined" if "refiner" in parts else "plain")
    return kinds


def non_finite_tensors(state_dict: Mapping[str, torch.Tensor]) -> dict[str, int]:
    """The floating-point tensors holding NaN or infinite values, with how many values of each are not finite."""
    bad = {}
    for name, tensor in state_dict.items():
        if (tensor.is_floating_point() or tensor.is_complex()) and tensor.device.type != "meta":
            count = tensor.numel() - int(torch.isfinite(tensor).sum())
            if count:
                bad[name] = count
    return bad


def check_finite_weights(model: torch.nn.Module, source: str) -> None:
    """
    Refuses a model with NaN or infinite weights or buffers (a damaged file, a diverged run), naming the tensors.

    Raises:
        `ModelWeightsError`: listing the first few tensors and how many values of each are not finite.
    """
    state_dict = model.state_dict()
    bad = non_finite_tensors(state_dict)
    if bad:
        names = sorted(bad)
        listed = ", ".join(f"'{name}' ({bad[name]:,} of {state_dict[name].numel():,})" for name in names[:KEYS_SHOWN])
        more = ", ..." if len(names) > KEYS_SHOWN else ""
        raise ModelWeightsError(
            f"{source}: non-finite values (NaN or infinity) in {len(names)} tensors: {listed}{more}. The weights are "
            "damaged or come from a diverged run: use an earlier checkpoint, or re-convert the original one."
        )


@dataclass
class LoadedModel:
    """
    A model loaded by [`load_model_checked`], and the tensors it was allowed to lack (left initialised), if any.
    """

    model: RefinerViTForImageClassification
    initialised: list[str] = field(default_factory=list)


def _config_dict(source: str, flag: str, cache_dir: str | None) -> dict:
    try:
        config = PreTrainedConfig.get_config_dict(source, cache_dir=cache_dir)[0]
    except (OSError, ValueError) as error:
        raise loading_error(flag, source, error) from None
    model_type = config.get("model_type")
    if model_type != RefinerViTConfig.model_type:
        raise UsageError(
            f"{flag} {source}: a {model_type!r} model, not a Refiner-ViT (model_type 'refiner-vit'); give a "
            "Refiner-ViT model directory or Hub id."
        )
    return config


def _mismatch_message(
    flag: str,
    source: str,
    missing: list[str],
    unexpected: list[str],
    mismatched: list[str],
    config: dict,
    saved_names: Iterable[str] | None,
) -> str:
    problems = []
    if missing:
        problems.append(f"{describe_keys(missing)} missing")
    if unexpected:
        problems.append(f"{describe_keys(unexpected)} not in the model (unexpected)")
    if mismatched:
        problems.append(f"{describe_keys(mismatched)} of another shape")
    what = f"{flag} {source}: the weights do not fit the model its config.json describes: " + "; ".join(problems)
    saved = block_types_of_weights(saved_names) if saved_names is not None else None
    if config.get("block_types") is None:
        pattern = f" (they have block_types {saved})" if saved else ""
        return (
            f"{what}. config.json has no block_types, so the default pattern (plain, shared, plain, ...) was built, "
            f"but the weights are of another pattern{pattern}: the config does not describe the weights. Add the "
            "block_types of the model that wrote them to config.json, or re-save (or re-convert) the model."
        )
    if saved and not missing and saved != list(config["block_types"]):
        return (
            f"{what}. Its config.json has block_types {list(config['block_types'])} but the weights have {saved}: "
            "the config does not describe the weights; re-save (or re-convert) the model."
        )
    return (
        f"{what}. The directory is incomplete or damaged: copy it again, re-save the model with save_pretrained, or "
        "re-convert its original checkpoint."
    )


def load_model_checked(
    source: str,
    flag: str = "--model",
    allow_missing: Callable[[str], bool] | None = None,
    cache_dir: str | None = None,
    **kwargs,
) -> LoadedModel:
    """
    Loads a [`RefinerViTForImageClassification`] with every tensor checked: the weights files first
    ([`check_safetensors_file`], for a local directory), then transformers' loading report
    (`output_loading_info=True`), in which any missing, unexpected or mismatched tensor is an error (transformers
    would leave those parameters randomly initialised after a warning), then the values (all finite).

    Args:
        source: a model directory or Hub id.
        flag: the command-line flag that gave it, for messages.
        allow_missing: tensors that may be absent (e.g. a classifier head that fine-tuning replaces), by name.
        cache_dir: transformers' cache directory.
        kwargs: passed to `from_pretrained` (configuration overrides, `dtype`).

    Raises:
        `UsageError`: `source` is not there, not a model directory, or not a Refiner-ViT.
        `ModelWeightsError`: a damaged weights file, weights that do not fit the configuration, non-finite values.
        `ModelTooLargeError`: a configuration too large to build (see `check_model_size`).
    """
    check_model_path(flag, source)
    config = _config_dict(source, flag, cache_dir)
    saved_names = None
    directory = Path(source).expanduser()
    if directory.is_dir():
        saved_names = []
        for path in weights_files(directory):
            saved_names += check_safetensors_file(path)
    verbosity = transformers_logging.get_verbosity()
    transformers_logging.set_verbosity_error()  # its load report: the problems are reported below, as one line
    try:
        model, info = RefinerViTForImageClassification.from_pretrained(
            source, output_loading_info=True, ignore_mismatched_sizes=True, cache_dir=cache_dir, **kwargs
        )
    except SafetensorError as error:
        raise ModelWeightsError(
            f"{flag} {source}: its weights cannot be read ({one_line(error)}); re-save the model with "
            "save_pretrained, or re-convert its original checkpoint."
        ) from None
    except DataError:
        raise
    except (RuntimeError, EOFError, pickle.UnpicklingError) as error:  # transformers' refusals, a damaged .bin file
        reason = one_line(error).split(". ")[0].rstrip(".")
        raise ModelWeightsError(
            f"{flag} {source}: its weights cannot be loaded ({reason}); the file is damaged: re-save the model with "
            "save_pretrained, or re-convert its original checkpoint."
        ) from None
    except (OSError, ValueError) as error:
        raise loading_error(flag, source, error) from None
    finally:
        transformers_logging.set_verbosity(verbosity)
    allow_missing = allow_missing or (lambda name: False)
    missing = sorted(info["missing_keys"])
    initialised = [name for name in missing if allow_missing(name)]
    missing = [name for name in missing if not allow_missing(name)]
    unexpected = sorted(info["unexpected_keys"])
    mismatched = sorted(entry[0] if isinstance(entry, tuple) else entry for entry in info["mismatched_keys"])
    if missing or unexpected or mismatched:
        raise ModelWeightsError(_mismatch_message(flag, source, missing, unexpected, mismatched, config, saved_names))
    check_finite_weights(model, f"{flag} {source}")
    return LoadedModel(model, initialised)


def is_classifier_head(name: str) -> bool:
    """Whether a tensor name is one of the classifier heads' (class token or auxiliary)."""
    return name.startswith(_HEAD_PREFIXES)


def load_image_processor_checked(
    source: str,
    config: RefinerViTConfig,
    flag: str = "--model",
    processor_class: type | None = None,
    cache_dir: str | None = None,
    **changes,
):
    """
    The image processor of a model directory (or Hub id) and a note saying where it came from. Only a processor that
    is not there falls back to the evaluation processor for `config` (and the note says so); one whose
    `preprocessor_config.json` is there but cannot be read or fails the processor's checks is an error.

    Args:
        source: the model directory or Hub id.
        config: the model's configuration (for the default processor).
        flag: the command-line flag that gave `source`, for messages.
        processor_class: the class to load with (default: `AutoImageProcessor`).
        cache_dir: transformers' cache directory.
        changes: settings that replace the saved ones (`crop_pct`, `size`, ...); the default processor takes
            `crop_pct`.

    Returns:
        `(processor, note)`.

    Raises:
        `ImageProcessorConfigError`: naming the file and the field.
    """
    from transformers import AutoImageProcessor

    try:
        path = cached_file(
            source,
            PROCESSOR_NAME,
            cache_dir=cache_dir,
            _raise_exceptions_for_missing_entries=False,
            _raise_exceptions_for_connection_errors=False,
        )
    except OSError:
        path = None
    if path is None:
        processor = image_processor_for_config(config, crop_pct=changes.get("crop_pct"))
        return processor, (
            f"{NO_IMAGE_PROCESSOR} ({PROCESSOR_NAME}): the evaluation one for its configuration (crop_pct "
            f"{processor.crop_pct})"
        )
    loader = processor_class or AutoImageProcessor
    try:
        processor = loader.from_pretrained(source, cache_dir=cache_dir, **changes)
    except (OSError, ValueError, TypeError, KeyError) as error:
        text = "not valid JSON" if "not a valid JSON file" in str(error) else one_line(error).rstrip(".")
        raise ImageProcessorConfigError(
            f"{path}: {text}. Fix the file, or delete it to use the evaluation processor for the model's configuration."
        ) from None
    return processor, "its image processor"


__all__ = [
    "NO_IMAGE_PROCESSOR",
    "ImageProcessorConfigError",
    "LoadedModel",
    "ModelWeightsError",
    "block_types_of_weights",
    "check_finite_weights",
    "check_safetensors_file",
    "describe_keys",
    "is_classifier_head",
    "load_image_processor_checked",
    "load_model_checked",
    "non_finite_tensors",
    "weights_files",
]
