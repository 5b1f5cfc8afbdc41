"""
Conversion of the original Refiner-ViT checkpoints (the authors' timm-based code) to
[`RefinerViTForImageClassification`].

Checkpoints come in the forms found in the wild: timm's training-script dict (`state_dict`, `state_dict_ema`, `args` as
an `argparse.Namespace`, ...), a bare state dict, either with the `module.` prefix of DistributedDataParallel. The
configuration is inferred from the tensors' names and shapes, every tensor is mapped to exactly one parameter or
buffer of the new model, and anything missing, left over or of the wrong shape is an error naming the keys.
"""

from __future__ import annotations

import argparse
import errno
import math
import os
import pickle
import re
import zipfile
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import torch
from huggingface_hub.errors import StrictDataclassError
from safetensors import SafetensorError

from .cli import DataError, file_kind
from .configuration_refiner_vit import RefinerViTConfig
from .loading import check_safetensors_file, non_finite_tensors
from .modeling_refiner_vit import RefinerViTForImageClassification, count_parameters


# The only non-tensor classes a real checkpoint needs: timm's training script stores its arguments as a Namespace.
SAFE_CHECKPOINT_GLOBALS = [argparse.Namespace]
_DDP_PREFIX = "module."
_MAX_KEYS_SHOWN = 8

# Bounds checked before anything is allocated from what a file declares. PyTorch stores tensors uncompressed in its
# zip archives, and float weights barely compress, so an archive that would inflate to more than twice its size is
# not a checkpoint but a decompression bomb.
MAX_INFLATION = 2.0
# The converted model runs once on a photo to check it; its attention maps grow with the square of the tokens implied
# by the position embedding. 1 + 64 x 64 tokens (1024 px at patch 16) is four times the released L at 448 px (785).
MAX_TOKENS = 4097


class CheckpointError(DataError, ValueError):
    """An original checkpoint that cannot be loaded or converted; the message says which file and why."""


@dataclass
class OriginalWeights:
    """
    The weights taken out of an original checkpoint.

    Args:
        state_dict (`dict[str, torch.Tensor]`): the original tensors, without any `module.` prefix.
        weights (`str`): `"ema"` when they are the model-EMA weights of a timm checkpoint, else `"raw"`.
        source (`str`): where they came from, for messages.
        has_ema (`bool`): whether the checkpoint also held (or was) EMA weights.
    """

    state_dict: dict[str, torch.Tensor]
    weights: Literal["ema", "raw"]
    source: str
    has_ema: bool = False


def _describe_keys(keys) -> str:
    keys = sorted(keys)
    shown = ", ".join(repr(k) for k in keys[:_MAX_KEYS_SHOWN])
    return shown + (f", ... ({len(keys)} in all)" if len(keys) > _MAX_KEYS_SHOWN else "")


def load_checkpoint_file(path: str | os.PathLike) -> object:
    """
    Loads a pickled PyTorch checkpoint without executing code: `torch.load(weights_only=True)`, allowing only
    `argparse.Namespace` beyond tensors and containers.

    Raises:
        `FileNotFoundError`: the file does not exist.
        `CheckpointError`: the file is truncated or corrupt, is not a PyTorch checkpoint, or holds objects that a
            weights-only load refuses (a pickle that would run code is refused this way and never executed).
    """
    path = Path(path)
    if path.is_dir():
        suffixes = (".pth", ".pt", ".tar", ".bin", ".safetensors")
        candidates = sorted(p.name for p in path.iterdir() if p.suffix in suffixes)
        hint = f" (it holds {', '.join(candidates[:5])})" if candidates else ""
        raise CheckpointError(f"{path} is a directory: pass the checkpoint file itself{hint}.")
    if not path.exists():
        raise FileNotFoundError(errno.ENOENT, "Checkpoint file not found", str(path))
    if not path.is_file():  # a FIFO would block and a device such as /dev/zero never end
        raise CheckpointError(f"{path}: {file_kind(path)}, not a regular file; pass the checkpoint file itself.")
    check_declared_sizes(path)
    try:
        with torch.serialization.safe_globals(SAFE_CHECKPOINT_GLOBALS):
            return torch.load(path, map_location="cpu", weights_only=True)
    except SafetensorError as error:
        raise CheckpointError(f"{path}: not a readable safetensors file ({error}).") from None
    except pickle.UnpicklingError as error:
        if "Weights only load failed" in str(error):
            first_line = str(error).strip().splitlines()[0]
            raise CheckpointError(
                f"{path}: refused to load. The file holds objects other than tensors and plain containers, which a "
                f"weights-only load does not allow (nothing in it was executed). {first_line}"
            ) from None
        raise CheckpointError(f"{path}: not a readable PyTorch checkpoint ({error}).") from None
    except (RuntimeError, EOFError, OSError, ValueError, zipfile.BadZipFile, KeyError) as error:
        raise CheckpointError(
            f"{path}: cannot be read as a PyTorch checkpoint; the file looks truncated or corrupt ({error})."
        ) from None


