"""
One error policy for every command line of the package (convert, export, train, pack, evaluate, visualise).

- A [`UsageError`] is a problem with what was asked for (an argument, a flag's value, a combination of flags): one line
  `PROG: error: ...` on stderr naming the problem and what to do, exit status [`EXIT_USAGE`] (2, as argparse's own).
- A [`DataError`] is a problem with what was given or found (a model directory, a checkpoint, a weights file, a data
  set, an image, an output directory another run owns, a full disk): one line the same way, exit status
  [`EXIT_DATA`] (1).
- An interruption (Ctrl-C, or SIGTERM, which unwinds the same way so that what was started is cleaned up) is one line
  saying what was kept and how to go on, exit status 128 + the signal's number (130, 143).
- Anything else is a bug and keeps its traceback.

Errors of the package's modules that are about the user's input derive from [`UsageError`] or [`DataError`], so that
every command shows them the same way through [`run_command`]. This module imports nothing beyond the standard
library, so that scripts without the `train` extra can use it.
"""

from __future__ import annotations

import argparse
import difflib
import errno
import os
import stat
import sys
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import TypeVar

from .interruption import Terminated, sigterm_unwinds, stopped_message


T = TypeVar("T")

EXIT_DATA = 1
EXIT_USAGE = 2


class CommandError(Exception):
    """An error a command shows as one line, without a traceback; `exit_status` is the process's exit status."""

    exit_status = EXIT_DATA


class UsageError(CommandError, ValueError):
    """A problem with the user's request; its message names it and the fix."""

    exit_status = EXIT_USAGE


class DataError(CommandError):
    """A problem with a file, model, data set or directory the command was given or found; names it and the fix."""

    exit_status = EXIT_DATA


# Operating-system errors about the user's files or the machine: one line, not a traceback.
_USER_ERRNOS = {
    errno.ENOENT,
    errno.EACCES,
    errno.EPERM,
    errno.EISDIR,
    errno.ENOTDIR,
    errno.ENOSPC,
    errno.EDQUOT,
    errno.EROFS,
    errno.EEXIST,
    errno.ENAMETOOLONG,
}


def is_user_os_error(error: BaseException) -> bool:
    """Whether `error` is an operating-system error about a path or the disk (shown as a data error)."""
    return isinstance(error, OSError) and error.errno in _USER_ERRNOS


def did_you_mean(name: str, candidates: Iterable[str], prefix: str = "") -> str:
    """' Did you mean X?' with the closest of `candidates` to `name` (difflib), or '' when none is close."""
    matches = difflib.get_close_matches(name, sorted(set(candidates)), n=3, cutoff=0.75)
    return f" Did you mean {' or '.join(prefix + match for match in matches)}?" if matches else ""


def one_line(message: object) -> str:
    return " ".join(str(message).split())


def is_main_process() -> bool:
    """Whether this is the first process of a launch (each process of `accelerate launch` sees the same error)."""
    return os.environ.get("RANK", "0") == "0"


def _print_error(prog: str, text: str) -> None:
    if is_main_process():
        print(f"{prog}: {text}", file=sys.stderr, flush=True)


def command_status(
    main: Callable[[], object],
    prog: str | None = None,
    usage_errors: tuple[type[BaseException], ...] = (),
    stopped_hint: Callable[[], str | None] | None = None,
) -> int:
    """
    Runs a command's `main` under the policy above and returns the exit status (0 when it returns).

    Args:
        main: the command's work.
        prog: the name the one-line errors start with (default: the script's file name).
        usage_errors: further exception classes shown as usage errors (exit 2), for modules that predate this one.
        stopped_hint: called after an interruption; what it returns (e.g. the command that resumes) follows the line.
    """
    prog = prog or Path(sys.argv[0]).name
    try:
        with sigterm_unwinds():
            main()
        return 0
    except CommandError as error:
        _print_error(prog, f"error: {one_line(error)}")
        return error.exit_status
    except usage_errors as error:  # type: ignore[misc]
        _print_error(prog, f"error: {one_line(error)}")
        return EXIT_USAGE
    except OSError as error:
        if not is_user_os_error(error):
            raise
        advice = " Check the free space and try again." if error.errno in (errno.ENOSPC, errno.EDQUOT) else ""
        text = f"{error.strerror}: {error.filename}" if error.filename and error.strerror else str(error)
        _print_error(prog, f"error: {one_line(text)}.{advice}")
        return EXIT_DATA
    except (KeyboardInterrupt, Terminated) as stop:
        message, status = stopped_message(stop)
        hint = stopped_hint() if stopped_hint is not None else None
        _print_error(prog, message + (f" {hint}" if hint else ""))
        return status


def run_command(
    main: Callable[[], T],
    usage_errors: tuple[type[BaseException], ...] = (),
    prog: str | None = None,
    stopped_hint: Callable[[], str | None] | None = None,
) -> T:
    """
    Runs a script's `main` under the policy above: its value when it returns, else `SystemExit` with the exit status
    after the one line (see [`command_status`]).
    """
    result: list[T] = []
    status = command_status(lambda: result.append(main()), prog, usage_errors, stopped_hint)
    if status:
        raise SystemExit(status)
    return result[0]


def looks_like_a_path(value: str) -> bool:
    """Whether a model argument is meant as a local path rather than a Hub id (`name` or `namespace/name`)."""
    return value.startswith(("/", ".", "~")) or value.count("/") > 1 or (os.sep != "/" and os.sep in value)


