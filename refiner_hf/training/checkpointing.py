"""
Resumable checkpoints: accelerate's `save_state` / `load_state` for the model, the optimizer and every process's
random states, and this module's own files for the rest of the run's state, so that resuming never unpickles
anything that could run code:

- `training_state.json`: [`TrainingProgress`] (epoch, batch, step, best weights, history, the run's id), the
  learning-rate schedule's state and the run's settings (those that change what is computed, see the trainer's
  `run_settings`), which a resumed run compares with its own;
- `ema.safetensors`: the model EMA's weights;
- `manifest.json`, written last: the size and SHA-256 of every file of the checkpoint.

accelerate loads its own pickles (`optimizer.bin`, `random_states_*.pkl`) with `torch.load(weights_only=True)`; a
random-state file it cannot read would be skipped with a log line at INFO, silently changing the run's randomness,
so this module reads them first and refuses them by name. A checkpoint is verified against its manifest before it is
resumed from; with `latest`, a damaged newest checkpoint is passed over for the newest intact one, with a message.
Its `training_state.json` is checked before anything is loaded: values that cannot be (a negative step, an epoch past
the end, more batches than an epoch has, a wrong type) are refused naming the file and the field.

Checkpoints of the older layout (before `training_state.json`: the schedule, the progress and the EMA pickled by
accelerate as `custom_checkpoint_<i>.pkl`, no manifest) resume too: their pickles are read weights-only, and the rest
of the checkpoint is loaded through accelerate without them.

Saving is atomic: the state is written to `.tmp-<name>` and renamed to `<name>` once every process has finished and
the manifest is written, so a crash or a kill during a save leaves the previous checkpoints intact and never a
half-written one under a valid name. Weights with NaN or infinite values are never saved. The last `total_limit`
checkpoints are kept, and the one holding the best weights (`TrainingProgress.best_step`): the trainer writes its
model directory from it when a run resumes.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import pickle
import re
import shutil
import tempfile
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
LEGACY_CUSTOM_PATTERN = re.compile(r"^custom_checkpoint_\d+\.pkl$")


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
        best_metric: the best validation top-1 so far, of the better of the raw and the EMA weights at each
            evaluation.
        best_epoch: the epoch that reached it.
        best_weights: "raw" or "ema", which weights reached it (the ones written to OUTPUT_DIR/model).
        best_step: the optimizer step of those weights, the name of the checkpoint that holds them.
        bad_training_images: the training images found undecodable so far (with `--skip_bad_images`), each named
            once: its index in the training split, or its name in a streamed one.
        bad_validation_images: the validation images the last evaluation left out as undecodable.
        epoch_totals: the training statistics of `epoch` up to the last checkpoint, summed over processes (the sum
            of the batch losses, the batches and the images), so that a resumed epoch reports the statistics of the
            whole epoch.
        epoch_bad_images: the training images of `epoch` found undecodable up to the last checkpoint.
        history: the per-epoch summaries so far.
        run_id: the run's identity, drawn when it starts and kept through its resumes: the checkpoints of one output
            directory must all be of one run.
        settings_changes: the settings a resume changed (with `--allow_changed_settings`): `{"step": ...,
            "changes": {name: [old, new]}}` per resume, recorded in the model card.
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
    run_id: str | None = None
    settings_changes: list[dict[str, Any]] = field(default_factory=list)

    def state_dict(self) -> dict[str, Any]:
        return asdict(self)

    def load_state_dict(self, state: dict[str, Any]) -> None:
        for name, value in state.items():
            setattr(self, name, value)


def checkpoint_step(path: Path) -> int | None:
    match = CHECKPOINT_PATTERN.match(path.name)
    return int(match.group(1)) if match else None


# The progress fields added after the first checkpoints of this layout: absent from those, they take their defaults.
LATER_PROGRESS_FIELDS = ("run_id", "settings_changes")


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def check_progress_state(
    state: Any,
    where: str,
    step_in_name: int | None = None,
    batches_per_epoch: int | None = None,
    total_epochs: int | None = None,
) -> dict[str, Any]:
    """
    The progress a checkpoint's training state holds, after refusing values that cannot be: a field missing or of the
    wrong type, a negative count, an epoch past the end, more batches than an epoch has, a step other than the one the
    checkpoint is named after. A state that could not be would otherwise train wrong or never end.

    Args:
        state: the `progress` mapping read from `where`.
        where: the file, for the messages (`.../training_state.json`).
        step_in_name: the optimizer step the checkpoint's name gives.
        batches_per_epoch: the training batches of an epoch in this run.
        total_epochs: the epochs this run trains.

    Raises:
        `CheckpointError`: one line naming the file and the field.
    """

    def refuse(name: str, problem: str) -> CheckpointError:
        return CheckpointError(
            f"{where}: progress.{name} {problem}; the file was changed after it was written (or by another version): "
            "resume from another checkpoint."
        )

    if not isinstance(state, dict):
        raise CheckpointError(f"{where}: `progress` is not a mapping; resume from another checkpoint.")
    defaults = TrainingProgress().state_dict()
    for name in state:
        if name not in defaults:
            raise refuse(name, "is not a field of the training progress")
    state = {**{name: defaults[name] for name in LATER_PROGRESS_FIELDS}, **state}
    for name in defaults:
        if name not in state:
            raise refuse(name, "is missing")
    for name in ("epoch", "batches_in_epoch", "global_step", "bad_validation_images"):
        if not _is_int(state[name]) or state[name] < 0:
            raise refuse(name, f"is {state[name]!r}, not a count (a whole number, 0 or more)")
    for name in ("evaluated_step", "best_epoch", "best_step"):
        if state[name] is not None and (not _is_int(state[name]) or state[name] < 0):
            raise refuse(name, f"is {state[name]!r}, neither a count nor null")
    metric = state["best_metric"]
    is_number = isinstance(metric, (int, float)) and not isinstance(metric, bool)
    if metric is not None and (not is_number or not 0 <= metric <= 1):
        raise refuse("best_metric", f"is {metric!r}, not an accuracy between 0 and 1")
    if state["best_weights"] == "model":  # the name of the raw weights in checkpoints of earlier versions
        state["best_weights"] = "raw"
    if state["best_weights"] not in (None, "raw", "ema"):
        raise refuse("best_weights", f"is {state['best_weights']!r}, not 'raw' or 'ema'")
    for name in ("bad_training_images", "epoch_bad_images"):
        images = state[name]
        if not isinstance(images, list) or not all(_is_int(i) or isinstance(i, str) for i in images):
            raise refuse(name, "is not a list of image indices or names")
    totals = state["epoch_totals"]
    if (
        not isinstance(totals, list)
        or len(totals) != 3
        or not all(isinstance(t, (int, float)) and not isinstance(t, bool) and math.isfinite(t) for t in totals)
        or not all(_is_int(count) and count >= 0 for count in totals[1:])
    ):
        raise refuse("epoch_totals", f"is {totals!r}, not three sums (loss, batches, images)")
    if not isinstance(state["history"], list) or not all(isinstance(h, dict) for h in state["history"]):
        raise refuse("history", "is not a list of epoch summaries")
    if state["run_id"] is not None and not isinstance(state["run_id"], str):
        raise refuse("run_id", f"is {state['run_id']!r}, not a string")
    if not isinstance(state["settings_changes"], list):
        raise refuse("settings_changes", "is not a list")
    step = state["global_step"]
    if step_in_name is not None and step != step_in_name:
        raise refuse("global_step", f"is {step}, but the checkpoint is named after step {step_in_name}")
    for name in ("evaluated_step", "best_step"):
        if state[name] is not None and state[name] > step:
            raise refuse(name, f"is {state[name]}, after the checkpoint's step {step}")
    if total_epochs is not None and state["epoch"] > total_epochs:
        raise refuse("epoch", f"is {state['epoch']}, past the end of this run's {total_epochs} epochs")
    if batches_per_epoch is not None and state["batches_in_epoch"] > batches_per_epoch:
        raise refuse(
            "batches_in_epoch",
            f"is {state['batches_in_epoch']}, beyond the {batches_per_epoch} batches of an epoch of this run",
        )
    return state


def _kind(value: Any) -> str:
    if isinstance(value, bool):
        return "bool"
    if isinstance(value, (int, float)):
        return "number"
    return "list" if isinstance(value, (list, tuple)) else type(value).__name__


def check_scheduler_state(state: Any, current: dict[str, Any], where: str) -> None:
    """
    Refuses a schedule state whose fields are not those of this run's schedule (`current`), or of another kind (a
    number where a number belongs, ...; null may stand for anything, as the schedule's optional fields are).

    Raises:
        `CheckpointError`: naming the file and the field.
    """
    if not isinstance(state, dict):
        raise CheckpointError(f"{where}: `scheduler` is missing or not a mapping; resume from another checkpoint.")
    for name in sorted(set(state) ^ set(current)):
        problem = "is missing" if name in current else "is not a field of this run's schedule"
        raise CheckpointError(f"{where}: scheduler.{name} {problem}; resume from another checkpoint.")
    for name, value in state.items():
        if value is not None and current[name] is not None and _kind(value) != _kind(current[name]):
            raise CheckpointError(
                f"{where}: scheduler.{name} is {value!r}, not a {_kind(current[name])}; resume from another checkpoint."
            )


def format_setting(value: Any) -> str:
    """A setting's value as the command line gives it."""
    if value is None:
        return "unset"
    if isinstance(value, list):
        return " ".join(format_setting(item) for item in value)
    if isinstance(value, dict):
        return json.dumps(value, separators=(",", ":"))
    return str(value)


