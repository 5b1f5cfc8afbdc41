"""benchmarks/profile_inference.py on the tiny model: every part measured on both paths, the parts adding up."""

from pathlib import Path

import pytest
from helpers import load_script, randomize_, tiny_config

from refiner_hf import RefinerViTForImageClassification
from refiner_hf.modeling_refiner_vit import RefinerViTMLP


SCRIPT = Path(__file__).resolve().parents[1] / "benchmarks" / "profile_inference.py"


def test_every_part_is_measured_and_the_parts_add_up_to_the_total(monkeypatch, capsys):
    monkeypatch.syspath_prepend(str(SCRIPT.parent))  # the script imports bench_common from beside it
    benchmark = load_script(SCRIPT)
    model = randomize_(RefinerViTForImageClassification(tiny_config()))
    mlp_forward = RefinerViTMLP.forward
    results = benchmark.main(["--device", "cpu", "--batch-size", "1", "2", "--iterations", "1"], model=model)

    assert list(results) == ["fast", "reference"]
    for figures in results.values():
        assert list(figures) == [1, 2]
        for figure in figures.values():
            parts = figure["parts_ms"]
            assert list(parts) == list(benchmark.PARTS)
            # Each wrapped part ran (the fast path's `forward_folded` methods included); the rest is what is left.
            assert all(parts[part] > 0 for part in benchmark.PARTS if part != benchmark.REST)
            assert parts[benchmark.REST] >= 0
            assert sum(parts.values()) == pytest.approx(figure["total_ms"], rel=1e-9)
            assert sum(figure["shares_percent"].values()) == pytest.approx(100.0)
            assert figure["plain_ms"] > 0

    printed = capsys.readouterr().out
    tables = printed.split("path (set_fast_inference(")[1:]
    assert [table.split(")")[0] for table in tables] == ["True", "False"]
    for table in tables:
        assert all(f"| {part} | " in table for part in benchmark.PARTS)
    # The wrapping is undone: the classes' methods and the layers' own forwards are the package's again.
    assert RefinerViTMLP.forward is mlp_forward
    assert not any("forward" in vars(module) for module in model.modules())
