"""
Inference throughput of Refiner-ViT: the reference path, the fast path (`model.set_fast_inference()`: its fused
kernels, C++ on CPU and Triton on CUDA, and its PyTorch implementation), the ONNX export run by ONNX Runtime (fp32
and int8 linear layers; CPU), the original code's `Refiner_ViT` (with `--original-checkout`; under AMP, float16
autocast, on CUDA at bf16), and a transformers `ViTForImageClassification` of DeiT-S size with random weights and
SDPA, in fp32, bf16 (autocast) and compiled (`torch.compile`), measured in alternation in one run. Prints images per
second, the ratios fast / reference and fast / DeiT-S, fast / DeiT-S per multiply-add (the throughput ratio times
Refiner-ViT's multiply-adds over the ViT's) and ONNX Runtime / fast; it is a benchmark, not a test.

    python benchmarks/bench_inference.py                                  # Refiner-ViT-S, 224 px, batch 1 and 8
    python benchmarks/bench_inference.py --batch-size 8 --no-compile
    python benchmarks/bench_inference.py --model refiner-vit-l --image-size 448 --dtype fp32 --no-compile --rounds 3 \\
        --reference-max-batch 1
    python benchmarks/bench_inference.py --model refiner-vit-l --image-size 448 --batch-size 64 --device cuda \\
        --dtype bf16 --no-compile --original-checkout ../Refiner_ViT

ONNX Runtime runs in the fp32 eager rows on CPU, with as many threads as PyTorch (`--no-onnx` leaves it out; it
needs the `export` extra).
"""

import argparse
import copy
import tempfile
import time
from pathlib import Path

import torch
from bench_common import (
    add_common_arguments,
    amp_dtype,
    deit_small_vit,
    interleaved_medians,
    machine_description,
    multiply_adds,
    original_refiner,
    refiner,
    write_json,
)

from refiner_hf.cpu_kernels import set_kernels_enabled
from refiner_hf.triton_support import set_triton_enabled


# The goal for inference on a GPU: the fast path within 0.8x of the DeiT-S-size ViT's throughput per multiply-add.
GOAL_PER_MULTIPLY_ADD = 0.8
NAMES = {
    "reference": "reference",
    "fast": "fast (fused kernels)",
    "fast-pytorch": "fast (PyTorch)",
    "onnx-fp32": "ONNX Runtime fp32",
    "onnx-int8": "ONNX Runtime int8",
    "original": "original code",
    "deit-s": "DeiT-S-size ViT",
}


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_common_arguments(parser)
    parser.add_argument("--batch-size", type=int, nargs="+", default=[1, 8])
    parser.add_argument("--dtype", nargs="+", choices=("fp32", "bf16"), default=["fp32", "bf16"])
    parser.add_argument("--no-compile", action="store_true", help="Skip the torch.compile measurements.")
    parser.add_argument("--no-onnx", action="store_true", help="Skip the ONNX Runtime measurements.")
    parser.add_argument(
        "--reference-max-batch",
        type=int,
        help="Measure the reference path only up to this batch size: it materialises every expanded attention map "
        "(Refiner-ViT-L at 448 px and batch 8 needs about 18 GB).",
    )
    parser.add_argument("--rounds", type=int, default=5, help="Alternations of the models (median kept).")
    parser.add_argument("--seconds", type=float, default=1.0, help="Approximate length of one measurement.")
    return parser.parse_args(argv)


