"""
Trusting an output directory and its checkpoints: a second run never silently replaces a previous one
(`--overwrite_output_dir` removes only what a run writes), a resume refuses another run's checkpoints and settings that
change the computation (unless `--allow_changed_settings`, recorded in the model card), training states that cannot
be are refused before training, a divergence names a checkpoint that can really be resumed, checkpoints of the older
layout resume, and Ctrl-C or SIGTERM end with one line naming the step, the checkpoint and the resuming command.
"""

import json
import math
import shlex
import shutil
import signal
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file
from training_utils import (
    ROOT,
    SCRIPT,
    read_results,
    run_in_process,
    run_resume_command,
    subprocess_env,
    tiny_run_args,
    two_process_launcher,
)

from refiner_hf import RefinerViTForImageClassification
from refiner_hf.cli import EXIT_DATA, EXIT_USAGE, UsageError, command_status
from refiner_hf.training.checkpointing import (
    STATE_FILE,
    CheckpointError,
    changed_settings,
    describe_changes,
    write_manifest,
)
from refiner_hf.training.run_lock import LOCK_FILE, PreviousRunError
from refiner_hf.training.tracking import read_metrics
from refiner_hf.training.trainer import (
    MixedRunsError,
    NonFiniteLossError,
    resume_command,
)


# 32 training images in batches of 4 (8 steps per epoch), 16 validation images, one epoch.
SMALL = dict(max_train_samples=32, per_device_train_batch_size=4, max_eval_samples=16, per_device_eval_batch_size=16)
ONE_EPOCH = dict(epochs=1, checkpointing_steps=3, checkpoints_total_limit=5, **SMALL)
# Stopped at step 3, its checkpoint saved mid-epoch (epoch 1, batch 3 of 8) and evaluated.
STOPPED = dict(ONE_EPOCH, max_train_steps=3)


def step(n: int) -> str:
    return f"step_{n:08d}"


def names(directory) -> list[str]:
    return sorted(p.name for p in directory.iterdir()) if directory.is_dir() else []


def snapshot(output_dir) -> dict[str, bytes]:
    """Every file under `output_dir`, by relative path."""
    return {str(p.relative_to(output_dir)): p.read_bytes() for p in sorted(output_dir.rglob("*")) if p.is_file()}


def edit_state(checkpoint, change) -> None:
    """Changes a checkpoint's training_state.json with `change(state)` and writes its manifest to match."""
    path = checkpoint / STATE_FILE
    state = json.loads(path.read_text())
    change(state)
    path.write_text(json.dumps(state))
    write_manifest(checkpoint)


def status_and_line(argv, capsys) -> tuple[int, str]:
    """Runs the trainer in this process under the command lines' error policy: its exit status and its stderr."""
    capsys.readouterr()
    status = command_status(lambda: run_in_process(argv), prog="run_imagenet.py")
    return status, capsys.readouterr().err.strip()


@pytest.fixture(scope="module")
def finished(tmp_path_factory):
    """A finished one-epoch run: checkpoints at steps 3, 6 and 8, the model, logs and results."""
    output_dir = tmp_path_factory.mktemp("finished") / "run"
    run_in_process(tiny_run_args(output_dir, **ONE_EPOCH))
    return output_dir


@pytest.fixture(scope="module")
def stopped(tmp_path_factory):
    """A run stopped by --max_train_steps 3: its checkpoint step_00000003 is mid-epoch."""
    output_dir = tmp_path_factory.mktemp("stopped") / "run"
    run_in_process(tiny_run_args(output_dir, **STOPPED))
    return output_dir


def copy_of(run, target):
    shutil.copytree(run, target)
    return target


# 1, 2: a previous run is never replaced silently; --overwrite_output_dir removes only what a run writes


