"""
Stopping a training run as a user does: Ctrl-C in a terminal and SIGTERM from Slurm or `pkill -f` reach every process
of the group, the DataLoader workers included. The run ends with one line (the step reached, the checkpoint to resume
from, the command that resumes), exit status 130 / 143 and no traceback, also when stopped during evaluation or while
a checkpoint is written; the workers leave the stopping to the main process.
"""

import os
import shlex
import signal
import subprocess
import sys
import time

import pytest
from accelerate import Accelerator
from torch.utils.data import DataLoader, Dataset
from training_utils import (
    RECIPES,
    ROOT,
    SCRIPT,
    read_results,
    run_in_process,
    run_resume_command,
    subprocess_env,
    tiny_run_args,
)

from refiner_hf.cli import command_status
from refiner_hf.interruption import Terminated, interruption_behind
from refiner_hf.training import trainer
from refiner_hf.training.arguments import parse_args
from refiner_hf.training.data import load_image_data
from refiner_hf.training.loaders import WorkerInit, build_evaluation_loader, build_training_loader


PROG = "run_imagenet.py"
# 32 training images in batches of 4: 8 steps in one epoch, a checkpoint every 2 steps.
SMALL = dict(
    max_train_samples=32, per_device_train_batch_size=4, max_eval_samples=16, per_device_eval_batch_size=16, epochs=1
)


def stop_line(err: str) -> list[str]:
    lines = [part for line in err.splitlines() for part in line.split("\r")]
    return [line for line in lines if line.startswith(f"{PROG}: ")]


# The workers


class WorkerPid(Dataset):
    def __len__(self) -> int:
        return 1000

    def __getitem__(self, index: int) -> int:
        time.sleep(0.01)
        return os.getpid()


def test_a_loader_worker_ignores_ctrl_c_and_ends_quietly_on_sigterm():
    loader = DataLoader(WorkerPid(), batch_size=1, num_workers=1, worker_init_fn=WorkerInit())
    batches = iter(loader)
    pid = int(next(batches))
    os.kill(pid, signal.SIGINT)  # as Ctrl-C reaches the whole group: the worker goes on
    time.sleep(0.2)
    assert [int(next(batches)) for _ in range(5)] == [pid] * 5
    os.kill(pid, signal.SIGTERM)  # as Slurm or the main process ends it: at once, status 0, not "killed by signal"
    worker = batches._workers[0]
    worker.join(timeout=10)
    assert worker.exitcode == 0
    del batches


def test_the_worker_init_runs_a_further_init_after_setting_the_handlers():
    seen = []
    previous = signal.getsignal(signal.SIGINT), signal.getsignal(signal.SIGTERM)
    try:
        WorkerInit(then=seen.append)(3)
        assert signal.getsignal(signal.SIGINT) is signal.SIG_IGN and seen == [3]
    finally:
        signal.signal(signal.SIGINT, previous[0])
        signal.signal(signal.SIGTERM, previous[1])


def test_every_loader_of_the_trainer_has_the_worker_init(tmp_path):
    args = parse_args(tiny_run_args(tmp_path / "run", **SMALL, dataloader_num_workers=1), recipe_dirs=[RECIPES])
    data = load_image_data(args.data, args.training.seed)
    _, train_loader = build_training_loader(args, data, transform=None, num_labels=10, process_index=0, num_processes=1)
    eval_loader = build_evaluation_loader(args, data, image_processor=None)
    assert isinstance(train_loader.worker_init_fn, WorkerInit) and isinstance(eval_loader.worker_init_fn, WorkerInit)
    # accelerate's prepared loaders are new DataLoaders: they keep it.
    prepared = Accelerator(cpu=True).prepare(train_loader)
    assert isinstance(prepared.worker_init_fn, WorkerInit)


# The command line, stopped as a terminal or Slurm stops it


def start_in_own_group(argv: list[str]) -> subprocess.Popen:
    """The trainer's command line in a process group of its own, with the default Ctrl-C handler (a background job of
    a non-interactive shell would ignore SIGINT)."""
    return subprocess.Popen(
        [sys.executable, str(SCRIPT), *argv], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
        env=subprocess_env(), cwd=ROOT, start_new_session=True,
        preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL),
    )  # fmt: skip


