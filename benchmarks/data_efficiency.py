#!/usr/bin/env python
"""
Data efficiency of attention refinement where data is the limit: a Refiner-ViT against a plain ViT of the same size,
each trained on a share of Fashion-MNIST until its held-out accuracy has stopped improving at the lowest learning rate,
several seeds per share.

Data. The full Fashion-MNIST (60,000 training and 10,000 test images, MIT licence) read from
/usr/share/datasets/fashion-mnist, where Debian's package installs it (`sudo apt-get install dataset-fashion-mnist`),
or from `--data-dir` (the four `*-idx?-ubyte.gz` files of https://github.com/zalandoresearch/fashion-mnist). A fixed
`--held-out` images of the training file (1,000 by default, the same for every run) are kept apart for early stopping;
the shares are of the rest (59,000), drawn per seed and per class (so a 1 % share has 59 images of each class), and
top-1 is measured on the 10,000 test images. Without the files it says how to get them and falls back to the subset
shipped with the package (3,400 training images, of which 400 are held out, and 1,000 test images): enough to check
that it runs, too small for the curve.

Models. Both are `RefinerViTConfig`s with the same width, depth, heads, patch size and MLP: the Refiner-ViT refines the
attention maps in every block (`block_types` all `"refined"`: expansion and a depthwise convolution on the maps), the
plain ViT in none (all `"plain"`), so they differ only by the refinement's few parameters (checked: within 5 %). The
default is a small model (width 48, 4 blocks, 4 heads, 7-pixel patches: 16 tokens, a single-convolution stem, no aux
head) so that the default grid fits in an hour on two CPU cores (shares 1 to 30 %; the 100 % share alone would take
longer than that); `--full` uses the embedded recipe's model (width 96, 6 blocks, 4-pixel patches, the convolutional
stem), examples/recipes/embedded_fashion_mnist.yaml.

Training. A plain loop on tensors (the trainer's PIL pipeline would cost more than these models): AdamW, label
smoothing 0.1, random shifts of up to 2 pixels and horizontal flips. Trained to convergence of its share: a run is
evaluated on the held-out images once an epoch, but at least `--min-eval-steps` apart (so a small share gets several
epochs between evaluations); after a linear warmup over the first interval the learning rate holds until a plateau
(`--patience` evaluations without a gain, then one more: `ReduceLROnPlateau`), drops tenfold, and after `--lr-drops`
drops the next plateau ends the run. The weights of its best evaluation are tested. How long a run trains therefore
follows from its share: a smaller share takes more passes over its images. `--max-epochs / sqrt(share)` epochs is
only a safety cap; each run prints whether it converged or hit the cap.

Prints one row per share: mean ± std test top-1 over the seeds for each model, the gap (Refiner-ViT minus plain ViT)
with its standard error, and whether the gap is inside seed noise (smaller than twice its standard error); writes the
runs as JSON (`--results`, after every run) and draws the plot (`--out`); `--from-results` redraws both from such a
file without training:

    python benchmarks/data_efficiency.py          # shares 1-30 %, 3 seeds, the small model: 2 CPU cores, < 1 hour
    python benchmarks/data_efficiency.py --full   # shares 1-100 %, 3 seeds, the recipe's model: a GPU

It is a benchmark, not a test: the figures it prints are the result.
"""

from __future__ import annotations

import argparse
import concurrent.futures
import copy
import dataclasses
import json
import math
import multiprocessing
import statistics
import sys
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import matplotlib


matplotlib.use("Agg")

import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

from refiner_hf import RefinerViTConfig, RefinerViTForImageClassification  # noqa: E402
from refiner_hf.cli import did_you_mean  # noqa: E402
from refiner_hf.interruption import Terminated, sigterm_unwinds, stopped_message  # noqa: E402
from refiner_hf.training.checkpointing import write_text_atomically  # noqa: E402
from refiner_hf.training.embedded_data import SUBSET_FILE  # noqa: E402
from refiner_hf.training.embedded_data.build_subset import read_idx  # noqa: E402