def setting_name(name: str) -> str:
    return "the number of processes" if name == "num_processes" else f"--{name}"


def changed_settings(recorded: dict[str, Any], current: dict[str, Any]) -> dict[str, list[Any]]:
    """The settings both record whose values differ: `{name: [recorded, current]}` (in the current order)."""
    return {
        name: [recorded[name], value] for name, value in current.items() if name in recorded and recorded[name] != value
    }


def describe_changes(changes: dict[str, list[Any]]) -> str:
    """`--lr 0.002 -> 0.001, the number of processes 1 -> 2`."""
    return ", ".join(
        f"{setting_name(name)} {format_setting(old)} -> {format_setting(new)}" for name, (old, new) in changes.items()
    )


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


def _check_finite(modules: Iterable[nn.Module], optimizer: torch.optim.Optimizer | None = None) -> str | None:
    """
    The name of the first parameter or buffer of `modules` (or state of `optimizer`, e.g. Adam's moments, which turn
    the next step's weights into NaN) holding NaN or infinite values, if any.
    """
    for module in modules:
        for name, tensor in [*module.named_parameters(), *module.named_buffers()]:
            if tensor.is_floating_point() and not torch.isfinite(tensor).all():
                return name
    if optimizer is not None:
        for index, state in enumerate(optimizer.state.values()):
            for key, tensor in state.items():
                if torch.is_tensor(tensor) and tensor.is_floating_point() and not torch.isfinite(tensor).all():
                    return f"the optimizer's {key} of parameter {index}"
    return None