def check_declared_sizes(path: str | os.PathLike) -> None:
    """
    Refuses a checkpoint file whose declared sizes would make loading it allocate far more than the file holds: a zip
    archive (PyTorch's format) that inflates to more than [`MAX_INFLATION`] times its size, or a safetensors file whose
    header claims more than the file has: a header or a tensor reaching past the end of the file (truncated), a tensor
    whose shape needs more bytes than it declares, or a `.safetensors` file that is not one (e.g. a link to another
    file). (PyTorch's legacy format checks its storages against the file itself.)

    Raises:
        `CheckpointError`: naming the file and the sizes.
    """
    path = real = given = Path(path)
    named_suffix, size = path.suffix, path.stat().st_size
    if path.is_symlink():
        real = Path(os.path.realpath(path))
        path = Path(f"{path} (a link to {real})")  # what messages name
    if zipfile.is_zipfile(real):
        try:
            with zipfile.ZipFile(real) as archive:
                declared = sum(info.file_size for info in archive.infolist())
        except (zipfile.BadZipFile, OSError, ValueError) as error:
            raise CheckpointError(f"{path}: a damaged zip archive ({error}).") from None
        if declared > MAX_INFLATION * size:
            raise CheckpointError(
                f"{path}: the archive would inflate to {declared:,} bytes from a {size:,}-byte file. PyTorch stores "
                "tensors uncompressed, so this is not a checkpoint as torch.save writes it; refusing to inflate it."
            )
        return
    with open(real, "rb") as file:
        head = file.read(9)
    if len(head) == 9 and head[8:9] == b"{":  # safetensors: an 8-byte header length, then the JSON header
        check_safetensors_file(given, CheckpointError, advice="give the whole checkpoint file")
        return
    if ".safetensors" in (real.suffix, named_suffix):
        raise CheckpointError(
            f"{path}: not a safetensors file (it does not start with a safetensors header); pass the weights file "
            "itself."
        )


def extract_original_weights(
    checkpoint: Mapping, weights: Literal["ema", "raw"] | None = None, source: str = "checkpoint"
) -> OriginalWeights:
    """
    Takes the model weights out of a loaded original checkpoint.

    Args:
        checkpoint (`Mapping`):
            A timm training-script dict (with `state_dict` and possibly `state_dict_ema`), a `{"model": ...}` dict,
            or a bare state dict, with or without the `module.` prefix.
        weights (`str`, *optional*):
            `"ema"` or `"raw"`. By default the EMA weights when the checkpoint has them (the published accuracies
            are the EMA model's), else the raw ones.
        source (`str`, *optional*):
            Name of the checkpoint for error messages.
    """
    if weights not in (None, "ema", "raw"):
        raise ValueError(f"`weights` must be 'ema', 'raw' or None, got {weights!r}.")
    if not isinstance(checkpoint, Mapping):
        raise CheckpointError(
            f"{source}: expected a state dict or a training checkpoint dict, found a {type(checkpoint).__name__}."
        )
    is_training_dict = any(k in checkpoint for k in ("state_dict", "state_dict_ema", "model"))
    if is_training_dict:
        ema = checkpoint.get("state_dict_ema")
        raw = checkpoint.get("state_dict", checkpoint.get("model"))
        has_ema = ema is not None
        if weights is None:
            weights = "ema" if has_ema else "raw"
        if weights == "ema" and not has_ema:
            raise CheckpointError(
                f"{source}: EMA weights were asked for but the checkpoint has no 'state_dict_ema' "
                f"(its entries: {_describe_keys(checkpoint.keys())})."
            )
        state_dict = ema if weights == "ema" else raw
        if state_dict is None:
            raise CheckpointError(
                f"{source}: the checkpoint has no raw weights ('state_dict' or 'model'); "
                f"its entries: {_describe_keys(checkpoint.keys())}."
            )
    else:
        if weights == "ema":
            raise CheckpointError(f"{source}: EMA weights were asked for but this is a bare state dict without them.")
        state_dict, weights, has_ema = checkpoint, "raw", False
    if not isinstance(state_dict, Mapping) or not state_dict:
        raise CheckpointError(f"{source}: the {weights} weights are not a non-empty state dict.")

    non_tensors = [k for k, v in state_dict.items() if not isinstance(v, torch.Tensor)]
    if non_tensors:
        raise CheckpointError(f"{source}: entries that are not tensors: {_describe_keys(non_tensors)}.")
    keys = list(state_dict)
    if all(k.startswith(_DDP_PREFIX) for k in keys):
        state_dict = {k[len(_DDP_PREFIX) :]: v for k, v in state_dict.items()}
    return OriginalWeights(state_dict=dict(state_dict), weights=weights, source=source, has_ema=has_ema)


