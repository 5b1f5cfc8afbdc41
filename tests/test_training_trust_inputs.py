"""
The trainer at its edges: every numeric argument has a range, and a value outside it (on the command line or in a
recipe), a path that is a FIFO, a device or a file where a directory belongs, is one line with exit status 2 before
anything is written; a recipe's warmup is fitted to a short run; bad images (decompression bombs included) are one
line naming the file, with exit status 1, or skipped and counted with --skip_bad_images; an image folder without class
sub-folders says what the layout must be.
"""

from __future__ import annotations

import dataclasses
import os
import re
import sys
from pathlib import Path

import datasets
import PIL.Image
import pytest
from helpers import load_script
from training_utils import RECIPES, ROOT, run_in_process, tiny_run_args, write_image_folder

from refiner_hf.cli import EXIT_DATA, EXIT_USAGE, DataError, command_status
from refiner_hf.training.arguments import ARGUMENT_RANGES, GROUPS, RecipeError, parse_args
from refiner_hf.training.data import BadImageError, WorkerSafeDataError, check_image_folder, decode_image
from refiner_hf.training.loaders import EvaluationSet


PROG = "run_imagenet.py"


def refusal(argv: list[str], capsys, status: int = EXIT_USAGE) -> str:
    """The one line the trainer's command line prints for `argv` (run in this process), after checking its status."""
    capsys.readouterr()
    assert command_status(lambda: run_in_process(argv), PROG) == status
    err = capsys.readouterr().err
    # (Progress bars of the data loading and the epoch may stand before it on stderr.)
    errors = re.findall(rf"{PROG}: error: (.*)", err)
    assert len(errors) == 1 and "Traceback" not in err, err
    return errors[0]


# 1. Values that cannot be


def test_every_numeric_argument_has_a_range():
    numeric = {
        f.name
        for group in GROUPS
        for f in dataclasses.fields(group)
        if re.search(r"\b(int|float)\b", str(f.type)) and "bool" not in str(f.type)
    }
    assert numeric - set(ARGUMENT_RANGES) == set()
    assert set(ARGUMENT_RANGES) <= numeric  # no stale entry


@pytest.mark.parametrize(
    "argv, message",
    [
        (["--lr", "-1"], "--lr -1: must be a finite number > 0."),
        (["--lr", "nan"], "--lr nan: must be a finite number > 0."),
        (["--lr", "inf"], "--lr inf: must be a finite number > 0."),
        (["--crop_pct", "0"], "--crop_pct 0: must be a finite number in (0, 2] (a fraction of the resized image"),
        (["--crop_pct", "90"], "--crop_pct 90: must be a finite number in (0, 2]"),
        (["--epochs", "abc"], "argument --epochs: invalid int value: 'abc'"),
        (["--epochs", "0"], "--epochs 0: must be an integer >= 1."),
        (["--image_size", "-3"], "--image_size -3: must be an integer >= 1."),
        (["--per_device_eval_batch_size", "0"], "--per_device_eval_batch_size 0: must be an integer >= 1."),
        (["--train_samples_per_epoch", "0"], "--train_samples_per_epoch 0: must be an integer >= 1."),
        (["--hflip", "1.5"], "--hflip 1.5: must be a finite number in [0, 1]."),
        (["--mixup_prob", "-0.1"], "--mixup_prob -0.1: must be a finite number in [0, 1]."),
        (["--smoothing", "1"], "--smoothing 1: must be a finite number in [0, 1)."),
        (["--model_ema_decay", "nan"], "--model_ema_decay nan: must be a finite number in [0, 1]."),
        (["--opt_betas", "0.9", "1.5"], "--opt_betas 0.9 1.5: each must be a finite number in [0, 1)."),
        (["--opt_betas", "0.9"], "--opt_betas must be two numbers, beta1 then beta2; got 0.9."),
        (["--scale", "0", "1"], "--scale 0 1: each must be a finite number in (0, 1] (fractions of the image area)."),
        (["--seed", "-1"], "--seed -1: must be an integer in [0, 4294967295]"),
        (["--weight_decay=-inf"], "--weight_decay -inf: must be a finite number >= 0."),
        (["--clip_grad", "0"], "--clip_grad 0: must be a finite number > 0."),
        (["--dataloader_num_workers", "-1"], "--dataloader_num_workers -1: must be an integer >= 0."),
        (["--train_val_split", "1"], "--train_val_split 1: must be a finite number in [0, 1) (the fraction"),
        (["--warmup_epochs", "12"], "--warmup_epochs 12: must be below --epochs 10"),
    ],
)
def test_a_value_out_of_range_is_one_line_naming_flag_value_and_range(argv, message, tmp_path, capsys):
    output_dir = tmp_path / "run"
    line = refusal(argv + ["--output_dir", str(output_dir), "--report_to", "none"], capsys)
    assert line.startswith(message), line
    assert list(tmp_path.iterdir()) == []  # nothing written


