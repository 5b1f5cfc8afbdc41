"""
Training-step time and activation memory of Refiner-ViT with the reference computation, memory-lean training
(`model.set_memory_lean_training()`), and memory-lean training with activation checkpointing. Each mode runs in
its own child process, so that one mode's allocations cannot affect another's figures. Prints a table with the
ratios to the reference; it is a benchmark, not a test.

Memory is the peak of live tensor bytes during forward + backward above what was live when the step started
(parameters, their already allocated gradients, optimizer state and the batch), divided by the batch size: on CUDA
from `torch.cuda.max_memory_allocated`, on CPU from the allocation events of the PyTorch profiler's memory view.
The tensors still alive at the end of the forward (the activations saved for the backward) are shown too.

    python benchmarks/bench_train.py                                     # Refiner-ViT-S, 224 px, batch 8, fp32
    python benchmarks/bench_train.py --batch-size 4 --steps 2
    python benchmarks/bench_train.py --device cuda --dtype bf16 --batch-size 64
"""

import argparse
import json
import statistics
import subprocess
import sys
import time

import torch
from bench_common import add_common_arguments, machine_description, refiner, synchronize


MODES = {
    "reference": "reference",
    "lean": "memory-lean",
    "checkpointing": "activation checkpointing",
    "lean+checkpointing": "memory-lean + activation checkpointing",
}


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_common_arguments(parser)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--dtype", choices=("fp32", "bf16"), default="fp32", help="bf16: autocast.")
    parser.add_argument("--steps", type=int, default=3, help="Timed steps per mode (median kept).")
    parser.add_argument("--modes", nargs="+", choices=tuple(MODES), default=list(MODES))
    parser.add_argument("--child", choices=tuple(MODES), help=argparse.SUPPRESS)
    return parser.parse_args()


def live_bytes_profile(step) -> tuple[int, int]:
    """Runs `step` (returning a callable that finishes it) under the CPU memory profiler; returns the peak of live
    bytes above the start and the live bytes when `step` returns (before its finishing callable)."""
    from torch.profiler import ProfilerActivity, profile, record_function

    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        finish = step()
        with record_function("end_of_forward"):
            pass
        finish()
    events = prof.profiler.kineto_results.events()
    marker = min(e.start_ns() for e in events if e.name() == "end_of_forward")
    changes = sorted((e.start_ns(), e.nbytes()) for e in events if e.name() == "[memory]")
    live = peak = at_marker = 0
    for when, nbytes in changes:
        if when <= marker:
            at_marker = live + nbytes
        live += nbytes
        peak = max(peak, live)
    return peak, at_marker


def run_child(args: argparse.Namespace) -> dict:
    device = torch.device(args.device)
    model = refiner(args.model, args.image_size, args.seed).to(device).train()
    if args.child in ("lean", "lean+checkpointing"):
        model.set_memory_lean_training()
    if args.child in ("checkpointing", "lean+checkpointing"):
        model.activation_checkpointing_enable()
    optimizer = torch.optim.SGD(model.parameters(), lr=1e-3, momentum=0.9)
    generator = torch.Generator(device="cpu").manual_seed(args.seed)
    pixel_values = torch.randn(args.batch_size, 3, args.image_size, args.image_size, generator=generator).to(device)
    labels = torch.randint(0, model.config.num_labels, (args.batch_size,), generator=generator).to(device)
    autocast = torch.autocast(device.type, dtype=torch.bfloat16, enabled=args.dtype == "bf16")

    def forward():
        with autocast:
            loss = model(pixel_values, labels=labels).loss
        return loss.backward

    def step():
        optimizer.zero_grad(set_to_none=False)  # gradients stay allocated: not counted as step memory
        forward()()
        optimizer.step()

    step()  # warm-up: builds kernels, allocates gradients and optimizer state
    times = []
    for _ in range(args.steps):
        synchronize(device)
        start = time.perf_counter()
        step()
        synchronize(device)
        times.append(time.perf_counter() - start)

    optimizer.zero_grad(set_to_none=False)
    if device.type == "cuda":
        synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
        base = torch.cuda.memory_allocated(device)
        backward = forward()
        synchronize(device)
        saved = torch.cuda.memory_allocated(device) - base
        backward()
        synchronize(device)
        peak = torch.cuda.max_memory_allocated(device) - base
    else:
        peak, saved = live_bytes_profile(forward)
    return {
        "step_s": statistics.median(times),
        "peak_mib_per_image": peak / args.batch_size / 2**20,
        "saved_mib_per_image": saved / args.batch_size / 2**20,
    }


def main() -> None:
    args = parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.child:
        print(json.dumps(run_child(args)))
        return
    device = torch.device(args.device)
    print(f"# {args.model} at {args.image_size} px, batch {args.batch_size}, {args.dtype}, on "
          f"{machine_description(device)}")  # fmt: skip
    results = {}
    for mode in args.modes:
        command = [sys.executable, __file__, "--child", mode] + [
            f"--{name.replace('_', '-')}={value}"
            for name, value in vars(args).items()
            if name not in ("child", "modes") and value is not None
        ]
        output = subprocess.run(command, check=True, capture_output=True, text=True).stdout
        results[mode] = json.loads(output.strip().splitlines()[-1])
        r = results[mode]
        print(f"# {MODES[mode]}: {r['step_s']:.2f} s/step, peak {r['peak_mib_per_image']:.0f} MiB/image, "
              f"saved {r['saved_mib_per_image']:.0f} MiB/image")  # fmt: skip

    reference = results.get("reference")
    print()
    print("| mode | step time (s) | images/s | peak activation memory (MiB/image) | saved at end of forward "
          "(MiB/image) | time / reference | memory / reference |")  # fmt: skip
    print("|---|---|---|---|---|---|---|")
    for mode, r in results.items():
        time_ratio = f"{r['step_s'] / reference['step_s']:.2f}x" if reference else "-"
        memory_ratio = f"{r['peak_mib_per_image'] / reference['peak_mib_per_image']:.2f}x" if reference else "-"
        print(
            f"| {MODES[mode]} | {r['step_s']:.2f} | {args.batch_size / r['step_s']:.2f} | "
            f"{r['peak_mib_per_image']:.0f} | {r['saved_mib_per_image']:.0f} | {time_ratio} | {memory_ratio} |"
        )


if __name__ == "__main__":
    main()
