"""
Writing model directories safely, and proving what was written.

[`save_model_directory`] writes a model with its image processor (and model card) under a temporary name beside the
target, has the result checked, and only then moves it into place; an existing directory is replaced only when it is
recognisably a model directory written before, and only after its replacement is complete. A writer killed half way
leaves a hidden staging (or set-aside) directory, which the next write to the same place recognises as its own
leftover and cleans up, putting a set-aside model directory back where its replacement never arrived.
[`write_directory`] does the same for other kinds of directory, each described by a [`DirectoryLayout`] (the ONNX
export's, for instance). One writer at a time: a writer holds an [`OutputLock`] beside the target from start to end,
and a second one is refused naming the first (host and process). The final move never deletes what the writer did
not write: a target that appeared, or changed, while it ran is left untouched and the result is kept beside it.

[`verify_model_directory`] proves a written directory: every tensor in the weights file equals the in-memory model's
bit for bit, the configuration and both image-processor backends load back equal, the code named in `auto_map` is
there, and the reloaded model reproduces the in-memory model's logits within float rounding.
"""

from __future__ import annotations

import errno
import json
import logging
import os
import re
import secrets
import shutil
import socket
import tempfile
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open
from transformers import AutoImageProcessor, AutoModelForImageClassification
from transformers.dynamic_module_utils import get_relative_import_files, get_relative_imports

from . import image_processing_refiner_vit, modeling_refiner_vit
from .cli import DataError
from .image_processing_pil_refiner_vit import RefinerViTImageProcessorPil
from .image_processing_refiner_vit import RefinerViTImageProcessor
from .image_processing_refiner_vit_common import image_processor_auto_map
from .modeling_refiner_vit import RefinerViTPreTrainedModel, model_auto_map


# Reloaded logits must match the in-memory model's within this, relative to the logits' scale (max(1, max |logit|)):
# the same weights and code, but float rounding can differ between two model objects (e.g. with the alignment of
# their tensors), by a few units in the last place of float32 (about 1.2e-7 relative), never by more.
RELOAD_RELATIVE_TOLERANCE = 1e-5

WEIGHTS_NAME = "model.safetensors"
WEIGHTS_INDEX_NAME = "model.safetensors.index.json"
_SHARD_PATTERN = re.compile(r"model-\d+-of-\d+\.safetensors")
_STAGING, _SET_ASIDE = "partial", "replaced"


class ModelDirectoryError(DataError, OSError):
    """A model directory that cannot be written where asked, or that does not prove what it should hold."""


class OutputLockedError(ModelDirectoryError):
    """Another live process is writing the same output directory."""


class OutputChangedError(ModelDirectoryError):
    """The output directory appeared or changed while a command wrote it; the command's result was kept aside."""


logger = logging.getLogger(__name__)


def remote_code_files() -> list[str]:
    """
    The package files a saved model directory carries: the configuration, modeling and both processing modules, and
    every module they import relatively (what transformers' `trust_remote_code` loading needs).
    """
    files = set()
    for module in (modeling_refiner_vit, image_processing_refiner_vit):
        files.add(Path(module.__file__))
        files.update(Path(path) for path in get_relative_import_files(module.__file__))
    return sorted(path.name for path in files)


@dataclass(frozen=True)
class DirectoryLayout:
    """
    What a kind of directory written by this package holds, so that an existing one is recognised as written before
    (and may be replaced with `overwrite`) and anything else is left alone.

    Args:
        description (`str`): what such a directory is called in messages ("model directory").
        files (`frozenset[str]`): the names it may hold, besides the package's code files and `patterns`.
        required (`tuple[frozenset[str], ...]`): at least one name of each set must be there.
        required_description (`str`): how messages name what is required ("config.json and weights").
        patterns (`tuple[re.Pattern, ...]`): further names it may hold (e.g. weight shards).
    """

    description: str
    files: frozenset[str]
    required: tuple[frozenset[str], ...]
    required_description: str
    patterns: tuple[re.Pattern, ...] = ()

    def holds(self, path: Path) -> bool:
        """Whether `path` is a file that such a directory holds."""
        if path.is_symlink() or not path.is_file():
            return False
        name = path.name
        return name in self.files or any(p.fullmatch(name) for p in self.patterns) or name in remote_code_files()

    def is_complete(self, names: set[str]) -> bool:
        return all(names & alternatives for alternatives in self.required)


