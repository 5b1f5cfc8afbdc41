"""
Training-step time and activation memory of Refiner-ViT with the reference computation, memory-lean training
(`model.set_memory_lean_training()`: its fused kernels, C++ on CPU and Triton on CUDA, and its PyTorch
implementation), activation checkpointing, the original code's `Refiner_ViT` (with `--original-checkout`, under AMP:
float16 autocast and a gradient scaler on CUDA, as its training script's `--amp`), and a DeiT-S-size ViT with SDPA.
Each mode runs in its own child process, so that one mode's allocations cannot affect another's figures. Before each
mode's process and after the last, other processes' load is sampled from /proc/stat (printed, in the JSON, and a
warning above 0.25 CPUs on average). Prints a table with the ratios to the reference and to the original; it is a
benchmark, not a test.

Memory is the peak of live tensor bytes during forward + backward above what was live when the step started
(parameters, their already allocated gradients, optimizer state and the batch), divided by the batch size: on CUDA
from `torch.cuda.max_memory_allocated`, on CPU from the allocation events of the PyTorch profiler's memory view.
The tensors still alive at the end of the forward (the activations saved for the backward) are shown too.

    python benchmarks/bench_train.py                                     # Refiner-ViT-S, 224 px, batch 8, fp32
    python benchmarks/bench_train.py --batch-size 4 --steps 2
    python benchmarks/bench_train.py --device cuda --dtype bf16 --batch-size 64 \\
        --modes reference lean-pytorch lean original deit-s --original-checkout ../Refiner_ViT
"""

import argparse
import json
import statistics
import subprocess
import sys
import time

import torch
import torch.nn.functional as F
from bench_common import (
    add_common_arguments,
    amp_dtype,
    busy_warning,
    deit_small_vit,
    load_summary,
    machine_description,
    original_refiner,
    refiner,
    sample_other_load,
    synchronize,
    write_json,
)

from refiner_hf.cpu_kernels import set_kernels_enabled
from refiner_hf.triton_support import set_triton_enabled


MODES = {
    "reference": "reference",
    "lean": "memory-lean (fused kernels)",
    "lean-pytorch": "memory-lean (PyTorch)",
    "checkpointing": "activation checkpointing",
    "lean+checkpointing": "memory-lean + activation checkpointing",
    "original": "original code, AMP",
    "deit-s": "DeiT-S-size ViT (SDPA)",
}
DEFAULT_MODES = ["reference", "lean", "lean-pytorch", "checkpointing", "lean+checkpointing", "deit-s"]
# The goal for bf16 training on a GPU, against the original code under AMP.
GOAL_SPEEDUP, GOAL_MEMORY = 1.5, 0.5


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_common_arguments(parser)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--dtype", choices=("fp32", "bf16"), default="fp32", help="bf16: autocast.")
    parser.add_argument("--steps", type=int, default=3, help="Timed steps per mode (median kept).")
    parser.add_argument(
        "--modes",
        nargs="+",
        choices=tuple(MODES),
        help="Default: all but `original`, and `original` too with --original-checkout.",
    )
    parser.add_argument("--child", choices=tuple(MODES), help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.modes is None:
        args.modes = DEFAULT_MODES + (["original"] if args.original_checkout else [])
    if "original" in args.modes and not args.original_checkout:
        parser.error("mode `original` needs --original-checkout (a checkout of github.com/zhoudaquan/Refiner_ViT)")
    return args


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


def build(args: argparse.Namespace, device: torch.device):
    """The child's model and its loss: (model, loss(pixel_values, labels))."""
    mode = args.child
    if mode == "original":
        model = original_refiner(args.original_checkout, args.model, args.image_size, args.seed)

        def loss(pixel_values, labels):  # the class head and, at half weight, every token's dense head
            cls_logits, aux_logits, _ = model(pixel_values)
            dense = F.cross_entropy(aux_logits.flatten(0, 1), labels.repeat_interleave(aux_logits.shape[1]))
            return F.cross_entropy(cls_logits, labels) + 0.5 * dense

        return model, loss
    if mode == "deit-s":
        model = deit_small_vit(args.image_size, args.seed)
        return model, lambda pixel_values, labels: model(pixel_values, labels=labels).loss
    model = refiner(args.model, args.image_size, args.seed)
    # Set either way: memory-lean training is the model's default.
    model.set_memory_lean_training(mode in ("lean", "lean-pytorch", "lean+checkpointing"))
    if mode == "lean-pytorch":  # the implementation used where no fused kernel applies
        set_kernels_enabled(False)
        set_triton_enabled(False)
    if mode in ("checkpointing", "lean+checkpointing"):
        model.activation_checkpointing_enable()
    return model, lambda pixel_values, labels: model(pixel_values, labels=labels, mix_token=False).loss


def run_child(args: argparse.Namespace) -> dict:
    device = torch.device(args.device)
    model, loss_fn = build(args, device)
    model = model.to(device).train()
    optimizer = torch.optim.SGD(model.parameters(), lr=1e-3, momentum=0.9)
    generator = torch.Generator(device="cpu").manual_seed(args.seed)
    pixel_values = torch.randn(args.batch_size, 3, args.image_size, args.image_size, generator=generator).to(device)
    labels = torch.randint(0, 1000, (args.batch_size,), generator=generator).to(device)
    dtype = amp_dtype(args.child, args.dtype, device)
    autocast = torch.autocast(device.type, dtype=dtype or torch.bfloat16, enabled=dtype is not None)
    scaler = torch.amp.GradScaler(device.type, enabled=dtype == torch.float16)

    def forward():
        with autocast:
            loss = loss_fn(pixel_values, labels)
        return lambda: scaler.scale(loss).backward()

    def step():
        optimizer.zero_grad(set_to_none=False)  # gradients stay allocated: not counted as step memory
        forward()()
        scaler.step(optimizer)
        scaler.update()

    for _ in range(2):  # warm-up: compiles kernels, allocates gradients and optimizer state
        step()
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
        "images_per_s": args.batch_size / statistics.median(times),
        "peak_mib_per_image": peak / args.batch_size / 2**20,
        "saved_mib_per_image": saved / args.batch_size / 2**20,
        "autocast": str(dtype).removeprefix("torch.") if dtype else "none",
    }