def load_original_weights(
    checkpoint: str | os.PathLike | Mapping, weights: Literal["ema", "raw"] | None = None
) -> OriginalWeights:
    """[`load_checkpoint_file`] (for a path) followed by [`extract_original_weights`]."""
    if isinstance(checkpoint, Mapping):
        return extract_original_weights(checkpoint, weights)
    loaded = load_checkpoint_file(checkpoint)
    return extract_original_weights(loaded, weights, source=str(checkpoint))


def _block_indices(state_dict: Mapping[str, torch.Tensor], source: str) -> list[int]:
    indices = sorted({int(m.group(1)) for k in state_dict if (m := re.match(r"blocks\.(\d+)\.", k))})
    if indices != list(range(len(indices))):
        raise CheckpointError(f"{source}: block indices are not contiguous from 0: {indices}.")
    return indices


def _require(state_dict: Mapping[str, torch.Tensor], key: str, source: str, ndim: int | None = None) -> torch.Tensor:
    if key not in state_dict:
        raise CheckpointError(f"{source}: missing tensor {key!r}.")
    tensor = state_dict[key]
    if ndim is not None and tensor.ndim != ndim:
        raise CheckpointError(f"{source}: {key!r} has shape {tuple(tensor.shape)}, expected {ndim} dimensions.")
    return tensor