@pytest.mark.parametrize("under", [False, True])
def test_an_output_dir_that_is_a_file_or_under_one_is_refused(under, tmp_path, capsys):
    blocker = tmp_path / "notes.txt"
    blocker.write_text("mine")
    output_dir = blocker / "run" if under else blocker
    line = refusal(["--output_dir", str(output_dir), "--report_to", "none"], capsys)
    expected = f"{blocker} is a file, so no directory can be created under it" if under else "a file is there"
    assert line.startswith(f"--output_dir {output_dir}: {expected}")
    assert blocker.read_text() == "mine" and sorted(p.name for p in tmp_path.iterdir()) == ["notes.txt"]


@pytest.mark.parametrize(
    "line, message",
    [
        ("lr: -1\n", "`lr: -1` must be a finite number > 0."),
        ("lr: .nan\n", "`lr: nan` must be a finite number > 0."),
        ("epochs: 0\n", "`epochs: 0` must be an integer >= 1."),
        ("epochs: abc\n", "`epochs: 'abc'` has the wrong type (expected int)."),
        ("scale: [0.5, 2]\n", "`scale: 0.5 2` each must be a finite number in (0, 1]"),
    ],
)
def test_recipe_values_go_through_the_same_ranges(line, message, tmp_path, capsys):
    recipe = tmp_path / "mine.yaml"
    recipe.write_text(line)
    with pytest.raises(RecipeError) as error:
        parse_args(["--recipe", str(recipe), "--dataset_name", "x"])
    assert str(error.value) == f"{recipe}: {message}" or str(error.value).startswith(f"{recipe}: {message}")
    output_dir = tmp_path / "run"
    refused = refusal(["--recipe", str(recipe), "--output_dir", str(output_dir)], capsys)
    assert refused.startswith(f"{recipe}: {message}") and not output_dir.exists()


@pytest.mark.parametrize(
    "argv, message",
    [
        (["--aa", "rand-foo-m9"], "--aa rand-foo-m9: unknown section 'foo' of the 'rand' policy; its sections are "),
        (["--aa", "rand-m9-mstdx"], "--aa rand-m9-mstdx: unknown section 'mstdx' of the 'rand' policy"),
        (["--aa", "none"], "--aa none: unknown policy 'none'; it starts with one of rand, augmix, original"),
        (["--report_to", "tensorbored"], "--report_to tensorbored: unknown tracker 'tensorbored'; choose from all, "),
        (["--report_to", "none,wandbb"], "(comma-separated for several). Did you mean wandb?"),
    ],
)
def test_strings_that_would_train_something_else_or_fail_late_are_refused(argv, message, tmp_path, capsys):
    line = refusal(argv + ["--output_dir", str(tmp_path / "run")], capsys)
    assert line.startswith(message) or line.endswith(message), line
    assert list(tmp_path.iterdir()) == []
    for valid in (["--aa", "rand-m9-mstd0.5-inc1"], ["--aa", "augmix-m5-w3"], ["--aa", "v0-mstd0.5"], ["--aa", ""]):
        parse_args(valid + ["--report_to", "none,tensorboard"], recipe_dirs=[RECIPES])


def test_every_shipped_recipe_is_within_the_ranges():
    for recipe in sorted(RECIPES.glob("*.yaml")):
        parse_args(["--recipe", recipe.name, "--dataset_name", "x"], recipe_dirs=[RECIPES])


