#!/usr/bin/env python
"""
Data efficiency of attention refinement: a small Refiner-ViT against a plain ViT of the same size, trained with the
same recipe on growing shares of the embedded Fashion-MNIST training set.

Both models are `RefinerViTConfig`s of the embedded recipe's width, depth, heads, patch size, MLP and convolutional stem
(examples/recipes/embedded_fashion_mnist.yaml). The Refiner-ViT refines the attention maps in every block (`block_types`
all `"refined"`: expansion and the depthwise convolution on the maps); the plain ViT has every block `"plain"` (no
refinement), so the two differ only by the refinement's few parameters (checked: within 5 %). Every run is the package's
trainer, `refiner_hf.training.trainer.train` (examples/run_imagenet.py's: same data pipeline, augmentation, optimizer
and schedule), with the EMA off. Each run makes the same number of optimizer steps: `--epochs` on the full set,
proportionally more epochs (and a proportionally longer warmup) on a smaller share: a share of the data, not of the
compute. The top-1 reported is the final epoch's, on the full validation split (1,000 images).

Prints the mean ± std top-1 over the seeds (one row per model, one column per share) and draws it as a plot:

    python benchmarks/data_efficiency.py                          # 3 shares x 3 seeds x 2 models on 2 CPU cores
    python benchmarks/data_efficiency.py --fractions 0.05 0.1 0.3 1.0 --seeds 0 1 2 3 4 --epochs 30   # a GPU

It is a benchmark, not a test: the figures it prints are the result.
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import json
import statistics
import tempfile
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import matplotlib


matplotlib.use("Agg")

import matplotlib.pyplot as plt  # noqa: E402

from refiner_hf import RefinerViTConfig, RefinerViTForImageClassification  # noqa: E402
from refiner_hf.training.arguments import load_recipe  # noqa: E402
from refiner_hf.training.arguments import parse_args as trainer_arguments  # noqa: E402
from refiner_hf.training.trainer import train as run_training  # noqa: E402


ROOT = Path(__file__).resolve().parents[1]
RECIPE = ROOT / "examples" / "recipes" / "embedded_fashion_mnist.yaml"
TRAINING_IMAGES = 3400  # the embedded training split
MODELS = {"plain ViT": "plain", "Refiner-ViT": "refined"}


@dataclass
class Setting:
    """One cell of the table: a model at a share of the training set, over several seeds."""

    model: str
    fraction: float
    top1: list[float]


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument(
        "--fractions", type=float, nargs="+", default=[0.1, 0.3, 1.0], help="Shares of the training set."
    )
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--epochs", type=int, default=4, help="Epochs on the full set (more on a smaller share).")
    parser.add_argument(
        "--max-train-steps", type=int, help="Stop each run after this many steps (the schedule is unchanged)."
    )
    parser.add_argument("--max-eval-samples", type=int, help="Evaluate on the first N validation images only.")
    parser.add_argument("--batch-size", type=int, help="Training batch (default: the recipe's).")
    parser.add_argument(
        "--config-overrides", type=json.loads, default={}, help="JSON changes to both models' config, e.g. a width."
    )
    parser.add_argument("--out", type=Path, default=Path("data_efficiency.png"), help="Where to draw the plot.")
    parser.add_argument("--work-dir", type=Path, help="Keep the runs' outputs here (default: a temporary directory).")
    parser.add_argument("--num-workers", type=int, default=0, help="Data loading workers per run.")
    return parser.parse_args(argv)


@functools.cache
def recipe_values() -> dict[str, Any]:
    """The embedded recipe, read and checked as the trainer reads it."""
    return load_recipe(RECIPE)


def model_config(block_type: str, overrides: dict[str, Any]) -> dict[str, Any]:
    """The recipe's model with every block of `block_type`."""
    config = {**json.loads(recipe_values()["config_overrides"]), **overrides}
    config["block_types"] = [block_type] * config["num_hidden_layers"]
    return config


def parameter_count(config: dict[str, Any]) -> int:
    return RefinerViTForImageClassification(RefinerViTConfig(num_labels=10, **config)).num_parameters()


