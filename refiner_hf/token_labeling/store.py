"""
Relabel stores: the teacher's dense top-k score maps, one per training image, for token labeling.

A relabel map has shape `(2, k, h, w)`: `[0]` the top-k scores and `[1]` the top-k class indices (stored as floats)
on the teacher's spatial grid over the whole image. Two stores hold them, with the same interface:

- [`PerFileRelabelStore`]: the public layout, one pickled tensor per image at `ROOT/<wnid>/<image stem>.pt`, read
  with `torch.load(weights_only=True)`.
- [`PackedRelabelStore`]: the same maps packed into a few memory-mapped `.npy` shards (float16 scores and int16
  indices when that is lossless, else float32 / int32) with a key list, written by [`pack_relabel_store`]; no
  pickle, and far faster random reads. Reading it back gives exactly what the files hold. Each key is stored with a
  checksum of the key and its map's bytes, checked on every read, so that a key list out of step with its rows (keys
  swapped, a shard edited) is an error naming the key rather than maps read for the wrong images.

Keys are `"<wnid>/<image stem>"`, e.g. `"n01440764/n01440764_10026"` for `n01440764_10026.JPEG`.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import signal
import tempfile
import warnings
from collections import Counter
from collections.abc import Iterable, Iterator, Sequence
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass
from itertools import repeat
from pathlib import Path
from typing import Protocol

import numpy as np
import torch

from ..cli import DataError, UsageError, file_kind, one_line


PACKED_FORMAT = "refiner-relabel-packed"
# Version 2 binds each map to its key (a checksum beside each key); version 1 stores are read with a warning.
PACKED_VERSION = 2
UNVERIFIED_VERSION = 1
META_FILE = "relabel_meta.json"
# The settings of the teacher relabeling that writes a store (examples/generate_relabel.py), checked when it resumes.
RUN_FILE = "relabel_run.json"
CHECKSUM = "blake2b-64(key, NUL, score row, index row)"
_INTEGER_DTYPES = (torch.uint8, torch.int8, torch.int16, torch.int32, torch.int64)
_SHARD_NAME = re.compile(r"[A-Za-z0-9_][A-Za-z0-9_.-]*")


class RelabelError(DataError, ValueError):
    """A relabel file or store that cannot be used; the message names the file or key."""


class BadRelabelFilesError(RelabelError):
    """Some files of a relabel directory cannot be packed; `bad` lists each with its problem (nothing was written)."""

    def __init__(self, message: str, bad: list[str]) -> None:
        super().__init__(message)
        self.bad = bad


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
    if tensor.layout != torch.strided:
        raise RelabelError(f"{name}: expected a dense tensor, found a {tensor.layout} one.")
    tensor = tensor.detach()  # saved with requires_grad: its values are what counts
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
        raise RelabelError(f"{path}: {file_kind(path)}, not a regular file.")
    try:
        with warnings.catch_warnings():  # e.g. on a sparse tensor, which is refused below anyway
            warnings.simplefilter("ignore")
            tensor = torch.load(path, map_location="cpu", weights_only=True)
    except FileNotFoundError:
        raise RelabelError(f"{path}: relabel file not found.") from None
    except Exception as error:  # any unreadable, truncated or code-carrying pickle
        raise RelabelError(f"{path}: cannot be read as a relabel tensor ({_load_error_text(error)}).") from None
    return validate_relabel_tensor(tensor, str(path), num_classes)


def _load_error_text(error: Exception) -> str:
    """`torch.load`'s error in a few words: its advice to unpickle with `weights_only=False` is left out."""
    text = one_line(error)
    if "Weights only load failed" in text:
        found = re.search(r"[Uu]nsupported (GLOBAL [^ ]+|[^.]*?)(?: whose|\.)", text)
        what = f"unsupported {found.group(1)}" if found else "objects other than tensors"
        return f"it holds {what}, which is not loaded (a relabel file holds one tensor)"
    return f"{type(error).__name__}: {text[:300]}"


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

    # Files read to find the map shape most files share (the reference that a file of another shape is named against).
    shape_sample = 9

    def __init__(self, root: str | os.PathLike, num_classes: int | None = None) -> None:
        self.root = Path(root)
        if not self.root.exists():
            raise RelabelError(f"Relabel directory not found: {self.root}")
        if not self.root.is_dir():
            raise RelabelError(
                f"{self.root}: {file_kind(self.root)}, not a directory; give the relabel directory "
                "(<wnid>/<stem>.pt files) or a packed store."
            )
        self.num_classes = num_classes
        self._map_shape: tuple[int, int, int] | None = None

    def path(self, key: str) -> Path:
        return self.root / f"{key}.pt"

    def __contains__(self, key: str) -> bool:
        return self.path(key).is_file()

    def __getitem__(self, key: str) -> RelabelMap:
        relabel = read_relabel_file(self.path(key), self.num_classes, root=self.root)
        shape = tuple(relabel.scores.shape)
        if shape != self.map_shape:
            raise RelabelError(
                f"{self.path(key)}: map shape (k, h, w) = {shape}, but most files have {self.map_shape}."
            )
        return relabel

    def keys(self) -> Iterator[str]:
        """Every key under the root, in sorted order (reading a key checks that it is a regular file in the tree)."""
        for path in sorted(self.root.glob("*/*.pt")):
            yield f"{path.parent.name}/{path.stem}"

    @property
    def map_shape(self) -> tuple[int, int, int]:
        """The `(k, h, w)` most files share, read from a sample spread over the tree (not the first file alone)."""
        if self._map_shape is None:
            self._map_shape = self._common_shape()
        return self._map_shape

    def _common_shape(self) -> tuple[int, int, int]:
        keys = list(self.keys())
        if not keys:
            raise RelabelError(f"{self.root}: no relabel files (<wnid>/<stem>.pt) found.{_unfinished_hint(self.root)}")
        count = min(self.shape_sample, len(keys))
        sample = sorted({keys[round(i * (len(keys) - 1) / max(count - 1, 1))] for i in range(count)})
        shapes: Counter[tuple[int, ...]] = Counter()
        problems = []
        for key in sample:
            try:
                shapes[tuple(read_relabel_file(self.path(key), self.num_classes, root=self.root).scores.shape)] += 1
            except RelabelError as error:
                problems.append(str(error))
        if not shapes:
            raise RelabelError(
                f"{self.root}: none of the {len(sample)} relabel files read to find the map shape is usable; the "
                f"first: {problems[0]}"
            )
        shape = majority_shape(shapes)
        if shape is None:
            raise RelabelError(
                f"{self.root}: the relabel maps disagree on their shape (k, h, w): {describe_shapes(shapes)} of "
                f"{len(sample)} files read; pack the directory with refiner-vit-pack-relabel, which names the odd ones."
            )
        return shape  # type: ignore[return-value]


