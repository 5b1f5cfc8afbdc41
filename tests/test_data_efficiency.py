"""benchmarks/data_efficiency.py at its smallest: the data, the shares, the step budget, the table and the plot."""

import gzip
import json
import math
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from helpers import load_script
from PIL import Image


SCRIPT = Path(__file__).resolve().parents[1] / "benchmarks" / "data_efficiency.py"
TINY = json.dumps({"hidden_size": 16, "num_attention_heads": 2, "num_hidden_layers": 1, "mlp_ratio": 2.0})


@pytest.fixture(scope="module")
def benchmark():
    return load_script(SCRIPT)


def test_smallest_grid_falls_back_to_the_embedded_data_and_reports_what_it_measured(benchmark, tmp_path, capsys):
    out = tmp_path / "efficiency.png"
    results = benchmark.main(
        ["--data-dir", str(tmp_path / "no-data"), "--shares", "0.02", "--seeds", "0", "1", "--max-steps", "3",
         "--min-eval-steps", "2", "--held-out", "100", "--max-test-samples", "50", "--batch-size", "8", "--jobs", "1",
         "--config-overrides", TINY, "--out", str(out)]
    )  # fmt: skip
    captured = capsys.readouterr()
    assert "sudo apt-get install dataset-fashion-mnist" in captured.err and "embedded subset" in captured.err
    # 3,400 embedded training images less 100 held out; 2 % of each class of the 3,300 (about 330 each).
    assert "a pool of 3,300 training images, 100 held out for early stopping, 1,000 test images" in captured.out
    assert [(r.model, r.seed) for r in results] == [(model, seed) for seed in (0, 1) for model in benchmark.MODELS]
    pool_labels = benchmark.load_data(tmp_path / "no-data", 100).train_labels
    images = len(benchmark.share_indices(pool_labels, 0.02, seed=0))
    assert images == sum(round(0.02 * count) for count in np.bincount(pool_labels))
    for result in results:
        assert result.images == images and result.steps == 3 and result.max_steps == 3
        assert result.best_step in (2, 3) and not result.converged  # evaluated at steps 2 and 3 (the last)
        assert result.epochs == pytest.approx(3 / math.ceil(images / 8))
        assert 0.0 <= result.test_top1 <= 1.0 and round(result.test_top1 * 50) == pytest.approx(result.test_top1 * 50)
    # The table's row: each model's mean ± std over the two seeds, the gap and its standard error.
    row = next(line for line in captured.out.splitlines() if line.strip().startswith("2%"))
    numbers = [float(x) for x in re.findall(r"[-+]?\d+\.\d+", row)]
    plain = [100 * r.test_top1 for r in results if r.model == "plain ViT"]
    refined = [100 * r.test_top1 for r in results if r.model == "Refiner-ViT"]
    expected = [np.mean(plain), np.std(plain, ddof=1), np.mean(refined), np.std(refined, ddof=1)]
    expected += [expected[2] - expected[0], math.sqrt((expected[1] ** 2 + expected[3] ** 2) / 2)]
    np.testing.assert_allclose(numbers, expected, rtol=0, atol=0.006)  # printed with 2 decimals
    assert row.split()[1] == str(images)
    assert "0 of 4 runs converged (the others hit the epoch cap)." in captured.out  # 3 steps: each hit its cap
    record = json.loads(out.with_suffix(".json").read_text())
    assert [run["test_top1"] for run in record["runs"]] == [r.test_top1 for r in results]
    assert record["arguments"]["parameters"]["Refiner-ViT"] > record["arguments"]["parameters"]["plain ViT"]
    assert record["arguments"]["source"].startswith("the embedded Fashion-MNIST subset")
    with Image.open(out) as plot:
        assert plot.format == "PNG" and plot.size == (600, 420)
    # The table and plot again from the results file alone, without training.
    redrawn = benchmark.main(["--from-results", str(out.with_suffix(".json")), "--out", str(tmp_path / "again.png")])
    assert redrawn == results and row in capsys.readouterr().out.splitlines()
    assert (tmp_path / "again.png").is_file()


def write_idx(path: Path, array: np.ndarray) -> None:
    """An IDX file as Fashion-MNIST ships it: zeros, the uint8 type code, the rank, the sizes, then the data."""
    header = bytes([0, 0, 8, array.ndim]) + b"".join(int(n).to_bytes(4, "big") for n in array.shape)
    path.write_bytes(gzip.compress(header + array.astype(np.uint8).tobytes()))


