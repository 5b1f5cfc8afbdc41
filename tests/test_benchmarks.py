"""
benchmarks/bench_inference.py on a tiny model: every engine timed, each in a worker of its own (in this process, and
once in a child process), the other processes' load and the self-check in the figures, and the rules that flag a busy
machine and a self-check difference.
"""

import json
import sys
from pathlib import Path

import pytest
import torch
from helpers import load_script


BENCHMARKS = Path(__file__).resolve().parents[1] / "benchmarks"
ENGINES = ["reference", "fast", "fast-pytorch", "onnx-fp32", "onnx-int8", "deit-s", "timm-deit-s"]


@pytest.fixture(scope="module")
def benchmark():
    pytest.importorskip("timm")
    pytest.importorskip("onnxruntime")
    with pytest.MonkeyPatch.context() as patch:
        patch.syspath_prepend(str(BENCHMARKS))  # the script imports bench_common from beside it
        yield load_script(BENCHMARKS / "bench_inference.py")


def test_every_engine_is_timed_in_a_worker_of_its_own(benchmark, tmp_path, monkeypatch, capsys):
    # The workers run in this process here (a child process costs seconds of imports); the next test runs one.
    specs = []

    def worker_here(spec):
        specs.append(spec)
        return json.loads(json.dumps(benchmark.measure(spec)))  # what a child would send back

    monkeypatch.setattr(benchmark, "run_worker", worker_here)
    monkeypatch.setattr(benchmark, "BUSY_SAMPLE_SECONDS", 0.05)
    threads = torch.get_num_threads()
    try:  # one thread: on a loaded machine, waiting threads would slow the tiny model's every call
        figures = benchmark.main(
            ["--tiny-model", "--image-size", "32", "--batch-size", "1", "2", "--dtype", "fp32", "--no-compile",
             "--rounds", "2", "--seconds", "0.01", "--threads", "1", "--json", str(tmp_path / "figures.json")]
        )  # fmt: skip
    finally:
        torch.set_num_threads(threads)

    assert figures["engines"] == ENGINES and figures["failures"] == {} and figures["threads"] == 1
    # Round 1 runs every engine's worker in turn, then round 2; each worker holds one engine and the parent's threads.
    assert [spec["engines"] for spec in specs[:-1]] == [[name] for name in ENGINES] * 2
    assert {spec["threads"] for spec in specs} == {1}
    configurations = [(row["batch_size"], row["dtype"], row["mode"]) for row in figures["rows"]]
    assert configurations == [(1, "fp32", "eager"), (2, "fp32", "eager")]
    for row in figures["rows"]:
        assert list(row["images_per_s"]) == ENGINES
        for name in ENGINES:
            seconds = row["seconds_per_call"][name]
            assert len(seconds) == 2 and min(seconds) > 0  # one per round
            assert row["images_per_s"][name] == pytest.approx(row["batch_size"] / min(seconds))  # the best round
    assert figures["fast_vs_reference_difference"] < 1e-4
    assert figures["onnx_vs_reference_difference"]["onnx-fp32"] < 1e-4

    # The other processes' load: one sample before each worker and one after each round, and two around the
    # self-check, whose shared process holds the fast path and ONNX Runtime fp32.
    other_load = figures["other_load"]
    assert len(other_load["samples"]) == 2 * (len(ENGINES) + 1) + 2
    assert other_load["mean_cpus"] >= 0 and other_load["busy"] == (other_load["mean_cpus"] > 0.25)
    check = figures["self_check"]
    assert specs[-1]["engines"] == check["engines"] == ["fast", "onnx-fp32"] and specs[-1]["rounds"] == 2
    assert check["configuration"] == {"mode": "eager", "dtype": "fp32", "batch_size": 1}
    assert check["own_images_per_s"] == {name: figures["rows"][0]["images_per_s"][name] for name in check["engines"]}
    assert min(check["shared_images_per_s"].values()) > 0

    written = json.loads((tmp_path / "figures.json").read_text())
    assert written["rows"] == figures["rows"] and written["other_load"]["mean_cpus"] == other_load["mean_cpus"]
    printed = capsys.readouterr().out
    assert "| timm DeiT-S img/s | fast / reference | fast / DeiT-S | fast / timm DeiT-S |" in printed
    assert "| ORT int8 / timm DeiT-S |" in printed
    assert "# self-check, batch 1 fp32 eager, fast (fused kernels) and ONNX Runtime fp32" in printed
    assert ("# WARNING: the machine is busy" in printed) == other_load["busy"]


def test_a_child_process_times_its_engine(benchmark):
    spec = {"engines": ["fast"], "model": "tiny", "image_size": 32, "seed": 0, "device": "cpu", "threads": 1,
            "seconds": 0.01, "rounds": 1, "onnx_dir": None, "original_checkout": None,
            "configurations": [{"mode": "eager", "dtype": "fp32", "batch_size": 1},
                               {"mode": "eager", "dtype": "bf16", "batch_size": 2}]}  # fmt: skip
    result = benchmark.run_worker(spec)
    assert [(r["batch_size"], r["dtype"]) for r in result["results"]] == [(1, "fp32"), (2, "bf16")]
    for measured in result["results"]:
        assert len(measured["seconds_per_call"]["fast"]) == 1 and measured["seconds_per_call"]["fast"][0] > 0
        assert measured["first_call_s"]["fast"] > 0