def majority_shape(shapes: Counter) -> tuple[int, ...] | None:
    """The shape more than half of the maps have, else None: a minority shape is never taken as the right one."""
    if not shapes:
        return None
    shape, count = shapes.most_common(1)[0]
    return shape if count * 2 > sum(shapes.values()) else None


def describe_shapes(shapes: Counter) -> str:
    """ "(5, 6, 6) in 4 files, (5, 7, 7) in 3": the shapes found, most common first."""
    return ", ".join(f"{shape} in {count} file{'s' * (count != 1)}" for shape, count in shapes.most_common())


def map_checksum(key: str, scores: np.ndarray, indices: np.ndarray) -> str:
    """
    The checksum that binds a stored map to its key (16 hex digits): BLAKE2b of the key, a NUL byte and the bytes of
    the map's score and index rows as stored. A key list out of step with its rows fails it.
    """
    digest = hashlib.blake2b(key.encode("utf-8") + b"\0", digest_size=8)
    digest.update(np.ascontiguousarray(scores).data)
    digest.update(np.ascontiguousarray(indices).data)
    return digest.hexdigest()


def _parse_key_file(path: Path, with_checksums: bool) -> tuple[list[str], np.ndarray | None]:
    """The keys of a shard's key file and, for a version-2 store, their checksums (big-endian uint64)."""
    lines = path.read_text().splitlines()
    if not with_checksums:
        return lines, None
    keys, digests = [], []
    for number, line in enumerate(lines, 1):
        key, tab, digest = line.rpartition("\t")
        if not tab or not key or len(digest) != 16 or not all(c in "0123456789abcdef" for c in digest):
            raise RelabelError(
                f"{path} line {number}: expected '<key><TAB><checksum>', found {line[:80]!r}; the key list is "
                "damaged: pack or relabel the store again."
            )
        keys.append(key)
        digests.append(digest)
    return keys, np.frombuffer(bytes.fromhex("".join(digests)), dtype=">u8")


