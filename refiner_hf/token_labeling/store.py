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
import re
import shutil
from collections.abc import Iterable, Iterator, Sequence
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass
from itertools import repeat
from pathlib import Path
from typing import Protocol

import numpy as np
import torch

from ..cli import DataError


PACKED_FORMAT = "refiner-relabel-packed"
PACKED_VERSION = 1
META_FILE = "relabel_meta.json"
_INTEGER_DTYPES = (torch.uint8, torch.int8, torch.int16, torch.int32, torch.int64)
_SHARD_NAME = re.compile(r"[A-Za-z0-9_][A-Za-z0-9_.-]*")


class RelabelError(DataError, ValueError):
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


def check_relabel_values(
    scores: torch.Tensor, indices: torch.Tensor, name: str, num_classes: int | None = None
) -> None:
    """
    Checks the values of relabel maps (any leading shape): real, finite scores, and integral class indices in
    `[0, num_classes)`; raises [`RelabelError`] naming `name` otherwise.
    """
    if scores.is_complex() or not scores.is_floating_point():
        raise RelabelError(f"{name}: scores must be real floats, found {scores.dtype}.")
    if not torch.isfinite(scores).all():
        raise RelabelError(f"{name}: scores contain NaN or infinite values.")
    if indices.is_complex():
        raise RelabelError(f"{name}: class indices must be integers, found {indices.dtype}.")
    if indices.is_floating_point() and (not torch.isfinite(indices).all() or not torch.equal(indices, indices.round())):
        raise RelabelError(f"{name}: class indices are not integers.")
    low, high = indices.min().item(), indices.max().item()
    if low < 0 or (num_classes is not None and high >= num_classes):
        limit = f"[0, {num_classes})" if num_classes is not None else "non-negative"
        raise RelabelError(f"{name}: class indices range over [{low:g}, {high:g}], expected {limit}.")


def validate_relabel_tensor(tensor: object, name: str, num_classes: int | None = None) -> RelabelMap:
    """
    Checks one relabel tensor (shape `(2, k, h, w)`, finite scores, integral indices in `[0, num_classes)`) and
    returns it as a [`RelabelMap`]; raises [`RelabelError`] naming `name` otherwise.
    """
    if not isinstance(tensor, torch.Tensor):
        raise RelabelError(f"{name}: expected a tensor, found {type(tensor).__name__}.")
    if tensor.ndim != 4 or tensor.shape[0] != 2 or 0 in tensor.shape:
        raise RelabelError(f"{name}: expected shape (2, k, h, w), found {tuple(tensor.shape)}.")
    if tensor.is_complex() or not (tensor.is_floating_point() or tensor.dtype in _INTEGER_DTYPES):
        raise RelabelError(f"{name}: expected a real tensor, found {tensor.dtype}.")
    scores, indices = tensor[0].float(), tensor[1]
    check_relabel_values(scores, indices, name, num_classes)
    return RelabelMap(scores=scores, indices=indices.long())


