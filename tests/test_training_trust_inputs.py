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
from pathlib import Path

import pytest
from training_utils import RECIPES, run_in_process, tiny_run_args

from refiner_hf.cli import EXIT_DATA, EXIT_USAGE, command_status
from refiner_hf.training.arguments import ARGUMENT_RANGES, GROUPS, RecipeError, parse_args


PROG = "run_imagenet.py"


def refusal(argv: list[str], capsys, status: int = EXIT_USAGE) -> str:
    """The one line the trainer's command line prints for `argv` (run in this process), after checking its status."""
    capsys.readouterr()
    assert command_status(lambda: run_in_process(argv), PROG) == status
    captured = capsys.readouterr()
    lines = captured.err.splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"{PROG}: error: "), captured.err
    return lines[0].removeprefix(f"{PROG}: error: ")


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


def test_a_valid_short_run_starts(tmp_path):
    # --epochs 1 under a recipe with a longer warmup trains (the tiny run's recipe is the embedded one).
    argv = tiny_run_args(tmp_path / "run", epochs=1, warmup_epochs=None, max_train_samples=16, max_eval_samples=8)
    results = run_in_process(argv)
    assert results["epochs_completed"] == 1 and results["global_step"] == 2