def without_fused_kernels(fn):
    """Runs fn with the fused kernels (C++ and Triton) switched off: the fast path's PyTorch implementation."""

    def run():
        previous_cpu, previous_triton = set_kernels_enabled(False), set_triton_enabled(False)
        try:
            return fn()
        finally:
            set_kernels_enabled(previous_cpu)
            set_triton_enabled(previous_triton)

    return run


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    models = {
        "reference": refiner(args.model, args.image_size, args.seed),
        "deit-s": deit_small_vit(args.image_size, args.seed),
    }
    models["fast"] = copy.deepcopy(models["reference"]).set_fast_inference()
    if args.original_checkout:
        models["original"] = original_refiner(args.original_checkout, args.model, args.image_size, args.seed)
    models = {name: model.to(device).eval() for name, model in models.items()}
    macs = {
        "refiner": multiply_adds(models["reference"], args.image_size, device),  # the same work on every path
        "deit-s": multiply_adds(
            deit_small_vit(args.image_size, args.seed, "eager").to(device), args.image_size, device
        ),
    }

    with torch.no_grad():  # also builds the fused kernels before any timing or compilation
        check = torch.randn(2, 3, args.image_size, args.image_size, device=device)
        expected = models["reference"](check).logits
        difference = (models["fast"](check).logits - expected).abs().max().item()
    machine = machine_description(device)
    print(f"# {args.model} at {args.image_size} px on {machine}")
    print(f"# multiply-adds per image: Refiner-ViT {macs['refiner'] / 1e9:.2f} G, DeiT-S-size ViT "
          f"{macs['deit-s'] / 1e9:.2f} G")  # fmt: skip
    print(f"# fast vs reference, fp32 logits: max abs difference {difference:.2e}")
    if "original" in models:
        counts = [sum(p.numel() for p in models[name].parameters()) for name in ("original", "reference")]
        print(f"# original code from {args.original_checkout}: {counts[0]:,} parameters (here: {counts[1]:,})")
    work_dir = tempfile.TemporaryDirectory(prefix="bench_inference_")
    sessions = {}
    if not args.no_onnx and device.type == "cpu":
        sessions = onnx_sessions(models["reference"], Path(work_dir.name))
        for name, session in sessions.items():
            logits = session.run(["logits"], {"pixel_values": check.numpy()})[0]
            print(f"# {name} vs reference, logits: max abs difference {abs(logits - expected.numpy()).max():.2e}")

    modes = ["eager"] + ([] if args.no_compile else ["compiled"])
    rows = []
    for mode in modes:
        runners = models
        if mode == "compiled":
            # Every model, batch size and precision is its own graph of the same transformers wrapper: without room
            # for them all, dynamo would fall back to eager after the default limit of 8 and time the wrong thing.
            torch._dynamo.config.recompile_limit = 64
            runners = {name: torch.compile(model) for name, model in models.items()}
        for dtype in args.dtype:
            for batch_size in args.batch_size:
                pixel_values = torch.randn(batch_size, 3, args.image_size, args.image_size, device=device)

                def forward(name, model, pixel_values=pixel_values, dtype=dtype):
                    autocast_dtype = amp_dtype(name, dtype, device)
                    enabled = autocast_dtype is not None
                    with torch.no_grad(), torch.autocast(device.type, dtype=autocast_dtype, enabled=enabled):
                        output = model(pixel_values)
                        return output if name == "original" else output.logits

                candidates = {
                    name: (lambda name=name, model=model: forward(name, model)) for name, model in runners.items()
                }
                if mode == "eager":  # a compiled graph keeps the kernels it was traced with
                    candidates["fast-pytorch"] = without_fused_kernels(candidates["fast"])
                if args.reference_max_batch is not None and batch_size > args.reference_max_batch:
                    del candidates["reference"]
                if mode == "eager" and dtype == "fp32":
                    inputs = {"pixel_values": pixel_values.cpu().numpy()}
                    for name, session in sessions.items():
                        candidates[name] = lambda session=session, inputs=inputs: session.run(["logits"], inputs)
                if mode == "compiled":
                    start = time.perf_counter()
                    for fn in candidates.values():
                        fn()
                    print(f"# compiled for batch {batch_size}, {dtype} in {time.perf_counter() - start:.0f} s")
                seconds = interleaved_medians(candidates, device, args.rounds, args.seconds)
                images = {name: batch_size / value for name, value in seconds.items()}
                per_mac = images["fast"] * macs["refiner"] / (images["deit-s"] * macs["deit-s"])
                rows.append({"batch_size": batch_size, "dtype": dtype, "mode": mode, "images_per_s": images,
                             "fast_vs_deit_per_multiply_add": per_mac,
                             "goal_met": per_mac >= GOAL_PER_MULTIPLY_ADD if dtype == "bf16" else None})  # fmt: skip
                print(f"# batch {batch_size} {dtype} {mode}: "
                      + ", ".join(f"{name} {value:.2f} img/s" for name, value in images.items()))  # fmt: skip

    print()
    print(table(rows))
    onnx_rows = [row for row in rows if "onnx-fp32" in row["images_per_s"]]
    if onnx_rows:
        print()
        print(onnx_table(onnx_rows))
    goal_rows = [row for row in rows if row["goal_met"] is not None]
    if goal_rows:
        print()
        print(f"Goal (bf16 fast path vs DeiT-S-size ViT, throughput per multiply-add >= {GOAL_PER_MULTIPLY_ADD}x): "
              + ", ".join(f"batch {row['batch_size']} {row['mode']} {row['fast_vs_deit_per_multiply_add']:.2f}x "
                          f"({'met' if row['goal_met'] else 'not met'})" for row in goal_rows))  # fmt: skip
    write_json(args.json, {"benchmark": "inference", "machine": machine, "model": args.model,
                           "image_size": args.image_size, "multiply_adds": macs, "fast_vs_reference_difference":
                           difference, "rows": rows, "goal_per_multiply_add": GOAL_PER_MULTIPLY_ADD})  # fmt: skip
    work_dir.cleanup()


