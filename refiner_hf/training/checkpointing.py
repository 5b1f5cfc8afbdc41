"""
Resumable checkpoints: accelerate's `save_state` / `load_state` for the model, the optimizer and every process's
random states, and this module's own files for the rest of the run's state, so that resuming never unpickles
anything that could run code:

- `training_state.json`: [`TrainingProgress`] (epoch, batch, step, best weights, history) and the learning-rate
  schedule's state;
- `ema.safetensors`: the model EMA's weights;
- `manifest.json`, written last: the size and SHA-256 of every file of the checkpoint.

accelerate loads its own pickles (`optimizer.bin`, `random_states_*.pkl`) with `torch.load(weights_only=True)`; a
random-state file it cannot read would be skipped with a log line at INFO, silently changing the run's randomness,
so this module reads them first and refuses them by name. A checkpoint is verified against its manifest before it is
resumed from; with `latest`, a damaged newest checkpoint is passed over for the newest intact one, with a message.

Saving is atomic: the state is written to `.tmp-<name>` and renamed to `<name>` once every process has finished and
the manifest is written, so a crash or a kill during a save leaves the previous checkpoints intact and never a
half-written one under a valid name. Weights with NaN or infinite values are never saved. The last `total_limit`
checkpoints are kept, and the one holding the best weights (`TrainingProgress.best_step`): the trainer writes its
model directory from it when a run resumes.
"""

from __future__ import annotations

import hashlib
import json
import pickle
import re
import shutil
from collections.abc import Iterable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
from accelerate import Accelerator
from accelerate.utils import broadcast_object_list, gather_object
from accelerate.utils import load as accelerate_load
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from torch import nn

from .errors import DataError, UsageError


CHECKPOINT_PATTERN = re.compile(r"^step_(\d+)$")
TEMPORARY_PREFIX = ".tmp-"
STATE_FILE = "training_state.json"
EMA_FILE = "ema.safetensors"
MANIFEST_FILE = "manifest.json"
RANDOM_STATES_PATTERN = "random_states_{}.pkl"
# Checkpoints written before this layout kept these objects in accelerate's `custom_checkpoint_<i>.pkl`, in this order.
LEGACY_CUSTOM_STATES = ("scheduler", "progress", "ema")


class CheckpointError(DataError, ValueError):
    """A checkpoint that cannot be resumed from; the message names the checkpoint and the file."""


class NonFiniteWeightsError(DataError, RuntimeError):
    """Weights with NaN or infinite values, which are never checkpointed."""


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
        bad_training_images: the training images found undecodable so far (with `--skip_bad_images`), each named
            once: its index in the training split, or its name in a streamed one.
        bad_validation_images: the validation images the last evaluation left out as undecodable.
        epoch_totals: the training statistics of `epoch` up to the last checkpoint, summed over processes (the sum
            of the batch losses, the batches and the images), so that a resumed epoch reports the statistics of the
            whole epoch.
        epoch_bad_images: the training images of `epoch` found undecodable up to the last checkpoint.
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
    bad_training_images: list[int | str] = field(default_factory=list)
    bad_validation_images: int = 0
    epoch_totals: list[float] = field(default_factory=lambda: [0.0, 0, 0])
    epoch_bad_images: list[int | str] = field(default_factory=list)
    history: list[dict[str, Any]] = field(default_factory=list)

    def state_dict(self) -> dict[str, Any]:
        return asdict(self)

    def load_state_dict(self, state: dict[str, Any]) -> None:
        for name, value in state.items():
            setattr(self, name, value)


def checkpoint_step(path: Path) -> int | None:
    match = CHECKPOINT_PATTERN.match(path.name)
    return int(match.group(1)) if match else None


def sha256_of(path: Path) -> str:
    with path.open("rb") as file:
        return hashlib.file_digest(file, "sha256").hexdigest()