def infer_config(
    state_dict: Mapping[str, torch.Tensor],
    num_attention_heads: int | None = None,
    source: str = "checkpoint",
    **config_kwargs,
) -> RefinerViTConfig:
    """
    Infers the [`RefinerViTConfig`] of an original state dict (without `module.` prefix) from its keys and shapes:
    hidden size from the class token, image size from the position embedding, the stem from which convolutions exist,
    each block's type from its refinement and query/key/value shapes, heads from `adapt_bn`, the refinement
    expansions from `conv_exp`, MLP size, qkv bias, number of classes and the auxiliary head.

    Args:
        state_dict (`Mapping[str, torch.Tensor]`): the original tensors.
        num_attention_heads (`int`, *optional*):
            Needed only when no block refines its attention (the heads are read from the refinement's BatchNorm).
        source (`str`, *optional*): name of the checkpoint for error messages.
        config_kwargs: further configuration fields that shapes cannot tell, e.g. `layer_norm_eps` or `id2label`.
    """
    markers = ("cls_token", "pos_embed", "blocks.0.attn.proj.weight", "norm.weight")
    if not all(marker in state_dict for marker in markers):
        raise CheckpointError(
            f"{source}: not a Refiner-ViT checkpoint. Expected tensors such as {', '.join(map(repr, markers))}; "
            f"found {_describe_keys(state_dict.keys())}."
        )
    sd = state_dict
    hidden_size = _require(sd, "cls_token", source, ndim=3).shape[-1]

    if "patch_embed.conv1.weight" in sd:
        stem_type = "conv"
        stem_hidden_sizes = [_require(sd, f"patch_embed.conv{i}.weight", source, ndim=4).shape[0] for i in (1, 2, 3)]
        num_channels = sd["patch_embed.conv1.weight"].shape[1]
        patch_size = 2 * _require(sd, "patch_embed.proj.weight", source, ndim=4).shape[-1]
    else:
        stem_type, stem_hidden_sizes = "patch", [32, 64, 128]
        projection = _require(sd, "patch_embed.proj.weight", source, ndim=4)
        num_channels, patch_size = projection.shape[1], projection.shape[-1]

    num_patches = _require(sd, "pos_embed", source, ndim=3).shape[1] - 1
    side = math.isqrt(max(num_patches, 0))
    if num_patches <= 0 or side * side != num_patches:
        raise CheckpointError(
            f"{source}: 'pos_embed' has {num_patches + 1} positions, not 1 + a square number of patches."
        )

    indices = _block_indices(sd, source)
    block_types, heads_seen, expansions = [], set(), {"refined": set(), "shared": set()}
    kernel_sizes = set()
    for i in indices:
        prefix = f"blocks.{i}.attn."
        qkv_rows = _require(sd, prefix + "qkv.weight", source, ndim=2).shape[0]
        refines = any(k.startswith(prefix + "DLA.") for k in sd)
        if qkv_rows == hidden_size:
            if not refines:
                raise CheckpointError(
                    f"{source}: block {i} computes only values (qkv of {qkv_rows} rows) but has no refinement."
                )
            block_type = "shared"
        elif qkv_rows == 3 * hidden_size:
            block_type = "refined" if refines else "plain"
        else:
            raise CheckpointError(
                f"{source}: {prefix}qkv.weight has {qkv_rows} rows; expected {hidden_size} or {3 * hidden_size}."
            )
        block_types.append(block_type)
        if refines:
            heads = _require(sd, prefix + "adapt_bn.weight", source, ndim=1).shape[0]
            heads_seen.add(heads)
            expand = sd.get(prefix + "DLA.conv_exp.weight")
            expansions[block_type].add(1 if expand is None else expand.shape[0] / heads)
            kernel_sizes.add(_require(sd, prefix + "DLA.depth_sep_conv.weight", source, ndim=4).shape[-1])

    if len(heads_seen) > 1:
        raise CheckpointError(f"{source}: blocks disagree on the number of heads: {sorted(heads_seen)}.")
    if heads_seen:
        inferred_heads = heads_seen.pop()
        if num_attention_heads is not None and num_attention_heads != inferred_heads:
            raise CheckpointError(
                f"{source}: num_attention_heads={num_attention_heads} was given but the checkpoint has "
                f"{inferred_heads} heads."
            )
        num_attention_heads = inferred_heads
    elif num_attention_heads is None:
        raise CheckpointError(
            f"{source}: no block refines its attention, so the number of heads cannot be read from the tensors; "
            "pass `num_attention_heads`."
        )
    expansion_values = {}
    for block_type, values in expansions.items():
        if len(values) > 1 or any(v != int(v) for v in values):
            raise CheckpointError(f"{source}: inconsistent refinement expansion in {block_type} blocks: {values}.")
        expansion_values[block_type] = int(values.pop()) if values else 3
    if len(kernel_sizes) > 1:
        raise CheckpointError(f"{source}: blocks disagree on the refinement kernel size: {sorted(kernel_sizes)}.")

    head = _require(sd, "head.weight", source, ndim=2)
    config_fields = {
        "image_size": side * patch_size,
        "patch_size": patch_size,
        "num_channels": num_channels,
        "hidden_size": hidden_size,
        "num_hidden_layers": len(indices),
        "num_attention_heads": num_attention_heads,
        "intermediate_size": _require(sd, "blocks.0.mlp.fc1.weight", source, ndim=2).shape[0],
        "qkv_bias": "blocks.0.attn.qkv.bias" in sd,
        "stem_type": stem_type,
        "stem_hidden_sizes": stem_hidden_sizes,
        "block_types": block_types,
        "refine_expansion": expansion_values["refined"],
        "shared_expansion": expansion_values["shared"],
        "refine_kernel_size": kernel_sizes.pop() if kernel_sizes else 3,
        "use_aux_head": "aux_head.weight" in sd,
        "num_labels": head.shape[0],
    }
    config_fields["mlp_ratio"] = config_fields["intermediate_size"] / hidden_size
    config_fields.update(config_kwargs)
    try:
        return RefinerViTConfig(**config_fields)
    except (ValueError, StrictDataclassError) as error:
        raise CheckpointError(f"{source}: the inferred configuration is inconsistent: {error}") from None