def train(config: dict[str, Any], fraction: float, seed: int, output_dir: Path, args) -> float:
    """One run of the trainer; returns the final epoch's top-1 on the validation split."""
    samples = max(1, round(fraction * TRAINING_IMAGES))
    # The recipe's warmup, at most half of a short run, in epochs of the full set.
    warmup_epochs = min(recipe_values()["warmup_epochs"], args.epochs / 2)
    epochs = max(1, round(args.epochs / fraction))
    argv = [
        "--recipe", str(RECIPE),
        "--config_overrides", json.dumps(config),
        "--max_train_samples", str(samples),
        # Equal steps whatever the share: the schedule and its warmup stretch over more epochs of a smaller set.
        "--epochs", str(epochs),
        "--warmup_epochs", str(warmup_epochs * epochs / args.epochs),
        "--seed", str(seed),
        "--model_ema", "false",
        "--report_to", "none",
        "--dataloader_num_workers", str(args.num_workers),
        "--checkpoints_total_limit", "1",
        "--output_dir", str(output_dir),
    ]  # fmt: skip
    for flag, value in (
        ("--max_train_steps", args.max_train_steps),
        ("--max_eval_samples", args.max_eval_samples),
        ("--per_device_train_batch_size", args.batch_size),
    ):
        if value is not None:
            argv += [flag, str(value)]
    output_dir.mkdir(parents=True, exist_ok=True)
    # The run's report and progress bars go to its own log; errors still stop the benchmark.
    with (
        open(output_dir / "train.log", "w") as log,
        contextlib.redirect_stdout(log),
        contextlib.redirect_stderr(log),
    ):
        results = run_training(trainer_arguments(argv))
    return results["history"][-1]["eval_top1"]


def format_table(settings: list[Setting], parameters: dict[str, int]) -> str:
    """One row per model, one column per share: mean ± std top-1 (%) over the seeds."""
    fractions = sorted({s.fraction for s in settings})
    headers = [f"{fraction:.0%} ({max(1, round(fraction * TRAINING_IMAGES))} img)" for fraction in fractions]
    lines = [f"{'model':<12} {'parameters':>10}  " + "  ".join(f"{h:>16}" for h in headers)]
    for model in MODELS:
        cells = []
        for fraction in fractions:
            top1 = next(s.top1 for s in settings if s.model == model and s.fraction == fraction)
            std = statistics.stdev(top1) if len(top1) > 1 else 0.0
            cells.append(f"{100 * statistics.mean(top1):6.2f} ± {100 * std:5.2f}")
        lines.append(f"{model:<12} {parameters[model]:>10,}  " + "  ".join(f"{c:>16}" for c in cells))
    return "\n".join(lines)


def plot(settings: list[Setting], out: Path, title: str) -> Path:
    figure, axis = plt.subplots(figsize=(5, 3.5), dpi=120)
    for model in MODELS:
        rows = sorted((s for s in settings if s.model == model), key=lambda s: s.fraction)
        images = [round(s.fraction * TRAINING_IMAGES) for s in rows]
        means = [100 * statistics.mean(s.top1) for s in rows]
        stds = [100 * statistics.stdev(s.top1) if len(s.top1) > 1 else 0.0 for s in rows]
        axis.errorbar(images, means, yerr=stds, marker="o", capsize=3, label=model)
    axis.set_xscale("log")
    axis.set_xlabel("training images")
    axis.set_ylabel("top-1 (%)")
    axis.set_title(title, fontsize=8)
    axis.grid(alpha=0.3)
    axis.legend()
    figure.tight_layout()
    out.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(out)
    plt.close(figure)
    return out


def main(argv: Sequence[str] | None = None) -> list[Setting]:
    args = parse_args(argv)
    bad = [f for f in args.fractions if not 0 < f <= 1]
    if bad:
        raise SystemExit(f"--fractions must lie in (0, 1], got {bad}.")
    configs = {name: model_config(block_type, args.config_overrides) for name, block_type in MODELS.items()}
    parameters = {name: parameter_count(config) for name, config in configs.items()}
    gap = abs(parameters["Refiner-ViT"] - parameters["plain ViT"]) / parameters["plain ViT"]
    if gap > 0.05:
        raise SystemExit(f"The models' parameter counts differ by {gap:.1%} (more than 5 %): {parameters}.")
    print(
        f"Refiner-ViT (every block refined) against a plain ViT of the same size ({parameters['plain ViT']:,} vs "
        f"{parameters['Refiner-ViT']:,} parameters); shares {args.fractions}, seeds {args.seeds}, "
        f"the steps of {args.epochs} epoch(s) on the full set per run",
        flush=True,
    )
    settings = [Setting(model, fraction, []) for fraction in args.fractions for model in MODELS]
    with contextlib.ExitStack() as stack:
        work_dir = args.work_dir or Path(stack.enter_context(tempfile.TemporaryDirectory()))
        for setting in settings:
            for seed in args.seeds:
                start = time.perf_counter()
                name = f"{MODELS[setting.model]}_{setting.fraction:g}_seed{seed}"
                top1 = train(configs[setting.model], setting.fraction, seed, work_dir / name, args)
                setting.top1.append(top1)
                print(
                    f"  {setting.model:<12} {setting.fraction:>5.0%} seed {seed}: {100 * top1:6.2f} % top-1 "
                    f"({time.perf_counter() - start:.0f} s)",
                    flush=True,
                )
    print("\nTop-1 (%) on the embedded Fashion-MNIST validation split, mean ± std over seeds:")
    print(format_table(settings, parameters))
    out = plot(settings, args.out, f"Fashion-MNIST subset, {len(args.seeds)} seed(s), equal steps per run")
    print(f"Plot: {out}")
    return settings


if __name__ == "__main__":
    main()