def write_text_atomically(path: Path, text: str) -> None:
    """Writes `text` to `path` through a `.partial` file renamed over it: a reader (or a run stopped mid-write) sees
    the old file or the new one, never half of one."""
    partial = path.with_name(path.name + ".partial")
    partial.write_text(text)
    partial.replace(path)


def write_manifest(directory: Path) -> None:
    """Records the size and SHA-256 of every file under `directory` in its manifest (written last, atomically)."""
    files = sorted(path for path in directory.rglob("*") if path.is_file() and path.name != MANIFEST_FILE)
    manifest = {
        "files": {
            path.relative_to(directory).as_posix(): {"size": path.stat().st_size, "sha256": sha256_of(path)}
            for path in files
        }
    }
    write_text_atomically(directory / MANIFEST_FILE, json.dumps(manifest, indent=1) + "\n")


def verify_checkpoint(checkpoint: Path) -> None:
    """
    Checks every file a checkpoint's manifest lists: present, of the recorded size and SHA-256.

    Raises:
        `CheckpointError`: naming the checkpoint and the first file that does not match.
    """
    manifest_path = checkpoint / MANIFEST_FILE
    if not manifest_path.is_file():
        if (checkpoint / "custom_checkpoint_0.pkl").is_file():  # written before manifests: nothing to verify against
            return
        raise CheckpointError(
            f"{checkpoint} is incomplete: it has no {MANIFEST_FILE}, which a save writes last (a save that was "
            "interrupted, or a second run writing into the same directory)."
        )
    try:
        files = json.loads(manifest_path.read_text())["files"]
    except (OSError, ValueError, KeyError, TypeError) as error:
        raise CheckpointError(f"{checkpoint}: {MANIFEST_FILE} is unreadable ({error}).") from None
    root = checkpoint.resolve()
    for path in sorted(checkpoint.rglob("*")):
        name = path.relative_to(checkpoint).as_posix()
        if path.is_file() and name != MANIFEST_FILE and name not in files:
            raise CheckpointError(f"{checkpoint}: {name} is not part of the checkpoint as it was written.")
    for name, entry in files.items():
        path = checkpoint / name
        if not path.resolve().is_relative_to(root):
            raise CheckpointError(f"{checkpoint}: {MANIFEST_FILE} lists {name!r}, outside the checkpoint.")
        if not path.is_file():
            raise CheckpointError(f"{checkpoint}: {name} is missing.")
        size = path.stat().st_size
        if size != entry.get("size"):
            raise CheckpointError(f"{checkpoint}: {name} has {size:,} bytes, {entry.get('size'):,} were written.")
        if sha256_of(path) != entry.get("sha256"):
            raise CheckpointError(f"{checkpoint}: {name} is not what was written (its SHA-256 differs).")


def _check_finite(modules: Iterable[nn.Module]) -> str | None:
    """The name of the first parameter or buffer of `modules` holding NaN or infinite values, if any."""
    for module in modules:
        for name, tensor in [*module.named_parameters(), *module.named_buffers()]:
            if tensor.is_floating_point() and not torch.isfinite(tensor).all():
                return name
    return None


