"""
Relabel stores: the teacher's dense top-k score maps, one per training image, for token labeling.

A relabel map has shape `(2, k, h, w)`: `[0]` the top-k scores and `[1]` the top-k class indices (stored as floats)
on the teacher's spatial grid over the whole image. Two stores hold them, with the same interface:

- [`PerFileRelabelStore`]: the public layout, one pickled tensor per image at `ROOT/<wnid>/<image stem>.pt`, read
  with `torch.load(weights_only=True)`.
- [`PackedRelabelStore`]: the same maps packed into a few memory-mapped `.npy` shards (float16 scores and int16
  indices when that is lossless, else float32 / int32) with a key list, written by [`pack_relabel_store`]; no
  pickle, and far faster random reads. Reading it back gives exactly what the files hold.

Keys are `"<wnid>/<image stem>"`, e.g. `"n01440764/n01440764_10026"` for `n01440764_10026.JPEG`.
"""

from __future__ import annotations

import json
import os
import shutil
from collections.abc import Iterable, Iterator, Sequence
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

import numpy as np
import torch


PACKED_FORMAT = "refiner-relabel-packed"
PACKED_VERSION = 1
META_FILE = "relabel_meta.json"
KEYS_FILE = "keys.txt"


class RelabelError(ValueError):
    """A relabel file or store that cannot be used; the message names the file or key."""


@dataclass(frozen=True)
class RelabelMap:
    """One image's dense top-k teacher prediction: `scores` (k, h, w) float32 and `indices` (k, h, w) int64."""

    scores: torch.Tensor
    indices: torch.Tensor


def relabel_key(file_name: str) -> str:
    """
    The relabel key of an ImageNet training image, from its file name or its path relative to the image folder:
    `"n01440764_10026.JPEG"` and `"n01440764/n01440764_10026.JPEG"` both give `"n01440764/n01440764_10026"`.
    """
    path = Path(file_name)
    stem = path.stem
    folder = path.parent.name if path.parent.name else stem.split("_")[0]
    return f"{folder}/{stem}"


def validate_relabel_tensor(tensor: object, name: str, num_classes: int | None = None) -> RelabelMap:
    """
    Checks one relabel tensor (shape `(2, k, h, w)`, finite scores, integral indices in `[0, num_classes)`) and
    returns it as a [`RelabelMap`]; raises [`RelabelError`] naming `name` otherwise.
    """
    if not isinstance(tensor, torch.Tensor):
        raise RelabelError(f"{name}: expected a tensor, found {type(tensor).__name__}.")
    if tensor.ndim != 4 or tensor.shape[0] != 2 or 0 in tensor.shape:
        raise RelabelError(f"{name}: expected shape (2, k, h, w), found {tuple(tensor.shape)}.")
    scores, indices = tensor[0].float(), tensor[1]
    if not torch.isfinite(scores).all():
        raise RelabelError(f"{name}: scores contain NaN or infinite values.")
    if not torch.isfinite(indices).all() or not torch.equal(indices, indices.round()):
        raise RelabelError(f"{name}: class indices are not integers.")
    low, high = indices.min().item(), indices.max().item()
    if low < 0 or (num_classes is not None and high >= num_classes):
        limit = f"[0, {num_classes})" if num_classes is not None else "non-negative"
        raise RelabelError(f"{name}: class indices range over [{low:g}, {high:g}], expected {limit}.")
    return RelabelMap(scores=scores, indices=indices.long())


def read_relabel_file(path: str | os.PathLike, num_classes: int | None = None) -> RelabelMap:
    """Reads and checks one per-file relabel map, without executing anything in the pickle."""
    path = Path(path)
    try:
        tensor = torch.load(path, map_location="cpu", weights_only=True)
    except FileNotFoundError:
        raise RelabelError(f"{path}: relabel file not found.") from None
    except Exception as error:  # any unreadable, truncated or code-carrying pickle
        raise RelabelError(f"{path}: cannot be read as a relabel tensor ({type(error).__name__}: {error}).") from None
    return validate_relabel_tensor(tensor, str(path), num_classes)


class RelabelStore(Protocol):
    """What the training data path needs from a relabel store."""

    def __getitem__(self, key: str) -> RelabelMap: ...

    def __contains__(self, key: str) -> bool: ...

    @property
    def map_shape(self) -> tuple[int, int, int]:
        """`(k, h, w)` of every map."""
        ...


