"""
Resumable checkpoints through `accelerator.save_state` / `load_state`.

A checkpoint holds what accelerate saves (model, optimizer, every process's RNG states, the accumulation counter) and
the objects registered with `accelerator.register_for_checkpointing`: the learning-rate schedule, the model EMA and
[`TrainingProgress`], the position in the run (epoch, batches of it consumed, optimizer steps, best metric so far).

Saving is atomic: the state is written to `.tmp-<name>` and renamed to `<name>` once every process has finished, so a
crash or a kill during a save leaves the previous checkpoints intact and never a half-written one under a valid name.
The last `total_limit` checkpoints are kept, and the one holding the best weights (`TrainingProgress.best_step`): the
trainer writes its model directory from it when a run resumes.
"""

from __future__ import annotations

import json
import re
import shutil
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from accelerate import Accelerator

from .errors import UsageError


CHECKPOINT_PATTERN = re.compile(r"^step_(\d+)$")
TEMPORARY_PREFIX = ".tmp-"
PROGRESS_FILE = "progress.json"


@dataclass
class TrainingProgress:
    """
    Where a run stands; checkpointed with the model so that a resumed run continues at the same batch.

    Attributes:
        epoch: the epoch in progress.
        batches_in_epoch: training batches of `epoch` this process has consumed (a multiple of the accumulation
            steps except at the end of an epoch).
        global_step: optimizer steps done.
        evaluated_step: the optimizer step the last evaluation measured (None before the first): an evaluation is
            still due when the training has reached its end at another step, e.g. when a run was killed during its
            final evaluation.
        best_metric: the best validation top-1 so far (of the EMA weights when the EMA is on).
        best_epoch: the epoch that reached it.
        best_weights: "ema" or "model", which weights reached it.
        best_step: the optimizer step of those weights, the name of the checkpoint that holds them.
        bad_images: undecodable images skipped so far (with `--skip_bad_images`).
        epoch_totals: the training statistics of `epoch` up to the last checkpoint, summed over processes (the sum
            of the batch losses, the batches, the images and the bad images), so that a resumed epoch reports the
            statistics of the whole epoch.
        history: the per-epoch summaries so far.
    """

    epoch: int = 0
    batches_in_epoch: int = 0
    global_step: int = 0
    evaluated_step: int | None = None
    best_metric: float | None = None
    best_epoch: int | None = None
    best_weights: str | None = None
    best_step: int | None = None
    bad_images: int = 0
    epoch_totals: list[float] = field(default_factory=lambda: [0.0, 0, 0, 0])
    history: list[dict[str, Any]] = field(default_factory=list)

    def state_dict(self) -> dict[str, Any]:
        return asdict(self)

    def load_state_dict(self, state: dict[str, Any]) -> None:
        for name, value in state.items():
            setattr(self, name, value)


def checkpoint_step(path: Path) -> int | None:
    match = CHECKPOINT_PATTERN.match(path.name)
    return int(match.group(1)) if match else None


class CheckpointManager:
    """
    Saves, lists and prunes the checkpoints of a run under `directory` (one folder per optimizer step:
    `step_00001234`). The directory must be shared by all processes (as accelerate's `save_state` assumes).

    Args:
        accelerator: the run's accelerator (its registered objects are saved with the state).
        directory: where the checkpoints live.
        total_limit: how many of the newest checkpoints to keep.
    """

    def __init__(self, accelerator: Accelerator, directory: str | Path, total_limit: int = 3) -> None:
        self.accelerator = accelerator
        self.directory = Path(directory)
        self.total_limit = total_limit

    def checkpoints(self) -> list[Path]:
        """Complete checkpoints, oldest first (temporary folders of interrupted saves are not listed)."""
        if not self.directory.is_dir():
            return []
        found = [(checkpoint_step(p), p) for p in self.directory.iterdir() if p.is_dir()]
        return [path for step, path in sorted((s, p) for s, p in found if s is not None)]

    def latest(self) -> Path | None:
        checkpoints = self.checkpoints()
        return checkpoints[-1] if checkpoints else None

    def save(self, progress: TrainingProgress) -> Path:
        """
        Saves the state of every process as the checkpoint of `progress.global_step` and prunes old ones, keeping the
        last `total_limit` and the one of `progress.best_step`.
        """
        accelerator = self.accelerator
        name = f"step_{progress.global_step:08d}"
        final = self.directory / name
        staging = self.directory / f"{TEMPORARY_PREFIX}{name}"
        if accelerator.is_main_process:
            self.directory.mkdir(parents=True, exist_ok=True)
            shutil.rmtree(staging, ignore_errors=True)  # left by a save that was killed
        accelerator.wait_for_everyone()
        try:
            accelerator.save_state(str(staging))
            accelerator.wait_for_everyone()
        except BaseException:
            if accelerator.is_main_process:
                shutil.rmtree(staging, ignore_errors=True)
            raise
        if accelerator.is_main_process:
            # A readable copy of the position, for people; the registered object is what resuming uses.
            (staging / PROGRESS_FILE).write_text(json.dumps(progress.state_dict(), indent=2) + "\n")
            replaced = None
            if final.exists():  # the same step saved again (e.g. at the end of the epoch, after evaluation)
                replaced = final.with_name(f"{TEMPORARY_PREFIX}old-{name}")
                shutil.rmtree(replaced, ignore_errors=True)
                final.rename(replaced)
            staging.rename(final)
            if replaced is not None:
                shutil.rmtree(replaced, ignore_errors=True)
            for old in self.checkpoints()[: -self.total_limit]:
                if checkpoint_step(old) != progress.best_step:
                    shutil.rmtree(old, ignore_errors=True)
        accelerator.wait_for_everyone()
        return final

    def resolve(self, resume_from: str) -> Path | None:
        """The checkpoint `--resume_from_checkpoint` names: `latest` (None when there is none yet) or a directory."""
        if resume_from == "latest":
            return self.latest()
        path = Path(resume_from)
        if not path.is_dir():
            raise UsageError(
                f"--resume_from_checkpoint {resume_from}: no such checkpoint directory (`latest` takes the newest of "
                f"{self.directory})."
            )
        return path

    def of_step(self, step: int) -> Path | None:
        """The complete checkpoint of optimizer step `step`, if there is one."""
        path = self.directory / f"step_{step:08d}"
        return path if path.is_dir() else None


__all__ = ["CheckpointManager", "TrainingProgress", "checkpoint_step"]