def read_relabel_file(path: str | os.PathLike, num_classes: int | None = None, root: Path | None = None) -> RelabelMap:
    """
    Reads and checks one per-file relabel map, without executing anything in the pickle. Only a regular file is read
    (a FIFO or a device would block or stream forever), and, given the relabel `root`, only one inside it.
    """
    path = Path(path)
    if root is not None and not path.resolve().is_relative_to(root.resolve()):
        raise RelabelError(
            f"{path}: a symbolic link to {path.resolve()}, outside the relabel directory {root}; copy the file in, or "
            "point --relabel_root at the tree it belongs to."
        )
    if path.exists() and not path.is_file():
        raise RelabelError(f"{path}: not a regular file.")
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
        relabel = read_relabel_file(self.path(key), self.num_classes, root=self.root)
        shape = tuple(relabel.scores.shape)
        if self._map_shape is None:
            self._map_shape = shape
        elif shape != self._map_shape:
            raise RelabelError(f"{self.path(key)}: map shape (k, h, w) = {shape}, other files have {self._map_shape}.")
        return relabel

    def keys(self) -> Iterator[str]:
        """Every key under the root, in sorted order (reading a key checks that it is a regular file in the tree)."""
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
    Relabel maps packed by [`pack_relabel_store`] or [`PackedRelabelWriter`]: memory-mapped `.npy` shards of scores
    and indices, each with its list of keys, and a small JSON description. Nothing is unpickled
    (`allow_pickle=False`); a read is a slice of a memory map, whose values are checked (finite scores, class indices
    in range) naming the key.

    Opening checks what costs no scan of the data: the description, shard names that stay inside the store, real
    float scores and integer indices, every shard's shape against the description and its key list, and keys that
    appear once. `full_check=True` also reads every value (finite scores, indices in `[0, num_classes)`), naming the
    first bad key; the pack command and [`finalize_packed_store`] do so once, when the store is written.

    Args:
        directory: the store.
        full_check: also check every stored value now.
    """

    def __init__(self, directory: str | os.PathLike, full_check: bool = False) -> None:
        self.directory = Path(directory)
        meta_path = self.directory / META_FILE
        if not meta_path.is_file():
            raise RelabelError(f"{self.directory}: not a packed relabel store (no {META_FILE}).")
        try:
            meta = json.loads(meta_path.read_text())
        except (OSError, ValueError) as error:
            raise RelabelError(f"{meta_path}: unreadable ({error}).") from None
        if not isinstance(meta, dict) or meta.get("format") != PACKED_FORMAT or meta.get("version") != PACKED_VERSION:
            found = (meta.get("format"), meta.get("version")) if isinstance(meta, dict) else type(meta).__name__
            raise RelabelError(f"{meta_path}: unsupported store format {found}.")
        num_classes, map_shape, shards = meta.get("num_classes"), meta.get("map_shape"), meta.get("shards")
        if not (isinstance(num_classes, int) and num_classes > 0):
            raise RelabelError(f"{meta_path}: `num_classes` must be a positive integer, found {num_classes!r}.")
        if not (isinstance(map_shape, list) and len(map_shape) == 3 and all(_positive_int(n) for n in map_shape)):
            raise RelabelError(
                f"{meta_path}: `map_shape` must be three positive integers (k, h, w), found {map_shape!r}."
            )
        if not (
            isinstance(shards, list) and shards and all(isinstance(n, str) and _SHARD_NAME.fullmatch(n) for n in shards)
        ):
            raise RelabelError(
                f"{meta_path}: `shards` must list shard names (letters, digits, '_', '-', '.': files inside the "
                f"store), found {shards!r}."
            )
        self.num_classes: int = num_classes
        self._map_shape = tuple(map_shape)
        self._rows: dict[str, tuple[int, int]] = {}
        self._shards: list[tuple[np.ndarray, np.ndarray]] = []
        self._shard_keys: list[list[str]] = []
        for number, name in enumerate(shards):
            shard_keys = self._open_shard(name)
            for offset, key in enumerate(shard_keys):
                if key in self._rows:
                    other = shards[self._rows[key][0]]
                    raise RelabelError(f"{self.directory}: key {key!r} is stored twice (shards {other} and {name}).")
                self._rows[key] = (number, offset)
        if full_check:
            self.check_all_values()

    def _open_shard(self, name: str) -> list[str]:
        """Maps a shard after checking its files, dtypes and shapes; returns its keys."""
        paths = _shard_paths(self.directory, name)
        for path in paths:
            if not path.resolve().is_relative_to(self.directory.resolve()) or not path.is_file():
                raise RelabelError(f"{self.directory}: shard file {path.name} is missing or not a file in the store.")
        try:
            scores, indices = (np.load(path, mmap_mode="r", allow_pickle=False) for path in paths[:2])
            shard_keys = paths[2].read_text().splitlines()
        except (OSError, ValueError) as error:
            raise RelabelError(f"{self.directory}: shard {name} cannot be read ({error}).") from None
        if scores.dtype.kind != "f":
            raise RelabelError(f"{paths[0]}: scores must be real floats, found {scores.dtype}.")
        if indices.dtype.kind not in "iu":
            raise RelabelError(f"{paths[1]}: class indices must be integers, found {indices.dtype}.")
        expected = (len(shard_keys), *self._map_shape)
        for path, array in zip(paths, (scores, indices)):
            if array.shape != expected:
                raise RelabelError(
                    f"{path}: shape {array.shape}, but the store describes maps of (k, h, w) = {self._map_shape} and "
                    f"the shard lists {len(shard_keys)} keys."
                )
        if "" in shard_keys:
            raise RelabelError(f"{paths[2]}: an empty key.")
        self._shards.append((scores, indices))
        self._shard_keys.append(shard_keys)
        return shard_keys

    def check_all_values(self, rows_per_read: int = 4096) -> None:
        """Reads every map: finite scores and class indices in `[0, num_classes)`, naming the first bad key."""
        for (scores, indices), keys in zip(self._shards, self._shard_keys):
            for start in range(0, len(keys), rows_per_read):
                block_scores = torch.from_numpy(np.array(scores[start : start + rows_per_read], dtype=np.float32))
                block_indices = torch.from_numpy(np.array(indices[start : start + rows_per_read], dtype=np.int64))
                try:
                    check_relabel_values(block_scores, block_indices, "", self.num_classes)
                except RelabelError:
                    for row in range(len(block_scores)):  # find and name the map
                        check_relabel_values(
                            block_scores[row], block_indices[row], self._name(keys[start + row]), self.num_classes
                        )

    def _name(self, key: str) -> str:
        return f"{self.directory}: map {key!r}"

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
        location = self._rows.get(key)
        if location is None:
            raise KeyError(f"No relabel map for {key!r} in {self.directory}.")
        scores, indices = self._shards[location[0]]
        relabel = RelabelMap(
            scores=torch.from_numpy(np.array(scores[location[1]], dtype=np.float32)),
            indices=torch.from_numpy(np.array(indices[location[1]], dtype=np.int64)),
        )
        check_relabel_values(relabel.scores, relabel.indices, self._name(key), self.num_classes)
        return relabel


def _positive_int(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value > 0


def _shard_paths(directory: Path, name: str) -> tuple[Path, Path, Path]:
    return directory / f"{name}.scores.npy", directory / f"{name}.indices.npy", directory / f"{name}.keys.txt"


def _compact(array: np.ndarray, small: type, large: type) -> np.ndarray:
    """`array` in the `small` dtype when that loses nothing (the released maps are float16), else in `large`."""
    with np.errstate(over="ignore"):
        compact = array.astype(small)
    return compact if np.array_equal(compact.astype(array.dtype), array) else array.astype(large)


class PackedRelabelWriter:
    """
    Writes relabel maps into the shards of a packed store as they come (e.g. from a teacher), `shard_size` at a time.
    A shard counts only once its key list is written, last and atomically, so an interrupted run can resume:
    [`completed_keys`] tells what is already stored. Several processes may write into one directory with different
    `shard_prefix`es; [`finalize_packed_store`] then describes all complete shards.

    Args:
        directory: the store's directory (created if needed).
        shard_size: maps per shard.
        shard_prefix: name prefix of this writer's shards, e.g. `"rank0"`.
    """

    def __init__(self, directory: str | os.PathLike, shard_size: int = 65536, shard_prefix: str = "shard") -> None:
        self.directory = Path(directory)
        self.directory.mkdir(parents=True, exist_ok=True)
        self.shard_size = shard_size
        self.shard_prefix = shard_prefix
        self._keys: list[str] = []
        self._scores: list[np.ndarray] = []
        self._indices: list[np.ndarray] = []
        self._next_shard = len(self._complete_shards())

    def _complete_shards(self) -> list[str]:
        return _complete_shards(self.directory, f"{self.shard_prefix}-")

    def completed_keys(self) -> set[str]:
        """Keys already stored in this writer's complete shards."""
        return complete_shard_keys(self.directory, f"{self.shard_prefix}-")

    def add(self, key: str, scores: torch.Tensor | np.ndarray, indices: torch.Tensor | np.ndarray) -> None:
        """Adds one map: `scores` and `indices` of shape (k, h, w), checked (finite, integral, shapes) first."""
        scores, indices = torch.as_tensor(scores), torch.as_tensor(indices)
        if scores.ndim != 3 or scores.shape != indices.shape:
            raise RelabelError(
                f"{key}: scores {tuple(scores.shape)} and indices {tuple(indices.shape)} must be one (k, h, w) shape."
            )
        if self._scores and scores.shape != self._scores[0].shape:
            raise RelabelError(f"{key}: map shape {tuple(scores.shape)}, the others have {self._scores[0].shape}.")
        check_relabel_values(scores, indices, key)
        self._keys.append(key)
        self._scores.append(scores.numpy().astype(np.float32))
        self._indices.append(indices.numpy().astype(np.int64))
        if len(self._keys) >= self.shard_size:
            self.flush()

    def flush(self) -> None:
        """Writes the buffered maps as a complete shard."""
        if not self._keys:
            return
        name = f"{self.shard_prefix}-{self._next_shard:05d}"
        scores_path, indices_path, keys_path = _shard_paths(self.directory, name)
        np.save(scores_path, _compact(np.stack(self._scores), np.float16, np.float32))
        np.save(indices_path, _compact(np.stack(self._indices), np.int16, np.int32))
        partial = keys_path.with_suffix(".partial")
        partial.write_text("\n".join(self._keys) + "\n")
        partial.rename(keys_path)
        self._next_shard += 1
        self._keys, self._scores, self._indices = [], [], []


