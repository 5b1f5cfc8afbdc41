"""
Inference throughput of Refiner-ViT: the reference path, the fast path (`model.set_fast_inference()`), the ONNX
export run by ONNX Runtime (fp32 and int8 linear layers, CPU), and a transformers `ViTForImageClassification` of
DeiT-S size with random weights, in fp32, bf16 (autocast) and compiled (`torch.compile`), measured in alternation in
one run. Prints images per second and the ratios fast / reference, fast / DeiT-S and ONNX Runtime / fast; it is a
benchmark, not a test.

    python benchmarks/bench_inference.py                                  # Refiner-ViT-S, 224 px, batch 1 and 8
    python benchmarks/bench_inference.py --batch-size 8 --no-compile
    python benchmarks/bench_inference.py --model refiner-vit-l --image-size 448 --dtype fp32 --no-compile --rounds 3 \\
        --reference-max-batch 1
    python benchmarks/bench_inference.py --model refiner-vit-l --image-size 448 --batch-size 2 --device cuda

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
    deit_small_vit,
    interleaved_medians,
    machine_description,
    refiner,
)


def parse_args() -> argparse.Namespace:
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
    parser.add_argument("--rounds", type=int, default=5, help="Alternations of the three models (median kept).")
    parser.add_argument("--seconds", type=float, default=1.0, help="Approximate length of one measurement.")
    return parser.parse_args()


def main() -> None:
    args = parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    models = {
        "reference": refiner(args.model, args.image_size, args.seed),
        "deit-s": deit_small_vit(args.image_size, args.seed),
    }
    models["fast"] = copy.deepcopy(models["reference"])
    models["fast"].set_fast_inference()
    models = {name: model.to(device).eval() for name, model in models.items()}

    with torch.no_grad():  # also builds the fused kernels before any timing or compilation
        check = torch.randn(2, 3, args.image_size, args.image_size, device=device)
        expected = models["reference"](check).logits
        difference = (models["fast"](check).logits - expected).abs().max().item()
    print(f"# {args.model} at {args.image_size} px on {machine_description(device)}")
    print(f"# fast vs reference, fp32 logits: max abs difference {difference:.2e}")
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
                autocast = dtype == "bf16"

                def forward(model, pixel_values=pixel_values, autocast=autocast):
                    with torch.no_grad(), torch.autocast(device.type, dtype=torch.bfloat16, enabled=autocast):
                        return model(pixel_values).logits

                candidates = {name: (lambda model=model: forward(model)) for name, model in runners.items()}
                if args.reference_max_batch is not None and batch_size > args.reference_max_batch:
                    del candidates["reference"]
                if mode == "eager" and dtype == "fp32":
                    inputs = {"pixel_values": pixel_values.numpy()}
                    for name, session in sessions.items():
                        candidates[name] = lambda session=session, inputs=inputs: session.run(["logits"], inputs)
                if mode == "compiled":
                    start = time.perf_counter()
                    for fn in candidates.values():
                        fn()
                    print(f"# compiled for batch {batch_size}, {dtype} in {time.perf_counter() - start:.0f} s")
                seconds = interleaved_medians(candidates, device, args.rounds, args.seconds)
                images = {name: batch_size / value for name, value in seconds.items()}
                rows.append((batch_size, dtype, mode, images))
                print(
                    f"# batch {batch_size} {dtype} {mode}: "
                    + ", ".join(f"{name} {value:.2f} img/s" for name, value in images.items())
                )

    print()
    print("| batch | precision | mode | reference img/s | fast img/s | DeiT-S-size ViT img/s | fast / reference "
          "| fast / DeiT-S |")  # fmt: skip
    print("|---|---|---|---|---|---|---|---|")
    for batch_size, dtype, mode, images in rows:
        print(
            f"| {batch_size} | {dtype} | {mode} | {rate(images, 'reference')} | {rate(images, 'fast')} | "
            f"{rate(images, 'deit-s')} | {ratio(images, 'fast', 'reference')} | {ratio(images, 'fast', 'deit-s')} |"
        )
    onnx_rows = [(batch_size, images) for batch_size, _, _, images in rows if "onnx-fp32" in images]
    if onnx_rows:
        print()
        print("| batch | reference img/s | fast img/s | ONNX Runtime fp32 img/s | ONNX Runtime int8 img/s "
              "| DeiT-S-size ViT img/s | ORT fp32 / fast | ORT int8 / fast | ORT int8 / DeiT-S |")  # fmt: skip
        print("|---|---|---|---|---|---|---|---|---|")
        for batch_size, images in onnx_rows:
            print(
                f"| {batch_size} | {rate(images, 'reference')} | {rate(images, 'fast')} | "
                f"{rate(images, 'onnx-fp32')} | {rate(images, 'onnx-int8')} | {rate(images, 'deit-s')} | "
                f"{ratio(images, 'onnx-fp32', 'fast')} | {ratio(images, 'onnx-int8', 'fast')} | "
                f"{ratio(images, 'onnx-int8', 'deit-s')} |"
            )
    work_dir.cleanup()


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