FASHION_MNIST_DIR = Path("/usr/share/datasets/fashion-mnist")
HOW_TO_GET = (
    "the full Fashion-MNIST is not in {directory}: install Debian's package (`sudo apt-get install "
    "dataset-fashion-mnist`) or give --data-dir with the four *-idx?-ubyte.gz files of "
    "https://github.com/zalandoresearch/fashion-mnist. Falling back to the embedded subset (3,400 training images): "
    "it shows the benchmark runs, not the curve."
)
EMBEDDED_HELD_OUT = 400
MODELS = {"plain ViT": "plain", "Refiner-ViT": "refined"}
# The small default model: 16 tokens of 7x7 pixels keep a run at a few hundred images per second on one CPU core.
SMALL_MODEL = {
    "image_size": 28, "patch_size": 7, "num_channels": 1, "hidden_size": 48, "num_hidden_layers": 4,
    "num_attention_heads": 4, "mlp_ratio": 2.0, "stem_type": "patch", "refine_expansion": 3, "use_aux_head": False,
}  # fmt: skip
# The embedded recipe's model (examples/recipes/embedded_fashion_mnist.yaml) on one grey channel, without its aux head.
RECIPE_MODEL = {
    "image_size": 28, "patch_size": 4, "num_channels": 1, "hidden_size": 96, "num_hidden_layers": 6,
    "num_attention_heads": 4, "mlp_ratio": 3.0, "stem_type": "conv", "stem_hidden_sizes": [16, 32, 48],
    "refine_expansion": 3, "use_aux_head": False,
}  # fmt: skip
DEFAULTS = {"shares": [0.01, 0.03, 0.1, 0.3], "max_epochs": 30.0, "batch_size": 64, "held_out": 1000}
FULL_DEFAULTS = {"shares": [0.01, 0.03, 0.1, 0.3, 1.0], "max_epochs": 30.0, "batch_size": 128, "held_out": 5000}
# Fashion-MNIST's pixel mean and standard deviation (of the training file, in [0, 1]).
PIXEL_MEAN, PIXEL_STD = 0.286, 0.353


@dataclass
class Data:
    """Images as `(n, 28, 28)` uint8 arrays with their labels: the pool the shares are drawn from, the held-out
    split for early stopping and the test split."""

    train_images: np.ndarray
    train_labels: np.ndarray
    held_out_images: np.ndarray
    held_out_labels: np.ndarray
    test_images: np.ndarray
    test_labels: np.ndarray
    source: str