def _complete_shards(directory: Path, prefix: str = "") -> list[str]:
    """Names of the complete shards (those whose key file was written last) of `directory` starting with `prefix`."""
    return sorted(p.name[: -len(".keys.txt")] for p in directory.glob(f"{prefix}*.keys.txt"))


def complete_shard_keys(directory: str | os.PathLike, prefix: str = "") -> set[str]:
    """
    The keys stored in the complete shards of a packed store being written (whichever writer, or the writers whose
    shard names start with `prefix`): what an interrupted relabeling run does not have to compute again.
    """
    directory = Path(directory)
    keys: set[str] = set()
    for name in _complete_shards(directory, prefix):
        keys.update(_shard_paths(directory, name)[2].read_text().splitlines())
    return keys


def finalize_packed_store(directory: str | os.PathLike, num_classes: int) -> int:
    """
    Describes every complete shard of `directory` in its `relabel_meta.json` (so it opens as a
    [`PackedRelabelStore`]), removing leftovers of interrupted shards. Returns the number of maps.
    """
    directory = Path(directory)
    names = _complete_shards(directory)
    complete = set(names)
    for leftover in directory.glob("*.npy"):
        if leftover.name.rsplit(".", 2)[0] not in complete:
            leftover.unlink()
    for leftover in directory.glob("*.keys.partial"):
        leftover.unlink()
    if not names:
        raise RelabelError(f"{directory}: no complete relabel shard to describe.")
    shapes = {np.load(_shard_paths(directory, name)[0], mmap_mode="r").shape[1:] for name in names}
    if len(shapes) != 1:
        raise RelabelError(f"{directory}: shards disagree on the map shape (k, h, w): {sorted(shapes)}.")
    count = sum(len(_shard_paths(directory, name)[2].read_text().splitlines()) for name in names)
    meta = {
        "format": PACKED_FORMAT,
        "version": PACKED_VERSION,
        "num_classes": num_classes,
        "map_shape": [int(n) for n in shapes.pop()],
        "shards": names,
    }
    (directory / META_FILE).write_text(json.dumps(meta, indent=2) + "\n")
    try:
        PackedRelabelStore(directory, full_check=True)  # duplicate keys, values out of range: refused, named
    except RelabelError:
        (directory / META_FILE).unlink()
        raise
    return count