# 4. Paths that are not what they should be


@pytest.fixture
def fifo(tmp_path) -> Path:
    path = tmp_path / "pipe"
    os.mkfifo(path)
    return path


@pytest.mark.parametrize("flag", ["--train_dir", "--validation_dir", "--relabel_root", "--resume_from_checkpoint"])
def test_a_fifo_or_a_device_where_a_directory_belongs_says_what_it_is(flag, fifo, tmp_path, capsys):
    extra = ["--train_dir", str(tmp_path)] if flag == "--validation_dir" else []
    for path, kind in ((fifo, "a FIFO"), (Path("/dev/zero"), "a device"), (Path(__file__), "a file")):
        line = refusal(extra + [flag, str(path), "--output_dir", str(tmp_path / "run")], capsys)
        assert line.startswith(f"{flag} {path}: {kind}, not a directory."), line
    assert not (tmp_path / "run").exists()


def test_a_recipe_that_is_a_fifo_a_device_or_a_directory_says_what_it_is(fifo, tmp_path, capsys):
    for path, kind in (
        (fifo, "a FIFO, not a regular file"),
        (Path("/dev/zero"), "a device, not a regular file"),
        (tmp_path, "a directory, not a file"),
    ):
        line = refusal(["--recipe", str(path), "--output_dir", str(tmp_path / "run")], capsys)
        assert line.startswith(f"--recipe {path}: {kind}"), line
    missing = refusal(["--recipe", "no_such.yaml"], capsys)
    assert missing.startswith("Recipe 'no_such.yaml' not found")


# 7. A short run under a longer warmup


def test_a_recipes_warmup_is_fitted_to_a_short_run_with_one_line(capsys):
    args = parse_args(["--epochs", "1"], recipe_dirs=[RECIPES])  # the embedded recipe warms up for 1 epoch
    assert args.training.warmup_epochs == 0.5
    assert capsys.readouterr().out.splitlines() == [
        "Note: the recipe's (embedded_fashion_mnist.yaml) warmup of 1 epoch is not shorter than --epochs 1: it is "
        "shortened to 0.5 epochs (--warmup_epochs sets it)."
    ]
    # The defaults' 5 epochs, for a 3-epoch run.
    assert parse_args(["--epochs", "3", "--dataset_name", "x"]).training.warmup_epochs == 1.5
    # A warmup that fits is kept, and no line is printed.
    capsys.readouterr()
    assert parse_args(["--epochs", "2"], recipe_dirs=[RECIPES]).training.warmup_epochs == 1
    assert capsys.readouterr().out == ""


def test_an_explicit_warmup_too_long_stays_an_error(capsys):
    for argv in (["--warmup_epochs", "1"], ["--warmup_epochs=1"]):
        line = refusal(["--epochs", "1", *argv], capsys)
        assert line.startswith("--warmup_epochs 1: must be below --epochs 1"), line


def test_only_the_main_process_prints_the_error_and_the_note(monkeypatch, capsys):
    monkeypatch.setenv("RANK", "1")  # another process of `accelerate launch`
    assert command_status(lambda: parse_args(["--epochs", "0"], recipe_dirs=[RECIPES]), PROG) == EXIT_USAGE
    parse_args(["--epochs", "1"], recipe_dirs=[RECIPES])
    captured = capsys.readouterr()
    assert captured.err == "" and captured.out == ""
    assert EXIT_DATA == 1


def test_under_a_launcher_only_the_main_process_prints_an_argument_error(monkeypatch, capsys):
    # The other processes wait for the main one to print it and exit (the launcher then ends them), instead of
    # exiting first and having the launcher end the main process before it prints.
    script = load_script(ROOT / "examples" / "run_imagenet.py")
    waits = []
    monkeypatch.setattr(script.time, "sleep", waits.append)
    for rank, lines, expected_waits in (("1", 0, [script.ARGUMENT_ERROR_WAIT_S]), ("0", 1, [])):
        monkeypatch.setenv("RANK", rank)
        waits.clear()
        assert command_status(lambda: script.main(["--epochs", "0"]), PROG) == EXIT_USAGE
        err = capsys.readouterr().err
        assert err.splitlines() == [f"{PROG}: error: --epochs 0: must be an integer >= 1."][:lines]
        assert waits == expected_waits