MODEL_DIRECTORY = DirectoryLayout(
    description="model directory",
    files=frozenset(
        {"config.json", "preprocessor_config.json", WEIGHTS_NAME, WEIGHTS_INDEX_NAME, "README.md", ".gitattributes"}
    ),
    required=(frozenset({"config.json"}), frozenset({WEIGHTS_NAME, WEIGHTS_INDEX_NAME})),
    required_description="config.json and weights",
    patterns=(_SHARD_PATTERN,),
)


def check_output_directory(
    output_dir: str | os.PathLike,
    overwrite: bool = False,
    protected: Iterable[str | os.PathLike] = (),
    overwrite_flag: str = "overwrite=True",
    layout: DirectoryLayout = MODEL_DIRECTORY,
) -> None:
    """
    Refuses an output directory that writing a model there could harm. It may not be the current directory or one of
    its parents, nor contain a `protected` path (e.g. the checkpoint being converted). An existing non-empty directory
    is replaced only with `overwrite`, and only when it is a directory of `layout` written before (for a model
    directory: `config.json`, weights, and nothing but the files such a directory holds).

    Args:
        output_dir: the directory to write.
        overwrite: whether a previous directory of `layout` there may be replaced.
        protected: paths that must survive the write.
        overwrite_flag: how the caller's user says "overwrite" (`--overwrite` on a command line), for messages.
        layout: the kind of directory written (default: a model directory).

    Raises:
        `ModelDirectoryError`: naming the directory, the reason and what to do.
    """
    output = Path(output_dir)
    resolved = output.resolve()
    if resolved == Path.cwd().resolve() or resolved in Path.cwd().resolve().parents:
        raise ModelDirectoryError(
            f"{output_dir} is the current directory or one of its parents; a model directory needs a folder of its "
            "own: choose a new output directory."
        )
    for path in protected:
        kept = Path(path).resolve()
        if resolved == kept or resolved in kept.parents:
            raise ModelDirectoryError(
                f"{output_dir} holds {path}, which this command reads: choose an output directory that does not "
                "contain it."
            )
    if not output.exists() and not output.is_symlink():
        existing = next(parent for parent in output.absolute().parents if parent.exists())
        if not existing.is_dir():  # refused now rather than after minutes of work
            raise ModelDirectoryError(
                f"Cannot create {output_dir}: {existing} is a file, not a folder. Choose an output directory in a "
                "folder you can write to."
            )
        return
    if not output.is_dir():
        raise ModelDirectoryError(f"{output_dir} exists and is not a directory: choose another output directory.")
    entries = sorted(output.iterdir())
    if not entries:
        return
    if not overwrite:
        raise ModelDirectoryError(
            f"{output_dir} exists and is not empty: pass {overwrite_flag} to replace the {layout.description} there, "
            "or choose another output directory."
        )
    foreign = [entry.name for entry in entries if not layout.holds(entry)]
    if foreign or not layout.is_complete({entry.name for entry in entries}):
        reason = (
            f"it holds other files ({', '.join(foreign[:5])}{', ...' if len(foreign) > 5 else ''})"
            if foreign
            else f"it has no {layout.required_description}"
        )
        raise ModelDirectoryError(
            f"{output_dir} is not {_article(layout.description)} {layout.description} ({reason}); {overwrite_flag} "
            f"replaces only {_article(layout.description)} {layout.description} written before, never other files: "
            "choose another output directory."
        )


def _article(noun: str) -> str:
    return "an" if noun[:1].lower() in "aeiou" else "a"


def _leftover_owner(entry: Path, prefix: str) -> tuple[int, str] | None:
    """The (pid, host) a staging or set-aside directory name records, or `None` if it is not such a name."""
    if not entry.name.startswith(prefix):
        return None
    owner, _, _ = entry.name[len(prefix) :].rpartition(".")
    pid, _, host = owner.partition("@")
    return (int(pid), host) if pid.isdigit() and host else None


def _process_is_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # someone else's process
        return True
    return True