def test_reads_the_full_data_set_and_holds_out_a_fixed_split(benchmark, tmp_path):
    rng = np.random.default_rng(0)
    train, train_labels = rng.integers(0, 256, (40, 28, 28)), np.arange(40) % 10
    test, test_labels = rng.integers(0, 256, (12, 28, 28)), np.arange(12) % 10
    for name, array in (("train-images-idx3", train), ("train-labels-idx1", train_labels),
                        ("t10k-images-idx3", test), ("t10k-labels-idx1", test_labels)):  # fmt: skip
        write_idx(tmp_path / f"{name}-ubyte.gz", array)
    data = benchmark.load_data(tmp_path, held_out=8)
    assert data.source == f"Fashion-MNIST from {tmp_path}"
    assert len(data.train_images) == 32 and len(data.held_out_images) == 8
    np.testing.assert_array_equal(data.test_images, test)
    # Every training image is in exactly one of the two splits, with its label, and the split is the same each time.
    together = np.concatenate([data.train_images, data.held_out_images]).reshape(40, -1)
    order = np.lexsort(together.T[::-1])
    np.testing.assert_array_equal(together[order], train.reshape(40, -1)[np.lexsort(train.reshape(40, -1).T[::-1])])
    again = benchmark.load_data(tmp_path, held_out=8)
    np.testing.assert_array_equal(again.held_out_labels, data.held_out_labels)


def test_shares_are_drawn_per_class_and_per_seed(benchmark):
    labels = np.repeat(np.arange(10), 100)
    chosen = benchmark.share_indices(labels, 0.03, seed=0)
    assert np.bincount(labels[chosen]).tolist() == [3] * 10
    assert np.array_equal(chosen, benchmark.share_indices(labels, 0.03, seed=0))
    assert not np.array_equal(chosen, benchmark.share_indices(labels, 0.03, seed=1))
    assert len(benchmark.share_indices(labels, 1.0, seed=0)) == 1000
    assert np.bincount(labels[benchmark.share_indices(labels, 0.001, seed=0)]).tolist() == [1] * 10  # at least one


def test_smaller_shares_may_take_more_epochs_and_are_evaluated_at_least_every_min_eval_steps(benchmark):
    # At most 4 / sqrt(share) epochs: 1 % of 59,000 images (590, 10 steps of 64) 40 epochs; 10 % 12.6; all 4.
    assert benchmark.step_budget(0.01, 590, 4.0, 64) == 400
    assert benchmark.step_budget(0.1, 5900, 4.0, 64) == round(4 / math.sqrt(0.1) * 93)
    assert benchmark.step_budget(1.0, 59000, 4.0, 64) == 4 * 922
    per_image = [benchmark.step_budget(s, round(59000 * s), 4.0, 64) / (59000 * s) for s in (0.01, 0.03, 0.1, 1.0)]
    assert per_image == sorted(per_image, reverse=True)
    # Evaluated once an epoch, but not more often than every 50 steps (590 images are 10 steps of 64).
    assert benchmark.eval_interval(590, 64, 50) == 50
    assert benchmark.eval_interval(5900, 64, 50) == 93 and benchmark.eval_interval(59000, 64, 50) == 922


