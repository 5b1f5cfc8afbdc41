"""
One writer per run directory.

Two trainers writing into one output directory corrupt each other's checkpoints and model. A run takes
`OUTPUT_DIR/.run.lock` before it writes anything: the file is created exclusively (`O_EXCL`) and names its holder
(host, process, start time), and a background thread refreshes it while the run lives. Another run finds it and is
refused with the holder's name. A lock whose holder is gone is recognised as stale and taken over, with a message: on
the same host when the process no longer exists, from any host when the lock has not been refreshed for
`stale_after` seconds (a run killed on one node and restarted on another).

Once it holds the lock, a run claims the directory ([`claim_run_directory`]): a directory that holds a previous run
(its checkpoints, model, logs or results) is refused unless the run resumes it or is asked to replace it
(`--overwrite_output_dir`), in which case only what a run writes there is removed.
"""

from __future__ import annotations

import atexit
import json
import os
import shutil
import socket
import threading
import time
from pathlib import Path
from typing import Any

from ..cli import DataError


LOCK_FILE = ".run.lock"
# What a training run writes into its output directory besides the lock; a directory holding any of them (a folder
# only when it is not empty) holds a previous run.
RUN_OUTPUTS = ("checkpoints", "model", "logs", "all_results.json")


class RunLockedError(DataError, RuntimeError):
    """Another live run holds the output directory."""


class PreviousRunError(DataError):
    """The output directory holds a previous run that the new one would replace without being asked to."""


def _process_is_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


