#!/usr/bin/env python
"""
Fine-tuning on a small image folder, as a new user does it: `examples/run_imagenet.py --model_name_or_path MODEL
--train_dir D/train --validation_dir D/val` without `--recipe` (examples/recipes/finetune_own_data.yaml), on folders
of 3 classes with 30 training and some validation images per class, built here without a download:

- `fashion`: three Fashion-MNIST classes (T-shirt/top, Trouser, Pullover) from the validation split of the subset
  shipped with the package, which the default run's model never trained on; 30 training and 30 validation images
  per class, 28x28 grayscale PNGs.
- `digits`: a domain the default model never saw: the digits 2, 5 and 8 drawn with PIL at 64x64 in one of 22 DejaVu
  fonts, at a random size, position and rotation, in a random colour on a random colour background, with noise (the
  colours say nothing about the class); 30 training and 20 validation images per class, drawn independently.
- `photos`: square crops of three of scikit-image's sample photos (astronaut, coffee, chelsea the cat), one class
  per photo; 30 training crops from the left 70 % of each photo and 10 validation crops from the right 30 %.

Each data set's fine-tuning runs in a subprocess from a fresh output directory; the script prints, per data set, the
best validation top-1 (all_results.json), which weights reached it, the optimizer steps and the wall time of the
whole command (start-up, data loading, training, evaluation and saving), and the load average before and after
(the CPUs may be shared). The model is the default run's (`python examples/run_imagenet.py`, a few minutes on two
CPU cores), or any other `--model`:

    python benchmarks/finetune_small_folder.py --model outputs/refiner-vit-fashion-mnist/model

`--from_scratch` runs the same folders without a model (on a machine without a GPU the trainer then picks
examples/recipes/own_data_cpu.yaml), and arguments after `--` are passed to the trainer, e.g. `-- --epochs 20`.
It is a benchmark, not a test: the figures it prints are the result.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import PIL.Image
import PIL.ImageDraw
import PIL.ImageFont


ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "examples" / "run_imagenet.py"
FASHION_CLASSES = (0, 1, 2)  # T-shirt/top, Trouser, Pullover
DIGITS = ("2", "5", "8")
FONT_DIR = Path("/usr/share/fonts/truetype/dejavu")


def write_fashion_folders(root: Path, per_class: int = 30) -> None:
    """`root/train` and `root/val`: `per_class` images of each class of [`FASHION_CLASSES`] from the embedded
    validation split, the first ones of each class for training and the next ones for validation."""
    from refiner_hf.training.data import load_embedded_dataset

    validation = load_embedded_dataset()["validation"][:]
    names = load_embedded_dataset()["validation"].features["label"].names
    for label in FASHION_CLASSES:
        indices = np.flatnonzero(validation["label"] == label)[: 2 * per_class]
        name = names[label].replace("/", "-")
        for split, chosen in (("train", indices[:per_class]), ("val", indices[per_class:])):
            directory = root / split / name
            directory.mkdir(parents=True, exist_ok=True)
            for index in chosen:
                PIL.Image.fromarray(validation["image"][index].astype(np.uint8)).save(directory / f"{index}.png")


def draw_digit(digit: str, fonts: list[Path], rng: np.random.Generator, size: int = 64) -> PIL.Image.Image:
    """One digit in a random font, size, position, rotation and pair of colours, with Gaussian noise."""
    background = tuple(int(c) for c in rng.integers(0, 256, 3))
    # A foreground at least 100 away from the background in some channel, so that the digit stays visible.
    while True:
        foreground = tuple(int(c) for c in rng.integers(0, 256, 3))
        if max(abs(a - b) for a, b in zip(foreground, background)) > 100:
            break
    font = PIL.ImageFont.truetype(str(fonts[rng.integers(len(fonts))]), int(rng.integers(26, 50)))
    glyph = PIL.Image.new("L", (size, size), 0)
    draw = PIL.ImageDraw.Draw(glyph)
    left, top, right, bottom = draw.textbbox((0, 0), digit, font=font)
    x = (size - (right - left)) / 2 - left + rng.uniform(-8, 8)
    y = (size - (bottom - top)) / 2 - top + rng.uniform(-8, 8)
    draw.text((x, y), digit, fill=255, font=font)
    glyph = glyph.rotate(rng.uniform(-25, 25), resample=PIL.Image.BILINEAR)
    image = PIL.Image.composite(
        PIL.Image.new("RGB", (size, size), foreground), PIL.Image.new("RGB", (size, size), background), glyph
    )
    pixels = np.asarray(image, dtype=np.float32) + rng.normal(0, 12, (size, size, 3))
    return PIL.Image.fromarray(np.clip(pixels, 0, 255).astype(np.uint8))


def write_digit_folders(root: Path, train_per_class: int = 30, val_per_class: int = 20, seed: int = 0) -> None:
    """`root/train` and `root/val` of drawn [`DIGITS`], each image drawn independently."""
    fonts = sorted(path for path in FONT_DIR.glob("DejaVu*.ttf") if "ExtraLight" not in path.name)
    if not fonts:
        sys.exit(f"finetune_small_folder.py: error: no DejaVu fonts in {FONT_DIR}: install fonts-dejavu-core.")
    rng = np.random.default_rng(seed)
    for split, count in (("train", train_per_class), ("val", val_per_class)):
        for digit in DIGITS:
            directory = root / split / f"digit-{digit}"
            directory.mkdir(parents=True, exist_ok=True)
            for index in range(count):
                draw_digit(digit, fonts, rng).save(directory / f"{index}.png")


PHOTOS = ("astronaut", "coffee", "chelsea")


def write_photo_folders(root: Path, train_per_class: int = 30, val_per_class: int = 10, seed: int = 0) -> None:
    """`root/train` and `root/val`: square crops (48 to 96 px) of three of scikit-image's sample photos, one class
    each; the training crops come from the left 70 % of a photo, the validation crops from the rest (no pixel is in
    both)."""
    try:
        import skimage.data
    except ImportError:
        sys.exit("finetune_small_folder.py: error: the photos data set needs scikit-image: pip install scikit-image.")
    rng = np.random.default_rng(seed)
    for name in PHOTOS:
        photo = getattr(skimage.data, name)()
        height, width = photo.shape[:2]
        split_at = int(0.7 * width)
        for split, count, (left, right) in (
            ("train", train_per_class, (0, split_at)),
            ("val", val_per_class, (split_at, width)),
        ):
            directory = root / split / name
            directory.mkdir(parents=True, exist_ok=True)
            for index in range(count):
                size = int(rng.integers(48, min(97, right - left + 1)))
                x = int(rng.integers(left, right - size + 1))
                y = int(rng.integers(0, height - size + 1))
                PIL.Image.fromarray(photo[y : y + size, x : x + size]).save(directory / f"{index}.png")


BUILDERS = {"fashion": write_fashion_folders, "digits": write_digit_folders, "photos": write_photo_folders}


def run_finetuning(data: Path, output_dir: Path, model: str | None, extra: list[str]) -> dict:
    """Runs the trainer's command line on `data` and returns its wall time, results and load averages."""
    command = [sys.executable, str(SCRIPT), "--train_dir", str(data / "train"), "--validation_dir", str(data / "val")]
    command += ["--output_dir", str(output_dir), "--report_to", "none"]
    command += ["--model_name_or_path", model] if model else []
    command += extra
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "PYTHONPATH": str(ROOT)}
    load_before = os.getloadavg()
    start = time.perf_counter()
    finished = subprocess.run(command, capture_output=True, text=True, env=env)
    seconds = time.perf_counter() - start
    if finished.returncode != 0:
        sys.exit(
            f"{' '.join(command)} failed ({finished.returncode}):\n{finished.stdout[-3000:]}{finished.stderr[-3000:]}"
        )
    results = json.loads((output_dir / "all_results.json").read_text())
    recipe = next((line for line in finished.stdout.splitlines() if line.startswith("Recipe: ")), "Recipe: ?")
    return {"seconds": seconds, "results": results, "recipe": recipe, "load": (load_before, os.getloadavg())}


