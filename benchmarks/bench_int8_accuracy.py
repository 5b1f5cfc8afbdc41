#!/usr/bin/env python
"""
What int8 costs: top-1 on the embedded Fashion-MNIST validation set (1,000 images) of a trained model's ONNX export,
in fp32 and with int8 linear layers, against the PyTorch model, all fed by the model's own image processor.

The int8 variants: ONNX Runtime's dynamic quantization with one scale per output channel (what `refiner-vit-export
--quantize int8` writes) and with one scale per tensor, and static quantization (QDQ, activation ranges calibrated
on training images) of the same linear layers. Prints, for each, the top-1, the share of images whose top-1 is the
PyTorch model's, the largest logit difference relative to the logits' scale, and the file size:

    python examples/run_imagenet.py                   # trains the default model (a few minutes on 2 CPU cores)
    python benchmarks/bench_int8_accuracy.py          # or --model DIR, a model trained on the embedded data

It is a benchmark, not a test: the figures it prints are the result.
"""

from __future__ import annotations

import argparse
import tempfile
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from transformers import AutoImageProcessor

from refiner_hf import RefinerViTForImageClassification
from refiner_hf.assets import sample_image_path
from refiner_hf.onnx_export import (
    ONNX_NAME,
    QUANTIZED_ONNX_NAME,
    onnx_session,
    quantize_int8,
    reference_computation,
    save_onnx_directory,
)
from refiner_hf.training.embedded_data import SUBSET_FILE, class_names


ROOT = Path(__file__).resolve().parents[1]
DEFAULT_MODEL = ROOT / "outputs" / "refiner-vit-fashion-mnist" / "model"


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", type=Path, default=DEFAULT_MODEL, help="A model trained on the embedded data.")
    parser.add_argument("--limit", type=int, help="Evaluate the first N validation images only (default: all).")
    parser.add_argument("--calibration-images", type=int, default=256, help="Training images for static ranges.")
    parser.add_argument("--batch-size", type=int, default=100)
    parser.add_argument("--work-dir", type=Path, help="Where to write the exports (default: a temporary directory).")
    return parser.parse_args(argv)


def embedded_images(split: str, limit: int | None = None) -> tuple[list[Image.Image], np.ndarray]:
    """A split of the embedded data as RGB images (what the trainer's data pipeline gives the processor)."""
    with np.load(SUBSET_FILE) as arrays:
        images, labels = arrays[f"{split}_images"][:limit], arrays[f"{split}_labels"][:limit]
    return [Image.fromarray(image.astype(np.uint8)).convert("RGB") for image in images], labels.astype(np.int64)


def quantize_static_int8(source: Path, destination: Path, calibration: list[np.ndarray]) -> Path:
    """The linear layers in int8 with activation ranges calibrated on `calibration` batches (QDQ format)."""
    from onnxruntime.quantization import CalibrationDataReader, QuantFormat, QuantType, quantize_static
    from onnxruntime.quantization.shape_inference import quant_pre_process

    class Batches(CalibrationDataReader):
        def __init__(self) -> None:
            self.batches = iter(calibration)

        def get_next(self):
            batch = next(self.batches, None)
            return None if batch is None else {"pixel_values": batch}

    prepared = destination.with_name("static.preprocessed.onnx")
    quant_pre_process(str(source), str(prepared), skip_symbolic_shape=True)
    quantize_static(
        prepared,
        destination,
        Batches(),
        quant_format=QuantFormat.QDQ,
        op_types_to_quantize=["MatMul", "Gemm"],
        per_channel=True,
        activation_type=QuantType.QUInt8,
        weight_type=QuantType.QInt8,
        extra_options={"MatMulConstBOnly": True},
    )
    prepared.unlink()
    return destination


@dataclass
class Row:
    name: str
    top1: float
    agreement: float
    relative_difference: float
    megabytes: float | None