@pytest.mark.parametrize("patience, lr_drops", [(0, 0), (1, 1), (2, 2)])
def test_a_run_ends_at_the_plateau_after_its_last_learning_rate_drop(
    benchmark, tmp_path, monkeypatch, patience, lr_drops
):
    # A held-out top-1 that never improves after the first evaluation: each plateau takes patience + 1 evaluations,
    # the rate drops lr_drops times, and the plateau after the last drop ends the run.
    seen_rates = []

    def constant_top1(model, inputs, labels, batch=500):
        seen_rates.append(float(optimizers[-1].param_groups[0]["lr"]))
        return 0.5

    optimizers = []
    adamw = torch.optim.AdamW
    monkeypatch.setattr(benchmark, "top1", constant_top1)
    monkeypatch.setattr(
        benchmark.torch.optim, "AdamW", lambda *a, **k: optimizers.append(adamw(*a, **k)) or optimizers[-1]
    )
    args = benchmark.parse_args(
        ["--data-dir", str(tmp_path), "--shares", "0.01", "--batch-size", "8", "--min-eval-steps", "2",
         "--patience", str(patience), "--lr-drops", str(lr_drops), "--lr", "0.01", "--held-out", "20",
         "--max-test-samples", "10", "--device", "cpu"]
    )  # fmt: skip
    data = benchmark.load_data(tmp_path, args.held_out)
    config = benchmark.model_config("plain", False, json.loads(TINY))
    result = benchmark.run("plain ViT", config, 0.01, 0, data, args)
    evaluations = 1 + (lr_drops + 1) * (patience + 1)
    assert result.converged and result.lr_drops == lr_drops
    interval = benchmark.eval_interval(result.images, 8, 2)  # 30 images: an epoch of 4 steps
    assert interval == 4 and result.best_step == interval and result.steps == interval * evaluations < result.max_steps
    # Held-out evaluations (the last call tests the best weights): the rate after warmup, divided by 10 per drop.
    expected = [0.01] * (1 + patience + 1) + [
        0.01 * 0.1 ** (1 + i // (patience + 1)) for i in range(lr_drops * (patience + 1))
    ]
    np.testing.assert_allclose(seen_rates[:-1], expected, rtol=1e-6)


def test_gap_and_seed_noise(benchmark):
    def results(model, values):
        return [
            benchmark.RunResult(model, 0.01, seed, 590, v, v, 10, 10, 10, 1.0, 2, True, 1.0)
            for seed, v in enumerate(values)
        ]

    clear = benchmark.summary_rows(
        results("plain ViT", [0.70, 0.72, 0.74]) + results("Refiner-ViT", [0.80, 0.81, 0.82])
    )
    (row,) = clear
    assert row["plain ViT"][:2] == pytest.approx((72.0, 2.0)) and row["Refiner-ViT"][:2] == pytest.approx((81.0, 1.0))
    assert row["gap"] == pytest.approx(9.0) and row["gap_se"] == pytest.approx(math.sqrt(5 / 3))
    assert not row["inside_noise"]
    (noisy,) = benchmark.summary_rows(
        results("plain ViT", [0.70, 0.72, 0.74]) + results("Refiner-ViT", [0.71, 0.73, 0.77])
    )
    assert noisy["gap"] == pytest.approx(5 / 3) and noisy["inside_noise"]


def test_augmentation_shifts_by_at_most_two_pixels_or_mirrors(benchmark):
    batch = torch.full((64, 1, 28, 28), -1.0)
    batch[:, 0, 10, 5] = 5.0
    shifted = benchmark.augment(batch, torch.Generator().manual_seed(0))
    assert shifted.shape == batch.shape
    rows, columns = [], []
    for image in shifted[:, 0]:
        row, column = divmod(int(image.argmax()), 28)
        assert image.max() == 5.0 and (image == 5.0).sum() == 1
        rows.append(row)
        columns.append(column if abs(column - 5) <= 2 else 27 - column)
    assert set(rows) <= set(range(8, 13)) and set(columns) <= set(range(3, 8))
    assert len(set(rows)) > 2  # not the same shift for every image


def test_parameter_counts_match_within_five_percent(benchmark):
    for full in (False, True):
        configs = {name: benchmark.model_config(kind, full, {}) for name, kind in benchmark.MODELS.items()}
        assert configs["plain ViT"]["block_types"] == ["plain"] * configs["plain ViT"]["num_hidden_layers"]
        assert set(configs["Refiner-ViT"]["block_types"]) == {"refined"}
        counts = {name: benchmark.parameter_count(config) for name, config in configs.items()}
        assert counts["plain ViT"] < counts["Refiner-ViT"] < 1.05 * counts["plain ViT"]


@pytest.mark.parametrize(
    "argv, message",
    [
        (["--shares", "0", "1.5"], r"--shares must lie in \(0, 1\], got \[0.0, 1.5\]"),
        (["--patience", "-1"], "--patience must be at least 0, got -1"),
        (["--lr-drops", "-2"], "--lr-drops must be at least 0, got -2"),
        (["--min-eval-steps", "0"], "--min-eval-steps must be at least 1, got 0"),
        (["--max-epochs", "0"], "--max-epochs must be positive, got 0.0"),
        (
            ["--config-overrides", '{"hiden_size": 32}'],
            r"--config-overrides: 'hiden_size' is not a RefinerViTConfig field\. Did you mean hidden_size\?",
        ),
        (["--config-overrides", '{"block_types": ["plain"]}'], r"--config-overrides: `block_types` cannot be set"),
        (["--config-overrides", "[1]"], r"--config-overrides: must be a JSON object of RefinerViTConfig fields"),
    ],
)
def test_rejects_settings_that_cannot_run(benchmark, capsys, argv, message):
    with pytest.raises(SystemExit) as exit_info:
        benchmark.parse_args(argv)
    assert exit_info.value.code == 2 and re.search(message, capsys.readouterr().err)


@pytest.mark.parametrize("stop, status", [(signal.SIGINT, 130), (signal.SIGTERM, 143)])
def test_a_stopped_grid_ends_at_once_and_keeps_the_runs_that_finished(tmp_path, stop, status):
    # Ctrl-C or SIGTERM while two workers train: the queued runs are dropped and the running ones ended (the pool
    # would otherwise finish all 24 runs first); the results file holds the finished runs, whole.
    out = tmp_path / "e.png"
    command = [sys.executable, str(SCRIPT), "--data-dir", str(tmp_path / "none"), "--shares", "0.02", "0.05",
               "--seeds", *map(str, range(6)), "--held-out", "100", "--max-test-samples", "100",
               "--min-eval-steps", "5", "--config-overrides", TINY, "--jobs", "2", "--out", str(out)]  # fmt: skip
    process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    results = out.with_suffix(".json")
    deadline = time.monotonic() + 120
    while not results.exists() and process.poll() is None and time.monotonic() < deadline:
        time.sleep(0.2)
    assert process.poll() is None, "the grid ended before it could be stopped"
    process.send_signal(stop)
    _, err = process.communicate(timeout=60)
    assert process.returncode == status
    assert "stopped by" in err and "The runs that finished are in the results file." in err
    finished = json.loads(results.read_text())["runs"]
    assert 1 <= len(finished) < 24
