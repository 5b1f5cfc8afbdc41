"""
Command line: pack a per-file relabel directory into a memory-mapped, pickle-free store.

    refiner-vit-pack-relabel RELABEL_ROOT OUT [--num-classes 1000] [--num-workers 8]
    python examples/pack_relabel.py label_top5_train_nfnet relabel_nfnet_packed

Every file is validated (shape, finite scores, class indices in range, one map shape for all); bad files are left out
and listed by name, and the command then exits with status 2 unless `--allow-bad` is given.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from pathlib import Path

from ..cli import EXIT_DATA, ArgumentParser, command_status
from .store import pack_relabel_store


PROG = "refiner-vit-pack-relabel"


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = ArgumentParser(prog=PROG, description=__doc__.strip().splitlines()[0])
    parser.add_argument("relabel_root", type=Path, help="Directory of <wnid>/<image stem>.pt relabel files.")
    parser.add_argument("output", type=Path, help="Directory to create for the packed store.")
    parser.add_argument("--num-classes", type=int, default=1000, help="Classes the indices refer to.")
    parser.add_argument("--shard-size", type=int, default=65536, help="Maps per .npy shard.")
    parser.add_argument("--num-workers", type=int, default=0, help="Processes reading the files (0: this one).")
    parser.add_argument("--allow-bad", action="store_true", help="Exit with status 0 even if some files were bad.")
    return parser.parse_args(argv)


def pack(args: argparse.Namespace) -> int:
    report = pack_relabel_store(
        args.relabel_root,
        args.output,
        num_classes=args.num_classes,
        shard_size=args.shard_size,
        num_workers=args.num_workers,
        progress=True,
    )
    print(f"Packed {report.packed} relabel maps into {args.output}.")
    if report.bad:
        print(f"{len(report.bad)} bad relabel file(s) were left out:", file=sys.stderr)
        for problem in report.bad:
            print(f"  {problem}", file=sys.stderr)
        return 0 if args.allow_bad else EXIT_DATA
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    """Runs the command; returns its exit status (see `refiner_hf.cli` for the error policy)."""
    status: list[int] = []
    return command_status(lambda: status.append(pack(parse_args(argv))), PROG) or status[0]


if __name__ == "__main__":
    sys.exit(main())
