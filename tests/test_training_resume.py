"""
Resuming a run killed anywhere: mid-epoch, after an epoch-end checkpoint, during the final evaluation, after the last
checkpoint, while the model directory is written, before the results are written. `--resume_from_checkpoint latest`
finishes what was left and ends with the model directory of an uninterrupted run, byte for byte, and results that
name only a directory that was written.

Kills are simulated in this process by raising [`Killed`] (a `BaseException`, which nothing in the trainer catches,
like a signal) at the chosen call; one test kills a real process with SIGKILL.
"""

import json
import shutil
from pathlib import Path

import pytest
from training_utils import (
    kill_script_at,
    read_results,
    run_in_process,
    run_script,
    tiny_run_args,
)

from refiner_hf.training import trainer
from refiner_hf.training.checkpointing import CheckpointManager


# The tiny runs at half size: 32 training images in batches of 4 (8 steps per epoch), 16 validation images.
SMALL = dict(max_train_samples=32, per_device_train_batch_size=4, max_eval_samples=16, per_device_eval_batch_size=16)
# A: the run. Checkpoints at steps 4, 8 (end of epoch 1), 12 (the stop, before the final evaluation) and 12
# again after it. With a limit of 1 checkpoint, the best one is kept besides the last.
STOPPED_MID_EPOCH = dict(epochs=2, max_train_steps=12, checkpointing_steps=4, checkpoints_total_limit=1, **SMALL)
# B: a single epoch, so the final evaluation finds the best weights and writes them after the last checkpoint.
SINGLE_EPOCH = dict(epochs=1, checkpointing_steps=3, **SMALL)
# Fields of all_results.json that measure time.
TIMINGS = ("train_seconds_this_run", "images_per_second", "epoch_seconds")


class Killed(BaseException):
    """A simulated kill."""


def kill_at(owner, name: str, call: int, after: bool = False):
    """A patch: `owner.name` raises [`Killed`] at its `call`-th call, before it runs (or, with `after`, once it has)."""

    def patch(monkeypatch):
        original, calls = getattr(owner, name), []

        def wrapper(*args, **kwargs):
            calls.append(1)
            if len(calls) == call and not after:
                raise Killed(name)
            result = original(*args, **kwargs)
            if len(calls) == call and after:
                raise Killed(name)
            return result

        monkeypatch.setattr(owner, name, wrapper)

    return patch


def delete(*names: str):
    """What a kill before writing `names` leaves: a finished run without them."""

    def remove(output_dir: Path) -> None:
        for name in names:
            path = output_dir / name
            shutil.rmtree(path) if path.is_dir() else path.unlink()

    return remove


def attempt(argv: list[str], monkeypatch, patch=None) -> bool:
    """Runs the trainer in this process with `patch` applied; returns whether it was killed."""
    with monkeypatch.context() as patched:
        if patch is not None:
            patch(patched)
        try:
            run_in_process(argv)
        except Killed:
            return True
    return False


def model_directory(output_dir: Path) -> dict[str, bytes]:
    """Every file of output_dir/model; the model card's mentions of the run's directory name (its title and the name
    its code examples load, see `card_model_name`) replaced by a placeholder."""
    files = {path.name: path.read_bytes() for path in sorted((output_dir / "model").iterdir())}
    card = files["README.md"].decode()
    for mention in (f'"{output_dir.name}"', f"# {output_dir.name}\n"):
        card = card.replace(mention, mention.replace(output_dir.name, "NAME"))
    files["README.md"] = card.encode()
    return files


def comparable_results(output_dir: Path) -> dict:
    """all_results.json without timings, with the run's directory replaced by a placeholder."""
    text = (output_dir / "all_results.json").read_text().replace(str(output_dir), "OUTPUT_DIR")
    results = json.loads(text)
    for record in [results, *results["history"]]:
        for key in TIMINGS:
            record.pop(key, None)
    return results


@pytest.fixture(scope="module")
def references(tmp_path_factory) -> dict[str, Path]:
    """The uninterrupted runs of both settings."""
    directories = {}
    for name, setting in (("A", STOPPED_MID_EPOCH), ("B", SINGLE_EPOCH)):
        directories[name] = tmp_path_factory.mktemp(f"reference-{name}")
        run_in_process(tiny_run_args(directories[name], **setting))
    return directories