def test_a_valid_short_run_starts(tmp_path):
    # --epochs 1 under a recipe with a longer warmup trains (the tiny run's recipe is the embedded one).
    argv = tiny_run_args(tmp_path / "run", epochs=1, warmup_epochs=None, max_train_samples=16, max_eval_samples=8)
    results = run_in_process(argv)
    assert results["epochs_completed"] == 1 and results["global_step"] == 2


# 2. Bad images, decompression bombs included


def write_png(path: Path, side: int) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    PIL.Image.new("RGB", (side, side), (120, 30, 200)).save(path)
    return path


@pytest.mark.parametrize("side", [40, 64])  # over the limit (Pillow warns), over twice the limit (Pillow refuses)
def test_a_decompression_bomb_is_a_bad_image_naming_the_file(side, tmp_path, monkeypatch):
    monkeypatch.setattr(PIL.Image, "MAX_IMAGE_PIXELS", 1000)
    path = write_png(tmp_path / "bomb.png", side)
    with pytest.raises(BadImageError) as error:
        decode_image({"path": str(path), "bytes": None}, 7)
    assert str(error.value).startswith(f"Cannot decode image 7 ({path}): too large: ")
    assert "decompression bomb" in str(error.value) and isinstance(error.value, DataError)
    with pytest.raises(BadImageError, match=r"image 3: too large"):
        decode_image({"path": None, "bytes": path.read_bytes()}, 3)
    monkeypatch.setattr(PIL.Image, "MAX_IMAGE_PIXELS", side * side)
    assert decode_image({"path": str(path), "bytes": None}, 7).size == (side, side)


def test_the_evaluation_set_names_a_bad_image_or_skips_it(tmp_path, monkeypatch):
    monkeypatch.setattr(PIL.Image, "MAX_IMAGE_PIXELS", 1000)
    paths = [write_png(tmp_path / f"{i}.png", 64 if i == 1 else 8) for i in range(3)]
    source = datasets.Dataset.from_dict(
        {"image": [{"path": str(p), "bytes": None} for p in paths], "label": [0, 1, 0]},
        features=datasets.Features({"image": datasets.Image(decode=False), "label": datasets.Value("int64")}),
    )
    with pytest.raises(BadImageError) as error:
        EvaluationSet(source, "image", "label")[1]
    assert str(error.value).startswith(f"Cannot decode image 1 ({paths[1]}): too large: ")
    assert str(error.value).endswith("; pass --skip_bad_images to skip (and count) the images that cannot be decoded.")
    skipping = EvaluationSet(source, "image", "label", skip_bad_images=True)
    assert [skipping[i]["image"] is None for i in range(3)] == [False, True, False]


def test_a_process_other_than_the_main_one_names_the_bad_image_it_met(tmp_path, monkeypatch, capsys):
    # Under `accelerate launch` only the main process prints errors; a bad image is met by one process only.
    path = tmp_path / "broken.jpg"
    path.write_bytes(b"not a jpeg")
    source = datasets.Dataset.from_dict(
        {"image": [{"path": str(path), "bytes": None}], "label": [0]},
        features=datasets.Features({"image": datasets.Image(decode=False), "label": datasets.Value("int64")}),
    )
    monkeypatch.setattr(sys, "argv", ["run_imagenet.py"])
    for rank, printed in (("1", 1), ("0", 0)):
        monkeypatch.setenv("RANK", rank)
        with pytest.raises(BadImageError) as error:
            EvaluationSet(source, "image", "label")[0]
        assert capsys.readouterr().err.splitlines() == [f"{PROG}: error: {error.value}"][:printed]
        assert str(error.value).startswith(f"Cannot decode image 0 ({path}): ")


