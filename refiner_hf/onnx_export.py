"""
Deployment exports of Refiner-ViT: `torch.export` programs and ONNX models (optionally with int8 linear layers) of
the reference computation, checked against the PyTorch model with ONNX Runtime.

[`export_program`] gives the `torch.export.ExportedProgram` of a classifier (input `pixel_values` with a dynamic
batch dimension, outputs `logits` and optionally `cls_logits` / `aux_logits`), for AOTInductor, ExecuTorch or any
other consumer of exported programs. [`export_onnx`] writes the same computation as an ONNX model with the dynamo
exporter of `torch.onnx`, and [`quantize_int8`] quantizes its linear layers with ONNX Runtime's dynamic
quantization. [`save_onnx_directory`] writes an export directory (`model.onnx`, `config.json`,
`preprocessor_config.json`, and `model_quantized.onnx` when asked) all at once, after checking that ONNX Runtime
reproduces the model's outputs on a real photo through the image processor; [`OnnxImageClassifier`] classifies
images with such a directory and no PyTorch model.

Exports always trace the reference computation (operation by operation, as in the original code), also from a model
on the fast path (the default, `attn_implementation="fused"`): its fused C++ kernels are not operators an exporter
knows.
"""

from __future__ import annotations

import copy
import math
import os
import time
from collections.abc import Iterable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import PIL.Image
import PIL.ImageOps
import torch
from torch import nn
from transformers import AutoConfig, AutoImageProcessor

from .cli import UsageError
from .configuration_refiner_vit import RefinerViTConfig
from .loading import check_finite_weights
from .model_directory import DirectoryLayout, ModelDirectoryError, write_directory
from .modeling_refiner_vit import RefinerViTForImageClassification, count_parameters


if TYPE_CHECKING:
    import onnxruntime


ONNX_NAME = "model.onnx"
ONNX_DATA_NAME = "model.onnx.data"  # weights beside the graph, only for models over protobuf's 2 GiB
QUANTIZED_ONNX_NAME = "model_quantized.onnx"  # optimum's name for a quantized model beside model.onnx
ONNX_FILES = (ONNX_NAME, ONNX_DATA_NAME, QUANTIZED_ONNX_NAME)
OUTPUT_NAMES = ("logits", "cls_logits", "aux_logits")
# The dynamo exporter emits opset 18 and later; 20 is the newest that ONNX Runtime releases of the last two years run
# and has a Gelu operator (the MLP's activation), which keeps the graph close to the model.
MIN_OPSET = 18
DEFAULT_OPSET = 20
# The newest opset the installed exporter writes (torch.onnx's own bound; 23 in torch 2.9 to 2.14).
try:
    from torch.onnx._constants import ONNX_MAX_OPSET as MAX_OPSET
except ImportError:  # pragma: no cover - a torch that moved it
    MAX_OPSET = 23
# ONNX Runtime's outputs must equal the PyTorch model's within this, relative to their scale (max(1, max |value|)):
# the same float32 computation, in another order.
EXPORT_RELATIVE_TOLERANCE = 1e-4
# Batch sizes of the check: 1 (what the exporter's example batch of 2 does not show) and 3 (a batch that is not the
# example's either); together they prove the batch dimension dynamic.
CHECK_BATCH_SIZES = (1, 3)
_EXAMPLE_BATCH_SIZE = 2

ONNX_EXPORT_DIRECTORY = DirectoryLayout(
    description="ONNX export directory",
    files=frozenset(
        {
            "config.json",
            "preprocessor_config.json",
            ONNX_NAME,
            ONNX_DATA_NAME,
            QUANTIZED_ONNX_NAME,
            "README.md",
            ".gitattributes",
        }
    ),
    required=(frozenset({"config.json"}), frozenset({ONNX_NAME})),
    required_description=f"config.json and {ONNX_NAME}",
)


class ExportError(UsageError):
    """An export that cannot be made as asked (an output the model does not have, an opset too old, ...)."""