def test_the_uninterrupted_runs_keep_the_best_and_the_last_checkpoint(references):
    results = read_results(references["A"])
    assert results["global_step"] == 12 and [h["step"] for h in results["history"]] == [8, 12]
    best = f"step_{8 if results['best_epoch'] == 0 else 12:08d}"
    names = sorted(p.name for p in (references["A"] / "checkpoints").iterdir())
    assert names == sorted({best, "step_00000012"})
    assert Path(results["model_dir"]) == references["A"] / "model"
    single = read_results(references["B"])
    assert single["global_step"] == 8 and single["best_epoch"] == 0 and [h["step"] for h in single["history"]] == [8]


STOPPED_MID_EPOCH_KILLS = {
    "mid-epoch 1": [kill_at(trainer, "mix_batch", call=7)],
    "mid-epoch 2": [kill_at(trainer, "mix_batch", call=11)],
    "after the epoch-end checkpoint": [kill_at(CheckpointManager, "save", call=2, after=True)],
    "during the final evaluation": [kill_at(trainer, "evaluate_classifier", call=3)],
    "after the last checkpoint": [kill_at(CheckpointManager, "save", call=4, after=True)],
    "while the model directory is written, twice": [
        kill_at(trainer, "save_model_directory", call=1),  # the best of epoch 1
        kill_at(trainer, "save_model_directory", call=1),  # the resumed run writing it at the end
    ],
    "before the results are written": [delete("all_results.json")],
    "while the model or the results are written": [delete("model", "all_results.json")],
}
SINGLE_EPOCH_KILLS = {
    "during the final evaluation": [kill_at(trainer, "evaluate_classifier", call=1)],
    "after the last checkpoint": [kill_at(CheckpointManager, "save", call=3, after=True)],
    "while the model directory is written": [kill_at(trainer, "save_model_directory", call=1)],
}
CASES = [("A", name, kills) for name, kills in STOPPED_MID_EPOCH_KILLS.items()]
CASES += [("B", name, kills) for name, kills in SINGLE_EPOCH_KILLS.items()]


@pytest.mark.parametrize("setting, kill_point, kills", CASES, ids=[f"{c[0]}: {c[1]}" for c in CASES])
def test_a_run_killed_anywhere_resumes_to_the_same_model_directory(
    references, tmp_path, monkeypatch, capsys, setting, kill_point, kills
):
    setting_args = STOPPED_MID_EPOCH if setting == "A" else SINGLE_EPOCH
    argv = tiny_run_args(tmp_path, **setting_args)
    for number, kill in enumerate(kills):
        resume = ["--resume_from_checkpoint", "latest"] if number else []
        if kill.__name__ == "remove":  # a finished run missing what the kill would not have written
            assert not attempt(argv + resume, monkeypatch)
            kill(tmp_path)
        else:
            assert attempt(argv + resume, monkeypatch, kill), "the kill did not happen"
            # Nothing names a model directory that was not written.
            assert not (tmp_path / "all_results.json").exists()
    capsys.readouterr()
    assert not attempt(argv + ["--resume_from_checkpoint", "latest"], monkeypatch)
    if (setting, kill_point) == ("A", "during the final evaluation"):
        assert "training finished; its final evaluation, the model directory and the results are left" in (
            capsys.readouterr().out
        )

    reference = references[setting]
    expected, actual = model_directory(reference), model_directory(tmp_path)
    assert sorted(actual) == sorted(expected)
    for name in expected:
        assert actual[name] == expected[name], name  # bitwise
    assert comparable_results(tmp_path) == comparable_results(reference)
    assert read_results(tmp_path)["model_dir"] == str(tmp_path / "model")


def test_a_process_killed_after_its_last_checkpoint_resumes_to_the_same_model_directory(tmp_path):
    reference, interrupted = tmp_path / "reference", tmp_path / "interrupted"
    run_script(tiny_run_args(reference, **SINGLE_EPOCH))
    argv = tiny_run_args(interrupted, **SINGLE_EPOCH)
    last_checkpoint = f"Saved checkpoint {interrupted / 'checkpoints' / 'step_00000008'}"
    # Killed while writing the model directory or the results, or just before (a slow reader may let it go further).
    kill_script_at(argv, lambda line: line == last_checkpoint)  # then it writes the model directory and the results

    resumed = run_script(argv + ["--resume_from_checkpoint", "latest"]).stdout
    assert "training and evaluation finished; the model directory and the results are left" in resumed
    assert model_directory(interrupted) == model_directory(reference)
    assert comparable_results(interrupted) == comparable_results(reference)