def test_the_self_check_flags_a_difference_above_25_percent(benchmark):
    own = {"fast": 10.0, "onnx-fp32": 20.0}
    differences, flagged = benchmark.self_check_differences(own, {"fast": 9.0, "onnx-fp32": 14.0})
    assert differences == pytest.approx({"fast": -0.1, "onnx-fp32": -0.3}) and flagged == ["onnx-fp32"]
    differences, flagged = benchmark.self_check_differences(own, {"fast": 13.0, "onnx-fp32": 22.0})
    assert differences == pytest.approx({"fast": 0.3, "onnx-fp32": 0.1}) and flagged == ["fast"]


def test_the_self_check_uses_onnx_runtime_or_else_a_deit(benchmark):
    eager = {"mode": "eager", "dtype": "fp32", "batch_size": 1}
    compiled = {**eager, "mode": "compiled"}
    plan = {"fast": [eager, compiled], "onnx-fp32": [eager], "deit-s": [eager, compiled]}
    assert benchmark.self_check_plan(plan) == (eager, ["fast", "onnx-fp32"])
    del plan["onnx-fp32"]
    assert benchmark.self_check_plan(plan) == (eager, ["fast", "deit-s"])
    assert benchmark.self_check_plan({"deit-s": [eager]}) is None


def test_other_processes_load_and_the_busy_machine(benchmark):
    bench_common = sys.modules["bench_common"]
    # 2 CPUs for 1 s at 100 ticks per second: 200 ticks in all, 100 of them busy, 0.25 s of them this process's.
    assert bench_common.other_cpus((1000, 5000, 2), (1100, 5200, 2), 0.25, ticks_per_second=100) == 0.75
    assert bench_common.other_cpus((1000, 5000, 2), (1010, 5200, 2), 0.25, ticks_per_second=100) == 0.0
    sample = bench_common.sample_other_load(0.05)
    assert sample is None or sample >= 0
    assert benchmark.load_summary([0.1, 0.2])["busy"] is False
    summary = benchmark.load_summary([0.5, None, 0.2])
    assert summary["busy"] is True and summary["mean_cpus"] == pytest.approx(0.35) and summary["max_cpus"] == 0.5
    assert benchmark.load_summary([None])["busy"] is None


def test_the_targets_are_checked_on_fp32_eager_rows(benchmark):
    rows = [
        {"batch_size": 1, "dtype": "fp32", "mode": "eager",
         "images_per_s": {"fast": 9.0, "timm-deit-s": 10.0, "onnx-fp32": 8.0, "original": 0.8}},
        {"batch_size": 8, "dtype": "fp32", "mode": "eager", "images_per_s": {"fast": 8.0, "timm-deit-s": 10.0}},
        {"batch_size": 1, "dtype": "bf16", "mode": "eager", "images_per_s": {"fast": 1.0, "timm-deit-s": 10.0}},
    ]  # fmt: skip
    checked = benchmark.target_results(rows, ("refiner-vit-s", 224))
    results = {(t["engine"], t["other"], t["batch_size"]): (t["ratio"], t["met"]) for t in checked}
    assert results == {
        ("fast", "timm-deit-s", 1): (pytest.approx(0.9), True),
        ("onnx-fp32", "fast", 1): (pytest.approx(8 / 9), False),
        ("fast", "timm-deit-s", 8): (pytest.approx(0.8), False),
    }
    # The original code's target is the released model's, Refiner-ViT-L at 448 px.
    checked = benchmark.target_results(rows, ("refiner-vit-l", 448))
    results = {(t["engine"], t["other"], t["batch_size"]): (t["ratio"], t["met"]) for t in checked}
    assert results == {("fast", "original", 1): (pytest.approx(11.25), True), ("onnx-fp32", "fast", 1): (8 / 9, False)}


def test_the_training_benchmark_reports_other_processes_load(tmp_path, monkeypatch, capsys):
    # The modes' child processes are stood in for (their figures are not what is tested here).
    monkeypatch.syspath_prepend(str(BENCHMARKS))
    train = load_script(BENCHMARKS / "bench_train.py")
    figures = {"step_s": 2.0, "images_per_s": 4.0, "peak_mib_per_image": 100.0, "saved_mib_per_image": 90.0,
               "autocast": "none"}  # fmt: skip
    completed = type("Completed", (), {"returncode": 0, "stdout": json.dumps(figures) + "\n", "stderr": ""})
    monkeypatch.setattr(train.subprocess, "run", lambda *args, **kwargs: completed)
    loads = iter([0.1, 0.9, 0.8])  # before each of the two modes, and after the last
    monkeypatch.setattr(train, "sample_other_load", lambda *args: next(loads))
    train.main(["--modes", "reference", "lean", "--json", str(tmp_path / "train.json")])
    other_load = json.loads((tmp_path / "train.json").read_text())["other_load"]
    assert other_load["samples"] == [0.1, 0.9, 0.8] and other_load["busy"] is True
    assert other_load["mean_cpus"] == pytest.approx(0.6) and other_load["max_cpus"] == pytest.approx(0.9)
    printed = capsys.readouterr().out
    assert "mean 0.60 CPUs, at most 0.90" in printed and "# WARNING: the machine is busy" in printed