class PackedRelabelStore:
    """
    Relabel maps packed by [`pack_relabel_store`] or [`PackedRelabelWriter`]: memory-mapped `.npy` shards of scores
    and indices, each with its list of keys, and a small JSON description. Nothing is unpickled
    (`allow_pickle=False`); a read is a slice of a memory map, whose values are checked (finite scores, class indices
    in range) and whose checksum is checked against its key ([`map_checksum`]: the map is the one stored for that
    key), naming the key.

    Opening checks what costs no scan of the data: the description, shard names that stay inside the store, real
    float scores and integer indices, every shard's shape against the description and its key list, and keys that
    appear once. `full_check=True` also reads every map (finite scores, indices in `[0, num_classes)`, checksums),
    naming the first bad key; the pack command and [`finalize_packed_store`] do so once, when the store is written.

    A store of format version 1 (written before keys were bound to their maps) is read with a warning that its keys
    cannot be verified, rather than refused: it may be the only copy of a long teacher run, and nothing says it is
    wrong. Packing or relabeling it again gives a store whose every read is checked.

    Args:
        directory: the store.
        full_check: also check every stored map now.
        warn_unverified: warn (once per store and process) when the store is of version 1.
    """

    def __init__(self, directory: str | os.PathLike, full_check: bool = False, warn_unverified: bool = True) -> None:
        self.directory = Path(directory)
        meta_path = self.directory / META_FILE
        if not self.directory.is_dir():
            kind = file_kind(self.directory) if self.directory.exists() else "no such directory"
            raise RelabelError(f"{self.directory}: {kind}; give the directory of a packed relabel store.")
        if not meta_path.is_file():
            raise RelabelError(f"{self.directory}: not a packed relabel store (no {META_FILE}).")
        try:
            meta = json.loads(meta_path.read_text())
        except (OSError, ValueError) as error:
            raise RelabelError(f"{meta_path}: unreadable ({error}).") from None
        version = meta.get("version") if isinstance(meta, dict) else None
        if not isinstance(meta, dict) or meta.get("format") != PACKED_FORMAT or version not in _READABLE_VERSIONS:
            found = (meta.get("format"), meta.get("version")) if isinstance(meta, dict) else type(meta).__name__
            raise RelabelError(
                f"{meta_path}: unsupported store format {found} (this version reads {PACKED_FORMAT!r} versions "
                f"{', '.join(map(str, _READABLE_VERSIONS))}); pack it again with refiner-vit-pack-relabel."
            )
        self.verified = version >= PACKED_VERSION
        if not self.verified and warn_unverified:
            warnings.warn(
                f"{self.directory}: a packed relabel store of version {version}, whose maps are not bound to their "
                "keys: a key list out of step with its maps would go unnoticed. Pack it again from the per-file maps "
                "with refiner-vit-pack-relabel (or relabel again with examples/generate_relabel.py) to have every "
                "read checked.",
                UserWarning,
                stacklevel=2,
            )
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
        self._checksums: list[np.ndarray | None] = []
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
            shard_keys, checksums = _parse_key_file(paths[2], with_checksums=self.verified)
        except (OSError, ValueError) as error:
            if isinstance(error, RelabelError):
                raise
            raise RelabelError(f"{self.directory}: shard {name} cannot be read ({one_line(error)}).") from None
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
        self._checksums.append(checksums)
        return shard_keys

    def check_all_values(self, rows_per_read: int = 4096) -> None:
        """
        Reads every map: finite scores, class indices in `[0, num_classes)` and its checksum against its key, naming
        the first bad key.
        """
        for (scores, indices), keys, checksums in zip(self._shards, self._shard_keys, self._checksums):
            for start in range(0, len(keys), rows_per_read):
                stored_scores = np.asarray(scores[start : start + rows_per_read])
                stored_indices = np.asarray(indices[start : start + rows_per_read])
                block_scores = torch.from_numpy(stored_scores.astype(np.float32))
                block_indices = torch.from_numpy(stored_indices.astype(np.int64))
                try:
                    check_relabel_values(block_scores, block_indices, "", self.num_classes)
                except RelabelError:
                    for row in range(len(block_scores)):  # find and name the map
                        check_relabel_values(
                            block_scores[row], block_indices[row], self._name(keys[start + row]), self.num_classes
                        )
                if checksums is not None:
                    for row in range(len(stored_scores)):
                        self._check_binding(keys[start + row], stored_scores[row], stored_indices[row],
                                            checksums[start + row])  # fmt: skip

    def _name(self, key: str) -> str:
        return f"{self.directory}: map {key!r}"

    def _check_binding(self, key: str, scores: np.ndarray, indices: np.ndarray, expected: np.uint64) -> None:
        if int(map_checksum(key, scores, indices), 16) != int(expected):
            raise RelabelError(
                f"{self._name(key)} fails its checksum: the map stored in its row is not the one packed for this key "
                "(the key list was reordered or a shard was changed); pack or relabel the store again."
            )

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
        shard, row = location
        scores, indices = self._shards[shard]
        stored_scores, stored_indices = np.asarray(scores[row]), np.asarray(indices[row])
        relabel = RelabelMap(
            scores=torch.from_numpy(stored_scores.astype(np.float32)),
            indices=torch.from_numpy(stored_indices.astype(np.int64)),
        )
        check_relabel_values(relabel.scores, relabel.indices, self._name(key), self.num_classes)
        checksums = self._checksums[shard]
        if checksums is not None:  # the map in this row is the one written for this key
            self._check_binding(key, stored_scores, stored_indices, checksums[row])
        return relabel