@dataclass
class RunResult:
    """One model trained on one share with one seed."""

    model: str
    share: float
    seed: int
    images: int
    test_top1: float
    held_out_top1: float
    steps: int
    best_step: int
    max_steps: int
    epochs: float
    lr_drops: int
    converged: bool
    seconds: float


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument(
        "--full",
        action="store_true",
        help="The full grid for a GPU: shares 1, 3, 10, 30, 100 %%, the recipe's model, at most 30 / sqrt(share) "
        "epochs, batch 128, 5,000 held-out images.",
    )
    parser.add_argument(
        "--shares", type=float, nargs="+", help="Shares of the training pool (default 0.01 0.03 0.1 0.3)."
    )
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument(
        "--max-epochs",
        type=float,
        help="The epoch budget, a safety cap: a share s may take max_epochs / sqrt(s) epochs (default 30).",
    )
    parser.add_argument("--batch-size", type=int)
    parser.add_argument("--held-out", type=int, help="Training images kept apart for early stopping (default 1,000).")
    parser.add_argument("--lr", type=float, default=2e-3)
    parser.add_argument("--weight-decay", type=float, default=0.05)
    parser.add_argument(
        "--min-eval-steps", type=int, default=50, help="Steps between held-out evaluations: an epoch, at least this."
    )
    parser.add_argument(
        "--patience",
        type=int,
        default=4,
        help="Evaluations without a gain tolerated at one learning rate; the next one without a gain is a plateau.",
    )
    parser.add_argument(
        "--lr-drops",
        type=int,
        default=2,
        help="Plateaus that divide the learning rate by 10; the plateau after the last drop ends the run.",
    )
    parser.add_argument("--max-steps", type=int, help="Cap every run at this many steps (for quick checks).")
    parser.add_argument("--max-test-samples", type=int, help="Test on the first N test images only.")
    parser.add_argument("--config-overrides", type=json.loads, default={}, help="JSON changes to both models' config.")
    parser.add_argument("--data-dir", type=Path, default=FASHION_MNIST_DIR, help="Where the Fashion-MNIST files are.")
    parser.add_argument("--device", help="torch device (default: cuda when available, else cpu).")
    parser.add_argument("--jobs", type=int, default=2, help="Runs at a time on the CPU, one thread each.")
    parser.add_argument("--out", type=Path, default=Path("data_efficiency.png"), help="Where to draw the plot.")
    parser.add_argument("--results", type=Path, help="Where to write the runs as JSON (default: beside --out).")
    parser.add_argument(
        "--from-results", type=Path, help="Train nothing: print the table and draw the plot of a --results file."
    )
    args = parser.parse_args(argv)
    for name, value in (FULL_DEFAULTS if args.full else DEFAULTS).items():
        if getattr(args, name) is None:
            setattr(args, name, value)
    bad = [share for share in args.shares if not 0 < share <= 1]
    if bad:
        parser.error(f"--shares must lie in (0, 1], got {bad}.")
    for name, lowest in (("patience", 0), ("lr_drops", 0), ("min_eval_steps", 1), ("batch_size", 1)):
        if getattr(args, name) < lowest:
            parser.error(f"--{name.replace('_', '-')} must be at least {lowest}, got {getattr(args, name)}.")
    if not args.max_epochs > 0:
        parser.error(f"--max-epochs must be positive, got {args.max_epochs}.")
    if problem := config_overrides_problem(args.config_overrides):
        parser.error(f"--config-overrides: {problem}")
    if args.device is None:
        args.device = "cuda" if torch.cuda.is_available() else "cpu"
    if args.results is None:
        args.results = args.out.with_suffix(".json")
    return args


# Configuration fields the benchmark sets itself: overriding them would compare other models than it says.
NOT_OVERRIDABLE = {
    "block_types": "the benchmark sets it (every block refined against every block plain)",
    "num_labels": "Fashion-MNIST has 10 classes",
    "id2label": "Fashion-MNIST has 10 classes",
    "label2id": "Fashion-MNIST has 10 classes",
}


def config_overrides_problem(overrides: Any) -> str | None:
    """
    What is wrong with `--config-overrides`: not a JSON object, or a key that is not a `RefinerViTConfig` field (which
    the configuration would keep as an unused attribute, training its default instead), with the closest fields.
    """
    if not isinstance(overrides, dict):
        return f"must be a JSON object of RefinerViTConfig fields, got {json.dumps(overrides)}."
    fields = {f.name for f in dataclasses.fields(RefinerViTConfig)} - set(NOT_OVERRIDABLE)
    for key in overrides:
        if key in NOT_OVERRIDABLE:
            return f"`{key}` cannot be set: {NOT_OVERRIDABLE[key]}."
        if key not in fields:
            return f"{key!r} is not a RefinerViTConfig field.{did_you_mean(str(key), fields)}"
    return None