def main(argv: list[str] | None = None) -> None:
    argv = sys.argv[1:] if argv is None else argv
    extra = argv[argv.index("--") + 1 :] if "--" in argv else []
    argv = argv[: argv.index("--")] if "--" in argv else argv
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="outputs/refiner-vit-fashion-mnist/model", help="the model to fine-tune")
    parser.add_argument("--from_scratch", action="store_true", help="no --model_name_or_path (the trainer's choice)")
    parser.add_argument("--datasets", nargs="+", choices=sorted(BUILDERS), default=["fashion", "digits", "photos"])
    parser.add_argument("--work_dir", type=Path, help="where the folders and runs go (a new temporary folder)")
    args = parser.parse_args(argv)
    model = None if args.from_scratch else args.model
    if model and not Path(model).is_dir():
        sys.exit(
            f"finetune_small_folder.py: error: --model {model} is not a directory: train the default model first "
            "(python examples/run_imagenet.py) or name one."
        )
    work_dir = args.work_dir or Path(tempfile.mkdtemp(prefix="finetune_small_folder_"))
    print(f"Model: {model or 'none (from scratch)'}; trainer arguments added: {' '.join(extra) or 'none'}")
    print(f"CPUs: {os.cpu_count()}; torch threads: {os.environ.get('OMP_NUM_THREADS', 'default')}; work dir {work_dir}")
    for name in args.datasets:
        data = work_dir / name
        if not (data / "train").is_dir():
            BUILDERS[name](data)
        counts = {split: len(list((data / split).rglob("*.png"))) for split in ("train", "val")}
        measured = run_finetuning(data, work_dir / f"run-{name}-{time.strftime('%H%M%S')}", model, extra)
        results = measured["results"]
        (before, after) = measured["load"]
        print(
            f"{name}: {counts['train']} training / {counts['val']} validation images: best top-1 "
            f"{100 * results['eval_top1']:.1f} % ({results['best_weights']} weights, epoch {results['best_epoch'] + 1} "
            f"of {results['epochs_completed']}), {results['global_step']} steps, wall time {measured['seconds']:.0f} s "
            f"(load average {before[0]:.1f} before, {after[0]:.1f} after)",
            flush=True,
        )
        print(f"  {measured['recipe']}")
        print("  top-1 per epoch: " + " ".join(f"{100 * h['eval_top1']:.0f}" for h in results["history"]))


if __name__ == "__main__":
    main()
