"""
Where the inference time of Refiner-ViT goes: milliseconds per batch and share of the forward's total for each part of
the model, on the fast path (`model.eval().set_fast_inference(True)`) and the reference path (`False`). It is a
benchmark, not a test.

    python benchmarks/profile_inference.py                                  # Refiner-ViT-S, 224 px, batch 1 and 8
    python benchmarks/profile_inference.py --batch-size 1 --iterations 3 --paths fast
    python benchmarks/profile_inference.py --model refiner-vit-l --image-size 448 --batch-size 8 --threads 16 \\
        --paths fast --json profile_l448.json

The parts: the stem (`RefinerViTEmbeddings`: convolutions, class token, position embedding); the attention
projections (`qkv` or `v_proj`, and `o_proj`); the attention products (the probabilities softmax(s q k^T) + s times
the incoming map, and the map times the values); the refinement (`RefinerViTRefiner.forward_folded` or
`forward_adapted`, adapt_bn included); the MLP (`RefinerViTMLP.forward`, or `forward_folded`, whose `addcmul` also
adds the residual); the head (final LayerNorm and classifiers); and the rest (the blocks' LayerNorms, residual
additions, reshapes and Python): the forward's total minus the parts.

The methods computing each part are wrapped at run time, in this process only (the fast path calls several of them as
methods such as `forward_folded`, where module hooks would not fire), each with a wall-clock timer; on CUDA the device
is synchronised at every boundary. A part entered inside another counts towards the outer one only. Timers rather
than `torch.profiler`: the profiler records every operator, and its cost would weigh most on the reference path's
many small ones. The plain forward, without the wrapping, is timed too, to show what the instrumentation adds.
"""

import argparse
import contextlib
import functools
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import torch
from bench_common import MODELS, machine_description, refiner, synchronize, write_json

from refiner_hf import RefinerViTForImageClassification
from refiner_hf.modeling_refiner_vit import (
    RefinerViTAttention,
    RefinerViTEmbeddings,
    RefinerViTMLP,
    RefinerViTRefiner,
)


PATHS = {"fast": True, "reference": False}
REST = "LayerNorms, residuals, rest"
PARTS = ("stem", "attention projections", "attention products", "refinement", "MLP", "head", REST)
WARM_UP = 2


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", choices=MODELS, default="refiner-vit-s")
    parser.add_argument("--image-size", type=int, default=224)
    parser.add_argument("--batch-size", type=int, nargs="+", default=[1, 8])
    parser.add_argument("--paths", nargs="+", choices=tuple(PATHS), default=list(PATHS))
    parser.add_argument("--iterations", type=int, default=5, help=f"Timed forwards (after {WARM_UP} warm-up ones).")
    parser.add_argument("--threads", type=int, help="torch.set_num_threads (default: PyTorch's choice).")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--json", type=Path, help="Also write the figures to this JSON file.")
    return parser.parse_args(argv)


class PartTimer:
    """Seconds spent in each part (but the rest); a part entered inside another one counts towards the outer one."""

    def __init__(self, device: torch.device) -> None:
        self.device = device
        self.inside = False
        self.reset()

    def reset(self) -> None:
        self.seconds = dict.fromkeys(PARTS[:-1], 0.0)

    def wrap(self, part: str, fn: Callable) -> Callable:
        @functools.wraps(fn)
        def timed(*args, **kwargs):
            if self.inside:
                return fn(*args, **kwargs)
            synchronize(self.device)  # what is still queued belongs to the rest
            self.inside, start = True, time.perf_counter()
            try:
                return fn(*args, **kwargs)
            finally:
                synchronize(self.device)
                self.seconds[part] += time.perf_counter() - start
                self.inside = False

        return timed


def part_targets(model: RefinerViTForImageClassification) -> list[tuple[str, object, str]]:
    """
    (part, owner, attribute) of everything wrapped: the classes' methods that both paths compute a part with, and the
    `forward` of the linear layers and LayerNorm that share their class with layers of other parts.
    """
    targets = [
        ("stem", RefinerViTEmbeddings, "forward"),
        ("attention products", RefinerViTAttention, "_attention_probs"),
        ("attention products", RefinerViTAttention, "_context"),
        ("refinement", RefinerViTRefiner, "forward_folded"),
        ("refinement", RefinerViTRefiner, "forward_adapted"),
        ("MLP", RefinerViTMLP, "forward"),
        ("MLP", RefinerViTMLP, "forward_folded"),
    ]
    for module in model.modules():
        if isinstance(module, RefinerViTAttention):
            projection = module.v_proj if module.block_type == "shared" else module.qkv
            targets += [("attention projections", layer, "forward") for layer in (projection, module.o_proj)]
    head = (model.refiner_vit.layernorm, model.classifier, model.aux_classifier)
    return targets + [("head", layer, "forward") for layer in head if layer is not None]