def load_data(directory: Path, held_out: int) -> Data:
    """The full Fashion-MNIST from `directory`, or (saying so) the embedded subset; `held_out` fixed training images
    (a fixed draw, the same for every run) are set apart for early stopping."""
    names = ["train-images-idx3-ubyte.gz", "train-labels-idx1-ubyte.gz"]
    names += ["t10k-images-idx3-ubyte.gz", "t10k-labels-idx1-ubyte.gz"]
    if all((directory / name).is_file() for name in names):
        train_images, train_labels, test_images, test_labels = (read_idx(directory / name) for name in names)
        source = f"Fashion-MNIST from {directory}"
    else:
        print("Note: " + HOW_TO_GET.format(directory=directory), file=sys.stderr, flush=True)
        with np.load(SUBSET_FILE) as arrays:
            train_images, train_labels = arrays["train_images"], arrays["train_labels"]
            test_images, test_labels = arrays["validation_images"], arrays["validation_labels"]
        held_out = min(held_out, EMBEDDED_HELD_OUT)
        source = f"the embedded Fashion-MNIST subset ({SUBSET_FILE.name})"
    order = np.random.default_rng(12345).permutation(len(train_images))
    kept, pool = order[:held_out], order[held_out:]
    return Data(
        train_images[pool], train_labels[pool], train_images[kept], train_labels[kept], test_images, test_labels, source
    )


def share_indices(labels: np.ndarray, share: float, seed: int) -> np.ndarray:
    """A share of the pool drawn per class (each class keeps `round(share * its count)` images, at least one)."""
    rng = np.random.default_rng(seed)
    chosen = [
        rng.permutation(np.flatnonzero(labels == c))[: max(1, round(share * np.sum(labels == c)))]
        for c in np.unique(labels)
    ]
    return np.sort(np.concatenate(chosen))


def model_config(block_type: str, full: bool, overrides: dict[str, Any]) -> dict[str, Any]:
    """The benchmark's model with every block of `block_type`."""
    config = {**(RECIPE_MODEL if full else SMALL_MODEL), **overrides}
    config["block_types"] = [block_type] * config["num_hidden_layers"]
    return config


def parameter_count(config: dict[str, Any]) -> int:
    return RefinerViTForImageClassification(RefinerViTConfig(num_labels=10, **config)).num_parameters()


def to_inputs(images: np.ndarray, device: str) -> torch.Tensor:
    """uint8 `(n, 28, 28)` → normalised float `(n, 1, 28, 28)`."""
    pixels = torch.from_numpy(np.ascontiguousarray(images)).to(device).float().div_(255).unsqueeze(1)
    return (pixels - PIXEL_MEAN) / PIXEL_STD


def augment(batch: torch.Tensor, generator: torch.Generator, shift: int = 2) -> torch.Tensor:
    """Per image, a random shift of up to `shift` pixels each way (zero padding) and a horizontal flip half the time."""
    size, side = batch.shape[0], batch.shape[-1]
    padded = F.pad(batch, (shift,) * 4, value=-PIXEL_MEAN / PIXEL_STD)  # the padding is black, as the background
    offsets = torch.randint(0, 2 * shift + 1, (2, size), generator=generator).to(batch.device)
    steps = torch.arange(side, device=batch.device)
    rows = (offsets[0, :, None] + steps)[:, :, None]
    columns = (offsets[1, :, None] + steps)[:, None, :]
    shifted = padded[torch.arange(size, device=batch.device)[:, None, None], 0, rows, columns].unsqueeze(1)
    flip = (torch.rand(size, generator=generator) < 0.5).to(batch.device)
    return torch.where(flip[:, None, None, None], shifted.flip(-1), shifted)


@torch.no_grad()
def top1(
    model: RefinerViTForImageClassification,
    inputs: torch.Tensor,
    labels: torch.Tensor,
    batch: int = 500,
) -> float:
    model.eval()
    correct = sum(
        int((model(inputs[i : i + batch]).logits.argmax(-1) == labels[i : i + batch]).sum())
        for i in range(0, len(inputs), batch)
    )
    return correct / len(inputs)


def step_budget(share: float, images: int, max_epochs: float, batch_size: int) -> int:
    """The most steps a run on `images` images (a `share` of the pool) may take: `max_epochs / sqrt(share)` epochs."""
    return max(1, round(max_epochs / math.sqrt(share) * math.ceil(images / batch_size)))


def eval_interval(images: int, batch_size: int, min_eval_steps: int) -> int:
    """Steps between held-out evaluations: one epoch, but at least `min_eval_steps` (a 1 % share is 10 steps)."""
    return max(math.ceil(images / batch_size), min_eval_steps)


