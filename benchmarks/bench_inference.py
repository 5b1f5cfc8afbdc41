"""
Inference throughput of Refiner-ViT: the reference path, the fast path (`model.set_fast_inference()`: its fused
kernels, C++ on CPU and Triton on CUDA, and its PyTorch implementation), the original code's `Refiner_ViT` (with
`--original-checkout`; under AMP, float16 autocast, on CUDA at bf16), and a transformers `ViTForImageClassification`
of DeiT-S size with random weights and SDPA, in fp32, bf16 (autocast) and compiled (`torch.compile`), measured in
alternation in one run. Prints images per second, the ratios fast / reference and fast / DeiT-S, and fast / DeiT-S
per multiply-add (the throughput ratio times Refiner-ViT's multiply-adds over the ViT's); it is a benchmark, not a
test.

    python benchmarks/bench_inference.py                                  # Refiner-ViT-S, 224 px, batch 1 and 8
    python benchmarks/bench_inference.py --batch-size 8 --no-compile
    python benchmarks/bench_inference.py --model refiner-vit-l --image-size 448 --batch-size 64 --device cuda \\
        --dtype bf16 --no-compile --original-checkout ../Refiner_ViT
"""

import argparse
import copy
import time

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
    "original": "original code",
    "deit-s": "DeiT-S-size ViT",
}


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_common_arguments(parser)
    parser.add_argument("--batch-size", type=int, nargs="+", default=[1, 8])
    parser.add_argument("--dtype", nargs="+", choices=("fp32", "bf16"), default=["fp32", "bf16"])
    parser.add_argument("--no-compile", action="store_true", help="Skip the torch.compile measurements.")
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
    goal_rows = [row for row in rows if row["goal_met"] is not None]
    if goal_rows:
        print()
        print(f"Goal (bf16 fast path vs DeiT-S-size ViT, throughput per multiply-add >= {GOAL_PER_MULTIPLY_ADD}x): "
              + ", ".join(f"batch {row['batch_size']} {row['mode']} {row['fast_vs_deit_per_multiply_add']:.2f}x "
                          f"({'met' if row['goal_met'] else 'not met'})" for row in goal_rows))  # fmt: skip
    write_json(args.json, {"benchmark": "inference", "machine": machine, "model": args.model,
                           "image_size": args.image_size, "multiply_adds": macs, "fast_vs_reference_difference":
                           difference, "rows": rows, "goal_per_multiply_add": GOAL_PER_MULTIPLY_ADD})  # fmt: skip


def table(rows: list[dict]) -> str:
    names = [name for name in NAMES if any(name in row["images_per_s"] for row in rows)]
    header = " | ".join(f"{NAMES[name]} img/s" for name in names)
    lines = [
        f"| batch | precision | mode | {header} | fast / reference | fast / DeiT-S | fast / DeiT-S per multiply-add |",
        "|---|---|---|" + "---|" * len(names) + "---|---|---|",
    ]
    for row in rows:
        images = row["images_per_s"]
        values = " | ".join(f"{images[name]:.2f}" if name in images else "-" for name in names)
        lines.append(
            f"| {row['batch_size']} | {row['dtype']} | {row['mode']} | {values} | "
            f"{images['fast'] / images['reference']:.2f}x | {images['fast'] / images['deit-s']:.2f}x | "
            f"**{row['fast_vs_deit_per_multiply_add']:.2f}x** |"
        )
    return "\n".join(lines)


if __name__ == "__main__":
    main()