class CheckpointManager:
    """
    Saves, verifies, loads, lists and prunes the checkpoints of a run under `directory` (one folder per optimizer
    step: `step_00001234`). The directory must be shared by all processes (as accelerate's `save_state` assumes).

    Args:
        accelerator: the run's accelerator (the model and optimizer it prepared are saved with the state).
        directory: where the checkpoints live.
        total_limit: how many of the newest checkpoints to keep.
        progress: the run's [`TrainingProgress`].
        scheduler: the learning-rate schedule (its state must be plain JSON).
        ema: the model EMA, saved as safetensors.
        guarded: modules whose weights must be finite for a checkpoint to be written.
    """

    def __init__(
        self,
        accelerator: Accelerator,
        directory: str | Path,
        total_limit: int = 3,
        progress: TrainingProgress | None = None,
        scheduler: Any = None,
        ema: nn.Module | None = None,
        guarded: Iterable[nn.Module] = (),
    ) -> None:
        self.accelerator = accelerator
        self.directory = Path(directory)
        self.total_limit = total_limit
        self.progress = progress
        self.scheduler = scheduler
        self.ema = ema
        self.guarded = list(guarded)
        self._verified: Path | None = None

    def checkpoints(self) -> list[Path]:
        """Checkpoint folders, oldest first (temporary folders of interrupted saves are not listed)."""
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

        Raises:
            `NonFiniteWeightsError`: the weights hold NaN or infinite values; nothing is written, the previous
                checkpoints stay the latest.
        """
        accelerator = self.accelerator
        bad = _check_finite(self.guarded)
        if accelerator.reduce(torch.tensor(float(bad is not None), device=accelerator.device), reduction="sum") > 0:
            where = f" (e.g. {bad})" if bad else " on another process"
            raise NonFiniteWeightsError(
                f"The weights hold NaN or infinite values at step {progress.global_step}{where}; they were not "
                f"checkpointed, and the latest checkpoint in {self.directory} is the last good one."
            )
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
            if accelerator.is_main_process:
                self._save_own_state(staging, progress)
                write_manifest(staging)
        except BaseException:
            if accelerator.is_main_process:
                shutil.rmtree(staging, ignore_errors=True)
            raise
        if accelerator.is_main_process:
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

    def _save_own_state(self, directory: Path, progress: TrainingProgress) -> None:
        state = {"progress": progress.state_dict()}
        if self.scheduler is not None:
            state["scheduler"] = self.scheduler.state_dict()
        (directory / STATE_FILE).write_text(json.dumps(state, indent=1) + "\n")
        if self.ema is not None:
            tensors = {key: value.detach().cpu().clone().contiguous() for key, value in self.ema.state_dict().items()}
            save_file(tensors, directory / EMA_FILE, metadata={"format": "pt"})

    def _verify_everywhere(self, checkpoint: Path) -> str | None:
        """Verifies `checkpoint` once (on the main process) and gives every process the outcome."""
        problem = None
        if self.accelerator.is_main_process and checkpoint != self._verified:
            try:
                verify_checkpoint(checkpoint)
            except CheckpointError as error:
                problem = str(error)
        (problem,) = broadcast_object_list([problem])
        if problem is None:
            self._verified = checkpoint
        return problem

    def resolve(self, resume_from: str) -> Path | None:
        """
        The checkpoint `--resume_from_checkpoint` names, verified: `latest` is the newest intact checkpoint (damaged
        newer ones are passed over, with a message; None when there is none yet), a directory must be intact.

        Raises:
            `CheckpointError`: the named checkpoint is damaged, or every checkpoint of the run is.
        """
        if resume_from != "latest":
            path = Path(resume_from)
            if not path.is_dir():
                raise UsageError(
                    f"--resume_from_checkpoint {resume_from}: no such checkpoint directory (`latest` takes the newest "
                    f"intact one of {self.directory})."
                )
            if problem := self._verify_everywhere(path):
                raise CheckpointError(f"{problem} Resume from another checkpoint (`latest` takes the newest intact).")
            return path
        problems = []
        for checkpoint in reversed(self.checkpoints()):
            problem = self._verify_everywhere(checkpoint)
            if problem is None:
                if problems:
                    self.accelerator.print(
                        f"Passing over {len(problems)} damaged checkpoint(s): {' '.join(problems)} Resuming from the "
                        f"newest intact one, {checkpoint.name}.",
                        flush=True,
                    )
                return checkpoint
            problems.append(problem)
        if problems:
            raise CheckpointError(f"No intact checkpoint in {self.directory}: {' '.join(problems)}")
        return None

    def load(self, checkpoint: Path) -> None:
        """
        Resumes the run's state from `checkpoint` after verifying it: model, optimizer and random states through
        accelerate, the progress, schedule and EMA from their files.

        Raises:
            `CheckpointError`: naming the file that is damaged or cannot be read safely.
        """
        if problem := self._verify_everywhere(checkpoint):
            raise CheckpointError(problem)
        self._check_pickles(checkpoint)
        try:
            self.accelerator.load_state(str(checkpoint))
        except (
            OSError,
            RuntimeError,
            ValueError,
            KeyError,
            EOFError,
            SafetensorError,
            pickle.UnpicklingError,
        ) as error:
            raise CheckpointError(f"{checkpoint}: cannot be loaded ({type(error).__name__}: {error}).") from None
        self._load_own_state(checkpoint)

    def _check_pickles(self, checkpoint: Path) -> None:
        """
        Reads accelerate's pickles first, weights only: it skips a random-state file it cannot read with a line at
        INFO (silently changing the run's randomness), and its own errors do not name the file. Every process checks
        its random states, the main one the shared files; all stop on any problem.
        """
        random_states = checkpoint / RANDOM_STATES_PATTERN.format(self.accelerator.process_index)
        if not random_states.is_file():
            print(
                f"Warning: {random_states} does not exist (the checkpoint was saved by fewer processes): process "
                f"{self.accelerator.process_index} continues with fresh random states, so the resumed run will not "
                "repeat an uninterrupted one exactly.",
                flush=True,
            )
        shared = sorted(checkpoint.glob("*.bin")) if self.accelerator.is_main_process else []
        problem = None
        for path in shared + ([random_states] if random_states.is_file() else []):
            try:
                try:
                    accelerate_load(path, map_location="cpu", mmap=True)  # mapped, not read: cheap for large states
                except RuntimeError as error:
                    if "mmap" not in str(error):
                        raise
                    accelerate_load(path, map_location="cpu")  # a legacy-format file cannot be mapped
            except Exception as error:  # truncated, tampered with, or holding objects a weights-only load refuses
                consequence = (
                    "resuming without them would change the run's randomness. " if path == random_states else ""
                )
                problem = f"{path}: cannot be read safely ({type(error).__name__}); {consequence}"
                problem += "Resume from another checkpoint."
                break
        problems = [found for found in gather_object([problem]) if found is not None]
        if problems:
            raise CheckpointError(problems[0])

    def _load_own_state(self, checkpoint: Path) -> None:
        if not (checkpoint / STATE_FILE).is_file():
            self._load_legacy_state(checkpoint)
            return
        try:
            state = json.loads((checkpoint / STATE_FILE).read_text())
            if self.progress is not None:
                self.progress.load_state_dict(state["progress"])
            if self.scheduler is not None:
                self.scheduler.load_state_dict(state["scheduler"])
            if self.ema is not None:
                self.ema.load_state_dict(load_file(checkpoint / EMA_FILE))
        except (OSError, ValueError, KeyError, TypeError, RuntimeError, SafetensorError) as error:
            raise CheckpointError(f"{checkpoint}: the training state cannot be loaded ({error}).") from None

    def _load_legacy_state(self, checkpoint: Path) -> None:
        """Checkpoints written before this layout: their pickled states, read without executing anything."""
        objects = {"scheduler": self.scheduler, "progress": self.progress, "ema": self.ema}
        for index, name in enumerate(LEGACY_CUSTOM_STATES):
            path = checkpoint / f"custom_checkpoint_{index}.pkl"
            if objects[name] is None or not path.is_file():
                continue
            try:
                objects[name].load_state_dict(accelerate_load(path, map_location="cpu"))
            except Exception as error:  # a weights-only load refuses anything that could run code
                raise CheckpointError(f"{path}: cannot be read safely ({type(error).__name__}: {error}).") from None

    def of_step(self, step: int) -> Path | None:
        """The checkpoint of optimizer step `step`, if there is one."""
        path = self.directory / f"step_{step:08d}"
        return path if path.is_dir() else None


__all__ = [
    "CheckpointError",
    "CheckpointManager",
    "NonFiniteWeightsError",
    "TrainingProgress",
    "checkpoint_step",
    "verify_checkpoint",
    "write_manifest",
]