def run(name: str, config: dict[str, Any], share: float, seed: int, data: Data, args: argparse.Namespace) -> RunResult:
    """Trains one model on one share with one seed until its held-out top-1 has stopped improving at the lowest
    learning rate; tests its best weights."""
    start = time.perf_counter()
    torch.manual_seed(seed)
    generator = torch.Generator().manual_seed(seed)
    device = args.device
    chosen = share_indices(data.train_labels, share, seed)
    images, labels = to_inputs(data.train_images[chosen], device), torch.from_numpy(data.train_labels[chosen])
    labels = labels.long().to(device)
    held_out = to_inputs(data.held_out_images, device), torch.from_numpy(data.held_out_labels).long().to(device)
    model = RefinerViTForImageClassification(RefinerViTConfig(num_labels=10, **config)).to(device)

    max_steps = step_budget(share, len(chosen), args.max_epochs, args.batch_size)
    if args.max_steps is not None:
        max_steps = min(max_steps, args.max_steps)
    interval = eval_interval(len(chosen), args.batch_size, args.min_eval_steps)
    optimizer = torch.optim.AdamW(model.parameters(), lr=args.lr, weight_decay=args.weight_decay)
    # Warmup over the first interval, then the rate holds until the held-out top-1 stops improving.
    plateau = torch.optim.lr_scheduler.ReduceLROnPlateau(optimizer, mode="max", factor=0.1, patience=args.patience)
    best, best_step, best_state, lr_drops = -1.0, 0, None, 0
    step, converged = 0, False
    while step < max_steps and not converged:
        order = torch.randperm(len(chosen), generator=generator).to(device)
        for first in range(0, len(chosen), args.batch_size):
            if step < interval:
                for group in optimizer.param_groups:
                    group["lr"] = args.lr * (step + 1) / interval
            model.train()
            batch = order[first : first + args.batch_size]
            logits = model(augment(images[batch], generator)).logits
            loss = F.cross_entropy(logits, labels[batch], label_smoothing=0.1)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            step += 1
            if step % interval == 0 or step == max_steps:
                accuracy = top1(model, *held_out)
                if accuracy > best:
                    best, best_step = accuracy, step
                    best_state = copy.deepcopy(model.state_dict())
                rate = optimizer.param_groups[0]["lr"]
                plateau.step(accuracy)
                if optimizer.param_groups[0]["lr"] < rate:  # a plateau: the rate drops, or after the last drop it ends
                    lr_drops += 1
                    converged = lr_drops > args.lr_drops
            if step >= max_steps or converged:
                break
    model.load_state_dict(best_state)
    test_images, test_labels = data.test_images, data.test_labels
    if args.max_test_samples is not None:
        test_images, test_labels = test_images[: args.max_test_samples], test_labels[: args.max_test_samples]
    test = top1(model, to_inputs(test_images, device), torch.from_numpy(test_labels).long().to(device))
    seconds = time.perf_counter() - start
    epochs = step / math.ceil(len(chosen) / args.batch_size)
    return RunResult(
        name, share, seed, len(chosen), test, best, step, best_step, max_steps, epochs, min(lr_drops, args.lr_drops),
        converged, seconds,
    )  # fmt: skip


_WORKER_DATA: Data | None = None


def _init_worker(data: Data) -> None:
    global _WORKER_DATA
    _WORKER_DATA = data
    torch.set_num_threads(1)  # one run per core: small models scale badly over threads, runs in parallel scale well


def _run_in_worker(name: str, config: dict[str, Any], share: float, seed: int, args: argparse.Namespace) -> RunResult:
    return run(name, config, share, seed, _WORKER_DATA, args)