class PerFileRelabelStore:
    """
    Relabel maps as the public release ships them: `ROOT/<wnid>/<stem>.pt`, one pickled tensor each.

    Args:
        root: the relabel directory.
        num_classes: when given, indices are checked against it on every read.
    """

    def __init__(self, root: str | os.PathLike, num_classes: int | None = None) -> None:
        self.root = Path(root)
        if not self.root.is_dir():
            raise RelabelError(f"Relabel directory not found: {self.root}")
        self.num_classes = num_classes
        self._map_shape: tuple[int, int, int] | None = None

    def path(self, key: str) -> Path:
        return self.root / f"{key}.pt"

    def __contains__(self, key: str) -> bool:
        return self.path(key).is_file()

    def __getitem__(self, key: str) -> RelabelMap:
        relabel = read_relabel_file(self.path(key), self.num_classes)
        shape = tuple(relabel.scores.shape)
        if self._map_shape is None:
            self._map_shape = shape
        elif shape != self._map_shape:
            raise RelabelError(f"{self.path(key)}: map shape (k, h, w) = {shape}, other files have {self._map_shape}.")
        return relabel

    def keys(self) -> Iterator[str]:
        """Every key under the root, in sorted order."""
        for path in sorted(self.root.glob("*/*.pt")):
            yield f"{path.parent.name}/{path.stem}"

    @property
    def map_shape(self) -> tuple[int, int, int]:
        if self._map_shape is None:
            first = next(self.keys(), None)
            if first is None:
                raise RelabelError(f"{self.root}: no relabel files (<wnid>/<stem>.pt) found.")
            self[first]
        return self._map_shape


