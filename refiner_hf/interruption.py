"""
Command lines that write directories unwind on SIGTERM as they do on Ctrl-C, so that what they started is cleaned up
(see `model_directory.write_directory`) and the user is told so in one line.
"""

from __future__ import annotations

import signal
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


__all__ = ["Terminated", "sigterm_unwinds", "stopped_message"]