_BLOCK_RULES = [
    (r"norm1\.", "layernorm_before."),
    (r"norm2\.", "layernorm_after."),
    (r"attn\.proj\.", "attention.o_proj."),
    (r"attn\.adapt_bn\.", "attention.adapt_bn."),
    (r"attn\.DLA\.conv_exp\.", "attention.refiner.expand_conv."),
    (r"attn\.DLA\.bn1\.", "attention.refiner.expand_bn."),
    (r"attn\.DLA\.depth_sep_conv\.", "attention.refiner.depthwise_conv."),
    (r"attn\.DLA\.bn2\.", "attention.refiner.depthwise_bn."),
    (r"attn\.DLA\.conv_pro\.", "attention.refiner.project_conv."),
    (r"attn\.DLA\.bn3\.", "attention.refiner.project_bn."),
    (r"mlp\.fc1\.", "mlp.fc1."),
    (r"mlp\.fc2\.", "mlp.fc2."),
    (r"mlp\.scale_channel$", "mlp.layer_scale"),
]
_TOP_RULES = [
    (r"cls_token$", "refiner_vit.embeddings.cls_token"),
    (r"pos_embed$", "refiner_vit.embeddings.position_embeddings"),
    (r"patch_embed\.(conv[123]|bn[123])\.", r"refiner_vit.embeddings.patch_embeddings.\1."),
    (r"patch_embed\.proj\.", "refiner_vit.embeddings.patch_embeddings.projection."),
    (r"norm\.", "refiner_vit.layernorm."),
    (r"head\.", "classifier."),
    (r"aux_head\.", "aux_classifier."),
]


def original_key_to_hf(key: str, block_types: list[str]) -> str | None:
    """The name in [`RefinerViTForImageClassification`] of an original key, or `None` if it has none."""
    if match := re.match(r"blocks\.(\d+)\.(.*)$", key):
        index, rest = int(match.group(1)), match.group(2)
        if index >= len(block_types):
            return None
        prefix = f"refiner_vit.layers.{index}."
        if rest.startswith("attn.qkv."):
            target = "v_proj." if block_types[index] == "shared" else "qkv."
            return prefix + "attention." + target + rest[len("attn.qkv.") :]
        for pattern, replacement in _BLOCK_RULES:
            if re.match(pattern, rest):
                return prefix + re.sub("^" + pattern, replacement, rest)
        return None
    for pattern, replacement in _TOP_RULES:
        if re.match(pattern, key):
            return re.sub("^" + pattern, replacement, key)
    return None