class PackedRelabelStore:
    """
    Relabel maps packed by [`pack_relabel_store`]: memory-mapped `.npy` shards of scores and indices, a key list and
    a small JSON description. Nothing is unpickled (`allow_pickle=False`); a read is a slice of a memory map.
    """

    def __init__(self, directory: str | os.PathLike) -> None:
        self.directory = Path(directory)
        meta_path = self.directory / META_FILE
        if not meta_path.is_file():
            raise RelabelError(f"{self.directory}: not a packed relabel store (no {META_FILE}).")
        meta = json.loads(meta_path.read_text())
        if meta.get("format") != PACKED_FORMAT or meta.get("version") != PACKED_VERSION:
            raise RelabelError(f"{meta_path}: unsupported store format {meta.get('format')!r} v{meta.get('version')}.")
        self.num_classes: int = meta["num_classes"]
        self._map_shape = tuple(meta["map_shape"])
        keys = (self.directory / KEYS_FILE).read_text().splitlines()
        self._rows = {key: row for row, key in enumerate(keys)}
        self._shard_size: int = meta["shard_size"]
        self._shards = [
            (
                np.load(self.directory / shard["scores"], mmap_mode="r"),
                np.load(self.directory / shard["indices"], mmap_mode="r"),
            )
            for shard in meta["shards"]
        ]
        if sum(len(scores) for scores, _ in self._shards) != len(keys):
            raise RelabelError(f"{self.directory}: the shards hold a different number of maps than {KEYS_FILE} lists.")

    def __len__(self) -> int:
        return len(self._rows)

    def __contains__(self, key: str) -> bool:
        return key in self._rows

    def keys(self) -> Iterator[str]:
        return iter(self._rows)

    @property
    def map_shape(self) -> tuple[int, int, int]:
        return self._map_shape

    def __getitem__(self, key: str) -> RelabelMap:
        row = self._rows.get(key)
        if row is None:
            raise KeyError(f"No relabel map for {key!r} in {self.directory}.")
        scores, indices = self._shards[row // self._shard_size]
        offset = row % self._shard_size
        return RelabelMap(
            scores=torch.from_numpy(np.array(scores[offset], dtype=np.float32)),
            indices=torch.from_numpy(np.array(indices[offset], dtype=np.int64)),
        )


def open_relabel_store(
    path: str | os.PathLike, num_classes: int | None = None
) -> PackedRelabelStore | PerFileRelabelStore:
    """A packed store when `path` holds one, the per-file layout otherwise."""
    path = Path(path)
    if (path / META_FILE).is_file():
        store = PackedRelabelStore(path)
        if num_classes is not None and store.num_classes != num_classes:
            raise RelabelError(
                f"{path}: the relabel maps index {store.num_classes} classes but the model has {num_classes}."
            )
        return store
    return PerFileRelabelStore(path, num_classes)


def missing_relabel_keys(store: RelabelStore, keys: Iterable[str]) -> list[str]:
    """The keys (in order) that `store` has no map for."""
    return [key for key in keys if key not in store]


def check_relabel_coverage(store: RelabelStore, keys: Sequence[str], shown: int = 5) -> None:
    """Raises a [`RelabelError`] naming the first few training images without a relabel map, with the count."""
    missing = missing_relabel_keys(store, keys)
    if missing:
        listed = ", ".join(missing[:shown]) + (", ..." if len(missing) > shown else "")
        raise RelabelError(
            f"{len(missing)} of {len(keys)} training images have no relabel map (e.g. {listed}); "
            "check that the relabel directory matches the training set."
        )


@dataclass
class PackReport:
    """What [`pack_relabel_store`] did: how many maps it packed and which files it refused, with the reason."""

    packed: int
    bad: list[str]


def _read_for_packing(path: Path, num_classes: int) -> tuple[np.ndarray, np.ndarray] | str:
    try:
        relabel = read_relabel_file(path, num_classes)
    except RelabelError as error:
        return str(error)
    return relabel.scores.numpy(), relabel.indices.numpy()


def _compact(array: np.ndarray, small: type, large: type) -> np.ndarray:
    """`array` in the `small` dtype when that loses nothing (the released maps are float16), else in `large`."""
    with np.errstate(over="ignore"):
        compact = array.astype(small)
    return compact if np.array_equal(compact.astype(array.dtype), array) else array.astype(large)


def pack_relabel_store(
    root: str | os.PathLike,
    output: str | os.PathLike,
    num_classes: int = 1000,
    shard_size: int = 65536,
    num_workers: int = 0,
    progress: bool = False,
) -> PackReport:
    """
    Packs a per-file relabel directory (`ROOT/<wnid>/<stem>.pt`) into a [`PackedRelabelStore`] at `output`,
    validating every file (shape, finite scores, indices in `[0, num_classes)`, one map shape for all). Bad files
    are left out and named in the report. The store is written under a temporary name and renamed at the end.
    """
    source = PerFileRelabelStore(root)
    output = Path(output)
    if output.exists():
        raise FileExistsError(f"{output} already exists.")
    paths = [source.path(key) for key in source.keys()]
    if not paths:
        raise RelabelError(f"{root}: no relabel files (<wnid>/<stem>.pt) found.")
    staging = output.with_name(f".{output.name}.partial")
    if staging.exists():
        shutil.rmtree(staging)
    staging.mkdir(parents=True)

    def results() -> Iterator[tuple[Path, tuple[np.ndarray, np.ndarray] | str]]:
        if num_workers > 0:
            with ProcessPoolExecutor(num_workers) as pool:
                yield from zip(paths, pool.map(_read_for_packing, paths, [num_classes] * len(paths), chunksize=256))
        else:
            yield from ((path, _read_for_packing(path, num_classes)) for path in paths)

    iterator = results()
    if progress:
        from tqdm.auto import tqdm

        iterator = tqdm(iterator, total=len(paths), desc="packing relabel maps")

    keys: list[str] = []
    bad: list[str] = []
    shards: list[dict] = []
    map_shape: tuple[int, ...] | None = None
    buffer_scores: list[np.ndarray] = []
    buffer_indices: list[np.ndarray] = []

    def flush() -> None:
        number = len(shards)
        names = {"scores": f"scores-{number:05d}.npy", "indices": f"indices-{number:05d}.npy"}
        np.save(staging / names["scores"], _compact(np.stack(buffer_scores), np.float16, np.float32))
        np.save(staging / names["indices"], _compact(np.stack(buffer_indices), np.int16, np.int32))
        shards.append({**names, "count": len(buffer_scores)})
        buffer_scores.clear()
        buffer_indices.clear()

    for path, result in iterator:
        if isinstance(result, str):
            bad.append(result)
            continue
        scores, indices = result
        if map_shape is None:
            map_shape = scores.shape
        elif scores.shape != map_shape:
            bad.append(f"{path}: map shape (k, h, w) = {scores.shape}, the others have {map_shape}.")
            continue
        keys.append(f"{path.parent.name}/{path.stem}")
        buffer_scores.append(scores)
        buffer_indices.append(indices)
        if len(buffer_scores) == shard_size:
            flush()
    if buffer_scores:
        flush()
    if not keys:
        shutil.rmtree(staging)
        raise RelabelError(f"{root}: no valid relabel file; the first problems: {'; '.join(bad[:5])}")
    (staging / KEYS_FILE).write_text("\n".join(keys) + "\n")
    meta = {
        "format": PACKED_FORMAT,
        "version": PACKED_VERSION,
        "num_classes": num_classes,
        "map_shape": list(map_shape),
        "shard_size": shard_size,
        "shards": shards,
    }
    (staging / META_FILE).write_text(json.dumps(meta, indent=2) + "\n")
    staging.rename(output)
    return PackReport(packed=len(keys), bad=bad)
