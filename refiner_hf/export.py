"""
Command line: export a Refiner-ViT model to ONNX (optionally with int8 linear layers) for ONNX Runtime.

    refiner-vit-export --model outputs/refiner-vit-fashion-mnist/model --output refiner-vit-onnx
    python -m refiner_hf.export --model refiner-vit-l-448 --output refiner-vit-l-448-onnx --quantize int8
    refiner-vit-export --model refiner-vit-l-448 --output refiner-vit-l-448-onnx --check   # re-check an export

The output directory holds `model.onnx` (input `pixel_values`, output `logits`, and `cls_logits` / `aux_logits` with
`--extra-outputs`; a dynamic batch dimension), `config.json` and `preprocessor_config.json` (with their code, for
`trust_remote_code=True` without the package), and `model_quantized.onnx` with `--quantize int8`. The export traces
the reference computation, never the fast path's C++ kernels. Before anything is reported as done, ONNX Runtime's
outputs on a real photo prepared by the written image processor must equal the PyTorch model's within 1e-4 of their
scale at two batch sizes; the directory is written under a hidden name and moved into place only then, so a failure
or an interruption leaves nothing half-written.
"""

from __future__ import annotations

import sys
from collections.abc import Sequence
from pathlib import Path

import torch
from transformers import AutoConfig
from transformers.utils import logging

from .assets import sample_image_path
from .cli import ArgumentParser, UsageError, check_model_path, check_output_path, command_status
from .convert_checkpoint import load_photo
from .loading import load_image_processor_checked, load_model_checked
from .model_directory import OutputLock, check_output_directory
from .modeling_refiner_vit import RefinerViTForImageClassification
from .onnx_export import (
    DEFAULT_OPSET,
    EXPORT_RELATIVE_TOLERANCE,
    MAX_OPSET,
    MIN_OPSET,
    ONNX_DATA_NAME,
    ONNX_EXPORT_DIRECTORY,
    ONNX_FILES,
    ONNX_NAME,
    OUTPUT_NAMES,
    QUANTIZED_ONNX_NAME,
    OnnxExport,
    OutputComparison,
    check_export_memory,
    check_opset,
    check_outputs,
    onnx_opset,
    require_onnx_packages,
    save_onnx_directory,
    verify_onnx_directory,
)


PROG = "refiner-vit-export"


def parse_args(argv: Sequence[str] | None = None):
    parser = ArgumentParser(
        prog=PROG,
        description="Export a Refiner-ViT model directory (or Hub model) to ONNX for ONNX Runtime, checked against "
        "the PyTorch model before it is written.",
    )
    parser.add_argument("--model", required=True, help="A Refiner-ViT model directory or Hub model id.")
    parser.add_argument(
        "--output", "--output-dir", dest="output", type=Path, required=True, help="The export directory to write."
    )
    parser.add_argument(
        "--opset",
        type=int,
        default=DEFAULT_OPSET,
        help=f"ONNX opset (default {DEFAULT_OPSET}; {MIN_OPSET} to {MAX_OPSET}).",
    )
    parser.add_argument(
        "--image-size",
        type=int,
        help="Export for another resolution: the position embedding is resized, and the image processor with it "
        "(default: the model's).",
    )
    parser.add_argument(
        "--quantize",
        choices=("int8",),
        help=f"Also write {QUANTIZED_ONNX_NAME}: ONNX Runtime's dynamic int8 quantization of the linear layers.",
    )
    parser.add_argument(
        "--extra-outputs",
        nargs="+",
        choices=OUTPUT_NAMES[1:],
        default=[],
        help="Outputs besides `logits`: the class token's head (cls_logits) and the auxiliary head's per-token "
        "logits (aux_logits).",
    )
    parser.add_argument("--image", type=Path, default=sample_image_path(), help="Photo for the check.")
    parser.add_argument(
        "--check",
        action="store_true",
        help="Check an existing export at --output against --model (nothing is written). Every export is checked "
        "the same way before it is written.",
    )
    parser.add_argument(
        "--overwrite",
        action="store_true",
        help="Replace an export directory written before at --output (never a folder holding other files).",
    )
    return parser.parse_args(argv)


def load_model(source: str, image_size: int | None) -> tuple[RefinerViTForImageClassification, object, str]:
    """
    The Refiner-ViT classifier at `source` in float32, every tensor checked ([`~loading.load_model_checked`]), its
    image processor (the evaluation one for its configuration only when the source has none), both at `image_size`
    when given, and a note on where the processor came from.

    Raises:
        `UsageError`: `source` is not there, not a model directory, or not a Refiner-ViT.
        `DataError`: weights that are damaged, do not fit the configuration or are not finite; an invalid
            `preprocessor_config.json`; a model too large for this machine.
    """
    model = load_model_checked(source, "--model", dtype=torch.float32).model.eval()
    processor, note = load_image_processor_checked(source, model.config, "--model")
    if image_size and image_size != model.config.image_size:
        try:
            model.resize_position_embeddings(image_size)
        except ValueError as error:
            raise UsageError(f"--image-size {image_size}: {error}") from None
        size = {"shortest_edge": image_size}, {"height": image_size, "width": image_size}
        processor = type(processor).from_dict({**processor.to_dict(), "size": size[0], "crop_size": size[1]})
        note += f", resized to {image_size} px"
    return model, processor, note