@pytest.mark.parametrize("stop, status, name", [(signal.SIGINT, 130, "an interrupt"), (signal.SIGTERM, 143, "SIGTERM")])
def test_a_run_whose_process_group_is_stopped_says_so_in_one_line_and_resumes(tmp_path, stop, status, name):
    output_dir = tmp_path / "run"
    argv = tiny_run_args(output_dir, **SMALL, checkpointing_steps=2, dataloader_num_workers=1)
    process = start_in_own_group(argv)
    for line in process.stdout:
        if line.startswith("Saved checkpoint"):
            os.killpg(process.pid, stop)  # the main process and its DataLoader worker
            break
    _, err = process.communicate(timeout=120)
    assert process.returncode == status, err[-3000:]
    assert "Traceback" not in err and "DataLoader worker" not in err, err[-3000:]
    said = stop_line(err)
    assert len(said) == 1 and said == [err.strip().splitlines()[-1].split("\r")[-1]]
    latest = sorted((output_dir / "checkpoints").glob("step_*"))[-1]
    command = f"python {shlex.join([str(SCRIPT), *argv, '--resume_from_checkpoint', 'latest'])}"
    prefix = f"{PROG}: error: stopped by {name}; nothing half-written was left behind. It was stopped at step "
    reached, rest = said[0].removeprefix(prefix).split("; ", 1)
    assert int(reached) >= int(latest.name[5:]) >= 2 and rest == f"resuming starts from {latest}: {command}"
    with pytest.raises(ProcessLookupError):  # no worker is left behind
        os.killpg(process.pid, 0)
    if stop == signal.SIGTERM:  # the printed command finishes the run: 8 steps, as an uninterrupted one
        resumed = run_resume_command(command)
        assert f"Resumed from {latest}" in resumed.stdout and read_results(output_dir)["global_step"] == 8


def test_a_launched_run_whose_process_group_gets_ctrl_c_says_it_once(tmp_path):
    # Ctrl-C in the terminal reaches the launcher, both processes and their workers; the launcher passes it on too.
    output_dir = tmp_path / "run"
    argv = tiny_run_args(output_dir, **SMALL, checkpointing_steps=2, dataloader_num_workers=1)
    accelerate = os.path.join(os.path.dirname(sys.executable), "accelerate")
    launcher = [accelerate, "launch", "--config_file", str(ROOT / "examples" / "accelerate_configs" / "cpu_2proc.yaml"),
                "--main_process_port", "29573"]  # fmt: skip
    process = subprocess.Popen(
        [*launcher, str(SCRIPT), *argv], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
        env=subprocess_env(), cwd=ROOT, start_new_session=True,
        preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL),
    )  # fmt: skip
    for line in process.stdout:
        if line.startswith("Saved checkpoint"):
            os.killpg(process.pid, signal.SIGINT)
            break
    _, err = process.communicate(timeout=120)
    assert process.returncode == 130, err[-3000:]
    assert "Traceback" not in err and "DataLoader worker" not in err and "FAILED" not in err, err[-3000:]
    said = stop_line(err)
    assert len(said) == 1 and said[0].startswith(f"{PROG}: error: stopped by an interrupt;"), err[-3000:]
    assert said[0].endswith(f"accelerate launch [the same launch options] {shlex.join([str(SCRIPT), *argv])} "
                            "--resume_from_checkpoint latest")  # fmt: skip


# Stopped while evaluating or writing a checkpoint (in this process: the stop raised where the signal would land)


def stopped_status(argv: list[str], capsys) -> tuple[int, list[str]]:
    capsys.readouterr()
    status = command_status(lambda: run_in_process(argv), PROG, stopped_hint=lambda: trainer.resume_hint(argv, "r.py"))
    err = capsys.readouterr().err
    assert "Traceback" not in err
    return status, stop_line(err)