_READABLE_VERSIONS = (UNVERIFIED_VERSION, PACKED_VERSION)


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
    [`completed_keys`] tells what is already stored. Each key is written with the checksum of its map as stored
    ([`map_checksum`]), which every read of the finished store checks. Several processes may write into one
    directory with different `shard_prefix`es; [`finalize_packed_store`] then describes all complete shards.

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
        if not isinstance(key, str) or not key or any(c in key for c in "\t\n\r"):
            raise RelabelError(f"{key!r}: a relabel key must be a non-empty string without tabs or line breaks.")
        scores, indices = torch.as_tensor(scores).detach(), torch.as_tensor(indices).detach()
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
        scores = _compact(np.stack(self._scores), np.float16, np.float32)
        indices = _compact(np.stack(self._indices), np.int16, np.int32)
        partial = keys_path.with_suffix(".partial")
        try:
            np.save(scores_path, scores)
            np.save(indices_path, indices)
            lines = (f"{key}\t{map_checksum(key, s, i)}\n" for key, s, i in zip(self._keys, scores, indices))
            partial.write_text("".join(lines))
            partial.rename(keys_path)
        except BaseException:  # an interruption or a full disk: no half-written shard is left
            for path in (scores_path, indices_path, partial):
                path.unlink(missing_ok=True)
            raise
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
        keys.update(line.split("\t", 1)[0] for line in _shard_paths(directory, name)[2].read_text().splitlines())
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
    for name in names:
        keys_path = _shard_paths(directory, name)[2]
        with keys_path.open() as lines:
            first = lines.readline()
        if first and "\t" not in first:
            raise RelabelError(
                f"{directory}: shard {name} was written by an older version, without the checksums that bind its maps "
                f"to their keys; delete its files ({name}.*) and run again to relabel its images."
            )
    shapes = {np.load(_shard_paths(directory, name)[0], mmap_mode="r").shape[1:] for name in names}
    if len(shapes) != 1:
        raise RelabelError(f"{directory}: shards disagree on the map shape (k, h, w): {sorted(shapes)}.")
    count = sum(len(_shard_paths(directory, name)[2].read_text().splitlines()) for name in names)
    meta = {
        "format": PACKED_FORMAT,
        "version": PACKED_VERSION,
        "checksum": CHECKSUM,
        "num_classes": num_classes,
        "map_shape": [int(n) for n in shapes.pop()],
        "shards": names,
    }
    (directory / META_FILE).write_text(json.dumps(meta, indent=2) + "\n")
    try:
        PackedRelabelStore(directory, full_check=True)  # duplicate keys, values, checksums: refused, named
    except RelabelError:
        (directory / META_FILE).unlink()
        raise
    return count


def open_relabel_store(
    path: str | os.PathLike, num_classes: int | None = None, full_check: bool = False, warn_unverified: bool = True
) -> PackedRelabelStore | PerFileRelabelStore:
    """
    A packed store when `path` holds one, the per-file layout otherwise. `full_check` reads every map of a packed
    store now (per-file maps are each checked when read); `warn_unverified` warns of a version-1 packed store.
    """
    path = Path(path)
    if (path / META_FILE).is_file():
        store = PackedRelabelStore(path, full_check=full_check, warn_unverified=warn_unverified)
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
    """What [`pack_relabel_store`] did: how many maps it packed and which files it left out, with the reason."""

    packed: int
    bad: list[str]