@contextlib.contextmanager
def instrumented(model: RefinerViTForImageClassification, timer: PartTimer) -> Iterator[None]:
    """Wraps the parts' methods with the timer's, and puts the originals back on exit."""
    saved = []
    try:
        for part, owner, name in part_targets(model):
            saved.append((owner, name, vars(owner).get(name)))  # None: inherited from the class, nothing to restore
            setattr(owner, name, timer.wrap(part, getattr(owner, name)))
        yield
    finally:
        for owner, name, original in reversed(saved):
            if original is None:
                delattr(owner, name)
            else:
                setattr(owner, name, original)


def time_forwards(model: torch.nn.Module, pixel_values: torch.Tensor, iterations: int, after_warm_up=None) -> float:
    """Mean seconds per forward over `iterations` forwards, after `WARM_UP` ones (then `after_warm_up()`)."""
    with torch.no_grad():
        for _ in range(WARM_UP):
            model(pixel_values)
        if after_warm_up is not None:
            after_warm_up()
        synchronize(pixel_values.device)
        start = time.perf_counter()
        for _ in range(iterations):
            model(pixel_values)
        synchronize(pixel_values.device)
    return (time.perf_counter() - start) / iterations


def profile(
    model: RefinerViTForImageClassification, batch_sizes: list[int], paths: list[str], iterations: int
) -> dict[str, dict[int, dict]]:
    """For each path and batch size: the plain and instrumented forwards' milliseconds per batch, and each part's
    milliseconds and share (%) of the instrumented total."""
    config, device = model.config, model.device
    results = {}
    for path in paths:
        model.eval().set_fast_inference(PATHS[path])
        results[path] = {}
        for batch_size in batch_sizes:
            pixel_values = torch.randn(batch_size, config.num_channels, config.image_size, config.image_size,
                                       device=device)  # fmt: skip
            plain = time_forwards(model, pixel_values, iterations)
            timer = PartTimer(device)
            with instrumented(model, timer):
                total = time_forwards(model, pixel_values, iterations, after_warm_up=timer.reset)
            parts_ms = {part: seconds / iterations * 1e3 for part, seconds in timer.seconds.items()}
            parts_ms[REST] = total * 1e3 - sum(parts_ms.values())
            results[path][batch_size] = {
                "plain_ms": plain * 1e3,
                "total_ms": total * 1e3,
                "parts_ms": parts_ms,
                "shares_percent": {part: 100 * ms / (total * 1e3) for part, ms in parts_ms.items()},
            }
    return results


def table(path: str, figures: dict[int, dict]) -> str:
    """One path's figures: a row per part, a pair of columns (milliseconds, share) per batch size."""
    batches = list(figures)
    lines = [
        f"{path} path (set_fast_inference({PATHS[path]})), milliseconds per batch:",
        "| part | " + " | ".join(f"batch {b}: ms | share" for b in batches) + " |",
        "|---|" + "---:|---:|" * len(batches),
    ]
    for part in PARTS:
        cells = [f"{figures[b]['parts_ms'][part]:.2f} | {figures[b]['shares_percent'][part]:.1f} %" for b in batches]
        lines.append(f"| {part} | " + " | ".join(cells) + " |")
    lines.append("| **total (instrumented)** | " + " | ".join(f"**{figures[b]['total_ms']:.2f}** | 100 %"
                                                          for b in batches) + " |")  # fmt: skip
    lines.append("| plain forward | " + " | ".join(f"{figures[b]['plain_ms']:.2f} |" for b in batches) + " |")
    added = [figures[b]["total_ms"] - figures[b]["plain_ms"] for b in batches]
    lines.append("| instrumentation adds | " + " | ".join(
        f"{ms:+.2f} | {100 * ms / figures[b]['plain_ms']:+.1f} %" for ms, b in zip(added, batches)) + " |")  # fmt: skip
    return "\n".join(lines)


def main(argv: list[str] | None = None, model: RefinerViTForImageClassification | None = None) -> dict:
    """Prints the tables and returns the figures; `model` (its own image size) replaces `--model`/`--image-size`."""
    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    name = args.model if model is None else "the given model"
    if model is None:
        model = refiner(args.model, args.image_size, args.seed)
    model = model.to(device).eval()
    machine = machine_description(device)
    print(f"# {name} at {model.config.image_size} px on {machine}")
    print(f"# mean of {args.iterations} forwards per batch after {WARM_UP} warm-up ones, fp32, no gradients")
    results = profile(model, args.batch_size, args.paths, args.iterations)
    for path, figures in results.items():
        print()
        print(table(path, figures))
    write_json(args.json, {"benchmark": "profile_inference", "machine": machine, "model": name,
                           "image_size": model.config.image_size, "iterations": args.iterations,
                           "results": results})  # fmt: skip
    return results


if __name__ == "__main__":
    main()
