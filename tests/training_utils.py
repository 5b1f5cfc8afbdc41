"""Helpers of the trainer's tests: a tiny model and run, and running the trainer in this process or its command line
(examples/run_imagenet.py) in a subprocess."""

from __future__ import annotations

import json
import os
import shlex
import signal
import subprocess
import sys
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from helpers import TINY_FIELDS
from safetensors.torch import load_file


ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "examples" / "run_imagenet.py"
RECIPES = ROOT / "examples" / "recipes"

# The unit tests' tiny model (every block type, the convolutional stem, both heads) on the embedded 28x28 images, a
# little wider; the head is sized from the data set.
TINY_MODEL = {
    **{key: value for key, value in TINY_FIELDS.items() if key != "num_labels"},
    "image_size": 28,
    "patch_size": 4,
    "hidden_size": 32,
    "shared_expansion": 2,
    "stem_hidden_sizes": [8, 16, 16],
}
# The same size without any BatchNorm (patch stem, plain blocks), whose state does not depend on how a global batch
# is split between processes.
TINY_MODEL_WITHOUT_BATCHNORM = {**TINY_MODEL, "stem_type": "patch", "block_types": ["plain"] * 4}


def tiny_run_args(output_dir: Path, model: dict[str, Any] | None = None, **overrides: Any) -> list[str]:
    """
    Arguments of a run of a few seconds on the embedded data: 64 training images in batches of 8 (8 steps per epoch),
    2 epochs, 37 validation images (an odd number), the paper's augmentation and mixing at small strength, no trackers.
    """
    values: dict[str, Any] = {
        "output_dir": output_dir,
        "config_overrides": json.dumps(model or TINY_MODEL),
        "max_train_samples": 64,
        "max_eval_samples": 37,
        "per_device_train_batch_size": 8,
        "per_device_eval_batch_size": 8,
        "epochs": 2,
        "cooldown_epochs": 0,
        "warmup_epochs": 0,
        "lr": 2e-3,
        "lr_schedule_unit": "step",
        "scale": "0.5 1.0",
        "aa": "rand-m9-mstd0.5-inc1",
        "reprob": 0.25,
        "mixup": 0.0,
        "cutmix": 0.0,
        "smoothing": 0.1,
        "drop_path": 0.0,
        "model_ema_decay": 0.99,
        "model_ema_warmup": True,
        "dataloader_num_workers": 0,
        "logging_steps": 1,
        "report_to": "none",
    }
    values.update(overrides)
    argv = []
    for key, value in values.items():
        if value is None:
            continue
        argv.append(f"--{key}")
        argv.extend(str(value).split(" ") if key in ("scale", "ratio") else [str(value)])
    return argv


def run_in_process(argv: list[str]) -> dict[str, Any]:
    """Trains in this process with the command line `argv` of examples/run_imagenet.py (its recipes included)."""
    from refiner_hf.training.arguments import parse_args
    from refiner_hf.training.trainer import train

    return train(parse_args(argv, recipe_dirs=[RECIPES]))


def subprocess_env() -> dict[str, str]:
    env = dict(os.environ)
    env.update(
        {
            "PYTHONUNBUFFERED": "1",
            "HF_HUB_OFFLINE": "1",
            "HF_DATASETS_OFFLINE": "1",
            "TOKENIZERS_PARALLELISM": "false",
            "OMP_NUM_THREADS": "1",
        }
    )
    return env


def run_script(argv: list[str], launcher: list[str] | None = None, timeout: float = 300) -> subprocess.CompletedProcess:
    """Runs the trainer in a subprocess (optionally through `accelerate launch`); fails with its output if it fails."""
    command = (launcher or [sys.executable]) + [str(SCRIPT)] + argv
    result = subprocess.run(command, capture_output=True, text=True, timeout=timeout, env=subprocess_env(), cwd=ROOT)
    if result.returncode != 0:
        raise AssertionError(f"{' '.join(command)} failed:\n{result.stdout[-4000:]}\n{result.stderr[-4000:]}")
    return result


def run_resume_command(command: str) -> subprocess.CompletedProcess:
    """Runs the resume command a stopped run printed (`python SCRIPT ARGS`) with this interpreter; fails if it fails."""
    resumed = subprocess.run(
        [sys.executable, *shlex.split(command)[1:]], capture_output=True, text=True, env=subprocess_env(), cwd=ROOT
    )
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    return resumed