# What a finished or unfinished packed store's directory holds; anything else in an output directory is the user's.
_STORE_FILE = re.compile(
    rf"{re.escape(META_FILE)}|{re.escape(RUN_FILE)}|{_SHARD_NAME.pattern}\.(scores\.npy|indices\.npy|keys\.txt|keys\.partial)"
)


def is_store_file(name: str) -> bool:
    """Whether a file name is one a packed store (finished or being written) holds."""
    return _STORE_FILE.fullmatch(name) is not None


def store_directory_entries(output: Path, named: str) -> list[str]:
    """
    The sorted file names in an existing output directory for a store, after refusing (a [`RelabelError`] starting
    with `named`) one that holds files no store holds: nothing a user wrote there is mixed with a store.
    """
    entries = sorted(path.name for path in output.iterdir())
    foreign = [name for name in entries if not is_store_file(name)]
    if foreign:
        raise RelabelError(
            f"{named}: holds files that are not part of a relabel store (e.g. {foreign[0]}); give a new or empty "
            "directory."
        )
    return entries


def check_store_output(output: str | os.PathLike, overwrite: bool = False) -> bool:
    """
    Refuses (a [`RelabelError`]) an output directory for a packed store that holds anything but a finished packed
    store, and that too unless `overwrite`: nothing a user or another run wrote there is mixed with or lost. Returns
    whether an existing store is to be replaced.
    """
    output = Path(output)
    if not output.exists() and not output.is_symlink():
        return False
    if not output.is_dir():
        raise RelabelError(f"{output}: {file_kind(output)} is there; give a directory path for the packed store.")
    entries = store_directory_entries(output, str(output))
    if not entries:
        return False
    if META_FILE not in entries:
        raise RelabelError(
            f"{output}: holds an unfinished relabel store (shards without {META_FILE}; a relabeling run may still be "
            "writing it); give another directory."
        )
    if not overwrite:
        raise RelabelError(
            f"{output}: already holds a packed relabel store; give --overwrite to replace it, or another directory."
        )
    return True


def _publish(staging: Path, output: Path, overwrite: bool) -> None:
    """Moves the finished store into place; the store it replaces (only with `overwrite`) is removed last."""
    replace = check_store_output(output, overwrite)  # again: the directory may have changed while packing
    if replace:
        old = Path(tempfile.mkdtemp(dir=output.parent, prefix=f".{output.name}.", suffix=".replaced"))
        os.rename(output, old)
        try:
            os.rename(staging, output)
        except OSError:
            os.rename(old, output)
            raise
        shutil.rmtree(old)
        return
    try:
        os.rename(staging, output)  # replaces an empty directory; refused if another writer filled it meanwhile
    except OSError as error:
        raise RelabelError(
            f"{output}: another writer put files there while this one packed ({error.strerror}); nothing was written "
            "there. Give another directory."
        ) from None


_FILES_PER_TASK = 256


def _unfinished_hint(root: str | os.PathLike) -> str:
    """For a directory that holds shards but no description: what it is (an unfinished packed store)."""
    if any(Path(root).glob("*.keys.txt")):
        return (
            f" It holds shards of a packed store but no {META_FILE}: an unfinished teacher relabeling, which "
            "examples/generate_relabel.py completes when run again with the same --output."
        )
    return ""


def _ignore_interruptions() -> None:
    # Ctrl-C reaches every process of the terminal: the main process alone unwinds, and stops the pool.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_DFL)


def _read_for_packing(path: Path, num_classes: int, root: Path) -> tuple[np.ndarray, np.ndarray] | str:
    try:
        relabel = read_relabel_file(path, num_classes, root=root)
    except RelabelError as error:
        return one_line(error)
    return relabel.scores.numpy(), relabel.indices.numpy()


