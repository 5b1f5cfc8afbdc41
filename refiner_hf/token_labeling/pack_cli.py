"""
Command line: pack a per-file relabel directory into a memory-mapped, pickle-free store.

    refiner-vit-pack-relabel RELABEL_ROOT OUT [--num-classes 1000] [--num-workers 8]
    python examples/pack_relabel.py label_top5_train_nfnet relabel_nfnet_packed

Every file is validated (a regular file inside the tree, shape, finite scores, class indices in range); the store
takes the map shape most files share. Bad files are listed by name and nothing is written (exit status 1) unless
`--allow-bad` is given, which packs the others. OUT must be new or empty; `--overwrite` replaces a packed store there
(only once the new one is complete). Usage errors exit with status 2, bad data with 1, an interruption with 130 / 143,
each with one line and nothing half-written left behind.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from pathlib import Path

from ..cli import ArgumentParser, UsageError, check_output_path, command_status
from .store import BadRelabelFilesError, pack_relabel_store


PROG = "refiner-vit-pack-relabel"


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = ArgumentParser(prog=PROG, description=__doc__.strip().splitlines()[0])
    parser.add_argument("relabel_root", type=Path, help="Directory of <wnid>/<image stem>.pt relabel files.")
    parser.add_argument("output", type=Path, help="Directory to create for the packed store (new or empty).")
    parser.add_argument("--num-classes", type=int, default=1000, help="Classes the indices refer to.")
    parser.add_argument("--shard-size", type=int, default=65536, help="Maps per .npy shard.")
    parser.add_argument("--num-workers", type=int, default=0, help="Processes reading the files (0: this one).")
    parser.add_argument("--allow-bad", action="store_true", help="Pack the good files even if some are bad.")
    parser.add_argument("--overwrite", action="store_true", help="Replace a packed store already at OUT.")
    args = parser.parse_args(argv)
    for flag, value, least in (("--num-classes", args.num_classes, 1), ("--shard-size", args.shard_size, 1),
                               ("--num-workers", args.num_workers, 0)):  # fmt: skip
        if value < least:
            raise UsageError(f"{flag} must be at least {least}, got {value}.")
    check_output_path("OUT", args.output)
    if args.output.resolve() == args.relabel_root.resolve() or args.output.resolve().is_relative_to(
        args.relabel_root.resolve()
    ):
        raise UsageError(f"OUT {args.output} lies inside RELABEL_ROOT {args.relabel_root}; give a directory outside.")
    return args


def pack(args: argparse.Namespace) -> None:
    try:
        report = pack_relabel_store(
            args.relabel_root,
            args.output,
            num_classes=args.num_classes,
            shard_size=args.shard_size,
            num_workers=args.num_workers,
            progress=sys.stderr.isatty(),
            allow_bad=args.allow_bad,
            overwrite=args.overwrite,
        )
    except BadRelabelFilesError as error:
        _list_bad(error.bad)
        raise
    if report.bad:
        _list_bad(report.bad)
    left_out = f" ({len(report.bad)} bad file(s) left out, listed above)" if report.bad else ""
    print(f"Packed {report.packed} relabel maps into {args.output}{left_out}.")


def _list_bad(bad: Sequence[str]) -> None:
    print(f"{len(bad)} bad relabel file(s):", file=sys.stderr)
    for problem in bad:
        print(f"  {problem}", file=sys.stderr)


def main(argv: Sequence[str] | None = None) -> int:
    """Runs the command; returns its exit status (see `refiner_hf.cli` for the error policy)."""
    return command_status(lambda: pack(parse_args(argv)), PROG)


if __name__ == "__main__":
    sys.exit(main())