def kill_script_at(argv: list[str], line_is_the_moment: Callable[[str], bool], timeout: float = 300) -> None:
    """
    Runs the trainer's command line in a subprocess and kills it with SIGKILL as soon as it prints a line for which
    `line_is_the_moment` is true; fails unless it was killed.
    """
    process = subprocess.Popen(
        [sys.executable, str(SCRIPT), *argv], stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True,
        env=subprocess_env(), cwd=ROOT,
    )  # fmt: skip
    try:
        for line in process.stdout:
            if line_is_the_moment(line.strip()):
                process.send_signal(signal.SIGKILL)
                break
        process.wait(timeout=timeout)
    finally:
        process.kill()
    assert process.returncode == -signal.SIGKILL


def final_checkpoint(output_dir: Path) -> Path:
    checkpoints = sorted((output_dir / "checkpoints").glob("step_*"))
    return checkpoints[-1]


def checkpoint_tensors(checkpoint: Path) -> dict[str, Any]:
    """The model weights of a checkpoint and, when present, its EMA weights."""
    tensors = {f"model.{k}": v for k, v in load_file(checkpoint / "model.safetensors").items()}
    if (checkpoint / "ema.safetensors").exists():
        tensors.update({f"ema.{k}": v for k, v in load_file(checkpoint / "ema.safetensors").items()})
    return tensors


def read_results(output_dir: Path) -> dict[str, Any]:
    return json.loads((output_dir / "all_results.json").read_text())


def write_image_folder(
    root: Path, per_class: int, corrupt: str | None = None, names: Sequence[str] | None = None, offset: int = 0
) -> int:
    """
    An imagefolder tree of `per_class` embedded images of each of the first 3 classes (from the `offset`-th of each
    class on), saved in turn as grayscale, RGB and CMYK JPEGs and RGBA and palette PNGs, plus an optional corrupt
    JPEG; the class folders are named after the Fashion-MNIST classes or `names`. Returns the number of files.
    """
    import numpy as np
    import PIL.Image

    from refiner_hf.training.data import load_embedded_dataset

    data = load_embedded_dataset()["train"]
    names = list(names or [name.replace("/", "-") for name in data.features["label"].names[:3]])
    columns = data[:]
    modes = ["L", "RGB", "RGBA", "CMYK", "P"]
    count = 0
    for label in range(3):
        directory = root / names[label]
        directory.mkdir(parents=True)
        for index in np.flatnonzero(columns["label"] == label)[offset : offset + per_class]:
            mode = modes[count % len(modes)]
            suffix = ".jpg" if mode in ("L", "RGB", "CMYK") else ".png"
            PIL.Image.fromarray(columns["image"][index].astype(np.uint8)).convert(mode).save(
                directory / f"{index}{suffix}"
            )
            count += 1
    if corrupt:
        (root / names[0] / corrupt).write_bytes(b"\xff\xd8\xff\xe0 this is not a JPEG")
        count += 1
    return count


# Token labeling

RELABEL_SCRIPT = ROOT / "examples" / "generate_relabel.py"


def save_tiny_teacher(directory: Path, num_labels: int = 10) -> Path:
    """A tiny random ResNet classifier saved with `save_pretrained`: a 7 x 7 output grid at 56 px."""
    import torch
    from transformers import ResNetConfig, ResNetForImageClassification

    torch.manual_seed(0)
    config = ResNetConfig(
        embedding_size=8, hidden_sizes=[8, 16], depths=[1, 1], layer_type="basic", num_labels=num_labels
    )
    ResNetForImageClassification(config).save_pretrained(directory)
    return directory


def run_relabel_script(
    argv: list[str], launcher: list[str] | None = None, timeout: float = 300
) -> subprocess.CompletedProcess:
    """Runs examples/generate_relabel.py in a subprocess (optionally through `accelerate launch`)."""
    command = (launcher or [sys.executable]) + [str(RELABEL_SCRIPT)] + argv
    result = subprocess.run(command, capture_output=True, text=True, timeout=timeout, env=subprocess_env(), cwd=ROOT)
    if result.returncode != 0:
        raise AssertionError(f"{' '.join(command)} failed:\n{result.stdout[-4000:]}\n{result.stderr[-4000:]}")
    return result


def two_process_launcher(port: int) -> list[str]:
    """`accelerate launch` of 2 CPU processes (`--multi_gpu` starts both through torchrun; they run over gloo)."""
    accelerate = os.path.join(os.path.dirname(sys.executable), "accelerate")
    return [accelerate, "launch", "--multi_gpu", "--num_processes", "2", "--num_machines", "1",
            "--mixed_precision", "no", "--dynamo_backend", "no", "--main_process_port", str(port)]  # fmt: skip
