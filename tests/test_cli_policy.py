"""
One error policy for every command (refiner_hf.cli): each command line of the package, run as a user runs it (its own
process), answers a table of bad inputs with exactly one line on stderr, `PROG: error: ...`, naming the problem, and
exit status 2 for a usage error or 1 for a data error; no traceback, and nothing written.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from helpers import FIXTURES
from safetensors.torch import load_file, save_file

from refiner_hf import convert_original_checkpoint
from refiner_hf.cli import EXIT_DATA, EXIT_USAGE
from refiner_hf.image_processing_refiner_vit import image_processor_for_config
from refiner_hf.model_directory import save_model_directory


ROOT = Path(__file__).resolve().parents[1]
COMMANDS = {
    "convert": [sys.executable, "-m", "refiner_hf.convert_checkpoint"],
    "export": [sys.executable, "-m", "refiner_hf.export"],
    "pack": [sys.executable, "-m", "refiner_hf.token_labeling.pack_cli"],
    "train": [sys.executable, str(ROOT / "examples" / "run_imagenet.py")],
    "visualise": [sys.executable, str(ROOT / "examples" / "visualize_attention.py")],
}
PROGS = {
    "convert": "refiner-vit-convert",
    "export": "refiner-vit-export",
    "pack": "refiner-vit-pack-relabel",
    "train": "run_imagenet.py",
    "visualise": "visualize_attention.py",
}


@pytest.fixture(scope="module")
def inputs(tmp_path_factory) -> Path:
    """A converted tiny model directory, broken copies of it, and other bad files."""
    root = tmp_path_factory.mktemp("inputs")
    model = convert_original_checkpoint(FIXTURES / "released_tiny.pth")
    save_model_directory(model, image_processor_for_config(model.config), root / "model")

    nan = root / "nan-model"
    nan.mkdir()
    for item in (root / "model").iterdir():
        if item.is_file():
            (nan / item.name).write_bytes(item.read_bytes())
    weights = load_file(nan / "model.safetensors")
    name = next(key for key in weights if key.endswith("classifier.weight"))
    weights[name][0, 0] = float("nan")
    save_file(weights, nan / "model.safetensors", metadata={"format": "pt"})

    truncated = root / "truncated-model"
    truncated.mkdir()
    for item in (root / "model").iterdir():
        if item.is_file():
            (truncated / item.name).write_bytes(item.read_bytes())
    data = (truncated / "model.safetensors").read_bytes()
    (truncated / "model.safetensors").write_bytes(data[: len(data) // 2])

    (root / "truncated.pth").write_bytes((FIXTURES / "released_tiny.pth").read_bytes()[:1000])
    (root / "a-file").write_text("not a directory")
    flat = root / "flat-images"
    flat.mkdir()
    from PIL import Image

    for index in range(4):
        Image.new("RGB", (28, 28), (index * 40, 0, 0)).save(flat / f"image{index}.png")
    torch.save({"not": "a model"}, root / "not-refiner.pth")
    return root


def cases(root: Path, work: Path) -> dict[str, tuple[str, list[str], int, str]]:
    """case -> (command, arguments, exit status, a part of the one line), writing (if at all) under `work`."""
    model = str(root / "model")
    return {
        "convert: unknown flag": ("convert", ["--checkpoint", "x.pth", "--overwrit"], EXIT_USAGE, "--overwrite"),
        "convert: not a number": ("convert", ["--checkpoint", "x.pth", "--image-size", "big"], EXIT_USAGE, "big"),
        "convert: missing file": ("convert", ["--checkpoint", str(root / "absent.pth")], EXIT_DATA, "absent.pth"),
        "convert: truncated file": (
            "convert",
            ["--checkpoint", str(root / "truncated.pth"), "--output-dir", str(work / "c")],
            EXIT_DATA,
            "truncated.pth",
        ),
        "convert: not a Refiner-ViT": (
            "convert",
            ["--checkpoint", str(root / "not-refiner.pth"), "--output-dir", str(work / "c")],
            EXIT_DATA,
            "not-refiner.pth",
        ),
        "export: no such model": ("export", ["--model", "/no/such/model", "--output", str(work / "e")], 2, "/no/such"),
        "export: image size 0": (
            "export",
            ["--model", model, "--output", str(work / "e"), "--image-size", "0"],
            EXIT_USAGE,
            "--image-size",
        ),
        "export: opset 99": ("export", ["--model", model, "--output", str(work / "e"), "--opset", "99"], 2, "opset"),
        "export: NaN weights": (
            "export",
            ["--model", str(root / "nan-model"), "--output", str(work / "e")],
            EXIT_DATA,
            "classifier",
        ),
        "export: truncated weights": (
            "export",
            ["--model", str(root / "truncated-model"), "--output", str(work / "e")],
            EXIT_DATA,
            "model.safetensors",
        ),
        "export: output under a file": (
            "export",
            ["--model", model, "--output", str(root / "a-file" / "e")],
            EXIT_USAGE,
            "a-file",
        ),
        "pack: no such root": ("pack", [str(root / "absent"), str(work / "p")], EXIT_DATA, "absent"),
        "pack: not a number": ("pack", [str(root), str(work / "p"), "--num-classes", "many"], EXIT_USAGE, "many"),
        "train: negative lr": ("train", ["--lr", "-1", "--output_dir", str(work / "t")], EXIT_USAGE, "--lr"),
        "train: NaN lr": ("train", ["--lr", "nan", "--output_dir", str(work / "t")], EXIT_USAGE, "--lr"),
        "train: not a number": ("train", ["--epochs", "abc", "--output_dir", str(work / "t")], EXIT_USAGE, "abc"),
        "train: crop_pct 0": ("train", ["--crop_pct", "0", "--output_dir", str(work / "t")], EXIT_USAGE, "--crop_pct"),
        "train: output under a file": ("train", ["--output_dir", str(root / "a-file" / "t")], EXIT_USAGE, "a-file"),
        "train: images without class folders": (
            "train",
            ["--train_dir", str(root / "flat-images"), "--output_dir", str(work / "t")],
            EXIT_DATA,
            "flat-images",
        ),
        "visualise: no such model": ("visualise", ["--model", "/no/such/model"], EXIT_USAGE, "/no/such/model"),
        "visualise: NaN weights": (
            "visualise",
            ["--model", str(root / "nan-model"), "--out", str(work / "v.png")],
            EXIT_DATA,
            "classifier",
        ),
    }


CASES = [
    "convert: unknown flag", "convert: not a number", "convert: missing file", "convert: truncated file",
    "convert: not a Refiner-ViT", "export: no such model", "export: image size 0", "export: opset 99",
    "export: NaN weights", "export: truncated weights", "export: output under a file", "pack: no such root",
    "pack: not a number", "train: negative lr", "train: NaN lr", "train: not a number", "train: crop_pct 0",
    "train: output under a file", "train: images without class folders", "visualise: no such model",
    "visualise: NaN weights",
]  # fmt: skip


@pytest.mark.parametrize("case", CASES)
def test_every_command_answers_bad_input_with_one_line_and_its_exit_status(inputs, case, tmp_path):
    work = tmp_path / "work"
    work.mkdir()
    command, argv, status, part = cases(inputs, work)[case]
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "PYTHONWARNINGS": "ignore"}
    result = subprocess.run([*COMMANDS[command], *argv], capture_output=True, text=True, timeout=300, cwd=work, env=env)
    lines = result.stderr.strip().splitlines()
    assert "Traceback" not in result.stderr, result.stderr
    assert result.returncode == status, result.stderr
    assert len(lines) == 1 and lines[0].startswith(f"{PROGS[command]}: error: "), result.stderr
    assert part in lines[0], lines[0]
    assert [path for path in work.rglob("*") if not path.is_dir()] == [], "a refused command wrote something"