def open_relabel_store(
    path: str | os.PathLike, num_classes: int | None = None, full_check: bool = False
) -> PackedRelabelStore | PerFileRelabelStore:
    """
    A packed store when `path` holds one, the per-file layout otherwise. `full_check` reads every map of a packed
    store now (per-file maps are each checked when read).
    """
    path = Path(path)
    if (path / META_FILE).is_file():
        store = PackedRelabelStore(path, full_check=full_check)
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


def _read_for_packing(path: Path, num_classes: int, root: Path) -> tuple[np.ndarray, np.ndarray] | str:
    try:
        relabel = read_relabel_file(path, num_classes, root=root)
    except RelabelError as error:
        return str(error)
    return relabel.scores.numpy(), relabel.indices.numpy()


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
    writer = PackedRelabelWriter(staging, shard_size=shard_size)

    def results() -> Iterator[tuple[Path, tuple[np.ndarray, np.ndarray] | str]]:
        if num_workers > 0:
            with ProcessPoolExecutor(num_workers) as pool:
                reads = pool.map(_read_for_packing, paths, repeat(num_classes), repeat(source.root), chunksize=256)
                yield from zip(paths, reads)
        else:
            yield from ((path, _read_for_packing(path, num_classes, source.root)) for path in paths)

    iterator = results()
    if progress:
        from tqdm.auto import tqdm

        iterator = tqdm(iterator, total=len(paths), desc="packing relabel maps")

    bad: list[str] = []
    packed = 0
    map_shape: tuple[int, ...] | None = None
    for path, result in iterator:
        if isinstance(result, str):
            bad.append(result)
            continue
        scores, indices = result
        map_shape = map_shape or scores.shape
        if scores.shape != map_shape:
            bad.append(f"{path}: map shape (k, h, w) = {scores.shape}, the others have {map_shape}.")
            continue
        writer.add(f"{path.parent.name}/{path.stem}", scores, indices)
        packed += 1
    writer.flush()
    if not packed:
        shutil.rmtree(staging)
        raise RelabelError(f"{root}: no valid relabel file; the first problems: {'; '.join(bad[:5])}")
    finalize_packed_store(staging, num_classes)
    staging.rename(output)
    return PackReport(packed=packed, bad=bad)