def convert_state_dict(
    state_dict: Mapping[str, torch.Tensor], model: RefinerViTForImageClassification, source: str = "checkpoint"
) -> dict[str, torch.Tensor]:
    """
    Renames an original state dict to `model`'s names and checks that it covers the model exactly: every original
    tensor maps to exactly one parameter or buffer of the same shape, and every parameter and buffer gets one; a float
    parameter or buffer stored as integers (or booleans, or complex numbers) is refused. `model` may live on the meta
    device: only its names, shapes and dtypes are read.

    Raises:
        `CheckpointError`: naming the unexpected, missing, mis-shaped or non-float keys.
    """
    block_types = model.config.block_types
    expected = model.state_dict()
    converted: dict[str, torch.Tensor] = {}
    unexpected, wrong_shape, not_float = [], [], []
    for key, tensor in state_dict.items():
        new_key = original_key_to_hf(key, block_types)
        if new_key is None or new_key not in expected:
            unexpected.append(key)
            continue
        if new_key in converted:
            raise CheckpointError(f"{source}: two tensors map to {new_key!r} (one of them is {key!r}).")
        if tuple(tensor.shape) != tuple(expected[new_key].shape):
            wrong_shape.append(f"{key!r} {tuple(tensor.shape)} (expected {tuple(expected[new_key].shape)})")
            continue
        if expected[new_key].is_floating_point() and not tensor.is_floating_point():
            not_float.append(f"{key!r} ({str(tensor.dtype).removeprefix('torch.')})")
        converted[new_key] = tensor
    # PyTorch before 0.4.1 did not save `num_batches_tracked`; it does not change any output.
    missing = [k for k in expected if k not in converted and not k.endswith("num_batches_tracked")]
    problems = []
    if unexpected:
        problems.append(f"unexpected tensors {_describe_keys(unexpected)}")
    if missing:
        problems.append(f"missing tensors (new names) {_describe_keys(missing)}")
    if wrong_shape:
        problems.append(f"tensors of the wrong shape {', '.join(wrong_shape[:_MAX_KEYS_SHOWN])}")
    if problems:
        raise CheckpointError(f"{source}: does not match the inferred Refiner-ViT architecture: {'; '.join(problems)}.")
    if not_float:
        listed = ", ".join(not_float[:_MAX_KEYS_SHOWN])
        listed += f", ... ({len(not_float)} in all)" if len(not_float) > _MAX_KEYS_SHOWN else ""
        raise CheckpointError(
            f"{source}: float weights stored with a non-float dtype (their fractional part is lost): {listed}. "
            "Convert the checkpoint the weights were trained in, saved as floats."
        )
    for key in expected:
        if key not in converted:
            converted[key] = torch.zeros(expected[key].shape, dtype=expected[key].dtype)
    return converted


def check_data_held(
    state_dict: Mapping[str, torch.Tensor], config: RefinerViTConfig, source: str = "checkpoint"
) -> None:
    """
    Refuses tensors whose shapes claim far more values than the checkpoint holds (broadcast views with zero strides
    saved from a tiny storage), before a model of those shapes is laid out: its parameters may take at most
    [`MAX_INFLATION`] times the bytes of the checkpoint's data (float16 weights become float32).

    Raises:
        `CheckpointError`: naming both sizes.
    """
    storages = {}
    for tensor in state_dict.values():
        storage = tensor.untyped_storage()
        storages[(storage.data_ptr(), storage.nbytes())] = storage.nbytes()
    held = sum(storages.values())
    needed = 4 * count_parameters(config)
    if needed > MAX_INFLATION * held:
        raise CheckpointError(
            f"{source}: the tensors' shapes describe a model of {needed:,} bytes, but the checkpoint holds only "
            f"{held:,} bytes of data (tensors broadcast from a few values); refusing to build it."
        )


def check_finite(state_dict: Mapping[str, torch.Tensor], source: str = "checkpoint") -> None:
    """
    Refuses weights with NaN or infinite values (a diverged run, a damaged file), naming every such tensor.

    Raises:
        `CheckpointError`: listing the tensors and how many values of each are not finite.
    """
    bad = non_finite_tensors(state_dict)
    if bad:
        listed = ", ".join(f"{key!r} ({count:,} of {state_dict[key].numel():,})" for key, count in sorted(bad.items()))
        raise CheckpointError(
            f"{source}: non-finite values (NaN or infinity) in {len(bad)} tensors: {listed}. The checkpoint is damaged "
            "or comes from a diverged run; convert it anyway only if that is what you want (--allow-non-finite, "
            "`allow_non_finite=True`)."
        )