class RunLock:
    """
    The lock of one run directory, held from [`acquire`] to [`release`] (or the process' end).

    Args:
        directory: the run's output directory (created if needed).
        refresh_every: seconds between refreshes of the lock while it is held.
        stale_after: seconds without a refresh after which any run may take the lock over.
    """

    def __init__(self, directory: str | os.PathLike, refresh_every: float = 30.0, stale_after: float = 600.0) -> None:
        self.path = Path(directory) / LOCK_FILE
        self.refresh_every = refresh_every
        self.stale_after = stale_after
        self.holder = {"host": socket.gethostname(), "pid": os.getpid(), "started": time.strftime("%Y-%m-%d %H:%M:%S")}
        self.taken_over: dict[str, Any] | None = None
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def describe(self, holder: dict[str, Any]) -> str:
        return f"process {holder.get('pid')} on {holder.get('host')}, started {holder.get('started')}"

    def _read(self) -> tuple[dict[str, Any], float] | None:
        try:
            age = time.time() - self.path.stat().st_mtime
            return json.loads(self.path.read_text()), age
        except FileNotFoundError:
            return None
        except (OSError, ValueError):
            return {}, time.time() - self.path.stat().st_mtime  # half written: judged by its age alone

    def _stale(self, holder: dict[str, Any], age: float) -> bool:
        if age > self.stale_after:
            return True
        same_host = holder.get("host") == self.holder["host"]
        return same_host and isinstance(holder.get("pid"), int) and not _process_is_alive(holder["pid"])

    def acquire(self) -> RunLock:
        """Takes the lock, taking over a stale one; raises [`RunLockedError`] naming a live holder."""
        self.path.parent.mkdir(parents=True, exist_ok=True)
        for _ in range(3):  # a race with another run taking over the same stale lock: look again
            try:
                descriptor = os.open(self.path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
            except FileExistsError:
                found = self._read()
                if found is None:
                    continue
                holder, age = found
                if holder == self.holder:
                    return self  # already ours
                if not self._stale(holder, age):
                    raise RunLockedError(
                        f"{self.path.parent} is being written by another run ({self.describe(holder)}; its lock "
                        f"{self.path} was refreshed {age:.0f} s ago). Wait for it to finish, or choose another "
                        "--output_dir."
                    ) from None
                self.taken_over = holder
                self.path.unlink(missing_ok=True)
                continue
            with os.fdopen(descriptor, "w") as file:
                json.dump(self.holder, file)
            self._thread = threading.Thread(target=self._refresh, name="run-lock-refresh", daemon=True)
            self._thread.start()
            atexit.register(self.release)  # however the process ends short of being killed
            return self
        raise RunLockedError(f"Could not take the lock {self.path}: other runs keep taking it.")

    def _refresh(self) -> None:
        while not self._stop.wait(self.refresh_every):
            try:
                os.utime(self.path)
            except OSError:  # removed from under us: nothing to refresh
                return

    def release(self) -> None:
        """Gives the lock up (only if it is still this run's)."""
        atexit.unregister(self.release)
        self._stop.set()
        if self._thread is not None:
            self._thread.join()
            self._thread = None
        found = self._read()
        if found is not None and found[0] == self.holder:
            self.path.unlink(missing_ok=True)

    def __enter__(self) -> RunLock:
        return self.acquire()

    def __exit__(self, *exc_info) -> None:
        self.release()


def lock_run_directory(state, directory: str | os.PathLike) -> RunLock | None:
    """
    Takes the lock of a run directory for a (possibly distributed) run, given accelerate's `PartialState` (or an
    `Accelerator`): the main process holds it, and every process raises [`RunLockedError`] when another run holds
    it. Returns the lock on the main process, None on the others.
    """
    from accelerate.utils import broadcast_object_list

    lock, problem = None, None
    if state.is_main_process:
        try:
            lock = RunLock(directory).acquire()
        except RunLockedError as error:
            problem = str(error)
    (problem,) = broadcast_object_list([problem])
    if problem is not None:
        raise RunLockedError(problem)
    if lock is not None and lock.taken_over is not None:
        state.print(f"Took over the lock of {directory} from a run that is gone ({lock.describe(lock.taken_over)}).")
    return lock


def previous_run_outputs(directory: str | os.PathLike) -> list[str]:
    """What a previous run left in `directory` (of [`RUN_OUTPUTS`]), folders with a trailing slash."""
    found = []
    for name in RUN_OUTPUTS:
        path = Path(directory) / name
        if path.is_dir() and not path.is_symlink():
            if any(path.iterdir()):
                found.append(f"{name}/")
        elif path.exists() or path.is_symlink():
            found.append(name)
    return found


def remove_run_outputs(directory: str | os.PathLike) -> list[str]:
    """Removes what a run writes into `directory` ([`RUN_OUTPUTS`], and a results file left half-written), nothing
    else; returns what was there."""
    removed = previous_run_outputs(directory)
    for name in (*RUN_OUTPUTS, "all_results.json.partial"):
        path = Path(directory) / name
        if path.is_dir() and not path.is_symlink():
            shutil.rmtree(path)
        elif path.exists() or path.is_symlink():
            path.unlink()
    return removed


def claim_run_directory(state, directory: str | os.PathLike, resuming: bool, overwrite: bool) -> None:
    """
    Makes sure a new run replaces nothing it was not asked to, given accelerate's `PartialState` and a directory whose
    lock this run holds: a directory that holds a previous run is refused unless the run resumes it (`resuming`); with
    `overwrite`, the previous run's outputs are removed first. Decided on the main process, for every process.

    Raises:
        [`PreviousRunError`]: naming what is there and the two ways on.
    """
    from accelerate.utils import broadcast_object_list

    problem, removed = None, []
    if state.is_main_process and not resuming:
        if overwrite:
            removed = remove_run_outputs(directory)
        elif found := previous_run_outputs(directory):
            problem = (
                f"--output_dir {directory} holds a previous run ({', '.join(found)}), which this run would replace: "
                "pass --resume_from_checkpoint latest to continue it, or --overwrite_output_dir to start over (its "
                "checkpoints/, model/, logs/ and all_results.json are removed; other files stay)."
            )
    (problem,) = broadcast_object_list([problem])
    if problem is not None:
        raise PreviousRunError(problem)
    if removed:
        state.print(f"--overwrite_output_dir: removed the previous run's {', '.join(removed)} from {directory}.")


__all__ = [
    "LOCK_FILE",
    "RUN_OUTPUTS",
    "PreviousRunError",
    "RunLock",
    "RunLockedError",
    "claim_run_directory",
    "lock_run_directory",
    "previous_run_outputs",
    "remove_run_outputs",
]
