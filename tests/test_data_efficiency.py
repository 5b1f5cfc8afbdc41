"""benchmarks/data_efficiency.py at its smallest setting: both models through the trainer, the table and the plot."""

import json
import re
from pathlib import Path

import pytest
from helpers import load_script
from PIL import Image


SCRIPT = Path(__file__).resolve().parents[1] / "benchmarks" / "data_efficiency.py"
TINY = json.dumps(
    {
        "hidden_size": 32,
        "num_attention_heads": 2,
        "num_hidden_layers": 2,
        "mlp_ratio": 2.0,
        "stem_hidden_sizes": [8] * 3,
    }
)


@pytest.fixture(scope="module")
def benchmark():
    return load_script(SCRIPT)


def test_smallest_setting_runs_both_models_through_the_trainer(benchmark, tmp_path, capsys):
    out = tmp_path / "efficiency.png"
    settings = benchmark.main(
        ["--fractions", "0.02", "--seeds", "0", "--epochs", "1", "--max-train-steps", "2", "--max-eval-samples", "20",
         "--batch-size", "8", "--config-overrides", TINY, "--out", str(out), "--work-dir", str(tmp_path / "runs")]
    )  # fmt: skip
    printed = capsys.readouterr().out
    lines = printed.splitlines()
    header = next(i for i, line in enumerate(lines) if line.startswith("model"))
    assert re.fullmatch(r"model\s+parameters\s+2% \(68 img\)", lines[header])
    rows = lines[header + 1 : header + 3]
    assert [row.split("  ")[0].strip() for row in rows] == ["plain ViT", "Refiner-ViT"]
    for row, setting in zip(rows, settings):
        mean, std = re.search(r"([\d.]+) ±\s+([\d.]+)$", row).groups()
        assert float(mean) == pytest.approx(100 * setting.top1[0], abs=0.01) and float(std) == 0.0
        assert 0.0 <= setting.top1[0] <= 1.0
    # Each run went through the trainer: 2 steps on 68 images, evaluated on 20 validation images.
    for name in ("plain_0.02_seed0", "refined_0.02_seed0"):
        log = (tmp_path / "runs" / name / "train.log").read_text()
        assert "20" in log and (tmp_path / "runs" / name / "all_results.json").is_file()
    with Image.open(out) as plot:
        assert plot.format == "PNG" and plot.size == (600, 420)


def test_parameter_counts_match_within_five_percent(benchmark):
    configs = {name: benchmark.model_config(kind, {}) for name, kind in benchmark.MODELS.items()}
    assert configs["plain ViT"]["block_types"] == ["plain"] * 6
    assert configs["Refiner-ViT"]["block_types"] == ["refined"] * 6
    counts = {name: benchmark.parameter_count(config) for name, config in configs.items()}
    assert counts["plain ViT"] < counts["Refiner-ViT"] < 1.05 * counts["plain ViT"]
