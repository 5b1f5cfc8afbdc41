"""
The README's first command (classify the bundled photo with the converted bundled checkpoint), and the example
scripts' usage errors.
"""

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from helpers import FIXTURES, load_script
from PIL import Image
from training_utils import save_tiny_teacher

from refiner_hf import convert_original_checkpoint
from refiner_hf.assets import sample_image_path
from refiner_hf.image_processing_refiner_vit import image_processor_for_config
from refiner_hf.training.errors import run_command
from refiner_hf.training.teacher_relabeling import parse_relabel_args, relabel_training_set


EXAMPLES = Path(__file__).resolve().parents[1] / "examples"


def test_classify_image_prints_the_models_top_5():
    result = subprocess.run(
        [sys.executable, str(EXAMPLES / "classify_image.py")], capture_output=True, text=True, timeout=300, check=True
    )
    rows = re.findall(r"^\s+(\d)\. (LABEL_\d+)\s+([0-9.]+)$", result.stdout, flags=re.M)
    assert [int(r[0]) for r in rows] == [1, 2, 3, 4, 5]

    model = convert_original_checkpoint(FIXTURES / "released_tiny.pth")
    processor = image_processor_for_config(model.config)
    with torch.no_grad():
        probabilities = model(**processor(Image.open(sample_image_path()), return_tensors="pt")).logits.softmax(-1)[0]
    top = probabilities.topk(5)
    assert [r[1] for r in rows] == [f"LABEL_{i}" for i in top.indices.tolist()]
    assert [float(r[2]) for r in rows] == [round(v, 4) for v in top.values.tolist()]


# Usage errors: one line naming the problem and the fix, exit status 2, no traceback.


@pytest.mark.parametrize(
    "script, argv, message",
    [
        ("run_imagenet.py", ["--learning_rate", "1e-3"], "unknown argument --learning_rate. Did you mean --lr?"),
        ("generate_relabel.py", [], "the following arguments are required: --teacher, --output"),
        ("visualize_attention.py", ["--model", "/no/such/model"], "--model /no/such/model: no such directory."),
        ("classify_image.py", ["--image", "/no/such.jpg"], "--image /no/such.jpg: no such file"),
    ],
)
def test_the_example_scripts_print_usage_errors_as_one_line(script, argv, message):
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1"}
    result = subprocess.run(
        [sys.executable, str(EXAMPLES / script), *argv], capture_output=True, text=True, timeout=300, env=env
    )
    assert result.returncode == 2 and "Traceback" not in result.stderr
    errors = [line for line in result.stderr.splitlines() if line.startswith(f"{script}: error: ")]
    assert len(errors) == 1 and errors[0].startswith(f"{script}: error: {message}"), result.stderr


def one_line_error(main, capsys, usage_errors=()) -> str:
    """The line `run_command` prints for `main`'s usage error."""
    with pytest.raises(SystemExit) as exit_info:
        run_command(main, usage_errors)
    assert exit_info.value.code == 2
    lines = capsys.readouterr().err.splitlines()
    assert len(lines) == 1
    return lines[0].split(": error: ", 1)[1]


def test_generate_relabel_usage_errors(tmp_path, capsys):
    def relabel(argv):
        return relabel_training_set(*parse_relabel_args(argv))

    teacher = save_tiny_teacher(tmp_path / "teacher")
    output = str(tmp_path / "store")
    capsys.readouterr()
    base = ["--teacher", str(teacher), "--output", output]
    cases = [
        (["--output", output], "the following arguments are required: --teacher"),
        (["--teacher", "/no/such/teacher", "--output", output], "--teacher /no/such/teacher: no such directory."),
        (["--teacher", str(tmp_path), "--output", output], f"--teacher {tmp_path}: no config.json in this directory"),
        (base + ["--train_dir", "/no/such/dir"], "--train_dir /no/such/dir: no such directory."),
        (base + ["--topk", "3"], "unknown argument --topk. Did you mean --top_k?"),
        (base + ["--batch_size", "0"], "--batch_size must be at least 1, got 0."),
        (base + ["--teacher_image_size", "-5"], "--teacher_image_size must be between 1 and 4096 pixels, got -5."),
        (base + ["--teacher_image_size", "100000"], "--teacher_image_size must be between 1 and 4096 pixels"),
        (base + ["--output", str(teacher / "config.json")], f"--output {teacher / 'config.json'}: a file is there"),
        (base + ["--streaming"], "Relabeling needs a map-style training set: leave out --streaming."),
        (base + ["--relabel_root", str(tmp_path)], "--relabel_root is where the trainer reads the maps"),
    ]
    for argv, message in cases:
        assert one_line_error(lambda: relabel(argv), capsys).startswith(message), argv
    assert not (tmp_path / "store").exists()


def test_classify_image_usage_errors(tmp_path, capsys, monkeypatch):
    classify = load_script(EXAMPLES / "classify_image.py").main
    cases = [
        (["--model", "/no/such/model"], "--model /no/such/model: no such directory."),
        (["--checkpoint", str(tmp_path / "missing.pth")], f"--checkpoint {tmp_path / 'missing.pth'}: no such file."),
        (["--image", str(tmp_path / "missing.jpg")], f"--image {tmp_path / 'missing.jpg'}: no such file"),
        (["--top", "3"], "unknown argument --top. Did you mean --top-k?"),
        (["--top-k", "0"], "--top-k must be at least 1, got 0"),
    ]
    for argv, message in cases:
        monkeypatch.setattr(sys, "argv", ["classify_image.py", *argv])
        assert one_line_error(classify, capsys).startswith(message), argv