def _recover_from_dead_writers(output_dir: Path) -> None:
    """
    Cleans up what a writer of `output_dir` on this host that died (SIGKILL, power loss) left beside it: its staging
    directory is removed; a model directory it had set aside is put back if its replacement never arrived, else
    removed.
    """
    if not output_dir.parent.is_dir():
        return
    host = socket.gethostname()
    for entry in output_dir.parent.iterdir():
        for kind in (_STAGING, _SET_ASIDE):
            owner = _leftover_owner(entry, f".{output_dir.name}.{kind}.")
            if owner is None or owner[1] != host or _process_is_alive(owner[0]):
                continue
            if kind == _SET_ASIDE and not output_dir.exists():
                entry.rename(output_dir)
            else:
                shutil.rmtree(entry, ignore_errors=True)


def _sibling_prefix(output_dir: Path, kind: str) -> str:
    """Hidden names beside `output_dir` say whose they are: the directory, their purpose, this process and host."""
    return f".{output_dir.name}.{kind}.{os.getpid()}@{socket.gethostname()}."


def _staging_directory(output_dir: Path) -> Path:
    path = Path(tempfile.mkdtemp(prefix=_sibling_prefix(output_dir, _STAGING), dir=output_dir.parent))
    umask = os.umask(0)
    os.umask(umask)
    path.chmod(0o777 & ~umask)  # mkdtemp's 0700 would make the final directory private
    return path


def _remove_created_folders(folders: list[Path]) -> None:
    """Removes `folders` (deepest first) that a lock created, as long as nothing was written in them."""
    for folder in folders:
        try:
            folder.rmdir()
        except OSError:
            return


# A lock file that a holder is still writing (created, its holder not yet recorded) is given this long.
_UNRECORDED_LOCK_GRACE = 60.0
# The locks this process holds: path -> [times taken, holder record, parent folders created for it].
_held_locks: dict[Path, list] = {}