def child_command(args: argparse.Namespace, mode: str) -> list[str]:
    skip = ("child", "modes", "json")
    return [sys.executable, __file__, "--child", mode] + [
        f"--{name.replace('_', '-')}={value}"
        for name, value in vars(args).items()
        if name not in skip and value is not None
    ]


def goals(results: dict, dtype: str) -> dict | None:
    """The bf16 training goal against the original under AMP: >= 1.5x its throughput, <= 0.5x its memory (None unless
    both were measured in a bf16 run)."""
    lean, original = results.get("lean"), results.get("original")
    if dtype != "bf16" or not lean or not original:
        return None
    speedup = lean["images_per_s"] / original["images_per_s"]
    memory = lean["peak_mib_per_image"] / original["peak_mib_per_image"]
    return {
        "speedup_vs_original": speedup,
        "memory_vs_original": memory,
        "speed_goal_met": speedup >= GOAL_SPEEDUP,
        "memory_goal_met": memory <= GOAL_MEMORY,
    }


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.child:
        print(json.dumps(run_child(args)))
        return
    device = torch.device(args.device)
    machine = machine_description(device)
    print(f"# {args.model} at {args.image_size} px, batch {args.batch_size}, {args.dtype}, on {machine}")
    results, failures, loads = {}, {}, []
    for mode in args.modes:
        loads.append(sample_other_load())  # while no mode runs: other processes' load
        completed = subprocess.run(child_command(args, mode), capture_output=True, text=True)
        if completed.returncode != 0:  # one mode failing (e.g. out of memory) leaves the others' figures
            failures[mode] = (completed.stderr.strip().splitlines() or ["exit status %d" % completed.returncode])[-1]
            print(f"# {MODES[mode]}: FAILED: {failures[mode]}")
            continue
        results[mode] = r = json.loads(completed.stdout.strip().splitlines()[-1])
        print(f"# {MODES[mode]}: {r['step_s']:.3f} s/step, peak {r['peak_mib_per_image']:.0f} MiB/image, "
              f"saved {r['saved_mib_per_image']:.0f} MiB/image, autocast {r['autocast']}")  # fmt: skip
    loads.append(sample_other_load())
    other_load = load_summary(loads)
    if other_load["mean_cpus"] is not None:
        print(f"# other processes' load between the modes' processes: mean {other_load['mean_cpus']:.2f} CPUs, at "
              f"most {other_load['max_cpus']:.2f}")  # fmt: skip
    if busy_warning(other_load):
        print(busy_warning(other_load))

    print()
    print(table(results, args.batch_size))
    outcome = goals(results, args.dtype)
    if outcome:
        print()
        print(f"Goal (bf16 memory-lean vs original AMP): throughput {outcome['speedup_vs_original']:.2f}x "
              f"(>= {GOAL_SPEEDUP}x: {'met' if outcome['speed_goal_met'] else 'not met'}), activation memory "
              f"{outcome['memory_vs_original']:.2f}x (<= {GOAL_MEMORY}x: "
              f"{'met' if outcome['memory_goal_met'] else 'not met'})")  # fmt: skip
    write_json(args.json, {"benchmark": "train", "machine": machine, "model": args.model, "image_size": args.image_size,
                           "batch_size": args.batch_size, "dtype": args.dtype, "results": results,
                           "failures": failures, "goals": outcome, "other_load": other_load})  # fmt: skip
    if failures:
        sys.exit(1)


def table(results: dict, batch_size: int) -> str:
    reference, original = results.get("reference"), results.get("original")

    def ratio(r: dict, base: dict | None, key: str) -> str:
        return f"{r[key] / base[key]:.2f}x" if base else "-"

    lines = [
        "| mode | autocast | step time (s) | images/s | peak activation memory (MiB/image) | saved at end of forward "
        "(MiB/image) | time / reference | memory / reference | throughput / original | memory / original |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for mode, r in results.items():
        lines.append(
            f"| {MODES[mode]} | {r['autocast']} | {r['step_s']:.3f} | {r['images_per_s']:.1f} | "
            f"{r['peak_mib_per_image']:.0f} | {r['saved_mib_per_image']:.0f} | {ratio(r, reference, 'step_s')} | "
            f"{ratio(r, reference, 'peak_mib_per_image')} | {ratio(r, original, 'images_per_s')} | "
            f"{ratio(r, original, 'peak_mib_per_image')} |"
        )
    return "\n".join(lines)


if __name__ == "__main__":
    main()