def upgrade_legacy_progress(progress: Any) -> Any:
    """
    The progress of an older-layout checkpoint with this layout's fields: its count of undecodable images (their
    names were not kept) is dropped, its epoch totals lose that count, and the steps of its last evaluation and its
    best weights, when absent, are read from its history.
    """
    if not isinstance(progress, dict):
        return progress
    progress = dict(progress)
    progress.pop("bad_images", None)
    progress.setdefault("bad_training_images", [])
    progress.setdefault("bad_validation_images", 0)
    progress.setdefault("epoch_bad_images", [])
    totals = progress.get("epoch_totals")
    if isinstance(totals, (list, tuple)):
        progress["epoch_totals"] = list(totals[:3])
    else:
        progress.setdefault("epoch_totals", [0.0, 0, 0])
    history = progress.get("history")
    if isinstance(history, list) and all(isinstance(entry, dict) for entry in history):
        if "evaluated_step" not in progress:
            progress["evaluated_step"] = history[-1].get("step") if history else None
        if "best_step" not in progress:
            best = [h.get("step") for h in history if h.get("epoch") == progress.get("best_epoch")]
            progress["best_step"] = best[-1] if best else None
    return progress


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
        optimizer: the optimizer whose state must be finite too.
        settings: the run's settings, recorded in each checkpoint (see the trainer's `run_settings`).
        batches_per_epoch: the training batches of an epoch, the bound of a resumed position.
        total_epochs: the epochs of the run, the bound of a resumed epoch.
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
        optimizer: torch.optim.Optimizer | None = None,
        settings: dict[str, Any] | None = None,
        batches_per_epoch: int | None = None,
        total_epochs: int | None = None,
    ) -> None:
        self.accelerator = accelerator
        self.directory = Path(directory)
        self.total_limit = total_limit
        self.progress = progress
        self.scheduler = scheduler
        self.ema = ema
        self.guarded = list(guarded)
        self.optimizer = optimizer
        self.settings = settings
        self.batches_per_epoch = batches_per_epoch
        self.total_epochs = total_epochs
        self._verified: Path | None = None
        self.resumed_from: Path | None = None  # the checkpoint this process loaded
        self.last_saved: Path | None = None  # the newest checkpoint this process saved

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
        bad = _check_finite(self.guarded, self.optimizer)
        if accelerator.reduce(torch.tensor(float(bad is not None), device=accelerator.device), reduction="sum") > 0:
            where = f" (e.g. {bad})" if bad else " on another process"
            raise NonFiniteWeightsError(
                f"The weights hold NaN or infinite values at step {progress.global_step}{where}; they were not "
                f"checkpointed. {self.recovery_advice()}"
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
        self.last_saved = final
        return final

    def recovery_advice(self) -> str:
        """
        How to go on after the run diverged: from the newest checkpoint this run saved, or, when it saved none since it
        was resumed, from an intact checkpoint before the one it resumed from (which led to the divergence), or else
        by starting over.
        """
        remedy = "a lower --lr or --clip_grad, or mend the data first"
        good = self.last_saved
        if good is None and self.resumed_from is not None:
            good = self.intact_before(self.resumed_from)
            if good is None:
                return (
                    f"No intact checkpoint precedes {self.resumed_from.name}, which this run resumed from: start over "
                    f"with --overwrite_output_dir and {remedy}."
                )
        if good is None:
            return f"No checkpoint was written yet: start over with --overwrite_output_dir and {remedy}."
        return (
            f"The last good checkpoint is {good}: resume from it with --resume_from_checkpoint {good} "
            f"--allow_changed_settings and {remedy}."
        )

    def intact_before(self, checkpoint: Path) -> Path | None:
        """The newest intact checkpoint of an earlier step than `checkpoint`, if any."""
        step = checkpoint_step(checkpoint)
        for candidate in reversed(self.checkpoints()):
            if step is not None and checkpoint_step(candidate) >= step:
                continue
            try:
                verify_checkpoint(candidate)
            except CheckpointError:
                continue
            return candidate
        return None

    def _save_own_state(self, directory: Path, progress: TrainingProgress) -> None:
        state = {"progress": progress.state_dict()}
        if self.scheduler is not None:
            state["scheduler"] = self.scheduler.state_dict()
        if self.settings is not None:
            state["settings"] = self.settings
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

    def read_state(self, checkpoint: Path) -> dict[str, Any]:
        """
        The training state of `checkpoint`, checked: `progress` (see [`check_progress_state`]), `scheduler`, and
        `settings` (None for a checkpoint that records none); of the older layout, from its pickles (read weights-only)
        with `legacy` True and the EMA's weights as `ema`.

        Raises:
            `CheckpointError`: naming the file and the field that cannot be.
        """
        where = checkpoint / STATE_FILE
        legacy = not where.is_file() and (checkpoint / "custom_checkpoint_0.pkl").is_file()
        if legacy:
            state = self._read_legacy_state(checkpoint)
            where = checkpoint / "custom_checkpoint_1.pkl"
        else:
            try:
                state = json.loads(where.read_text())
            except (OSError, ValueError) as error:
                raise CheckpointError(f"{where}: cannot be read ({error}).") from None
            if not isinstance(state, dict):
                raise CheckpointError(f"{where}: not a mapping; resume from another checkpoint.")
        if "progress" not in state:
            raise CheckpointError(f"{where}: `progress` is missing; resume from another checkpoint.")
        state["progress"] = check_progress_state(state["progress"], str(where), checkpoint_step(checkpoint))
        state["where"] = str(where)
        if self.scheduler is not None:
            check_scheduler_state(state.get("scheduler"), self.scheduler.state_dict(), str(where))
        settings = state.get("settings")
        if settings is not None and not isinstance(settings, dict):
            raise CheckpointError(f"{where}: `settings` is not a mapping; resume from another checkpoint.")
        state["legacy"] = legacy
        return state

    def check_position(self, state: dict[str, Any]) -> None:
        """Refuses a position ([`read_state`]'s) past this run's epochs, or beyond the batches of its epochs."""
        check_progress_state(state["progress"], state["where"], None, self.batches_per_epoch, self.total_epochs)

    def run_ids(self) -> dict[Path, str]:
        """The run id each checkpoint of the directory records (those recording none, or unreadable, left out)."""
        found = {}
        for checkpoint in self.checkpoints():
            try:
                run_id = json.loads((checkpoint / STATE_FILE).read_text())["progress"]["run_id"]
            except (OSError, ValueError, KeyError, TypeError):
                continue
            if isinstance(run_id, str):
                found[checkpoint] = run_id
        return found

    def load(self, checkpoint: Path, state: dict[str, Any] | None = None) -> None:
        """
        Resumes the run's state from `checkpoint` after verifying it: model, optimizer and random states through
        accelerate, the progress, schedule and EMA from their files (`state`: as [`read_state`] read them).

        Raises:
            `CheckpointError`: naming the file that is damaged or cannot be read safely, or the values that are not
                finite.
        """
        if problem := self._verify_everywhere(checkpoint):
            raise CheckpointError(problem)
        state = state if state is not None else self.read_state(checkpoint)
        self._check_pickles(checkpoint)
        try:
            with tempfile.TemporaryDirectory(prefix="refiner-hf-checkpoint-") as view:
                source = checkpoint
                if state["legacy"]:
                    # accelerate refuses custom states it has no registered objects for: it loads the rest from a view
                    # of the checkpoint without them (read above, weights-only).
                    source = Path(view)
                    for path in checkpoint.iterdir():
                        if not LEGACY_CUSTOM_PATTERN.match(path.name):
                            os.symlink(path.resolve(), source / path.name)
                self.accelerator.load_state(str(source))
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
        self._load_own_state(checkpoint, state)
        bad = _check_finite(self.guarded, self.optimizer)
        bad_anywhere = self.accelerator.reduce(
            torch.tensor(float(bad is not None), device=self.accelerator.device), reduction="sum"
        )
        if bad_anywhere > 0:
            earlier = self.intact_before(checkpoint)
            advice = (
                f"resume from the intact checkpoint before it with --resume_from_checkpoint {earlier}"
                if earlier is not None
                else "no intact checkpoint precedes it: start over with --overwrite_output_dir"
            )
            raise CheckpointError(
                f"{checkpoint} holds NaN or infinite values ({bad or 'on another process'}), from which training "
                f"cannot go on: {advice}, with a lower --lr or --clip_grad."
            )
        self.resumed_from = checkpoint

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

    def _load_own_state(self, checkpoint: Path, state: dict[str, Any]) -> None:
        try:
            if self.progress is not None:
                self.progress.load_state_dict(state["progress"])
            if self.scheduler is not None:
                self.scheduler.load_state_dict(state["scheduler"])
            if self.ema is not None:
                ema = state["ema"] if state["legacy"] else load_file(checkpoint / EMA_FILE)
                self.ema.load_state_dict(ema)
        except (OSError, ValueError, KeyError, TypeError, RuntimeError, SafetensorError) as error:
            raise CheckpointError(f"{checkpoint}: the training state cannot be loaded ({error}).") from None

    def _read_legacy_state(self, checkpoint: Path) -> dict[str, Any]:
        """
        The state of a checkpoint of the older layout, from its pickles read weights-only (without executing
        anything), its progress brought to this layout's fields.
        """
        state: dict[str, Any] = {}
        for index, name in enumerate(LEGACY_CUSTOM_STATES):
            path = checkpoint / f"custom_checkpoint_{index}.pkl"
            if not path.is_file():
                continue
            try:
                state[name] = accelerate_load(path, map_location="cpu")
            except Exception as error:  # a weights-only load refuses anything that could run code
                raise CheckpointError(f"{path}: cannot be read safely ({type(error).__name__}: {error}).") from None
        if self.ema is not None and "ema" not in state:
            raise CheckpointError(f"{checkpoint}: no EMA weights (custom_checkpoint_2.pkl), which this run keeps.")
        if "progress" in state:
            state["progress"] = upgrade_legacy_progress(state["progress"])
        return state

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