def describe(comparison: OutputComparison, name: str = "logits") -> str:
    return f"max difference {comparison.max_difference[name]:.2g} (scale {comparison.scale[name]:.3g})"


def report(result: OnnxExport, image_name: str) -> None:
    """Prints what was checked, the files' sizes and, for int8, what quantization changed."""
    fp32, sizes = result.fp32, result.sizes
    batches = " and ".join(str(b) for b in fp32.batch_sizes)
    per_output = "; ".join(f"{name} {describe(fp32, name)}" for name in result.outputs)
    print(
        f"ONNX Runtime reproduces the PyTorch model on {image_name} (prepared by the written image processor) at "
        f"batch sizes {batches}: {per_output}; tolerance {EXPORT_RELATIVE_TOLERANCE:g} of the scale."
    )
    size = sizes[ONNX_NAME] + sizes.get(ONNX_DATA_NAME, 0)
    print(f"{ONNX_NAME}: {size / 1e6:.1f} MB, opset {result.opset}, outputs {', '.join(result.outputs)}.")
    if result.int8 is not None:
        int8, quantized = result.int8, sizes[QUANTIZED_ONNX_NAME]
        print(
            f"{QUANTIZED_ONNX_NAME} (int8 linear layers): {quantized / 1e6:.1f} MB ({quantized / size:.2f}x); logits "
            f"{describe(int8)}, {100 * int8.relative():.2g} % of their scale; same top-1 as PyTorch on "
            f"{100 * int8.top1_agreement:.0f} % of the check's images."
        )


def check_arguments(args) -> None:
    """Refuses flag values that cannot be meant, before anything is loaded."""
    if args.image_size is not None and args.image_size <= 0:
        raise UsageError(
            f"--image-size {args.image_size}: give a positive number of pixels (a multiple of the model's patch size), "
            "or leave it out to export at the model's own size."
        )
    if not args.check:
        check_opset(args.opset)


def source_config(source: str):
    """The configuration of a Refiner-ViT at `source`, or `None` when it cannot be read (the loading names why)."""
    check_model_path("--model", source)
    try:
        config = AutoConfig.from_pretrained(source)
    except (OSError, ValueError):
        return None
    return config if config.model_type == "refiner-vit" else None


def export(args) -> int:
    """The command: refusals of what cannot work first, then the export under the output directory's lock."""
    check_arguments(args)
    require_onnx_packages()
    if args.check:
        return export_or_check(args)
    check_output_path("--output", args.output)
    protected = [args.model] if Path(args.model).exists() else []
    check_output_directory(
        args.output, args.overwrite, protected=protected, overwrite_flag="--overwrite", layout=ONNX_EXPORT_DIRECTORY
    )
    with OutputLock(args.output):  # one writer at a time, from the start: a second export is refused now
        return export_or_check(args)


def export_or_check(args) -> int:
    """Checks the export at `args.output` with `--check`, else exports; the sizes and weights are checked first."""
    protected = [args.model] if Path(args.model).exists() else []
    if args.check:
        names = {p.name for p in args.output.iterdir()} if args.output.is_dir() else set()
        if not ONNX_EXPORT_DIRECTORY.is_complete(names):
            raise UsageError(
                f"--check {args.output}: not an export directory (no config.json and {ONNX_NAME}); export first "
                "without --check (every export is checked before it is written)."
            )
        if args.image_size is None:  # check at the resolution the export was made for
            args.image_size = AutoConfig.from_pretrained(args.output).image_size
    config = source_config(args.model)
    if config is not None:  # refused before the model (and a resized position embedding) is allocated
        check_export_memory(config, args.image_size)
    image = load_photo(args.image)
    model, processor, note = load_model(args.model, args.image_size)
    check_export_memory(model.config)
    outputs = check_outputs(model, args.extra_outputs)
    config = model.config
    print(
        f"Loaded {args.model}: {config.matching_preset() or 'custom Refiner-ViT'}, {model.num_parameters():,} "
        f"parameters, {config.image_size} px, {config.num_labels} classes; {note}."
    )
    if args.check:
        fp32, int8 = verify_onnx_directory(args.output, model, processor, image)
        sizes = {name: (args.output / name).stat().st_size for name in ONNX_FILES if (args.output / name).is_file()}
        result = OnnxExport(
            args.output, tuple(fp32.max_difference), onnx_opset(args.output / ONNX_NAME), 0.0, sizes, fp32, int8
        )
        report(result, args.image.name)
        print(f"{args.output} holds a correct export of {args.model}.")
        return 0
    result = save_onnx_directory(
        model,
        processor,
        args.output,
        image,
        outputs=outputs,
        opset=args.opset,
        quantize=args.quantize,
        overwrite=args.overwrite,
        protected=protected,
        overwrite_flag="--overwrite",
    )
    print(f"Exported the reference computation to ONNX in {result.seconds:.0f} s.")
    report(result, args.image.name)
    print(f"Wrote {args.output}")
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    """Runs the command; returns its exit status (see `refiner_hf.cli` for the error policy)."""
    logging.disable_progress_bar()
    return command_status(lambda: export(parse_args(argv)), PROG)


if __name__ == "__main__":
    sys.exit(main())
