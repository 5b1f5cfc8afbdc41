"""
Command lines that write directories unwind on SIGTERM as they do on Ctrl-C, so that what they started is cleaned up
(see `model_directory.write_directory`) and the user is told so in one line.
"""

from __future__ import annotations

import os
import signal
import sys
from collections.abc import Iterator
from contextlib import contextmanager


class Terminated(BaseException):
    """SIGTERM, raised where the command is so that it unwinds (and cleans up) like Ctrl-C does."""


@contextmanager
def sigterm_unwinds() -> Iterator[None]:
    """Turns SIGTERM into a [`Terminated`] exception for the duration, so that a stopped command cleans up."""

    def raise_terminated(signum, frame):
        raise Terminated

    try:
        previous = signal.signal(signal.SIGTERM, raise_terminated)
    except ValueError:  # not the main thread: signals cannot be handled here
        yield
        return
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


def stopped_message(stop: BaseException) -> tuple[str, int]:
    """The one-line error and the exit status (128 + the signal's number) of a command stopped by `stop`."""
    terminated = isinstance(stop, Terminated)
    signal_name = "SIGTERM" if terminated else "an interrupt"
    message = f"error: stopped by {signal_name}; nothing half-written was left behind."
    return message, 128 + (signal.SIGTERM if terminated else signal.SIGINT)


def _exit_quietly(signum, frame) -> None:
    os._exit(0)


def leave_stopping_to_the_main_process() -> None:
    """
    Signal handling of a helper process (a DataLoader worker) whose main process stops it: Ctrl-C and a SIGTERM sent
    to the whole process group (a terminal, Slurm, `pkill -f`) reach it too. It ignores SIGINT, and ends at once and
    quietly (status 0) on SIGTERM, which is also how its main process ends it: a helper killed by a signal, or one
    that raised the main process's exception, would make the main process report a failed worker, with a traceback,
    instead of the one line of a stopped command.
    """
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, _exit_quietly)
    sys.excepthook = _quiet_about_abandoned_transfers(sys.excepthook)


def _quiet_about_abandoned_transfers(previous):
    """
    An excepthook that says nothing of errors in multiprocessing's resource sharer: a worker's thread that hands its
    batches' shared memory to the main process reports through `sys.excepthook` when the main process, stopping,
    drops the connection mid-transfer; the main process's one line already says what happened.
    """

    def hook(kind, value, tb):
        if tb is not None and tb.tb_frame.f_code.co_filename.endswith("resource_sharer.py"):
            return
        previous(kind, value, tb)

    return hook


def interruption_behind(error: BaseException) -> BaseException | None:
    """
    The interruption ([`KeyboardInterrupt`] or [`Terminated`]) during whose handling `error` was raised, if any: e.g.
    the error of a worker that the same signal stopped, met while the command unwound.
    """
    seen: set[int] = set()
    current: BaseException | None = error
    while current is not None and id(current) not in seen:
        if isinstance(current, (KeyboardInterrupt, Terminated)):
            return current
        seen.add(id(current))
        current = current.__cause__ or current.__context__
    return None


__all__ = [
    "Terminated",
    "interruption_behind",
    "leave_stopping_to_the_main_process",
    "sigterm_unwinds",
    "stopped_message",
]
