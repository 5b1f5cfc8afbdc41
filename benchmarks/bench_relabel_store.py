"""
Random-read throughput of relabel maps: the packed store against per-file `.pt` reading.

Builds a synthetic relabel directory of the public NFNet set's shape (top-5 on an 18x18 grid, 1000 classes) unless
`--relabel-root` points at a real one, packs it, then reads the same random keys from both stores and prints maps/s
and the ratio. Page cache: both stores are read once before timing, so the figures compare decoding, not disk.

    python benchmarks/bench_relabel_store.py --num-maps 5000 --reads 5000
"""

from __future__ import annotations

import argparse
import random
import tempfile
import time
from pathlib import Path

import torch

from refiner_hf.token_labeling import PackedRelabelStore, PerFileRelabelStore, pack_relabel_store


def write_synthetic_relabels(root: Path, num_maps: int, k: int = 5, size: int = 18, num_classes: int = 1000) -> None:
    generator = torch.Generator().manual_seed(0)
    for index in range(num_maps):
        wnid = f"n{index % 100:08d}"
        (root / wnid).mkdir(parents=True, exist_ok=True)
        scores = torch.randn(k, size, size, generator=generator) * 3
        indices = torch.randint(0, num_classes, (k, size, size), generator=generator).float()
        torch.save(torch.stack([scores, indices]), root / wnid / f"{wnid}_{index}.pt")


def reads_per_second(store, keys: list[str], repeats: int = 3) -> float:
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        for key in keys:
            store[key]
        best = min(best, time.perf_counter() - start)
    return len(keys) / best


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.strip().splitlines()[0])
    parser.add_argument("--relabel-root", type=Path, help="A real relabel directory (default: a synthetic one).")
    parser.add_argument("--num-maps", type=int, default=5000, help="Size of the synthetic relabel set.")
    parser.add_argument("--reads", type=int, default=5000, help="Random reads per measurement.")
    args = parser.parse_args()

    with tempfile.TemporaryDirectory() as tmp:
        root = args.relabel_root
        if root is None:
            root = Path(tmp) / "relabel"
            write_synthetic_relabels(root, args.num_maps)
        packed_dir = Path(tmp) / "packed"
        pack_relabel_store(root, packed_dir, num_workers=0)
        per_file, packed = PerFileRelabelStore(root), PackedRelabelStore(packed_dir)
        keys = list(packed.keys())
        sample = random.Random(0).choices(keys, k=args.reads)
        for key in sample:  # warm the page cache for both
            per_file[key], packed[key]
        per_file_rate = reads_per_second(per_file, sample)
        packed_rate = reads_per_second(packed, sample)
    print(f"maps: {len(keys)}, random reads: {len(sample)}, map shape (k, h, w): {packed.map_shape}")
    print(f"| store | maps/s |\n|---|---|\n| per-file .pt (weights_only) | {per_file_rate:,.0f} |")
    print(f"| packed (memory-mapped .npy) | {packed_rate:,.0f} |")
    print(f"packed / per-file: {packed_rate / per_file_rate:.1f}x")


if __name__ == "__main__":
    main()
