"""
Errors a user can fix, and how the command-line scripts show them.

A [`UsageError`] is a problem with what was asked for (an argument, a recipe, a data set, a path) whose message names
the problem and what to do about it. The scripts run their `main` through [`run_command`], which prints such an
error as one line and exits with status 2, as argparse does for its own usage errors; any other exception is a bug
and keeps its traceback.

This module imports nothing beyond the standard library, so that the inference examples can use it without the
`train` extra.
"""

from __future__ import annotations

import argparse
import difflib
import os
import sys
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import TypeVar


T = TypeVar("T")


class UsageError(ValueError):
    """A problem with the user's request; its message names it and the fix (shown without a traceback)."""


def did_you_mean(name: str, candidates: Iterable[str], prefix: str = "") -> str:
    """' Did you mean X?' with the closest of `candidates` to `name` (difflib), or '' when none is close."""
    matches = difflib.get_close_matches(name, sorted(set(candidates)), n=3, cutoff=0.75)
    return f" Did you mean {' or '.join(prefix + match for match in matches)}?" if matches else ""


def one_line(message: str) -> str:
    return " ".join(str(message).split())


def is_main_process() -> bool:
    """Whether this is the first process of a launch (each process of `accelerate launch` sees the same error)."""
    return os.environ.get("RANK", "0") == "0"


def run_command(main: Callable[[], T], usage_errors: tuple[type[BaseException], ...] = ()) -> T:
    """
    Runs a script's `main`: a [`UsageError`] (or one of `usage_errors`, errors of other modules that are about the
    user's input) is printed as `script: error: message` on one line, and the process exits with status 2.
    """
    try:
        return main()
    except (UsageError, *usage_errors) as error:
        if is_main_process():
            print(f"{Path(sys.argv[0]).name}: error: {one_line(str(error))}", file=sys.stderr, flush=True)
        raise SystemExit(2) from None


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
    "ArgumentParser",
    "OneLineErrors",
    "UsageError",
    "check_model_path",
    "did_you_mean",
    "loading_error",
    "looks_like_a_path",
    "one_line",
    "run_command",
]