def test_a_second_run_into_a_previous_run_is_refused_before_anything_is_written(finished, tmp_path, capsys):
    output_dir = copy_of(finished, tmp_path / "run")
    before = snapshot(output_dir)
    status, err = status_and_line(tiny_run_args(output_dir, **SMALL, epochs=1, max_train_steps=2), capsys)
    assert status == EXIT_DATA and len(err.splitlines()) == 1
    assert err == (
        f"run_imagenet.py: error: --output_dir {output_dir} holds a previous run (checkpoints/, model/, logs/, "
        "all_results.json), which this run would replace: pass --resume_from_checkpoint latest to continue it, or "
        "--overwrite_output_dir to start over (its checkpoints/, model/, logs/ and all_results.json are removed; "
        "other files stay)."
    )
    assert snapshot(output_dir) == before and not (output_dir / LOCK_FILE).exists()


def test_overwrite_output_dir_removes_only_the_previous_runs_files_and_no_old_checkpoint_survives(
    finished, tmp_path, capsys
):
    output_dir = copy_of(finished, tmp_path / "run")
    (output_dir / "notes.txt").write_text("mine\n")
    (output_dir / "data").mkdir()
    (output_dir / "data" / "labels.csv").write_text("a,b\n")
    shorter = tiny_run_args(output_dir, **SMALL, epochs=1, max_train_steps=2, checkpointing_steps=1)
    run_in_process(shorter + ["--overwrite_output_dir"])
    out = capsys.readouterr().out
    assert "--overwrite_output_dir: removed the previous run's checkpoints/, model/, logs/, all_results.json" in out
    assert (output_dir / "notes.txt").read_text() == "mine\n"
    assert (output_dir / "data" / "labels.csv").read_text() == "a,b\n"
    # Only the new run's checkpoints: the old run's later ones (steps 3, 6, 8) are gone ...
    assert names(output_dir / "checkpoints") == [step(1), step(2)]
    assert read_results(output_dir)["global_step"] == 2
    # ... so resuming `latest` resumes the new run, which is finished: same results, nothing of the old run.
    results = run_in_process(shorter + ["--resume_from_checkpoint", "latest"])
    assert results["global_step"] == 2 and [h["step"] for h in results["history"]] == [2]


def test_resuming_and_overwriting_at_once_is_a_usage_error(finished, tmp_path, capsys):
    output_dir = copy_of(finished, tmp_path / "run")
    argv = tiny_run_args(output_dir, **ONE_EPOCH) + ["--resume_from_checkpoint", "latest", "--overwrite_output_dir"]
    status, err = status_and_line(argv, capsys)
    assert status == EXIT_USAGE
    assert err == (
        "run_imagenet.py: error: --overwrite_output_dir removes the checkpoints that --resume_from_checkpoint latest "
        "would resume: give one of them."
    )
    assert (output_dir / "checkpoints").is_dir()


def test_overwrite_never_removes_what_the_run_reads(finished, tmp_path, capsys):
    output_dir = copy_of(finished, tmp_path / "run")
    before = snapshot(output_dir)
    argv = tiny_run_args(output_dir, model_name_or_path=output_dir / "model", config_overrides=None, **SMALL)
    status, err = status_and_line(argv + ["--overwrite_output_dir"], capsys)
    assert status == EXIT_USAGE
    assert err == (
        f"run_imagenet.py: error: --model_name_or_path {output_dir / 'model'} lies in {output_dir / 'model'}, which "
        "--overwrite_output_dir removes before the run reads it: choose another --output_dir."
    )
    assert snapshot(output_dir) == before


def test_resuming_latest_without_checkpoints_never_replaces_a_previous_model(finished, tmp_path):
    output_dir = copy_of(finished, tmp_path / "run")
    shutil.rmtree(output_dir / "checkpoints")
    before = snapshot(output_dir)
    with pytest.raises(PreviousRunError, match=r"holds no checkpoint to resume, but .* holds a previous run's model "):
        run_in_process(tiny_run_args(output_dir, resume_from_checkpoint="latest", **ONE_EPOCH))
    assert snapshot(output_dir) == before


def test_a_run_refused_before_training_leaves_nothing_in_a_new_directory(tmp_path):
    output_dir = tmp_path / "run"
    with pytest.raises(UsageError, match="--allow_large_model"):
        run_in_process(tiny_run_args(output_dir, config_overrides=json.dumps({"num_hidden_layers": 100_000}), **SMALL))
    assert names(output_dir) == []  # no logs/ either: the same command runs once fixed
    run_in_process(tiny_run_args(output_dir, **SMALL, epochs=1, max_train_steps=1))