def summary_rows(results: list[RunResult]) -> list[dict[str, Any]]:
    """Per share: each model's mean and std test top-1 (%), the gap, its standard error and whether it is noise."""
    rows = []
    for share in sorted({r.share for r in results}):
        row: dict[str, Any] = {"share": share, "images": next(r.images for r in results if r.share == share)}
        for name in MODELS:
            values = [100 * r.test_top1 for r in results if r.share == share and r.model == name]
            row[name] = (statistics.mean(values), statistics.stdev(values) if len(values) > 1 else 0.0, len(values))
        (plain_mean, plain_std, n_plain), (refined_mean, refined_std, n_refined) = row["plain ViT"], row["Refiner-ViT"]
        row["gap"] = refined_mean - plain_mean
        row["gap_se"] = math.sqrt(plain_std**2 / n_plain + refined_std**2 / n_refined)
        # With one seed there is no noise estimate: nothing can be called outside it.
        row["inside_noise"] = min(n_plain, n_refined) < 2 or abs(row["gap"]) < 2 * row["gap_se"]
        rows.append(row)
    return rows


def format_table(rows: list[dict[str, Any]], parameters: dict[str, int]) -> str:
    header = (
        f"{'share':>6} {'images':>7}  {'plain ViT':>14}  {'Refiner-ViT':>14}  {'gap ± s.e.':>14}  inside seed noise"
    )
    lines = [f"parameters: plain ViT {parameters['plain ViT']:,}, Refiner-ViT {parameters['Refiner-ViT']:,}", header]
    for row in rows:
        cells = [f"{row[name][0]:6.2f} ± {row[name][1]:5.2f}" for name in MODELS]
        gap = f"{row['gap']:+6.2f} ± {row['gap_se']:5.2f}"
        noise = "yes" if row["inside_noise"] else "no"
        lines.append(f"{row['share']:>6.0%} {row['images']:>7,}  {cells[0]:>14}  {cells[1]:>14}  {gap:>14}  {noise}")
    return "\n".join(lines)


def plot(rows: list[dict[str, Any]], out: Path, title: str) -> Path:
    figure, axis = plt.subplots(figsize=(5, 3.5), dpi=120)
    images = [row["images"] for row in rows]
    for name, marker in zip(MODELS, ("s", "o")):
        axis.errorbar(
            images,
            [row[name][0] for row in rows],
            yerr=[row[name][1] for row in rows],
            marker=marker,
            capsize=3,
            label=f"{name} (mean ± std)",
        )
    axis.set_xscale("log")
    # One labelled tick per share (matplotlib's own log ticks crowd each other between 10^3 and 10^4).
    axis.xaxis.set_minor_locator(matplotlib.ticker.NullLocator())
    axis.set_xticks(images, [f"{row['images']:,}\n({row['share']:.0%})" for row in rows], fontsize=8)
    axis.set_xlabel("training images (share), log scale")
    axis.set_ylabel("test top-1 (%)")
    axis.set_title(title, fontsize=8)
    axis.grid(alpha=0.3)
    axis.legend(fontsize=8)
    figure.tight_layout()
    out.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(out)
    plt.close(figure)
    return out


def write_results(args: argparse.Namespace, parameters: dict[str, int], results: list[RunResult], source: str) -> None:
    args.results.parent.mkdir(parents=True, exist_ok=True)
    arguments = vars(args) | {"parameters": parameters, "source": source}
    record = {"arguments": arguments, "runs": [asdict(r) for r in results]}
    # Atomically: stopped mid-write, the file keeps the previous record whole.
    write_text_atomically(args.results, json.dumps(record, indent=1, default=str))


def report_results(results: list[RunResult], parameters: dict[str, int], seeds: Sequence[int], source: str, out: Path):
    """Prints the table and draws the plot."""
    results.sort(key=lambda r: (r.share, r.seed, list(MODELS).index(r.model)))
    rows = summary_rows(results)
    print(f"\nTest top-1 (%), mean ± std over seeds {list(seeds)}; gap = Refiner-ViT - plain ViT:")
    print(format_table(rows, parameters))
    converged = sum(r.converged for r in results)
    print(f"{converged} of {len(results)} runs converged (the others hit the epoch cap).")
    title = f"{source.split(' from ')[0]}, {len(seeds)} seed(s), {converged} of {len(results)} runs converged"
    return plot(rows, out, title)