def test_worker_tracebacks_become_the_original_line():
    worker = (
        "Caught BadImageError in DataLoader worker process 0.\nOriginal Traceback (most recent call last):\n"
        '  File "x.py", line 3, in f\n    raise BadImageError(m)\n'
        "refiner_hf.training.data.BadImageError: Cannot decode image 2 (a: b.png): broken\n"
    )
    assert str(BadImageError(worker)) == "Cannot decode image 2 (a: b.png): broken"
    assert str(WorkerSafeDataError("Training example 1 has label -1.")) == "Training example 1 has label -1."


@pytest.fixture(scope="module")
def folder_with_bad_images(tmp_path_factory):
    """A 3-class image folder with a corrupt JPEG and a decompression bomb (under a limit of 5,000 pixels)."""
    root = tmp_path_factory.mktemp("bad")
    write_image_folder(root / "train", per_class=6, corrupt="broken.jpg")
    write_png(root / "train" / "Trouser" / "bomb.png", 100)
    write_image_folder(root / "val", per_class=2, offset=6)
    return root


def bad_folder_args(root: Path, output_dir: Path, **overrides) -> list[str]:
    values = dict(
        train_dir=root / "train", validation_dir=root / "val", max_train_samples=None, max_eval_samples=None,
        cache_dir=root / "cache", epochs=1, per_device_train_batch_size=4,
    )  # fmt: skip
    return tiny_run_args(output_dir, **{**values, **overrides})


@pytest.mark.parametrize("workers", [0, 1])
def test_a_bad_image_in_training_is_one_line_naming_it(workers, folder_with_bad_images, tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(PIL.Image, "MAX_IMAGE_PIXELS", 5000)
    argv = bad_folder_args(folder_with_bad_images, tmp_path / "run", dataloader_num_workers=workers)
    line = refusal(argv, capsys, status=EXIT_DATA)
    assert re.fullmatch(
        r"Cannot decode image \d+ \(.*(broken\.jpg|bomb\.png)\): .*; pass --skip_bad_images to skip \(and count\) "
        r"the images that cannot be decoded\.",
        line,
    ), line
    assert "Traceback" not in line


def test_skip_bad_images_skips_and_counts_a_decompression_bomb(folder_with_bad_images, tmp_path, monkeypatch):
    monkeypatch.setattr(PIL.Image, "MAX_IMAGE_PIXELS", 5000)
    argv = bad_folder_args(folder_with_bad_images, tmp_path / "run") + ["--skip_bad_images"]
    results = run_in_process(argv)
    # 20 training images (18 good) in batches of 4: 5 steps; both bad ones are met once in the epoch.
    assert results["global_step"] == 5 and results["bad_images_skipped"] == 2
    assert results["history"][0]["bad_images"] == 2 and results["eval_samples"] == 6


# 3. An image folder without class sub-folders


def test_images_straight_in_the_train_dir_say_what_the_layout_must_be(tmp_path, capsys):
    flat = tmp_path / "flat"
    for i in range(3):
        write_png(flat / f"img_{i}.png", 8)
    (flat / "notes.txt").write_text("not an image")
    line = refusal(["--train_dir", str(flat), "--output_dir", str(tmp_path / "run")], capsys, status=EXIT_DATA)
    assert line == (
        f"--train_dir {flat}: 3 images directly in it (e.g. img_0.png) and no class sub-folder; the layout must be "
        f"one sub-folder per class, each holding that class's images ({flat}/<class>/<image>)."
    )
    # Images next to class sub-folders would leave every image unlabelled too.
    write_png(flat / "cats" / "a.png", 8)
    write_png(flat / "dogs" / "b.png", 8)
    with pytest.raises(DataError) as error:
        check_image_folder("--validation_dir", flat)
    assert str(error.value).startswith(
        f"--validation_dir {flat}: 3 images directly in it (e.g. img_0.png) next to the class sub-folders (cats, dogs)"
    )
    assert str(error.value).endswith("move them into their class's sub-folder.")
    # Class sub-folders only (other files beside them are no images), or a metadata file naming the labels: fine.
    for i in range(3):
        (flat / f"img_{i}.png").unlink()
    check_image_folder("--train_dir", flat)
    write_png(flat / "c.png", 8)
    (flat / "metadata.csv").write_text("file_name,label\nc.png,0\n")
    check_image_folder("--train_dir", flat)