def table(rows: list[dict]) -> str:
    names = [name for name in NAMES if any(name in row["images_per_s"] for row in rows)]
    header = " | ".join(f"{NAMES[name]} img/s" for name in names)
    lines = [
        f"| batch | precision | mode | {header} | fast / reference | fast / DeiT-S | fast / DeiT-S per multiply-add |",
        "|---|---|---|" + "---|" * len(names) + "---|---|---|",
    ]
    for row in rows:
        images = row["images_per_s"]
        values = " | ".join(rate(images, name) for name in names)
        lines.append(
            f"| {row['batch_size']} | {row['dtype']} | {row['mode']} | {values} | "
            f"{ratio(images, 'fast', 'reference')} | {ratio(images, 'fast', 'deit-s')} | "
            f"**{row['fast_vs_deit_per_multiply_add']:.2f}x** |"
        )
    return "\n".join(lines)


def onnx_table(rows: list[dict]) -> str:
    lines = [
        "| batch | reference img/s | fast img/s | ONNX Runtime fp32 img/s | ONNX Runtime int8 img/s "
        "| DeiT-S-size ViT img/s | ORT fp32 / fast | ORT int8 / fast | ORT int8 / DeiT-S |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for row in rows:
        images = row["images_per_s"]
        lines.append(
            f"| {row['batch_size']} | {rate(images, 'reference')} | {rate(images, 'fast')} | "
            f"{rate(images, 'onnx-fp32')} | {rate(images, 'onnx-int8')} | {rate(images, 'deit-s')} | "
            f"{ratio(images, 'onnx-fp32', 'fast')} | {ratio(images, 'onnx-int8', 'fast')} | "
            f"{ratio(images, 'onnx-int8', 'deit-s')} |"
        )
    return "\n".join(lines)


def rate(images: dict[str, float], name: str) -> str:
    return f"{images[name]:.2f}" if name in images else "–"


def ratio(images: dict[str, float], name: str, other: str) -> str:
    return f"{images[name] / images[other]:.2f}x" if name in images and other in images else "–"


def onnx_sessions(model, directory: Path) -> dict:
    """
    ONNX Runtime sessions of `model`'s export, fp32 and int8, with as many threads as PyTorch uses, which sleep
    between runs (spinning threads would slow down the PyTorch models measured in alternation with them).
    """
    from refiner_hf.onnx_export import export_onnx, onnx_session, quantize_int8

    start = time.perf_counter()
    export_onnx(model, directory / "model.onnx")
    quantize_int8(directory / "model.onnx", directory / "model_quantized.onnx")
    sizes = {name: (directory / name).stat().st_size / 1e6 for name in ("model.onnx", "model_quantized.onnx")}
    print(
        f"# exported to ONNX (and quantized) in {time.perf_counter() - start:.0f} s: model.onnx "
        f"{sizes['model.onnx']:.1f} MB, model_quantized.onnx {sizes['model_quantized.onnx']:.1f} MB"
    )
    threads = torch.get_num_threads()
    return {
        "onnx-fp32": onnx_session(directory / "model.onnx", threads=threads, spinning=False),
        "onnx-int8": onnx_session(directory / "model_quantized.onnx", threads=threads, spinning=False),
    }


if __name__ == "__main__":
    main()