def test_a_checkpoint_of_another_run_in_the_directory_is_refused(finished, tmp_path):
    output_dir = copy_of(finished, tmp_path / "run")
    edit_state(output_dir / "checkpoints" / step(3), lambda state: state["progress"].update(run_id="another"))
    with pytest.raises(MixedRunsError, match=rf"holds checkpoints of another run \({step(3)}\) than .*{step(8)}"):
        run_in_process(tiny_run_args(output_dir, resume_from_checkpoint="latest", **ONE_EPOCH))


# 3: settings that change the computation are refused on resume, unless --allow_changed_settings


def test_changed_settings_are_named_as_the_command_line_gives_them():
    recorded = {"lr": 0.002, "scale": [0.08, 1.0], "num_processes": 1, "aa": None, "config_overrides": {"a": 1}}
    current = {"lr": 0.002, "scale": [0.5, 1.0], "num_processes": 2, "aa": "rand-m9", "config_overrides": {"a": 2}}
    assert describe_changes(changed_settings(recorded, current)) == (
        "--scale 0.08 1.0 -> 0.5 1.0, the number of processes 1 -> 2, --aa unset -> rand-m9, "
        '--config_overrides {"a":1} -> {"a":2}'
    )
    # A setting that only one side records (an argument added or retired since) is not a change.
    assert changed_settings({"lr": 0.1}, {"lr": 0.1, "new_flag": True}) == {}


def test_resuming_with_settings_that_change_the_computation_is_refused_naming_each(stopped, tmp_path, capsys):
    output_dir = copy_of(stopped, tmp_path / "run")
    before = snapshot(output_dir)
    changed = dict(STOPPED, max_train_samples=16, per_device_train_batch_size=8, lr=1e-3, seed=7, max_train_steps=5)
    status, err = status_and_line(tiny_run_args(output_dir, resume_from_checkpoint="latest", **changed), capsys)
    assert status == EXIT_USAGE and len(err.splitlines()) == 1
    checkpoint = output_dir / "checkpoints" / step(3)
    assert err == (
        f"run_imagenet.py: error: {checkpoint} was trained with other settings: --max_train_samples 32 -> 16, "
        "--lr 0.002 -> 0.001, --per_device_train_batch_size 4 -> 8, --seed 42 -> 7. Resume with the checkpoint's "
        "settings, pass --allow_changed_settings to go on with the new ones (the model card records them), or start "
        "over with --overwrite_output_dir."
    )
    assert snapshot(output_dir) == before


def test_settings_that_do_not_change_the_computation_may_change(stopped, tmp_path):
    output_dir = copy_of(stopped, tmp_path / "run")
    free = dict(STOPPED, max_train_steps=5, logging_steps=2, checkpointing_steps=2, checkpoints_total_limit=2,
                per_device_eval_batch_size=8, report_to="none")  # fmt: skip
    results = run_in_process(tiny_run_args(output_dir, resume_from_checkpoint="latest", **free))
    assert results["global_step"] == 5


def test_allowed_changes_are_said_and_recorded_in_the_model_card(stopped, tmp_path, capsys):
    output_dir = copy_of(stopped, tmp_path / "run")
    changed = dict(STOPPED, lr=1e-3, max_train_steps=None)
    capsys.readouterr()
    run_in_process(tiny_run_args(output_dir, resume_from_checkpoint="latest", **changed) + ["--allow_changed_settings"])
    out = capsys.readouterr().out
    checkpoint = output_dir / "checkpoints" / step(3)
    assert (
        f"Resuming {checkpoint} with changed settings (--allow_changed_settings): --lr 0.002 -> 0.001; the model "
        "card records them." in out
    )
    # The new learning rate applies (the checkpoint's schedule is not restored): per-step cosine over 8 steps.
    lrs = {r["step"]: r["train/lr"] for r in read_metrics(output_dir / "logs") if "train/lr" in r}
    assert lrs[4] == pytest.approx(1e-5 + 0.5 * (1e-3 - 1e-5)) and lrs[3] == pytest.approx(
        1e-5 + 0.5 * (2e-3 - 1e-5) * (1 + math.cos(math.pi * 3 / 8))
    )
    card = (output_dir / "model" / "README.md").read_text()
    assert "## Settings changed on resume" in card and "- resumed at step 3: --lr 0.002 -> 0.001" in card
    state = json.loads((output_dir / "checkpoints" / step(8) / STATE_FILE).read_text())
    assert state["settings"]["lr"] == 1e-3
    assert state["progress"]["settings_changes"] == [{"step": 3, "changes": {"lr": [0.002, 0.001]}}]
    # The new checkpoints record the new settings: resuming them with these is no change.
    results = run_in_process(tiny_run_args(output_dir, resume_from_checkpoint="latest", **changed))
    assert results["global_step"] == 8
    assert "- resumed at step 3: --lr 0.002 -> 0.001" in (output_dir / "model" / "README.md").read_text()