class OutputLock:
    """
    One writer at a time for an output directory: a hidden lock file beside it (`.NAME.lock`), created exclusively
    (`O_CREAT | O_EXCL`) and naming its holder (host, process, start time), held from [`acquire`] to [`release`]. A
    second writer is refused with the holder's name; a lock whose process is gone (same host) is taken over. The same
    process may take it again (a command holds it while the function writing the directory takes it too). Missing
    parent folders are created, and removed again at the release when nothing was written in them.

    Args:
        output_dir: the directory to be written.
    """

    def __init__(self, output_dir: str | os.PathLike) -> None:
        self.output_dir = Path(output_dir)
        absolute = self.output_dir.absolute()
        self.path = absolute.parent.resolve() / f".{absolute.name}.lock"  # one lock whatever links lead there
        self.holder = {"host": socket.gethostname(), "pid": os.getpid(), "started": time.strftime("%Y-%m-%d %H:%M:%S")}
        self.taken_over: dict | None = None

    def _read(self) -> dict | None:
        try:
            text = self.path.read_text()
        except FileNotFoundError:
            return None
        try:
            holder = json.loads(text)
            return holder if isinstance(holder, dict) else {}
        except ValueError:
            return {}  # being written, or damaged: judged by its age

    def _is_stale(self, holder: dict) -> bool:
        pid = holder.get("pid")
        if not isinstance(pid, int) or not holder.get("host"):
            try:
                return time.time() - self.path.stat().st_mtime > _UNRECORDED_LOCK_GRACE
            except FileNotFoundError:
                return True
        if holder["host"] != self.holder["host"]:
            return False  # another machine's process: cannot tell whether it lives
        return pid == os.getpid() or not _process_is_alive(pid)  # this process holds none it does not know of

    def acquire(self) -> OutputLock:
        """
        Takes the lock.

        Raises:
            `OutputLockedError`: another live process holds it (named with its host and process id).
            `ModelDirectoryError`: the folder of the output directory cannot be created.
        """
        if self.path in _held_locks:
            _held_locks[self.path][0] += 1
            return self
        missing = [folder for folder in [self.path.parent, *self.path.parent.parents] if not folder.exists()]
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
        except OSError as error:
            raise ModelDirectoryError(
                f"Cannot create {self.output_dir}: {error}. Choose an output directory in a folder you can write to."
            ) from None
        for _ in range(3):  # another writer taking over the same stale lock at the same time: look again
            try:
                descriptor = os.open(self.path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
            except FileExistsError:
                holder = self._read()
                if holder is None:
                    continue
                if not self._is_stale(holder):
                    _remove_created_folders(missing)
                    who = (
                        f"process {holder['pid']} on {holder['host']}, since {holder.get('started', '?')}"
                        if holder.get("pid")
                        else "a process that has not recorded itself yet"
                    )
                    raise OutputLockedError(
                        f"{self.output_dir} is being written by another command ({who}; lock {self.path}): wait for "
                        "it to finish, or choose another output directory (if that process is gone, delete the lock "
                        "file)."
                    ) from None
                self.taken_over = holder
                self.path.unlink(missing_ok=True)
                continue
            except OSError as error:
                _remove_created_folders(missing)
                raise ModelDirectoryError(
                    f"Cannot write beside {self.output_dir}: {error}. Choose an output directory in a folder you "
                    "can write to."
                ) from None
            with os.fdopen(descriptor, "w") as file:
                json.dump(self.holder, file)
            _held_locks[self.path] = [1, self.holder, missing]
            return self
        _remove_created_folders(missing)
        raise OutputLockedError(f"Could not take the lock {self.path}: other commands keep taking it.")

    def release(self) -> None:
        """Gives the lock up (the file only if it still names this holder) once every taking of it is released."""
        held = _held_locks.get(self.path)
        if held is None:
            return
        held[0] -= 1
        if held[0] > 0:
            return
        del _held_locks[self.path]
        if self._read() == held[1]:
            self.path.unlink(missing_ok=True)
        _remove_created_folders(held[2])

    def __enter__(self) -> OutputLock:
        return self.acquire()

    def __exit__(self, *exc_info) -> None:
        self.release()


def save_model_directory(
    model: RefinerViTPreTrainedModel,
    image_processor: RefinerViTImageProcessor | RefinerViTImageProcessorPil,
    output_dir: str | os.PathLike,
    model_card: str | None = None,
    overwrite: bool = False,
    verify: Callable[[Path], None] | None = None,
    protected: Iterable[str | os.PathLike] = (),
    overwrite_flag: str = "overwrite=True",
) -> Path:
    """
    Writes a complete, self-contained model directory: `model.safetensors`, `config.json` and
    `preprocessor_config.json` (both with `auto_map`), the package's configuration / modeling / processing files, and
    `README.md` when a model card is given.

    The directory is written under a hidden name beside `output_dir`, checked by `verify`, and renamed into place; a
    previous model directory there is set aside first and removed once the new one is in place. A failure or an
    interruption (an exception, Ctrl-C, a signal turned into an exception) leaves what was there before.

    Args:
        model: the model to save.
        image_processor: its evaluation image processor.
        output_dir: the directory to create.
        model_card: the text of `README.md`.
        overwrite: replace a previous model directory at `output_dir` (see [`check_output_directory`]).
        verify: called with the written (hidden) directory before it is moved into place; raising there leaves
            nothing.
        protected: paths that `output_dir` may not contain (e.g. the checkpoint being converted).
        overwrite_flag: how the caller's user says "overwrite", for messages.

    Raises:
        `ModelDirectoryError`: the output directory is refused, or writing failed (e.g. a full disk); nothing was
            left behind.
    """

    def write(staging: Path) -> None:
        model.save_pretrained(staging)
        image_processor.save_pretrained(staging)
        if model_card is not None:
            (staging / "README.md").write_text(model_card)

    return write_directory(
        output_dir, write, verify=verify, overwrite=overwrite, protected=protected, overwrite_flag=overwrite_flag
    )


def write_directory(
    output_dir: str | os.PathLike,
    write: Callable[[Path], None],
    verify: Callable[[Path], None] | None = None,
    overwrite: bool = False,
    protected: Iterable[str | os.PathLike] = (),
    overwrite_flag: str = "overwrite=True",
    layout: DirectoryLayout = MODEL_DIRECTORY,
) -> Path:
    """
    Writes a directory all at once: `write` fills a hidden staging directory beside `output_dir`, `verify` checks it,
    and only then is it renamed into place; a previous directory of the same `layout` there is set aside first and
    removed once the new one is in place. A failure or an interruption (an exception, Ctrl-C, a signal turned into
    an exception) leaves what was there before, and a writer killed outright leaves a hidden directory that the next
    write to the same place cleans up.

    Args:
        output_dir: the directory to create.
        write: fills the staging directory it is given.
        verify: called with the written (hidden) directory before it is moved into place; raising there leaves
            nothing.
        overwrite: replace a previous directory of `layout` at `output_dir` (see [`check_output_directory`]).
        protected: paths that `output_dir` may not contain.
        overwrite_flag: how the caller's user says "overwrite", for messages.
        layout: the kind of directory written, to recognise a previous one.

    Raises:
        `ModelDirectoryError`: the output directory is refused, or writing failed (e.g. a full disk); nothing was
            left behind.
    """
    output_dir = Path(output_dir)
    check = dict(overwrite=overwrite, protected=protected, overwrite_flag=overwrite_flag, layout=layout)
    check_output_directory(output_dir, **check)  # refused before anything is created beside it
    with OutputLock(output_dir):
        _recover_from_dead_writers(output_dir)
        check_output_directory(output_dir, **check)  # again: a dead writer's set-aside directory may be back
        previous = _directory_identity(output_dir)
        try:
            staging = _staging_directory(output_dir)
        except OSError as error:
            raise ModelDirectoryError(
                f"Cannot create {output_dir}: {error}. Choose an output directory in a folder you can write to."
            ) from None
        try:
            try:
                write(staging)
            except (OSError, SafetensorError) as error:
                raise ModelDirectoryError(
                    f"Writing {output_dir} failed: {error}. Check the free space and permissions there; nothing was "
                    "written."
                ) from None
            if verify is not None:
                verify(staging)
            _move_into_place(staging, output_dir, previous, layout)
        finally:
            if staging.exists():
                shutil.rmtree(staging, ignore_errors=True)
    return output_dir


def _directory_identity(path: Path) -> tuple[int, int] | None:
    """(device, inode) of a non-empty directory at `path` (one to be replaced), else `None`."""
    if path.is_symlink() or not path.is_dir() or not any(path.iterdir()):
        return None
    status = path.stat()
    return status.st_dev, status.st_ino


def _free_sibling(output_dir: Path, suffix: str) -> Path:
    """A visible name beside `output_dir` that nothing has: `NAME.SUFFIX`, else `NAME.SUFFIX-2`, ..."""
    for number in range(1, 1000):
        candidate = output_dir.with_name(f"{output_dir.name}.{suffix}" + (f"-{number}" if number > 1 else ""))
        if not os.path.lexists(candidate):
            return candidate
    return output_dir.with_name(f"{output_dir.name}.{suffix}-{secrets.token_hex(4)}")


def _keep_result(staging: Path, output_dir: Path, layout: DirectoryLayout, what: str) -> OutputChangedError:
    """Moves a finished, checked result to a visible name beside `output_dir`; the error that tells the user."""
    kept = _free_sibling(output_dir, "new")
    staging.rename(kept)
    return OutputChangedError(
        f"{output_dir} {what} while this command was writing it and was left untouched; the finished "
        f"{layout.description} was kept at {kept} instead: move it where you want it, or remove it."
    )


def _move_into_place(
    staging: Path, output_dir: Path, previous: tuple[int, int] | None, layout: DirectoryLayout
) -> None:
    """
    Renames the checked `staging` directory to `output_dir`, deleting only what this command was told to replace:
    the directory of `previous` identity (checked at the start), and in it only the files of `layout`.
    """
    if previous is None or not os.path.lexists(output_dir):  # nothing to replace (any more)
        try:
            # Atomic, and refused if a file or a non-empty directory is there by now (an empty one is replaced).
            os.rename(staging, output_dir)
            return
        except OSError as error:
            if error.errno not in (errno.EEXIST, errno.ENOTEMPTY, errno.ENOTDIR, errno.EISDIR):
                raise
        raise _keep_result(staging, output_dir, layout, "appeared")
    if _directory_identity(output_dir) != previous:
        raise _keep_result(staging, output_dir, layout, "was replaced or emptied")
    foreign = sorted(entry.name for entry in output_dir.iterdir() if not layout.holds(entry))
    if foreign:
        raise _keep_result(staging, output_dir, layout, f"got other files ({', '.join(foreign[:5])})")
    set_aside = output_dir.parent / (_sibling_prefix(output_dir, _SET_ASIDE) + secrets.token_hex(4))
    output_dir.rename(set_aside)
    try:
        os.rename(staging, output_dir)
    except BaseException:
        if not output_dir.exists():
            set_aside.rename(output_dir)
        raise
    _remove_replaced(set_aside, output_dir, layout)


def _remove_replaced(set_aside: Path, output_dir: Path, layout: DirectoryLayout) -> None:
    """
    Deletes the replaced directory's files of `layout`; anything else (written into it in the instant it was set
    aside) is kept under a visible name.
    """
    for entry in set_aside.iterdir():
        if layout.holds(entry):
            entry.unlink(missing_ok=True)
    try:
        set_aside.rmdir()
    except OSError:
        kept = _free_sibling(output_dir, "previous")
        set_aside.rename(kept)
        logger.warning(f"Files written into the replaced {output_dir} while it was replaced are kept in {kept}.")


@dataclass
class ReloadCheck:
    """
    What [`verify_model_directory`] proved.

    Args:
        num_tensors (`int`): tensors in the weights file, each equal to the in-memory one bit for bit.
        max_difference (`float`): largest difference between the reloaded and the in-memory model's logits.
        tolerance (`float`): what that difference was allowed to be.
    """

    num_tensors: int
    max_difference: float
    tolerance: float


def _bitwise_equal(a: torch.Tensor, b: torch.Tensor) -> bool:
    if a.dtype != b.dtype or a.shape != b.shape:
        return False
    return torch.equal(a.contiguous().reshape(-1).view(torch.uint8), b.contiguous().reshape(-1).view(torch.uint8))


def _weight_files(directory: Path) -> list[Path]:
    index = directory / WEIGHTS_INDEX_NAME
    if index.is_file():
        shards = sorted(set(json.loads(index.read_text())["weight_map"].values()))
        return [directory / shard for shard in shards]
    return [directory / WEIGHTS_NAME]


def _check_weights(directory: Path, state_dict: dict[str, torch.Tensor]) -> int:
    written = {}
    for path in _weight_files(directory):
        with safe_open(path, framework="pt") as file:
            written.update({key: file.get_tensor(key) for key in file.keys()})
    if set(written) != set(state_dict):
        missing, extra = sorted(set(state_dict) - set(written)), sorted(set(written) - set(state_dict))
        raise ModelDirectoryError(
            f"{directory}: the weights file does not hold the model's tensors (missing {missing[:5]}, unexpected "
            f"{extra[:5]})."
        )
    differing = [key for key, tensor in state_dict.items() if not _bitwise_equal(written[key], tensor.cpu())]
    if differing:
        raise ModelDirectoryError(
            f"{directory}: {len(differing)} written tensors differ from the model's, e.g. {differing[:5]}."
        )
    return len(written)


def _check_configs(directory: Path, model: RefinerViTPreTrainedModel, image_processor) -> None:
    volatile = {"_name_or_path", "transformers_version"}
    saved = type(model.config).from_pretrained(directory).to_dict()
    expected = model.config.to_dict()
    differing = sorted(k for k in set(saved) | set(expected) if k not in volatile and saved.get(k) != expected.get(k))
    if differing:
        raise ModelDirectoryError(f"{directory}: config.json does not load back equal (fields {differing}).")
    for backend, cls in (("torchvision", RefinerViTImageProcessor), ("pil", RefinerViTImageProcessorPil)):
        loaded = AutoImageProcessor.from_pretrained(directory, backend=backend)
        if type(loaded).__name__ != cls.__name__:
            raise ModelDirectoryError(
                f"{directory}: backend={backend!r} loads a {type(loaded).__name__}, not a {cls.__name__}."
            )
        saved, expected = loaded.to_dict(), image_processor.to_dict()
        differing = sorted(k for k in set(saved) | set(expected) if saved.get(k) != expected.get(k))
        if differing:
            raise ModelDirectoryError(
                f"{directory}: preprocessor_config.json does not load back equal with backend={backend!r} (fields "
                f"{differing})."
            )


def _check_code(directory: Path) -> None:
    """`auto_map` names the configuration, both models and both processor backends, and their code is all there."""
    expected = {
        "config.json": model_auto_map(),
        "preprocessor_config.json": {"AutoImageProcessor": image_processor_auto_map()},
    }
    references = []
    for name, auto_map in expected.items():
        written = json.loads((directory / name).read_text()).get("auto_map")
        if written != auto_map:
            raise ModelDirectoryError(f"{directory}: the `auto_map` of {name} is {written}, expected {auto_map}.")
        for entry in auto_map.values():
            references += entry.values() if isinstance(entry, dict) else [entry]
    for reference in references:
        pending, seen = [directory / (reference.rsplit(".", 1)[0] + ".py")], set()
        while pending:  # the module and, recursively, what it imports relatively
            module = pending.pop()
            if module in seen:
                continue
            seen.add(module)
            if not module.is_file():
                raise ModelDirectoryError(f"{directory}: `auto_map` names {reference} but {module.name} is missing.")
            pending += [module.with_name(f"{name}.py") for name in get_relative_imports(module)]


def logits_on_image(model: torch.nn.Module, image_processor, image) -> torch.Tensor:
    """The model's logits for one image prepared by `image_processor`."""
    with torch.no_grad():
        return model(**image_processor(image, return_tensors="pt")).logits


def _non_finite_count(values: torch.Tensor) -> int:
    return values.numel() - int(torch.isfinite(values).sum())


def compare_logits(actual: torch.Tensor, expected: torch.Tensor, allow_non_finite: bool = False) -> tuple[float, float]:
    """
    The largest difference between two models' logits and the tolerance it must meet (relative to the logits' scale).
    A NaN or infinite logit on either side fails (both sides NaN would otherwise compare as "no difference"), unless
    `allow_non_finite` (a model converted with non-finite weights on purpose): then they must be non-finite in the
    same places.

    Raises:
        `ModelDirectoryError`: naming the non-finite values or the difference.
    """
    counts = {"reloaded": _non_finite_count(actual), "in-memory": _non_finite_count(expected)}
    if any(counts.values()) and not allow_non_finite:
        described = " and ".join(f"the {side} model's {count:,}" for side, count in counts.items() if count)
        raise ModelDirectoryError(
            f"Non-finite logits (NaN or infinity): {described} of {expected.numel():,}; such a model cannot be "
            "checked. Its weights hold NaN or infinity, or its computation overflows."
        )
    finite = torch.isfinite(expected)
    scale = max(1.0, expected[finite].abs().max().item() if finite.any() else 0.0)
    tolerance = RELOAD_RELATIVE_TOLERANCE * scale
    if not all(torch.equal(test(actual), test(expected)) for test in (torch.isnan, torch.isposinf, torch.isneginf)):
        raise ModelDirectoryError("The reloaded model's logits are not finite where the in-memory model's are.")
    difference = (actual[finite] - expected[finite]).abs().max().item() if finite.any() else 0.0
    if not difference <= tolerance:
        raise ModelDirectoryError(
            f"The reloaded model's logits differ from the in-memory model's by {difference:.3g} (more than "
            f"{tolerance:.3g}, {RELOAD_RELATIVE_TOLERANCE:g} of their scale {scale:.3g})."
        )
    return difference, tolerance


def verify_model_directory(
    directory: str | os.PathLike,
    model: RefinerViTPreTrainedModel,
    image_processor,
    image,
    expected_logits: torch.Tensor | None = None,
    allow_non_finite: bool = False,
) -> ReloadCheck:
    """
    Proves that `directory` holds `model` and `image_processor`: the weights file bit for bit, the configuration and
    both processor backends as they load back, the code `auto_map` names, and the reloaded model's logits on `image`
    (through the reloaded processor) against `expected_logits` (by default the in-memory model's) within
    [`RELOAD_RELATIVE_TOLERANCE`] of their scale. Non-finite logits fail unless `allow_non_finite` (see
    [`compare_logits`]).

    Raises:
        `ModelDirectoryError`: naming what does not hold.
    """
    directory = Path(directory)
    num_tensors = _check_weights(directory, model.state_dict())
    _check_configs(directory, model, image_processor)
    _check_code(directory)
    if expected_logits is None:
        training = model.training
        expected_logits = logits_on_image(model.eval(), image_processor, image)
        model.train(training)
    reloaded = AutoModelForImageClassification.from_pretrained(directory).eval()
    actual = logits_on_image(reloaded, AutoImageProcessor.from_pretrained(directory), image)
    difference, tolerance = compare_logits(actual, expected_logits, allow_non_finite)
    return ReloadCheck(num_tensors=num_tensors, max_difference=difference, tolerance=tolerance)


__all__ = [
    "MODEL_DIRECTORY",
    "RELOAD_RELATIVE_TOLERANCE",
    "DirectoryLayout",
    "ModelDirectoryError",
    "OutputChangedError",
    "OutputLock",
    "OutputLockedError",
    "ReloadCheck",
    "check_output_directory",
    "compare_logits",
    "logits_on_image",
    "remote_code_files",
    "save_model_directory",
    "verify_model_directory",
    "write_directory",
]
