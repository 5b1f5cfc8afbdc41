#!/usr/bin/env python
"""
Fine-tuning on a small image folder, as a new user does it: `examples/run_imagenet.py --model_name_or_path MODEL
--train_dir D/train --validation_dir D/val` without `--recipe` (examples/recipes/finetune_own_data.yaml), on folders
of 3 classes with 30 training and 10 to 30 validation images per class, built here without a download. Three folders
whose validation images come from the same distribution as the training images (the case the recipe is for):

- `fashion`: three Fashion-MNIST classes (T-shirt/top, Trouser, Pullover) from the validation split of the subset
  shipped with the package, which the default run's model never trained on; 30 training and 30 validation images
  per class, 28x28 grayscale PNGs.
- `handwritten`: three classes of scikit-learn's handwritten digits (8x8 scans of 43 people's digits, upscaled to
  32x32), a domain the base model never saw; 30 training and 30 validation images per class.
- `photos`: square crops (48 to 96 px) of three of scikit-image's sample photos (astronaut, coffee, chelsea the cat),
  one class per photo, training and validation crops drawn independently from the whole photo; 30 training and 10
  validation crops per class.

and two harder ones, where validation differs from training by construction (30 images per class are too few there;
they show the recipe's limits, not its target):

- `photos_unseen_regions`: the photos' crops, training crops from the left 70 % of each photo and validation crops
  from the right 30 % (no pixel in both).
- `drawn_digits`: the digits 2, 5 and 8 drawn with PIL at 64x64 in one of 22 DejaVu fonts, at a random size,
  position and rotation, in a random colour on a random colour background, with noise (the colours say nothing
  about the class); 30 training and 20 validation images per class.

`--seeds N` repeats every data set N times: run s (1 to N) builds its folder with data seed s (other images; for
`handwritten` also other digits) and trains with `--seed 41+s` (the recipe's seed 42 in the first run). Each run is
a subprocess writing to a fresh output directory; the script prints, per run, the best validation top-1
(all_results.json), which weights reached it, the last epoch's top-1, the optimizer steps and the wall time of the
whole command (start-up, data loading, training, evaluation and saving), with the load average before and after (the
CPUs may be shared), then per data set the minimum and mean over the runs. The model is the default run's
(`python examples/run_imagenet.py`, a few minutes on two CPU cores), or any other `--model`:

    python benchmarks/finetune_small_folder.py --model outputs/refiner-vit-fashion-mnist/model --seeds 3

`--from_scratch` runs the same folders without a model (on a machine without a GPU the trainer then picks
examples/recipes/own_data_cpu.yaml), and arguments after `--` are passed to the trainer, e.g. `-- --epochs 30`.
`handwritten` needs scikit-learn, the photos scikit-image. It is a benchmark, not a test: the figures it prints are
the result.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
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
# The handwritten digits' classes, by data seed: run s uses HANDWRITTEN_CLASSES[(s - 1) % 3].
HANDWRITTEN_CLASSES = ((1, 7, 9), (3, 5, 8), (0, 6, 9))
DRAWN_DIGITS = ("2", "5", "8")
FONT_DIR = Path("/usr/share/fonts/truetype/dejavu")
PHOTOS = ("astronaut", "coffee", "chelsea")


def save_split(root: Path, split: str, name: str, images: list[np.ndarray | PIL.Image.Image]) -> None:
    """Writes `images` as `root/split/name/{index}.png`."""
    directory = root / split / name
    directory.mkdir(parents=True, exist_ok=True)
    for index, image in enumerate(images):
        image = image if isinstance(image, PIL.Image.Image) else PIL.Image.fromarray(image)
        image.save(directory / f"{index}.png")


def write_fashion_folders(root: Path, per_class: int = 30, seed: int = 1) -> None:
    """`root/train` and `root/val`: `per_class` images of each class of [`FASHION_CLASSES`] from the embedded
    validation split, chosen at random (`seed`), disjoint."""
    from refiner_hf.training.data import load_embedded_dataset

    split = load_embedded_dataset()["validation"]
    validation, names = split[:], split.features["label"].names
    rng = np.random.default_rng(seed)
    for label in FASHION_CLASSES:
        indices = rng.permutation(np.flatnonzero(np.asarray(validation["label"]) == label))[: 2 * per_class]
        images = [np.asarray(validation["image"][index], dtype=np.uint8) for index in indices]
        name = names[label].replace("/", "-")
        save_split(root, "train", name, images[:per_class])
        save_split(root, "val", name, images[per_class:])


def write_handwritten_folders(root: Path, per_class: int = 30, seed: int = 1) -> None:
    """`root/train` and `root/val`: `per_class` random (`seed`) scans each of three of scikit-learn's handwritten
    digits ([`HANDWRITTEN_CLASSES`] by seed), 8x8 with 17 grey levels, upscaled (bilinear) to 32x32; disjoint."""
    try:
        from sklearn.datasets import load_digits
    except ImportError:
        sys.exit("finetune_small_folder.py: error: the handwritten digits need scikit-learn: pip install scikit-learn.")
    digits = load_digits()
    rng = np.random.default_rng(seed)
    for label in HANDWRITTEN_CLASSES[(seed - 1) % len(HANDWRITTEN_CLASSES)]:
        indices = rng.permutation(np.flatnonzero(digits.target == label))[: 2 * per_class]
        images = [
            PIL.Image.fromarray((digits.images[index] * (255 / 16)).round().astype(np.uint8)).resize(
                (32, 32), PIL.Image.BILINEAR
            )
            for index in indices
        ]
        save_split(root, "train", f"digit-{label}", images[:per_class])
        save_split(root, "val", f"digit-{label}", images[per_class:])


def load_photos() -> dict[str, np.ndarray]:
    try:
        import skimage.data
    except ImportError:
        sys.exit("finetune_small_folder.py: error: the photo data sets need scikit-image: pip install scikit-image.")
    return {name: getattr(skimage.data, name)() for name in PHOTOS}


def random_crops(photo: np.ndarray, count: int, left: int, right: int, rng: np.random.Generator) -> list[np.ndarray]:
    """`count` square crops of 48 to 96 px lying within the columns [left, right) of `photo`."""
    height = photo.shape[0]
    crops = []
    for _ in range(count):
        size = int(rng.integers(48, min(97, right - left + 1)))
        x = int(rng.integers(left, right - size + 1))
        y = int(rng.integers(0, height - size + 1))
        crops.append(photo[y : y + size, x : x + size])
    return crops


def write_photo_folders(root: Path, train_per_class: int = 30, val_per_class: int = 10, seed: int = 1) -> None:
    """`root/train` and `root/val`: crops of three of scikit-image's sample photos, one class each, every crop drawn
    independently from the whole photo (validation crops may overlap training crops, as two photos of one object
    share views)."""
    rng = np.random.default_rng(seed)
    for name, photo in load_photos().items():
        width = photo.shape[1]
        save_split(root, "train", name, random_crops(photo, train_per_class, 0, width, rng))
        save_split(root, "val", name, random_crops(photo, val_per_class, 0, width, rng))


def write_unseen_region_folders(root: Path, train_per_class: int = 30, val_per_class: int = 10, seed: int = 1) -> None:
    """As [`write_photo_folders`], but the training crops come from the left 70 % of a photo and the validation crops
    from the rest: no pixel is in both."""
    rng = np.random.default_rng(seed)
    for name, photo in load_photos().items():
        split_at = int(0.7 * photo.shape[1])
        save_split(root, "train", name, random_crops(photo, train_per_class, 0, split_at, rng))
        save_split(root, "val", name, random_crops(photo, val_per_class, split_at, photo.shape[1], rng))


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


def write_drawn_digit_folders(root: Path, train_per_class: int = 30, val_per_class: int = 20, seed: int = 1) -> None:
    """`root/train` and `root/val` of [`DRAWN_DIGITS`], each image drawn independently."""
    fonts = sorted(path for path in FONT_DIR.glob("DejaVu*.ttf") if "ExtraLight" not in path.name)
    if not fonts:
        sys.exit(f"finetune_small_folder.py: error: no DejaVu fonts in {FONT_DIR}: install fonts-dejavu-core.")
    rng = np.random.default_rng(seed)
    for split, count in (("train", train_per_class), ("val", val_per_class)):
        for digit in DRAWN_DIGITS:
            save_split(root, split, f"digit-{digit}", [draw_digit(digit, fonts, rng) for _ in range(count)])


BUILDERS = {
    "fashion": write_fashion_folders,
    "handwritten": write_handwritten_folders,
    "photos": write_photo_folders,
    "photos_unseen_regions": write_unseen_region_folders,
    "drawn_digits": write_drawn_digit_folders,
}
SAME_DISTRIBUTION = ["fashion", "handwritten", "photos"]


def build_atomically(builder, data: Path, seed: int) -> None:
    """Builds a data set beside `data` and moves it into place only once complete, so that an interrupted build is
    never taken for a finished one by a later run into the same --work_dir."""
    partial = data.with_name(f".{data.name}.partial")
    shutil.rmtree(partial, ignore_errors=True)
    builder(partial, seed=seed)
    partial.rename(data)


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
    parser.add_argument(
        "--datasets", nargs="+", choices=list(BUILDERS), default=SAME_DISTRIBUTION,
        help=f"the folders to build and fine-tune on (default: {' '.join(SAME_DISTRIBUTION)})",
    )  # fmt: skip
    parser.add_argument("--seeds", type=int, default=1, help="runs per data set, each with other data and seed")
    parser.add_argument("--work_dir", type=Path, help="where the folders and runs go (a new temporary folder)")
    args = parser.parse_args(argv)
    if args.seeds < 1:
        parser.error(f"--seeds {args.seeds}: give at least 1.")
    model = None if args.from_scratch else args.model
    if model and not Path(model).is_dir():
        sys.exit(
            f"finetune_small_folder.py: error: --model {model} is not a directory: train the default model first "
            "(python examples/run_imagenet.py) or name one."
        )
    work_dir = args.work_dir or Path(tempfile.mkdtemp(prefix="finetune_small_folder_"))
    print(f"Model: {model or 'none (from scratch)'}; trainer arguments added: {' '.join(extra) or 'none'}")
    print(f"CPUs: {os.cpu_count()}; torch threads: {os.environ.get('OMP_NUM_THREADS', 'default')}; work dir {work_dir}")
    summary = {}
    for name in args.datasets:
        best = []
        for seed in range(1, args.seeds + 1):
            data = work_dir / f"{name}-seed{seed}"
            if not data.is_dir():
                build_atomically(BUILDERS[name], data, seed)
            counts = {split: len(list((data / split).rglob("*.png"))) for split in ("train", "val")}
            trainer_seed = ["--seed", str(41 + seed)] if "--seed" not in extra else []
            output_dir = work_dir / f"run-{name}-seed{seed}-{time.strftime('%H%M%S')}"
            measured = run_finetuning(data, output_dir, model, trainer_seed + extra)
            results = measured["results"]
            (before, after) = measured["load"]
            best.append(results["eval_top1"])
            print(
                f"{name}, data seed {seed}: {counts['train']} training / {counts['val']} validation images: best top-1 "
                f"{100 * results['eval_top1']:.1f} % ({results['best_weights']} weights, epoch "
                f"{results['best_epoch'] + 1} of {results['epochs_completed']}; last epoch "
                f"{100 * results['history'][-1]['eval_top1']:.1f} %), {results['global_step']} steps, wall time "
                f"{measured['seconds']:.0f} s (load average {before[0]:.1f} before, {after[0]:.1f} after)",
                flush=True,
            )
            print(f"  {measured['recipe']}")
            print("  top-1 per epoch: " + " ".join(f"{100 * h['eval_top1']:.0f}" for h in results["history"]))
        summary[name] = best
    print("Best validation top-1 over the runs (minimum / mean):")
    for name, best in summary.items():
        print(f"  {name}: {100 * min(best):.1f} / {100 * np.mean(best):.1f} % over {len(best)} run(s)")


if __name__ == "__main__":
    main()