def model_from_original_state_dict(
    state_dict: Mapping[str, torch.Tensor],
    num_attention_heads: int | None = None,
    source: str = "checkpoint",
    allow_non_finite: bool = False,
    max_tokens: int | None = MAX_TOKENS,
    **config_kwargs,
) -> RefinerViTForImageClassification:
    """
    Infers the configuration of an original state dict, checks every tensor against the model it implies, and builds
    that model holding them. Nothing the size of the model is allocated before the checkpoint's tensors have matched
    its architecture exactly (the model is laid out on the meta device first), so a small file whose shapes imply a
    huge model is refused, not built.

    Args:
        state_dict (`Mapping[str, torch.Tensor]`): the original tensors, without `module.` prefix.
        num_attention_heads (`int`, *optional*): only needed when no block refines its attention.
        source (`str`, *optional*): name of the checkpoint for error messages.
        allow_non_finite (`bool`, *optional*, defaults to `False`): convert weights with NaN or infinite values.
        max_tokens (`int`, *optional*, defaults to [`MAX_TOKENS`]): refuse a position embedding of more tokens (the
            attention maps of one image grow with their square); `None` for no bound.
        config_kwargs: further configuration fields that shapes cannot tell.

    Raises:
        `CheckpointError`: naming the tensors or sizes that do not fit.
    """
    config = infer_config(state_dict, num_attention_heads=num_attention_heads, source=source, **config_kwargs)
    tokens = config.num_patches + 1
    if max_tokens is not None and tokens > max_tokens:
        raise CheckpointError(
            f"{source}: the position embedding implies {tokens:,} tokens ({config.image_size} px at patch "
            f"{config.patch_size}), more than the {max_tokens:,} allowed: each attention map of one image would take "
            f"{config.num_attention_heads * tokens**2 * 4 / 2**30:,.1f} GiB. Raise the bound (--max-tokens, "
            "`max_tokens`) only for a model that really is that large."
        )
    check_data_held(state_dict, config, source=source)
    with torch.device("meta"):
        layout = RefinerViTForImageClassification(config)
    converted = convert_state_dict(state_dict, layout, source=source)
    if not allow_non_finite:
        check_finite(state_dict, source=source)
    model = layout.to_empty(device="cpu")
    model.load_state_dict(converted, strict=True)
    return model.eval()


def convert_original_checkpoint(
    checkpoint: str | os.PathLike | Mapping,
    weights: Literal["ema", "raw"] | None = None,
    num_attention_heads: int | None = None,
    allow_non_finite: bool = False,
    max_tokens: int | None = MAX_TOKENS,
    **config_kwargs,
) -> RefinerViTForImageClassification:
    """
    Converts an original Refiner-ViT checkpoint into a [`RefinerViTForImageClassification`] in eval mode.

    Args:
        checkpoint (`str`, `os.PathLike` or `Mapping`):
            A checkpoint file (loaded with `torch.load(weights_only=True)`) or an already loaded checkpoint: a timm
            training-script dict, a `{"model": ...}` dict or a bare state dict, with or without `module.` prefix.
        weights (`str`, *optional*):
            `"ema"` or `"raw"`; by default the EMA weights when present.
        num_attention_heads (`int`, *optional*):
            Only needed when no block refines its attention.
        allow_non_finite (`bool`, *optional*, defaults to `False`):
            Convert weights that hold NaN or infinite values instead of refusing them.
        max_tokens (`int`, *optional*, defaults to [`MAX_TOKENS`]):
            Refuse a model whose position embedding implies more tokens; `None` for no bound.
        config_kwargs:
            Configuration fields that shapes cannot tell (e.g. `layer_norm_eps`, `id2label`).

    Raises:
        `CheckpointError`: the file cannot be read, holds objects a weights-only load refuses, or does not match a
            Refiner-ViT; the message names the file and the tensors.

    Example:

    ```python
    >>> from refiner_hf import convert_original_checkpoint
    >>> model = convert_original_checkpoint("Refiner_ViT_L_448.pth")  # doctest: +SKIP
    >>> model.save_pretrained("refiner-vit-l-448")  # doctest: +SKIP
    ```
    """
    original = load_original_weights(checkpoint, weights)
    return model_from_original_state_dict(
        original.state_dict,
        num_attention_heads=num_attention_heads,
        source=original.source,
        allow_non_finite=allow_non_finite,
        max_tokens=max_tokens,
        **config_kwargs,
    )


__all__ = [
    "MAX_INFLATION",
    "MAX_TOKENS",
    "CheckpointError",
    "OriginalWeights",
    "check_data_held",
    "check_declared_sizes",
    "check_finite",
    "convert_original_checkpoint",
    "convert_state_dict",
    "extract_original_weights",
    "infer_config",
    "load_checkpoint_file",
    "load_original_weights",
    "model_from_original_state_dict",
    "original_key_to_hf",
]
