"""benchmarks/bench_int8_accuracy.py on a few validation images: every variant evaluated, fp32 equal to PyTorch."""

from pathlib import Path

import pytest
from helpers import load_script, randomize_, tiny_config

from refiner_hf import RefinerViTForImageClassification
from refiner_hf.image_processing_refiner_vit import image_processor_for_config
from refiner_hf.model_directory import save_model_directory
from refiner_hf.training.embedded_data import class_names


SCRIPT = Path(__file__).resolve().parents[1] / "benchmarks" / "bench_int8_accuracy.py"


def test_every_variant_is_evaluated_and_fp32_matches_pytorch(tmp_path, capsys):
    labels = dict(enumerate(class_names()))
    config = tiny_config(num_labels=10, id2label=labels, label2id={name: i for i, name in labels.items()})
    model = randomize_(RefinerViTForImageClassification(config)).eval()
    model_dir = save_model_directory(model, image_processor_for_config(config), tmp_path / "model")
    benchmark = load_script(SCRIPT)
    rows = benchmark.main(
        ["--model", str(model_dir), "--limit", "40", "--calibration-images", "16", "--batch-size", "20",
         "--work-dir", str(tmp_path / "work")]
    )  # fmt: skip
    names = [row.name for row in rows]
    assert names == [
        "PyTorch (reference computation)",
        "ONNX Runtime fp32",
        "ONNX Runtime int8, dynamic, per channel (--quantize int8)",
        "ONNX Runtime int8, dynamic, per tensor",
        "ONNX Runtime int8, static QDQ, 16 calibration images",
    ]
    pytorch, fp32, *int8 = rows
    assert fp32.top1 == pytorch.top1 and fp32.agreement == 100.0 and fp32.relative_difference < 1e-4
    for row in int8:
        assert 0 < row.megabytes < fp32.megabytes and row.relative_difference < 0.2
    printed = capsys.readouterr().out
    assert f"# {model_dir}: 40 validation images of the embedded Fashion-MNIST subset" in printed
    assert f"| ONNX Runtime fp32 | {pytorch.top1:.1f} | 100.0 |" in printed


def test_a_model_of_other_classes_is_refused(tmp_path):
    model = RefinerViTForImageClassification(tiny_config()).eval()
    model_dir = save_model_directory(model, image_processor_for_config(model.config), tmp_path / "model")
    with pytest.raises(SystemExit, match="does not classify the embedded Fashion-MNIST classes"):
        load_script(SCRIPT).main(["--model", str(model_dir)])