def test_a_checkpoint_without_recorded_settings_resumes_with_a_warning(stopped, tmp_path, capsys):
    output_dir = copy_of(stopped, tmp_path / "run")
    checkpoint = output_dir / "checkpoints" / step(3)
    edit_state(checkpoint, lambda state: state.pop("settings"))
    capsys.readouterr()
    results = run_in_process(tiny_run_args(output_dir, resume_from_checkpoint="latest", **dict(STOPPED, lr=1e-3)))
    warnings = [line for line in capsys.readouterr().out.splitlines() if line.startswith("Warning:")]
    assert warnings == [
        f"Warning: {checkpoint} records no settings (written by an earlier version of the trainer): resuming without "
        "checking that this run's are the ones it was trained with."
    ]
    assert results["global_step"] == 3


# 4: training states that cannot be are refused before training


@pytest.mark.parametrize(
    "field, value, problem",
    [
        ("batches_in_epoch", 99, "is 99, beyond the 8 batches of an epoch of this run"),
        ("global_step", -1, "is -1, not a count"),
        ("epoch", 5, "is 5, past the end of this run's 1 epochs"),
        ("epoch", "0", "is '0', not a count"),
        ("best_weights", "best", "is 'best', not 'raw' or 'ema'"),
        ("epoch_totals", [0.0, 3], r"is \[0.0, 3\], not three sums"),
        ("history", {"epoch": 0}, "is not a list of epoch summaries"),
        ("evaluated_step", 30, "is 30, after the checkpoint's step 3"),
        ("scheduler.t_initial", "8", "is '8', not a number"),
        ("scheduler.cycles", 2, "is not a field of this run's schedule"),
    ],
)
def test_a_training_state_that_cannot_be_is_refused_naming_the_file_and_field(
    stopped, tmp_path, monkeypatch, field, value, problem
):
    output_dir = copy_of(stopped, tmp_path / "run")
    checkpoint = output_dir / "checkpoints" / step(3)
    part, name = field.split(".") if "." in field else ("progress", field)
    edit_state(checkpoint, lambda state: state[part].update({name: value}))
    before = snapshot(output_dir)
    trained = []
    monkeypatch.setattr("refiner_hf.training.trainer.train_epoch", lambda *a: trained.append(1))
    with pytest.raises(CheckpointError, match=rf"^{checkpoint / STATE_FILE}: {part}\.{name} {problem}"):
        run_in_process(tiny_run_args(output_dir, resume_from_checkpoint="latest", **dict(STOPPED, max_train_steps=8)))
    assert not trained and snapshot(output_dir) == before


# 5: a divergence names a checkpoint that can be resumed


def diverge_at(monkeypatch, calls: int) -> None:
    """The `calls`-th training forward of each run (from now on) returns a NaN loss."""
    forward = RefinerViTForImageClassification.forward
    count = {"n": 0}

    def diverging(self, *args, **kwargs):
        outputs = forward(self, *args, **kwargs)
        if self.training:
            count["n"] += 1
            if count["n"] == calls:
                outputs.loss = outputs.loss * float("nan")
        return outputs

    monkeypatch.setattr(RefinerViTForImageClassification, "forward", diverging)
    return count