def pack_relabel_store(
    root: str | os.PathLike,
    output: str | os.PathLike,
    num_classes: int = 1000,
    shard_size: int = 65536,
    num_workers: int = 0,
    progress: bool = False,
    allow_bad: bool = False,
    overwrite: bool = False,
) -> PackReport:
    """
    Packs a per-file relabel directory (`ROOT/<wnid>/<stem>.pt`) into a [`PackedRelabelStore`] at `output`,
    validating every file (a regular file inside the tree, shape, finite scores, indices in `[0, num_classes)`).

    The maps must share one shape: the shape more than half of the valid files have is the store's, and the files of
    other shapes are the bad ones (when no shape has a majority, nothing is written: there is no telling which files
    are right). Files that cannot be packed are refused with a [`BadRelabelFilesError`] listing them, unless
    `allow_bad`, which leaves them out and names them in the report.

    The store is written under a temporary name beside `output` and moved into place when complete and read back in
    full; an error or an interruption leaves nothing behind. `output` must be absent, empty, or (with `overwrite`)
    a packed store, which is replaced only once the new one is complete.
    """
    for name, value, least in (("num_classes", num_classes, 1), ("shard_size", shard_size, 1),
                               ("num_workers", num_workers, 0)):  # fmt: skip
        if isinstance(value, bool) or not isinstance(value, int) or value < least:
            raise UsageError(f"--{name.replace('_', '-')} must be an integer of at least {least}, got {value!r}.")
    source = PerFileRelabelStore(root)
    output = Path(output)
    check_store_output(output, overwrite)
    paths = [source.path(key) for key in source.keys()]
    if not paths:
        raise RelabelError(
            f"{source.root}: no relabel files (<wnid>/<stem>.pt) found; nothing was written.{_unfinished_hint(root)}"
        )
    output.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(dir=output.parent, prefix=f".{output.name}.", suffix=".partial"))
    num_workers = min(num_workers, os.cpu_count() or 1, -(-len(paths) // _FILES_PER_TASK))
    pool = ProcessPoolExecutor(num_workers, initializer=_ignore_interruptions) if num_workers > 0 else None
    try:
        if pool is not None:
            reads = pool.map(
                _read_for_packing, paths, repeat(num_classes), repeat(source.root), chunksize=_FILES_PER_TASK
            )
        else:
            reads = (_read_for_packing(path, num_classes, source.root) for path in paths)
        results: Iterable[tuple[Path, tuple[np.ndarray, np.ndarray] | str]] = zip(paths, reads)
        if progress:
            from tqdm.auto import tqdm

            results = tqdm(results, total=len(paths), desc="packing relabel maps")
        report = _pack(results, staging, shard_size, source.root, output)
        if report.bad and not allow_bad:
            raise BadRelabelFilesError(
                f"{len(report.bad)} of {len(paths)} relabel files in {source.root} cannot be packed (the first: "
                f"{report.bad[0]}); nothing was written to {output}: fix or remove them, or give --allow-bad to pack "
                f"the other {report.packed}.",
                report.bad,
            )
        finalize_packed_store(staging, num_classes)
        _publish(staging, output, overwrite)
        return report
    finally:
        if pool is not None:
            pool.shutdown(wait=True, cancel_futures=True)
        shutil.rmtree(staging, ignore_errors=True)


def _pack(
    results: Iterable[tuple[Path, tuple[np.ndarray, np.ndarray] | str]],
    staging: Path,
    shard_size: int,
    root: Path,
    output: Path,
) -> PackReport:
    """Writes the valid maps into `staging`, one writer per shape, and keeps the shape most maps have."""
    bad: list[str] = []
    writers: dict[tuple[int, ...], PackedRelabelWriter] = {}
    files: dict[tuple[int, ...], list[Path]] = {}
    for path, result in results:
        if isinstance(result, str):
            bad.append(result)
            continue
        scores, indices = result
        shape = tuple(scores.shape)
        if shape not in writers:
            prefix = "shard" if not writers else f"shape{len(writers)}"
            writers[shape] = PackedRelabelWriter(staging, shard_size=shard_size, shard_prefix=prefix)
            files[shape] = []
        writers[shape].add(f"{path.parent.name}/{path.stem}", scores, indices)
        files[shape].append(path)
    shapes = Counter({shape: len(paths) for shape, paths in files.items()})
    if not shapes:
        raise RelabelError(
            f"{root}: no valid relabel file; nothing was written to {output}. The first problems: {'; '.join(bad[:3])}"
        )
    kept = majority_shape(shapes)
    if kept is None:
        raise RelabelError(
            f"{root}: the relabel maps disagree on their shape (k, h, w): {describe_shapes(shapes)}; no shape is "
            f"shared by more than half of the valid files, so none can be taken as right. Nothing was written to "
            f"{output}."
        )
    writers[kept].flush()
    for shape, writer in writers.items():
        if shape != kept:
            for leftover in staging.glob(f"{writer.shard_prefix}-*"):
                leftover.unlink()
            bad.extend(
                f"{path}: map shape (k, h, w) = {shape}, but most files ({shapes[kept]} of {shapes.total()}) have "
                f"{kept}."
                for path in files[shape]
            )
    return PackReport(packed=shapes[kept], bad=sorted(bad))