def main(argv: Sequence[str] | None = None) -> list[RunResult]:
    args = parse_args(argv)
    if args.from_results is not None:
        record = json.loads(args.from_results.read_text())
        results = [RunResult(**run) for run in record["runs"]]
        seeds = sorted({r.seed for r in results})
        source = record["arguments"].get("source", "Fashion-MNIST")
        out = report_results(results, record["arguments"]["parameters"], seeds, source, args.out)
        print(f"Plot: {out}")
        return results
    configs = {name: model_config(block_type, args.full, args.config_overrides) for name, block_type in MODELS.items()}
    parameters = {name: parameter_count(config) for name, config in configs.items()}
    gap = abs(parameters["Refiner-ViT"] - parameters["plain ViT"]) / parameters["plain ViT"]
    if gap > 0.05:
        raise SystemExit(f"The models' parameter counts differ by {gap:.1%} (more than 5 %): {parameters}.")
    data = load_data(args.data_dir, args.held_out)
    print(
        f"{data.source}: a pool of {len(data.train_labels):,} training images, {len(data.held_out_labels):,} held "
        f"out for early stopping, {len(data.test_labels):,} test images. Refiner-ViT (every block refined) against a "
        f"plain ViT ({parameters['plain ViT']:,} vs {parameters['Refiner-ViT']:,} parameters); shares {args.shares}, "
        f"seeds {args.seeds}, batch {args.batch_size}, each run until its held-out top-1 stops improving after "
        f"{args.lr_drops} learning-rate drops (at most {args.max_epochs:g} / sqrt(share) epochs), on {args.device}",
        flush=True,
    )
    # The largest shares first, so that the last runs to finish are short ones.
    shares = sorted(args.shares, reverse=True)
    tasks = [(name, configs[name], share, seed) for share in shares for seed in args.seeds for name in MODELS]
    results: list[RunResult] = []

    def report(result: RunResult) -> None:
        results.append(result)
        # After every run: an interrupted grid keeps what it measured.
        write_results(args, parameters, results, data.source)
        ending = "converged" if result.converged else f"ran out of epochs after {result.lr_drops} drop(s)"
        print(
            f"  {result.model:<12} {result.share:>5.0%} seed {result.seed}: test {100 * result.test_top1:6.2f} %, "
            f"held-out {100 * result.held_out_top1:6.2f} % at step {result.best_step}/{result.steps} "
            f"({result.epochs:.0f} epochs, at most {result.max_steps} steps; {ending}), {result.seconds:.0f} s",
            flush=True,
        )

    if args.jobs > 1 and args.device == "cpu":
        # Fresh processes (spawn), each with one thread and its own copy of the data.
        context = multiprocessing.get_context("spawn")
        with concurrent.futures.ProcessPoolExecutor(
            args.jobs, mp_context=context, initializer=_init_worker, initargs=(data,)
        ) as pool:
            futures = [pool.submit(_run_in_worker, *task, args) for task in tasks]
            try:
                for future in concurrent.futures.as_completed(futures):
                    report(future.result())
            except BaseException:
                # Stopped (Ctrl-C, SIGTERM) or a run failed: drop the queued runs and end the running ones, instead
                # of leaving the pool to finish the grid before the exception gets out.
                pool.shutdown(wait=False, cancel_futures=True)
                for worker in multiprocessing.active_children():
                    worker.terminate()
                raise
    else:
        for task in tasks:
            report(run(*task, data, args))

    out = report_results(results, parameters, args.seeds, data.source, args.out)
    write_results(args, parameters, results, data.source)
    print(f"Plot: {out}; runs: {args.results}")
    return results


if __name__ == "__main__":
    try:
        with sigterm_unwinds():
            main()
    except (KeyboardInterrupt, Terminated) as stop:
        message, status = stopped_message(stop)
        print(f"{message} The runs that finished are in the results file.", file=sys.stderr)
        sys.exit(status)