def test_a_divergence_after_a_resume_names_the_checkpoint_before_the_one_resumed(tmp_path, monkeypatch):
    output_dir = tmp_path / "run"
    argv = tiny_run_args(output_dir, **dict(ONE_EPOCH, checkpointing_steps=2))
    diverge_at(monkeypatch, 5)
    checkpoints = output_dir / "checkpoints"
    with pytest.raises(NonFiniteLossError, match=rf"at step 5 .*The last good checkpoint is {checkpoints / step(4)}"):
        run_in_process(argv)
    # Resumed from step 4, it diverges again before any new checkpoint: step 4 leads there, step 2 is named.
    count = diverge_at(monkeypatch, 1)
    with pytest.raises(NonFiniteLossError) as error:
        run_in_process(argv + ["--resume_from_checkpoint", "latest"])
    assert count["n"] == 1
    assert str(error.value).endswith(
        f"The last good checkpoint is {checkpoints / step(2)}: resume from it with --resume_from_checkpoint "
        f"{checkpoints / step(2)} --allow_changed_settings and a lower --lr or --clip_grad, or mend the data first."
    )
    # Without an earlier checkpoint, starting over is the way.
    shutil.rmtree(checkpoints / step(2))
    diverge_at(monkeypatch, 1)
    with pytest.raises(NonFiniteLossError, match=rf"No intact checkpoint precedes {step(4)}, which this run resumed "
                       "from: start over with --overwrite_output_dir and a lower --lr"):  # fmt: skip
        run_in_process(argv + ["--resume_from_checkpoint", "latest"])


def test_a_checkpoint_holding_nan_is_refused_naming_an_earlier_one(finished, tmp_path):
    output_dir = copy_of(finished, tmp_path / "run")
    checkpoint = output_dir / "checkpoints" / step(8)
    optimizer = torch.load(checkpoint / "optimizer.bin", weights_only=True)
    first = next(iter(optimizer["state"].values()))
    first["exp_avg_sq"].fill_(float("nan"))
    torch.save(optimizer, checkpoint / "optimizer.bin")
    write_manifest(checkpoint)
    with pytest.raises(
        CheckpointError,
        match=rf"{checkpoint} holds NaN or infinite values \(the optimizer's exp_avg_sq of parameter \d+\), from "
        rf"which training cannot go on: resume from the intact checkpoint before it with --resume_from_checkpoint "
        rf"{output_dir / 'checkpoints' / step(6)}",
    ):
        run_in_process(tiny_run_args(output_dir, resume_from_checkpoint="latest", **ONE_EPOCH))


# 6: checkpoints of the older layout (custom_checkpoint_<i>.pkl) resume


def to_older_layout(checkpoint) -> None:
    """What the trainer wrote before training_state.json: the schedule, the progress and the EMA pickled by accelerate
    (`register_for_checkpointing`, in this order), no manifest."""
    state = json.loads((checkpoint / STATE_FILE).read_text())
    progress = state["progress"]
    for name in ("run_id", "settings_changes", "bad_training_images", "epoch_bad_images", "bad_validation_images"):
        progress.pop(name)
    progress.update(bad_images=0, epoch_totals=progress["epoch_totals"] + [0])
    torch.save(state["scheduler"], checkpoint / "custom_checkpoint_0.pkl")
    torch.save(progress, checkpoint / "custom_checkpoint_1.pkl")
    torch.save(load_file(checkpoint / "ema.safetensors"), checkpoint / "custom_checkpoint_2.pkl")
    for name in (STATE_FILE, "ema.safetensors", "manifest.json"):
        (checkpoint / name).unlink()


def test_a_checkpoint_of_the_older_layout_resumes_to_the_same_model(finished, tmp_path, capsys):
    output_dir = tmp_path / "run"
    (output_dir / "checkpoints").mkdir(parents=True)
    shutil.copytree(finished / "checkpoints" / step(3), output_dir / "checkpoints" / step(3))
    to_older_layout(output_dir / "checkpoints" / step(3))
    capsys.readouterr()
    results = run_in_process(tiny_run_args(output_dir, resume_from_checkpoint="latest", **ONE_EPOCH))
    out = capsys.readouterr().out
    assert f"Resumed from {output_dir / 'checkpoints' / step(3)}: epoch 1, batch 3 of 8, step 3" in out
    assert "records no settings" in out
    assert results["eval_top1"] == read_results(finished)["eval_top1"]
    written, expected = output_dir / "model" / "model.safetensors", finished / "model" / "model.safetensors"
    assert written.read_bytes() == expected.read_bytes()