def check_model_path(flag: str, value: str) -> None:
    """
    Raises a [`UsageError`] for a model argument (a directory or a Hub id) that names a local path which is missing,
    not a directory, or not a model directory. A Hub id is left to the loading, see [`loading_error`].
    """
    path = Path(value).expanduser()
    if path.exists():
        if not path.is_dir():
            raise UsageError(f"{flag} {value}: not a directory; give a model directory (the one holding config.json).")
        if not (path / "config.json").is_file():
            raise UsageError(
                f"{flag} {value}: no config.json in this directory; give a directory written by `save_pretrained` "
                "(the trainer's OUTPUT_DIR/model, or the converter's output)."
            )
    elif looks_like_a_path(value):
        raise UsageError(f"{flag} {value}: no such directory.")


def check_input_file(flag: str, path: str | os.PathLike) -> Path:
    """
    The path of a file the command reads, after refusing (as a [`UsageError`]) one that is missing, a directory, or
    not a regular file (a FIFO, a device such as /dev/zero, a socket), which would block or never end.
    """
    path = Path(path).expanduser()
    try:
        mode = path.stat().st_mode
    except FileNotFoundError:
        raise UsageError(f"{flag} {path}: no such file.") from None
    except OSError as error:
        raise UsageError(f"{flag} {path}: cannot be read ({error.strerror}).") from None
    if stat.S_ISDIR(mode):
        raise UsageError(f"{flag} {path}: a directory, not a file.")
    if not stat.S_ISREG(mode):
        raise UsageError(f"{flag} {path}: {file_kind(path)}, not a regular file; give a file on disk.")
    if not os.access(path, os.R_OK):
        raise UsageError(f"{flag} {path}: not readable (permission denied).")
    return path


def file_kind(path: str | os.PathLike) -> str:
    """What is at `path`, for messages: "a directory", "a FIFO", "a device", "a socket", "a file" or a broken link."""
    path = Path(path)
    try:
        mode = path.stat().st_mode
    except OSError:
        return "a broken link" if path.is_symlink() else "an unreadable entry"
    if stat.S_ISDIR(mode):
        return "a directory"
    if stat.S_ISFIFO(mode):
        return "a FIFO"
    if stat.S_ISCHR(mode) or stat.S_ISBLK(mode):
        return "a device"
    return "a socket" if stat.S_ISSOCK(mode) else "a file"


def check_input_directory(flag: str, value: str | os.PathLike, what: str = "") -> Path:
    """
    The path of a directory the command reads, after refusing (as a [`UsageError`]) one that is missing, a file, a
    FIFO or a device, or not readable; `what` ends the refusal (what the directory should hold).
    """
    path = Path(value).expanduser()
    try:
        mode = path.stat().st_mode
    except (FileNotFoundError, NotADirectoryError):
        raise UsageError(f"{flag} {value}: no such directory.{what}") from None
    except OSError as error:
        raise UsageError(f"{flag} {value}: cannot be read ({error.strerror}).") from None
    if not stat.S_ISDIR(mode):
        raise UsageError(f"{flag} {value}: {file_kind(path)}, not a directory.{what}")
    if not os.access(path, os.R_OK | os.X_OK):
        raise UsageError(f"{flag} {value}: not readable (permission denied).")
    return path


def check_output_path(flag: str, path: str | os.PathLike) -> Path:
    """
    The path of a directory the command will create or write into, after refusing (as a [`UsageError`]) one that is
    a file, or lies under a file, where nothing can be created.
    """
    path = Path(path).expanduser()
    if path.exists() and not path.is_dir():
        raise UsageError(f"{flag} {path}: a file is there; give a directory path.")
    for parent in path.parents:
        if parent.exists():
            if not parent.is_dir():
                raise UsageError(f"{flag} {path}: {parent} is a file, so no directory can be created under it.")
            break
    return path


def loading_error(flag: str, value: str, error: BaseException) -> UsageError:
    """A one-line [`UsageError`] for a model argument that could not be loaded (e.g. a Hub id that is not there)."""
    text = str(error).strip()
    first_line = text.splitlines()[0] if text else type(error).__name__
    return UsageError(f"{flag} {value}: cannot load a model from it: {first_line}")


class OneLineErrors:
    """
    An argparse mixin: abbreviations are off (`--epoch 3` is not taken for `--epochs 3`) and a usage error is a
    [`UsageError`] naming the problem, instead of the usage text followed by the error.
    """

    def __init__(self, *args, **kwargs) -> None:
        kwargs.setdefault("allow_abbrev", False)
        super().__init__(*args, **kwargs)

    def error(self, message: str):
        raise UsageError(f"{message} (--help lists the arguments).")


class ArgumentParser(OneLineErrors, argparse.ArgumentParser):
    """`argparse.ArgumentParser` with [`OneLineErrors`], answering an unknown argument with the closest known one."""

    def parse_args(self, args=None, namespace=None):
        namespace, extras = self.parse_known_args(args, namespace)
        if extras:
            option = next((item for item in extras if item.startswith("-")), extras[0])
            known = [name for action in self._actions for name in action.option_strings if name.startswith("--")]
            hint = did_you_mean(option.split("=", 1)[0], known)
            self.error(f"unknown argument {option}.{hint}")
        return namespace


__all__ = [
    "EXIT_DATA",
    "EXIT_USAGE",
    "ArgumentParser",
    "CommandError",
    "DataError",
    "OneLineErrors",
    "UsageError",
    "check_input_directory",
    "check_input_file",
    "check_model_path",
    "check_output_path",
    "command_status",
    "did_you_mean",
    "file_kind",
    "is_main_process",
    "is_user_os_error",
    "loading_error",
    "looks_like_a_path",
    "one_line",
    "run_command",
]