def test_a_run_stopped_while_writing_a_checkpoint_leaves_the_previous_one_latest(tmp_path, capsys, monkeypatch):
    output_dir = tmp_path / "run"
    argv = tiny_run_args(output_dir, **SMALL, checkpointing_steps=2)
    original, saves = Accelerator.save_state, []

    def stopped_midway(self, directory, **kwargs):
        saves.append(directory)
        original(self, directory, **kwargs)
        if len(saves) == 2:  # the second checkpoint's files are written, the checkpoint is not complete yet
            raise Terminated

    monkeypatch.setattr(Accelerator, "save_state", stopped_midway)
    status, said = stopped_status(argv, capsys)
    checkpoints = output_dir / "checkpoints"
    assert status == 143 and sorted(p.name for p in checkpoints.iterdir()) == ["step_00000002"]
    assert said == [
        f"{PROG}: error: stopped by SIGTERM; nothing half-written was left behind. It was stopped at step 4; resuming "
        f"starts from {checkpoints / 'step_00000002'}: {trainer.resume_command(argv, 'r.py')}"
    ]
    monkeypatch.setattr(Accelerator, "save_state", original)
    results = run_in_process([*argv, "--resume_from_checkpoint", "latest"])
    assert results["global_step"] == 8


def test_a_run_stopped_while_evaluating_names_the_last_checkpoint(tmp_path, capsys, monkeypatch):
    output_dir = tmp_path / "run"
    argv = tiny_run_args(output_dir, **SMALL, checkpointing_steps=3)

    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(trainer, "evaluate_classifier", interrupted)
    status, said = stopped_status(argv, capsys)
    assert status == 130 and len(said) == 1
    assert said[0].startswith(f"{PROG}: error: stopped by an interrupt; nothing half-written was left behind.")
    assert f"It was stopped at step 8; resuming starts from {output_dir / 'checkpoints' / 'step_00000006'}: " in said[0]


def test_a_worker_error_met_while_a_stopped_run_unwinds_is_reported_as_the_stop(tmp_path, capsys, monkeypatch):
    def stopped(run):
        try:
            raise Terminated
        except Terminated:
            # What torch's SIGCHLD handler raises when the same signal ended a worker the old way.
            raise RuntimeError("DataLoader worker (pid 1) is killed by signal: Terminated.") from None

    monkeypatch.setattr(trainer, "train_and_evaluate", stopped)
    status, said = stopped_status(tiny_run_args(tmp_path / "run", **SMALL), capsys)
    assert status == 143 and len(said) == 1 and "stopped by SIGTERM" in said[0]


def test_interruption_behind_finds_the_stop_in_the_chain():
    try:
        try:
            raise KeyboardInterrupt
        except KeyboardInterrupt:
            raise RuntimeError("worker") from None
    except RuntimeError as error:
        assert isinstance(interruption_behind(error), KeyboardInterrupt)
    assert interruption_behind(RuntimeError("a bug")) is None


# A short run's notes under `accelerate launch`: said by the main process only


@pytest.mark.parametrize("rank, said", [("0", 2), ("1", 0)])
def test_the_notes_of_a_short_run_are_said_by_the_main_process_only(monkeypatch, capsys, rank, said):
    monkeypatch.setenv("RANK", rank)
    # The embedded recipe warms up for 1 epoch; 8 images leave classes out.
    args = parse_args(["--epochs", "1", "--max_train_samples", "8"], recipe_dirs=[RECIPES])
    load_image_data(args.data, args.training.seed)
    notes = [line for line in capsys.readouterr().out.splitlines() if line.startswith("Note: ")]
    assert len(notes) == said and args.training.warmup_epochs == 0.5
    if said:
        assert "warmup of 1 epoch is not shorter than --epochs 1" in notes[0] and "leaves no training image" in notes[1]


def test_a_worker_says_nothing_of_a_transfer_its_stopping_main_process_abandoned():
    # multiprocessing's resource sharer thread reports a dropped connection through sys.excepthook.
    from refiner_hf.interruption import _quiet_about_abandoned_transfers

    reported = []
    hook = _quiet_about_abandoned_transfers(lambda *info: reported.append(info[1]))
    for filename in ("multiprocessing/resource_sharer.py", "elsewhere.py"):
        namespace: dict = {}
        code = (
            "import sys\ndef serve(hook):\n    try:\n        raise ConnectionResetError('dropped')\n"
            "    except:\n        hook(*sys.exc_info())\n"
        )
        exec(compile(code, filename, "exec"), namespace)
        namespace["serve"](hook)
    assert [str(error) for error in reported] == ["dropped"]  # only the error from elsewhere