# 7: Ctrl-C and SIGTERM: one line with the step, the checkpoint and the command that resumes


def test_the_resume_command_drops_overwrite_and_an_earlier_resume():
    argv = ["--output_dir", "out dir", "--overwrite_output_dir", "--lr", "1e-3", "--resume_from_checkpoint=x"]
    assert resume_command(argv, "examples/run_imagenet.py") == (
        "python examples/run_imagenet.py --output_dir 'out dir' --lr 1e-3 --resume_from_checkpoint latest"
    )
    argv = ["--overwrite_output_dir", "true", "--resume_from_checkpoint", "ckpt", "--epochs", "2"]
    assert resume_command(argv, "run.py") == "python run.py --epochs 2 --resume_from_checkpoint latest"


def test_the_resume_command_of_a_launched_run_names_the_launcher(monkeypatch):
    monkeypatch.setenv("WORLD_SIZE", "2")
    assert resume_command(["--epochs", "2"], "examples/run_imagenet.py") == (
        "accelerate launch [the same launch options] examples/run_imagenet.py --epochs 2 --resume_from_checkpoint "
        "latest"
    )


@pytest.mark.parametrize("stop, status, name", [(signal.SIGINT, 130, "an interrupt"), (signal.SIGTERM, 143, "SIGTERM")])
def test_a_stopped_run_says_where_it_stopped_and_how_to_resume_in_one_line(tmp_path, stop, status, name):
    output_dir = tmp_path / "run"
    argv = tiny_run_args(output_dir, **dict(SMALL, epochs=1, checkpointing_steps=2))
    process = subprocess.Popen(
        [sys.executable, str(SCRIPT), *argv], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
        env=subprocess_env(), cwd=ROOT,
    )  # fmt: skip
    for line in process.stdout:
        if line.startswith("Saved checkpoint"):
            process.send_signal(stop)
            break
    _, err = process.communicate(timeout=120)
    assert process.returncode == status
    assert "Traceback" not in err
    last = err.strip().splitlines()[-1].split("\r")[-1]
    prefix = f"run_imagenet.py: error: stopped by {name}; nothing half-written was left behind. It was stopped at step "
    assert last.startswith(prefix), err[-2000:]
    reached, rest = last[len(prefix) :].split("; ", 1)
    latest = sorted((output_dir / "checkpoints").glob("step_*"))[-1]
    assert int(reached) >= int(latest.name[5:]) >= 2
    command = f"python {shlex.join([str(SCRIPT), *argv, '--resume_from_checkpoint', 'latest'])}"
    assert rest == f"resuming starts from {latest}: {command}"
    # The command resumes and finishes the run.
    resumed = run_resume_command(command)
    assert f"Resumed from {latest}" in resumed.stdout and read_results(output_dir)["global_step"] == 8


def test_a_launched_run_stopped_by_sigterm_says_it_once(tmp_path):
    output_dir = tmp_path / "run"
    argv = tiny_run_args(output_dir, **dict(SMALL, epochs=1, checkpointing_steps=2))
    process = subprocess.Popen(
        [*two_process_launcher(29571), str(SCRIPT), *argv], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
        env=subprocess_env(), cwd=ROOT,
    )  # fmt: skip
    for line in process.stdout:
        if line.startswith("Saved checkpoint"):
            process.send_signal(signal.SIGTERM)  # to the launcher, which passes it on to both processes
            break
    _, err = process.communicate(timeout=120)
    assert process.returncode == 143
    lines = [part for line in err.splitlines() for part in line.split("\r")]
    said = [line for line in lines if line.startswith("run_imagenet.py: ")]
    assert len(said) == 1 and "Traceback" not in err, err[-3000:]
    assert said[0].startswith("run_imagenet.py: error: stopped by SIGTERM; nothing half-written was left behind.")
    assert said[0].endswith(
        f"accelerate launch [the same launch options] {shlex.join([str(SCRIPT), *argv])} --resume_from_checkpoint "
        "latest"
    )