class ExportTooLargeError(UsageError):
    """An export whose estimated memory exceeds the machine's."""


def check_opset(opset: int) -> None:
    """
    Raises:
        `ExportError`: an opset the exporter does not write (before [`MIN_OPSET`] or after [`MAX_OPSET`]).
    """
    if not MIN_OPSET <= opset <= MAX_OPSET:
        raise ExportError(
            f"--opset {opset}: the exporter writes opsets {MIN_OPSET} to {MAX_OPSET}; choose one of them (default "
            f"{DEFAULT_OPSET})."
        )


# What an export's check holds at once, measured on CPU (tracing, ONNX Runtime's session and both forward passes of
# the largest check batch): about 15 attention maps of that batch for an expansion of 2, growing with the expansion
# of the refinement (whose intermediate maps have `expansion` times the heads), on top of the weights' copies and
# about 1 GiB of libraries.
_MAPS_PER_EXPANSION = 5
_WEIGHT_COPIES = 8
_BASE_MEMORY = 2**30


def export_memory_estimate(config: RefinerViTConfig, image_size: int | None = None, batch_size: int = 3) -> int:
    """
    Estimated peak memory in bytes of exporting and checking a model of `config` at `image_size` (default: its own):
    the attention maps of a batch of `batch_size` images (tokens^2 x heads, times the refinement's expansion and the
    copies the check's forward passes and ONNX Runtime hold) and the copies of the weights.
    """
    image_size = image_size or config.image_size
    tokens = (image_size // config.patch_size) ** 2 + 1
    expansions = [
        config.refine_expansion if kind == "refined" else config.shared_expansion if kind == "shared" else 0
        for kind in config.block_types
    ]
    maps = batch_size * config.num_attention_heads * tokens**2 * 4
    weights = 4 * count_parameters_at(config, image_size)
    return _BASE_MEMORY + _WEIGHT_COPIES * weights + _MAPS_PER_EXPANSION * (1 + max(expansions, default=0)) * maps


def count_parameters_at(config: RefinerViTConfig, image_size: int) -> int:
    """The parameters of a model of `config` resized to `image_size` (the position embedding grows with it)."""
    tokens = (image_size // config.patch_size) ** 2 + 1
    return count_parameters(config) + (tokens - config.num_patches - 1) * config.hidden_size


def machine_memory() -> int:
    """The machine's physical memory in bytes (0 when the system does not tell)."""
    try:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError, AttributeError):
        return 0


def check_export_memory(config: RefinerViTConfig, image_size: int | None = None, memory: int | None = None) -> None:
    """
    Refuses an export whose [`export_memory_estimate`] exceeds the machine's memory, before anything is allocated,
    naming the estimate, the memory and the largest image size (a multiple of the patch size) that fits.

    Raises:
        `ExportTooLargeError`: the export does not fit.
    """
    memory = machine_memory() if memory is None else memory
    image_size = image_size or config.image_size
    needed = export_memory_estimate(config, image_size)
    if not memory or needed <= memory:
        return
    patch = config.patch_size
    low, high = 0, image_size // patch  # the largest grid that fits, by bisection (the estimate grows with it)
    while low < high:
        middle = (low + high + 1) // 2
        if export_memory_estimate(config, middle * patch) <= memory:
            low = middle
        else:
            high = middle - 1
    fits = (
        f"the largest image size that fits is {low * patch} (--image-size {low * patch})"
        if low
        else ("no image size fits")
    )
    raise ExportTooLargeError(
        f"Exporting and checking at {image_size} px needs about {needed / 2**30:,.1f} GiB "
        f"(attention maps of {(image_size // patch) ** 2 + 1:,} tokens squared x {config.num_attention_heads} heads), "
        f"more than this machine's {memory / 2**30:,.1f} GiB of memory; {fits}."
    )


def require_onnx_packages() -> None:
    """Imports what ONNX export and checking need, or says how to install it."""
    missing = []
    for name in ("onnx", "onnxruntime", "onnxscript"):
        try:
            __import__(name)
        except ImportError:
            missing.append(name)
    if missing:
        raise ExportError(
            f"ONNX export needs {', '.join(missing)}: install them with `pip install 'refiner-hf[export]'`."
        )


class ClassifierOutputs(nn.Module):
    """
    A Refiner-ViT classifier as a function of `pixel_values` alone, returning the named outputs as a tuple: the
    signature exporters trace (no optional arguments, no output dataclass).
    """

    def __init__(self, model: RefinerViTForImageClassification, outputs: Sequence[str] = ("logits",)) -> None:
        super().__init__()
        self.model = model
        self.outputs = tuple(outputs)

    def forward(self, pixel_values: torch.Tensor) -> tuple[torch.Tensor, ...]:
        output = self.model(pixel_values=pixel_values)
        return tuple(getattr(output, name) for name in self.outputs)


def check_outputs(model: RefinerViTForImageClassification, outputs: Iterable[str]) -> tuple[str, ...]:
    """
    The outputs an export will have, in order: `logits` first, then those of `outputs` asked for besides it.

    Raises:
        `ExportError`: an unknown output, or `aux_logits` of a model without the auxiliary head.
    """
    asked = list(dict.fromkeys(outputs))
    unknown = [name for name in asked if name not in OUTPUT_NAMES]
    if unknown:
        raise ExportError(f"Unknown output {unknown[0]!r}: choose among {', '.join(OUTPUT_NAMES)}.")
    if "aux_logits" in asked and model.aux_classifier is None:
        raise ExportError(
            "This model has no auxiliary head (`use_aux_head` is false), so it has no `aux_logits` to export: leave "
            "aux_logits out of the outputs."
        )
    return ("logits",) + tuple(name for name in OUTPUT_NAMES[1:] if name in asked)


@contextmanager
def reference_computation(model: nn.Module) -> Iterator[nn.Module]:
    """
    Evaluation mode and the reference computation for the duration (whatever `set_fast_inference()` said), both
    restored afterwards: what exports trace.
    """
    switched = [(module, module.fast_inference) for module in model.modules() if hasattr(module, "fast_inference")]
    training = model.training
    try:
        for module, _ in switched:
            module.fast_inference = False
        yield model.eval()
    finally:
        for module, enabled in switched:
            module.fast_inference = enabled
        model.train(training)


def example_pixel_values(config: RefinerViTConfig, batch_size: int = _EXAMPLE_BATCH_SIZE) -> torch.Tensor:
    """A batch of random images of the model's size, to trace with."""
    size = config.image_size
    generator = torch.Generator().manual_seed(0)
    return torch.randn(batch_size, config.num_channels, size, size, generator=generator)


def _dynamic_batch() -> dict[str, dict[int, Any]]:
    return {"pixel_values": {0: torch.export.Dim("batch_size", min=1, max=4096)}}


def export_program(
    model: RefinerViTForImageClassification, outputs: Sequence[str] = ("logits",)
) -> torch.export.ExportedProgram:
    """
    The `torch.export` program of `model`'s reference computation in evaluation mode: input `pixel_values` of shape
    `(batch_size, num_channels, image_size, image_size)` with a dynamic batch size; outputs `logits` and those of
    `outputs` asked for besides it, in the order of [`OUTPUT_NAMES`]. Save it with `torch.export.save`, compile it
    with AOTInductor, or lower it to ExecuTorch.

    Example:

    ```python
    >>> program = export_program(model, outputs=("logits", "cls_logits"))
    >>> torch.export.save(program, "refiner-vit.pt2")
    >>> logits, cls_logits = torch.export.load("refiner-vit.pt2").module()(pixel_values)
    ```
    """
    outputs = check_outputs(model, outputs)
    with reference_computation(model), torch.no_grad():
        return torch.export.export(
            ClassifierOutputs(model, outputs).eval(),
            (example_pixel_values(model.config),),
            dynamic_shapes=_dynamic_batch(),
            strict=False,
        )


def export_onnx(
    model: RefinerViTForImageClassification,
    path: str | os.PathLike,
    outputs: Sequence[str] = ("logits",),
    opset: int = DEFAULT_OPSET,
) -> Path:
    """
    Writes `model`'s reference computation in evaluation mode as an ONNX model with the dynamo exporter of
    `torch.onnx`: input `pixel_values` (float32, `(batch_size, num_channels, image_size, image_size)`, dynamic batch
    size), outputs named as in `outputs`, the ONNX graph optimised by onnxscript, without the exporter's stack
    traces. Weights go inside the file unless it would pass protobuf's 2 GiB limit (then into `<name>.data` beside
    it).

    Raises:
        `ExportError`: an opset before [`MIN_OPSET`], an output the model does not have, or missing packages.
    """
    require_onnx_packages()
    outputs = check_outputs(model, outputs)
    check_opset(opset)
    path = Path(path)
    with reference_computation(model), torch.no_grad():
        program = torch.onnx.export(
            ClassifierOutputs(model, outputs).eval(),
            (example_pixel_values(model.config),),
            input_names=["pixel_values"],
            output_names=list(outputs),
            dynamic_shapes=_dynamic_batch(),
            opset_version=opset,
            dynamo=True,
            optimize=True,
            verbose=False,
        )
    # The exporter records each node's Python stack trace, full of this machine's absolute paths: not for a file that
    # is shared. The module scopes it records beside them stay (they map nodes back to layers in profilers).
    for node in program.model.graph.all_nodes():
        node.metadata_props.pop("pkg.torch.onnx.stack_trace", None)
    program.save(path)
    return path


def quantize_int8(source: str | os.PathLike, destination: str | os.PathLike, per_channel: bool = True) -> Path:
    """
    Writes `source` with its linear layers in int8: ONNX Runtime's dynamic quantization of every matrix product with
    a constant weight (int8 weights, one scale per output channel with `per_channel`; activations quantized to uint8
    per batch at run time). Convolutions, the attention's products and the refinement stay float32. The model goes
    through ONNX Runtime's quantization pre-processing first (graph optimisation and shape inference), as its
    documentation recommends.
    """
    require_onnx_packages()
    from onnxruntime.quantization import QuantType, quantize_dynamic
    from onnxruntime.quantization.shape_inference import quant_pre_process

    destination = Path(destination)
    prepared = destination.with_name(destination.stem + ".preprocessed.onnx")
    try:
        # Symbolic shape inference is for transformer graphs ONNX Runtime knows; this one needs only ONNX's own.
        quant_pre_process(str(source), str(prepared), skip_symbolic_shape=True)
        quantize_dynamic(
            prepared,
            destination,
            op_types_to_quantize=["MatMul", "Gemm"],
            per_channel=per_channel,
            weight_type=QuantType.QInt8,
            extra_options={"MatMulConstBOnly": True},
        )
    finally:
        prepared.unlink(missing_ok=True)
    return destination


def onnx_session(
    path: str | os.PathLike, threads: int | None = None, spinning: bool = True
) -> onnxruntime.InferenceSession:
    """
    An ONNX Runtime CPU session of the model at `path` (`threads` intra-op threads; default: ONNX Runtime's). Without
    `spinning`, its threads sleep as soon as a run ends instead of busy-waiting for the next one (for benchmarks that
    alternate it with PyTorch, whose threads would otherwise share the cores with spinning ones).

    Raises:
        `ModelDirectoryError`: ONNX Runtime cannot load the file (missing, damaged, or not an ONNX model).
    """
    require_onnx_packages()
    import onnxruntime

    options = onnxruntime.SessionOptions()
    options.log_severity_level = 3  # errors only: the optimiser's notes are not the user's business
    if threads:
        options.intra_op_num_threads = threads
    if not spinning:
        options.add_session_config_entry("session.intra_op.allow_spinning", "0")
    try:
        return onnxruntime.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
    except Exception as error:  # onnxruntime's own exception types (Fail, InvalidProtobuf, NoSuchFile, ...)
        first_line = (str(error).strip().splitlines() or [type(error).__name__])[0]
        raise ModelDirectoryError(f"ONNX Runtime cannot load {path}: {first_line}") from None


def onnx_opset(path: str | os.PathLike) -> int:
    """The default-domain opset of the ONNX model at `path` (its weights are not read)."""
    require_onnx_packages()
    import onnx

    model = onnx.load(str(path), load_external_data=False)
    return next(entry.version for entry in model.opset_import if entry.domain in ("", "ai.onnx"))


def check_images(image: PIL.Image.Image, batch_size: int) -> list[PIL.Image.Image]:
    """`batch_size` different views of one photo (itself, mirrored, upside down, ...), so that batches mix images."""
    views = [
        image,
        PIL.ImageOps.mirror(image),
        PIL.ImageOps.flip(image),
        image.rotate(90, expand=True),
        PIL.ImageOps.grayscale(image).convert("RGB"),
    ]
    return [views[index % len(views)] for index in range(batch_size)]


@dataclass
class OutputComparison:
    """
    How far one export's outputs are from the PyTorch model's, over the check's batches.

    Args:
        max_difference (`dict[str, float]`): the largest difference of each output.
        scale (`dict[str, float]`): each output's scale, max(1, max |value|) of the PyTorch model's.
        top1_agreement (`float`): the share of images whose top-1 class is the same.
        batch_sizes (`tuple[int, ...]`): the batch sizes compared.
    """

    max_difference: dict[str, float]
    scale: dict[str, float]
    top1_agreement: float
    batch_sizes: tuple[int, ...]

    def relative(self, name: str = "logits") -> float:
        return self.max_difference[name] / self.scale[name]


def _finite_scale(values: np.ndarray) -> float:
    finite = values[np.isfinite(values)]
    return max(1.0, float(np.abs(finite).max()) if finite.size else 0.0)


def compare_outputs(
    session: onnxruntime.InferenceSession,
    model: RefinerViTForImageClassification,
    batches: Sequence[tuple[torch.Tensor, np.ndarray]],
    tolerance: float | None = EXPORT_RELATIVE_TOLERANCE,
    what: str = "ONNX Runtime",
) -> OutputComparison:
    """
    Runs each batch through `session` (its `pixel_values` as ONNX Runtime gets them) and `model`'s reference
    computation (as PyTorch gets them), and compares every output the session has. A NaN or infinite value on either
    side is an error (NaN against NaN is no proof), and with a `tolerance`, so is an output that differs by more than
    `tolerance` times its scale.

    Raises:
        `ModelDirectoryError`: naming the output, the batch size and the difference.
    """
    names = [output.name for output in session.get_outputs()]
    unknown = [name for name in names if name not in OUTPUT_NAMES]
    if unknown or session.get_inputs()[0].name != "pixel_values":
        raise ModelDirectoryError(
            f"The ONNX model's input and outputs ({session.get_inputs()[0].name}; {', '.join(names)}) are not "
            "pixel_values and a Refiner-ViT's outputs: it was not written by this exporter."
        )
    differences = dict.fromkeys(names, 0.0)
    scales = dict.fromkeys(names, 1.0)
    agree = total = 0
    for pixel_values, onnx_pixel_values in batches:
        with reference_computation(model), torch.no_grad():
            expected = model(pixel_values=pixel_values)
        actual = dict(zip(names, session.run(names, {"pixel_values": onnx_pixel_values})))
        for name in names:
            reference = getattr(expected, name).numpy()
            got = actual[name]
            if got.shape != reference.shape:
                raise ModelDirectoryError(
                    f"{what}'s {name} have shape {got.shape}, the PyTorch model's {reference.shape}, at batch size "
                    f"{len(pixel_values)}."
                )
            non_finite = {
                "the PyTorch model's": reference.size - int(np.isfinite(reference).sum()),
                f"{what}'s": got.size - int(np.isfinite(got).sum()),
            }
            if any(non_finite.values()):  # NaN against NaN must never pass as "no difference"
                described = " and ".join(f"{side} {count:,}" for side, count in non_finite.items() if count)
                raise ModelDirectoryError(
                    f"Non-finite {name} (NaN or infinity) at batch size {len(pixel_values)}: {described} of "
                    f"{reference.size:,}; such an export cannot be checked (the model's weights hold NaN or infinity, "
                    "or its computation overflows)."
                )
            scale = _finite_scale(reference)
            scales[name] = max(scales[name], scale)
            difference = float(np.abs(got - reference).max())
            if tolerance is not None and not difference <= tolerance * scale:
                raise ModelDirectoryError(
                    f"{what}'s {name} differ from the PyTorch model's by {difference:.3g} (more than "
                    f"{tolerance * scale:.3g}, {tolerance:g} of their scale {scale:.3g}) at batch size "
                    f"{len(pixel_values)}."
                )
            differences[name] = max(differences[name], difference)
        agree += int((actual["logits"].argmax(-1) == expected.logits.argmax(-1).numpy()).sum())
        total += len(pixel_values)
    return OutputComparison(
        max_difference=differences,
        scale=scales,
        top1_agreement=agree / max(total, 1),
        batch_sizes=tuple(len(pixel_values) for pixel_values, _ in batches),
    )


def check_batches(
    image: PIL.Image.Image, image_processor, onnx_image_processor=None, batch_sizes: Sequence[int] = CHECK_BATCH_SIZES
) -> list[tuple[torch.Tensor, np.ndarray]]:
    """
    The check's batches: views of `image` prepared by `image_processor` for PyTorch and by `onnx_image_processor`
    (the one written beside the ONNX model; by default the same) for ONNX Runtime, which must agree exactly.

    Raises:
        `ModelDirectoryError`: the written image processor prepares the images differently.
    """
    batches = []
    for batch_size in batch_sizes:
        images = check_images(image, batch_size)
        pixel_values = image_processor(images, return_tensors="pt")["pixel_values"].float()
        onnx_pixel_values = pixel_values
        if onnx_image_processor is not None:
            onnx_pixel_values = onnx_image_processor(images, return_tensors="pt")["pixel_values"].float()
            if onnx_pixel_values.shape != pixel_values.shape or not torch.equal(onnx_pixel_values, pixel_values):
                raise ModelDirectoryError(
                    "The written preprocessor_config.json prepares images differently from the model's image processor."
                )
        batches.append((pixel_values, onnx_pixel_values.numpy()))
    return batches


@dataclass
class OnnxExport:
    """
    What [`save_onnx_directory`] wrote and proved.

    Args:
        directory (`Path`): the export directory.
        outputs (`tuple[str, ...]`): the ONNX model's outputs.
        opset (`int`): its opset.
        seconds (`float`): how long the export (tracing, translation, optimisation) took.
        sizes (`dict[str, int]`): the size in bytes of each ONNX file written.
        fp32 (`OutputComparison`): ONNX Runtime against the PyTorch model, within [`EXPORT_RELATIVE_TOLERANCE`].
        int8 (`OutputComparison`, *optional*): the quantized model against the PyTorch model (reported, not bounded).
    """

    directory: Path
    outputs: tuple[str, ...]
    opset: int
    seconds: float
    sizes: dict[str, int] = field(default_factory=dict)
    fp32: OutputComparison | None = None
    int8: OutputComparison | None = None


def export_config(model: RefinerViTForImageClassification) -> RefinerViTConfig:
    """
    The configuration written beside the ONNX model: the model's, with an `auto_map` naming only the configuration
    (an export directory has no modeling code to name), so that it loads with or without the package installed.
    """
    config = copy.deepcopy(model.config)
    config.auto_map = None
    config.architectures = [type(model).__name__]
    return config


def write_export_files(
    directory: Path,
    model: RefinerViTForImageClassification,
    image_processor,
    outputs: Sequence[str],
    opset: int,
    quantize: str | None,
) -> float:
    """Writes the export's files into `directory`; returns the seconds the ONNX export took."""
    export_config(model).save_pretrained(directory)
    image_processor.save_pretrained(directory)
    start = time.perf_counter()
    export_onnx(model, directory / ONNX_NAME, outputs=outputs, opset=opset)
    seconds = time.perf_counter() - start
    if quantize == "int8":
        quantize_int8(directory / ONNX_NAME, directory / QUANTIZED_ONNX_NAME)
    return seconds


def verify_onnx_directory(
    directory: str | os.PathLike,
    model: RefinerViTForImageClassification,
    image_processor,
    image: PIL.Image.Image,
    batch_sizes: Sequence[int] = CHECK_BATCH_SIZES,
) -> tuple[OutputComparison, OutputComparison | None]:
    """
    Proves that `directory` holds an export of `model`: `config.json` loads back as the model's configuration,
    `preprocessor_config.json` prepares `image` exactly as `image_processor` does, and ONNX Runtime's outputs of
    `model.onnx` on views of `image` at each of `batch_sizes` equal the PyTorch model's within
    [`EXPORT_RELATIVE_TOLERANCE`] of their scale. `model_quantized.onnx`, when there, is compared too (its
    difference is returned, not bounded: int8 is an approximation).

    Raises:
        `ModelDirectoryError`: naming what does not hold.
    """
    directory = Path(directory)
    config = AutoConfig.from_pretrained(directory)
    volatile = {"_name_or_path", "transformers_version", "auto_map", "architectures"}
    saved, expected = config.to_dict(), model.config.to_dict()
    differing = sorted(k for k in set(saved) | set(expected) if k not in volatile and saved.get(k) != expected.get(k))
    if differing:
        raise ModelDirectoryError(f"{directory}: config.json is not the model's configuration (fields {differing}).")
    written_processor = AutoImageProcessor.from_pretrained(directory)
    batches = check_batches(image, image_processor, written_processor, batch_sizes)
    fp32 = compare_outputs(onnx_session(directory / ONNX_NAME), model, batches)
    int8 = None
    if (directory / QUANTIZED_ONNX_NAME).is_file():
        int8 = compare_outputs(onnx_session(directory / QUANTIZED_ONNX_NAME), model, batches, tolerance=None)
        if not all(math.isfinite(value) for value in int8.max_difference.values()):
            raise ModelDirectoryError(f"{directory}: the int8 model's outputs are not finite.")
    return fp32, int8


def save_onnx_directory(
    model: RefinerViTForImageClassification,
    image_processor,
    output_dir: str | os.PathLike,
    image: PIL.Image.Image,
    outputs: Sequence[str] = ("logits",),
    opset: int = DEFAULT_OPSET,
    quantize: str | None = None,
    overwrite: bool = False,
    protected: Iterable[str | os.PathLike] = (),
    overwrite_flag: str = "overwrite=True",
) -> OnnxExport:
    """
    Writes an ONNX export directory of `model` with [`~model_directory.write_directory`]: `model.onnx` (see
    [`export_onnx`]), `config.json`, `preprocessor_config.json` (with the configuration and processing code, so that
    they load with `trust_remote_code=True` where the package is not installed) and, with `quantize="int8"`,
    `model_quantized.onnx` (see [`quantize_int8`]). The directory is checked ([`verify_onnx_directory`], on `image`)
    under a hidden name and moved into place only when ONNX Runtime reproduces the model, so a failure or an
    interruption leaves nothing half-written; `overwrite` replaces only an export directory written before.

    Raises:
        `ExportError`: the export cannot be made as asked.
        `ModelWeightsError`: the model's weights hold NaN or infinity.
        `ModelDirectoryError`: the output directory is refused, writing failed, or the check failed.
    """
    require_onnx_packages()
    outputs = check_outputs(model, outputs)
    if quantize not in (None, "int8"):
        raise ExportError(f"Unknown quantization {quantize!r}: the only one is int8.")
    check_opset(opset)
    check_finite_weights(model, "The model")
    result = OnnxExport(directory=Path(output_dir), outputs=outputs, opset=opset, seconds=0.0)

    def write(staging: Path) -> None:
        result.seconds = write_export_files(staging, model, image_processor, outputs, opset, quantize)

    def verify(staging: Path) -> None:
        result.fp32, result.int8 = verify_onnx_directory(staging, model, image_processor, image)
        result.sizes = {name: (staging / name).stat().st_size for name in ONNX_FILES if (staging / name).is_file()}

    write_directory(
        output_dir,
        write,
        verify=verify,
        overwrite=overwrite,
        protected=protected,
        overwrite_flag=overwrite_flag,
        layout=ONNX_EXPORT_DIRECTORY,
    )
    return result


class OnnxImageClassifier:
    """
    Image classification with an export directory and ONNX Runtime alone (no PyTorch model): the directory's image
    processor prepares the images, the ONNX model scores them, and the configuration names the classes. Called like
    transformers' image-classification pipeline.

    Example:

    ```python
    >>> classifier = OnnxImageClassifier.from_pretrained("refiner-vit-onnx")  # or file_name="model_quantized.onnx"
    >>> classifier("photo.jpg", top_k=3)
    [{'label': 'tabby, tabby cat', 'score': 0.62}, ...]
    ```
    """

    def __init__(self, session: onnxruntime.InferenceSession, image_processor, id2label: dict[int, str]) -> None:
        self.session = session
        self.image_processor = image_processor
        self.id2label = id2label

    @classmethod
    def from_pretrained(
        cls, directory: str | os.PathLike, file_name: str = ONNX_NAME, threads: int | None = None, **kwargs
    ) -> OnnxImageClassifier:
        """Loads an export directory; `kwargs` go to `AutoConfig` / `AutoImageProcessor.from_pretrained`."""
        config = AutoConfig.from_pretrained(directory, **kwargs)
        processor = AutoImageProcessor.from_pretrained(directory, **kwargs)
        session = onnx_session(Path(directory) / file_name, threads=threads)
        return cls(session, processor, {int(index): label for index, label in config.id2label.items()})

    def logits(self, images) -> np.ndarray:
        """The `logits` of a batch of images (anything the image processor takes)."""
        pixel_values = self.image_processor(images, return_tensors="np")["pixel_values"].astype(np.float32)
        return self.session.run(["logits"], {"pixel_values": pixel_values})[0]

    def __call__(self, images, top_k: int = 5) -> list[dict[str, Any]] | list[list[dict[str, Any]]]:
        single = not isinstance(images, (list, tuple))
        logits = self.logits([images] if single else list(images))
        probabilities = np.exp(logits - logits.max(-1, keepdims=True))
        probabilities /= probabilities.sum(-1, keepdims=True)
        results = []
        for row in probabilities:
            best = np.argsort(-row, kind="stable")[:top_k]
            results.append([{"label": self.id2label[int(i)], "score": float(row[i])} for i in best])
        return results[0] if single else results


__all__ = [
    "CHECK_BATCH_SIZES",
    "DEFAULT_OPSET",
    "EXPORT_RELATIVE_TOLERANCE",
    "MIN_OPSET",
    "ONNX_DATA_NAME",
    "ONNX_EXPORT_DIRECTORY",
    "ONNX_FILES",
    "ONNX_NAME",
    "OUTPUT_NAMES",
    "QUANTIZED_ONNX_NAME",
    "ClassifierOutputs",
    "ExportError",
    "ExportTooLargeError",
    "MAX_OPSET",
    "check_export_memory",
    "check_finite_weights",
    "check_opset",
    "export_memory_estimate",
    "machine_memory",
    "OnnxExport",
    "OnnxImageClassifier",
    "OutputComparison",
    "check_outputs",
    "compare_outputs",
    "export_onnx",
    "export_program",
    "onnx_opset",
    "onnx_session",
    "quantize_int8",
    "reference_computation",
    "save_onnx_directory",
    "verify_onnx_directory",
]