def evaluate(
    name: str,
    logits_of: Callable[[np.ndarray], np.ndarray],
    batches: list[np.ndarray],
    labels: np.ndarray,
    reference: np.ndarray | None,
    path: Path | None = None,
) -> tuple[Row, np.ndarray]:
    logits = np.concatenate([logits_of(batch) for batch in batches])
    predictions = logits.argmax(-1)
    if reference is None:
        reference = logits
    scale = max(1.0, float(np.abs(reference).max()))
    row = Row(
        name=name,
        top1=100 * float((predictions == labels).mean()),
        agreement=100 * float((predictions == reference.argmax(-1)).mean()),
        relative_difference=float(np.abs(logits - reference).max()) / scale,
        megabytes=path.stat().st_size / 1e6 if path is not None else None,
    )
    return row, logits


def main(argv: Sequence[str] | None = None) -> list[Row]:
    args = parse_args(argv)
    if not (args.model / "config.json").is_file():
        raise SystemExit(
            f"{args.model}: no model there; train the default one first with `python examples/run_imagenet.py`, or "
            "pass --model with a model trained on the embedded Fashion-MNIST data."
        )
    model = RefinerViTForImageClassification.from_pretrained(args.model, dtype=torch.float32).eval()
    if [model.config.id2label[i] for i in range(model.config.num_labels)] != class_names():
        raise SystemExit(f"{args.model} does not classify the embedded Fashion-MNIST classes.")
    processor = AutoImageProcessor.from_pretrained(args.model)
    temporary = tempfile.TemporaryDirectory(prefix="bench_int8_")
    work_dir = args.work_dir or Path(temporary.name)
    export_dir = work_dir / "onnx"

    photo = Image.open(sample_image_path()).convert("RGB")
    save_onnx_directory(model, processor, export_dir, photo, quantize="int8", overwrite=True)
    images, labels = embedded_images("validation", args.limit)
    batches = [
        processor(images[i : i + args.batch_size], return_tensors="np")["pixel_values"].astype(np.float32)
        for i in range(0, len(images), args.batch_size)
    ]
    calibration_images, _ = embedded_images("train", args.calibration_images)
    calibration = [
        processor(calibration_images[i : i + args.batch_size], return_tensors="np")["pixel_values"].astype(np.float32)
        for i in range(0, len(calibration_images), args.batch_size)
    ]
    per_tensor = quantize_int8(export_dir / ONNX_NAME, work_dir / "per_tensor.onnx", per_channel=False)
    static = quantize_static_int8(export_dir / ONNX_NAME, work_dir / "static.onnx", calibration)

    def pytorch(batch: np.ndarray) -> np.ndarray:
        with reference_computation(model), torch.no_grad():
            return model(torch.from_numpy(batch)).logits.numpy()

    def session_logits(path: Path) -> Callable[[np.ndarray], np.ndarray]:
        session = onnx_session(path)
        return lambda batch: session.run(["logits"], {"pixel_values": batch})[0]

    rows = []
    row, reference = evaluate("PyTorch (reference computation)", pytorch, batches, labels, None)
    rows.append(row)
    variants = [
        ("ONNX Runtime fp32", export_dir / ONNX_NAME),
        ("ONNX Runtime int8, dynamic, per channel (--quantize int8)", export_dir / QUANTIZED_ONNX_NAME),
        ("ONNX Runtime int8, dynamic, per tensor", per_tensor),
        (f"ONNX Runtime int8, static QDQ, {len(calibration_images)} calibration images", static),
    ]
    for name, path in variants:
        rows.append(evaluate(name, session_logits(path), batches, labels, reference, path)[0])

    print(f"# {args.model}: {len(images)} validation images of the embedded Fashion-MNIST subset")
    print()
    print("| model | top-1 (%) | same top-1 as PyTorch (%) | max logit difference / scale | size (MB) |")
    print("|---|---|---|---|---|")
    for row in rows:
        size = f"{row.megabytes:.2f}" if row.megabytes is not None else "–"
        print(f"| {row.name} | {row.top1:.1f} | {row.agreement:.1f} | {row.relative_difference:.2g} | {size} |")
    temporary.cleanup()
    return rows


if __name__ == "__main__":
    main()
