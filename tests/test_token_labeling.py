"""Token labeling data: relabel stores (per-file and packed), dense-label geometry and mixing."""

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from refiner_hf.token_labeling import (
    PackedRelabelStore,
    PackedRelabelWriter,
    PerFileRelabelStore,
    RelabelError,
    RelabelMap,
    check_relabel_coverage,
    crop_soft_labels,
    finalize_packed_store,
    open_relabel_store,
    pack_relabel_store,
    read_relabel_file,
    relabel_key,
)
from refiner_hf.token_labeling.pack_cli import main as pack_main
from refiner_hf.training.mixing import mix_dense_labels


ROOT = Path(__file__).resolve().parents[1]


def dense_labels(*args, **kwargs) -> torch.Tensor:
    """The tokens' soft labels of a crop (the dense part of `crop_soft_labels`)."""
    return crop_soft_labels(*args, **kwargs).dense


def halves_map(left: int = 3, right: int = 7, size: int = 18) -> RelabelMap:
    """A teacher map whose top class is `left` on the left half of the image and `right` on the right half."""
    scores = torch.zeros(2, size, size)
    scores[0] = 10.0
    indices = torch.zeros(2, size, size, dtype=torch.long)
    indices[0, :, : size // 2] = left
    indices[0, :, size // 2 :] = right
    indices[1] = 1
    return RelabelMap(scores=scores, indices=indices)


def test_relabel_keys_from_file_names():
    assert relabel_key("n01440764_10026.JPEG") == "n01440764/n01440764_10026"
    assert relabel_key("n01440764/n01440764_10026.JPEG") == "n01440764/n01440764_10026"
    assert relabel_key("train/n01440764/n01440764_10026.JPEG") == "n01440764/n01440764_10026"


def test_crop_of_the_right_half_labels_every_token_with_the_right_class():
    labels = dense_labels(halves_map(), (0, 300, 600, 300), (600, 600), output_size=14, num_classes=10)
    assert labels.shape == (10, 14, 14)
    assert torch.all(labels.argmax(0) == 7)
    left = dense_labels(halves_map(), (100, 0, 400, 290), (600, 600), output_size=14, num_classes=10)
    assert torch.all(left.argmax(0) == 3)


def test_flip_mirrors_the_map_and_a_straddling_crop_splits_where_it_should():
    whole = dense_labels(halves_map(), (0, 0, 600, 600), (600, 600), 14, 10)
    flipped = dense_labels(halves_map(), (0, 0, 600, 600), (600, 600), 14, 10, flipped=True)
    torch.testing.assert_close(flipped, whole.flip(-1))
    assert torch.all(whole.argmax(0)[:, :7] == 3) and torch.all(whole.argmax(0)[:, 7:] == 7)
    assert torch.all(flipped.argmax(0)[:, :7] == 7) and torch.all(flipped.argmax(0)[:, 7:] == 3)
    # A crop from x = 200 to 500 of a 600-wide image: the middle (x = 300) is a third of the way in.
    straddling = dense_labels(halves_map(), (0, 200, 600, 300), (600, 600), 12, 10).argmax(0)
    assert torch.all(straddling[:, :4] == 3) and torch.all(straddling[:, 4:] == 7)
    # Non-square images and rectangular crops scale each axis separately.
    wide = dense_labels(halves_map(), (0, 400, 300, 400), (300, 800), 6, 10).argmax(0)
    assert torch.all(wide == 7)


def test_label_values_softmax_and_sum_normalisation():
    scores = torch.tensor([[[4.0]], [[2.0]]])
    indices = torch.tensor([[[1]], [[3]]])
    relabel = RelabelMap(scores=scores, indices=indices)
    labels = dense_labels(relabel, (0, 0, 8, 8), (8, 8), 2, 5)
    expected = torch.tensor([0.0, 4.0, 0.0, 2.0, 0.0]).softmax(0)
    torch.testing.assert_close(labels[:, 1, 1], expected)
    summed = dense_labels(relabel, (0, 0, 8, 8), (8, 8), 2, 5, normalization="sum")
    torch.testing.assert_close(summed[:, 0, 0], torch.tensor([0.0, 4 / 6, 0.0, 2 / 6, 0.0]))
    with pytest.raises(ValueError, match="`normalization` must be"):
        dense_labels(relabel, (0, 0, 8, 8), (8, 8), 2, 5, normalization="max")


def test_mixup_and_cutmix_of_dense_labels():
    dense = torch.arange(2 * 3 * 4 * 4, dtype=torch.float32).reshape(2, 3, 4, 4)
    mixed = mix_dense_labels(dense, 0.7)
    torch.testing.assert_close(mixed, 0.7 * dense + 0.3 * dense.flip(0))
    # CutMix box rows 8..24, columns 0..16 of a 32 px image = token rows 1..3, columns 0..2 of a 4x4 grid.
    cut = mix_dense_labels(dense, 0.5, cutmix_box=(8, 24, 0, 16), image_size=(32, 32))
    inside = torch.zeros(4, 4, dtype=torch.bool)
    inside[1:3, 0:2] = True
    assert torch.equal(cut[..., inside], dense.flip(0)[..., inside])
    assert torch.equal(cut[..., ~inside], dense[..., ~inside])
    with pytest.raises(ValueError, match="image_size"):
        mix_dense_labels(dense, 0.5, cutmix_box=(0, 1, 0, 1))


def write_relabel_dir(root: Path, count: int = 12, dtype=torch.float16) -> dict[str, torch.Tensor]:
    generator = torch.Generator().manual_seed(0)
    written = {}
    for index in range(count):
        wnid = ("n00000001", "n00000002")[index % 2]
        (root / wnid).mkdir(parents=True, exist_ok=True)
        scores = (torch.randn(5, 6, 6, generator=generator) * 4).to(dtype)
        indices = torch.randint(0, 10, (5, 6, 6), generator=generator).to(dtype)
        tensor = torch.stack([scores, indices])
        torch.save(tensor, root / wnid / f"{wnid}_{index}.pt")
        written[f"{wnid}/{wnid}_{index}"] = tensor
    return written


class RunsCode:
    def __init__(self, marker: str) -> None:
        self.marker = marker

    def __reduce__(self):
        return (os.mkdir, (self.marker,))


def add_bad_files(root: Path) -> dict[str, str]:
    bad = root / "n00000003"
    bad.mkdir()
    torch.save(torch.zeros(3, 5, 6, 6), bad / "n00000003_shape.pt")
    nan = torch.zeros(2, 5, 6, 6)
    nan[0, 0, 0, 0] = float("nan")
    torch.save(nan, bad / "n00000003_nan.pt")
    out_of_range = torch.zeros(2, 5, 6, 6)
    out_of_range[1, 2, 3, 4] = 10
    torch.save(out_of_range, bad / "n00000003_range.pt")
    (bad / "n00000003_truncated.pt").write_bytes(b"PK\x03\x04 not a whole file")
    torch.save(RunsCode(str(root / "pwned")), bad / "n00000003_hostile.pt")
    return {
        "n00000003_shape.pt": "expected shape",
        "n00000003_nan.pt": "NaN or infinite",
        "n00000003_range.pt": r"class indices range over \[0, 10\], expected \[0, 10\)",
        "n00000003_truncated.pt": "cannot be read",
        "n00000003_hostile.pt": "cannot be read",
    }


@pytest.mark.parametrize("dtype", [torch.float16, torch.float32])
def test_packed_store_round_trip_equals_per_file_reading(tmp_path, dtype):
    written = write_relabel_dir(tmp_path / "relabel", dtype=dtype)
    report = pack_relabel_store(tmp_path / "relabel", tmp_path / "packed", num_classes=10, shard_size=5)
    assert report.packed == 12 and report.bad == []
    packed = open_relabel_store(tmp_path / "packed", num_classes=10)
    per_file = open_relabel_store(tmp_path / "relabel", num_classes=10)
    assert isinstance(packed, PackedRelabelStore) and isinstance(per_file, PerFileRelabelStore)
    assert sorted(packed.keys()) == sorted(written) == sorted(per_file.keys())
    assert packed.map_shape == per_file.map_shape == (5, 6, 6)
    for key, tensor in written.items():
        a, b = packed[key], per_file[key]
        assert torch.equal(a.scores, b.scores) and torch.equal(a.indices, b.indices)
        assert torch.equal(a.scores, tensor[0].float()) and torch.equal(a.indices, tensor[1].long())
    shard_dtype = np.load(tmp_path / "packed" / "shard-00000.scores.npy", mmap_mode="r").dtype
    assert shard_dtype == (np.float16 if dtype == torch.float16 else np.float32)
    with pytest.raises(KeyError, match="n09999999/x"):
        packed["n09999999/x"]
    with pytest.raises(RelabelError, match="index 10 classes but the model has 1000"):
        open_relabel_store(tmp_path / "packed", num_classes=1000)


def test_bad_relabel_files_are_reported_by_name_and_never_executed(tmp_path):
    root = tmp_path / "relabel"
    write_relabel_dir(root)
    expected = add_bad_files(root)
    report = pack_relabel_store(root, tmp_path / "packed", num_classes=10, allow_bad=True)
    assert report.packed == 12 and len(report.bad) == len(expected)
    for name, message in expected.items():
        [problem] = [p for p in report.bad if name in p]
        assert re.search(message, problem), problem
    assert not (root / "pwned").exists()
    with pytest.raises(RelabelError, match="n00000003_nan.pt: scores contain NaN"):
        read_relabel_file(root / "n00000003" / "n00000003_nan.pt")


def test_pack_command_exit_codes(tmp_path, capsys):
    root = tmp_path / "relabel"
    write_relabel_dir(root)
    add_bad_files(root)
    assert pack_main([str(root), str(tmp_path / "strict"), "--num-classes", "10"]) == 1  # a data error
    err = capsys.readouterr().err
    assert "5 bad relabel file(s):" in err and "n00000003_range.pt" in err
    assert "refiner-vit-pack-relabel: error: 5 of 17 relabel files" in err and "give --allow-bad" in err
    assert not (tmp_path / "strict").exists() and sorted(os.listdir(tmp_path)) == ["relabel"]  # nothing written
    assert pack_main([str(root), str(tmp_path / "lenient"), "--num-classes", "10", "--allow-bad"]) == 0
    assert len(PackedRelabelStore(tmp_path / "lenient")) == 12
    assert pack_main([str(tmp_path / "absent"), str(tmp_path / "x")]) == 1
    assert "Relabel directory not found" in capsys.readouterr().err
    script = subprocess.run(
        [sys.executable, str(ROOT / "examples" / "pack_relabel.py"), "--help"], capture_output=True, text=True
    )
    assert script.returncode == 0 and "relabel_root" in script.stdout


def test_missing_relabel_entries_are_named_before_training(tmp_path):
    written = write_relabel_dir(tmp_path / "relabel", count=4)
    pack_relabel_store(tmp_path / "relabel", tmp_path / "packed", num_classes=10)
    store = PackedRelabelStore(tmp_path / "packed")
    keys = list(written) + [f"n00000009/n00000009_{i}" for i in range(7)]
    with pytest.raises(
        RelabelError, match=r"7 of 11 training images have no relabel map \(e\.g\. n00000009/n00000009_0"
    ):
        check_relabel_coverage(store, keys)
    check_relabel_coverage(store, list(written))


def test_writer_resumes_after_an_interruption(tmp_path):
    maps = {f"n0000000{i % 2}/img_{i}": (torch.randn(2, 3, 3), torch.randint(0, 9, (2, 3, 3))) for i in range(8)}
    keys = list(maps)
    first = PackedRelabelWriter(tmp_path / "store", shard_size=3, shard_prefix="rank0")
    for key in keys[:7]:
        first.add(key, *maps[key])
    # Interrupted here: the 7th map was only buffered, and a shard was half written.
    (tmp_path / "store" / "rank0-00002.scores.npy").write_bytes(b"partial")
    resumed = PackedRelabelWriter(tmp_path / "store", shard_size=3, shard_prefix="rank0")
    done = resumed.completed_keys()
    assert done == set(keys[:6])
    for key in keys:
        if key not in done:
            resumed.add(key, *maps[key])
    resumed.flush()
    other = PackedRelabelWriter(tmp_path / "store", shard_size=3, shard_prefix="rank1")
    other.add("n00000009/img_9", torch.zeros(2, 3, 3), torch.zeros(2, 3, 3, dtype=torch.long))
    other.flush()
    assert finalize_packed_store(tmp_path / "store", num_classes=10) == 9
    store = PackedRelabelStore(tmp_path / "store")
    for key, (scores, indices) in maps.items():
        assert torch.equal(store[key].scores, scores) and torch.equal(store[key].indices, indices)
    assert torch.equal(store["n00000009/img_9"].scores, torch.zeros(2, 3, 3))


def packed_store(tmp_path: Path, name: str = "packed") -> Path:
    write_relabel_dir(tmp_path / "relabel")
    pack_relabel_store(tmp_path / "relabel", tmp_path / name, num_classes=10, shard_size=5)
    return tmp_path / name


def edit_meta(store: Path, **fields) -> None:
    meta = json.loads((store / "relabel_meta.json").read_text())
    meta.update(fields)
    (store / "relabel_meta.json").write_text(json.dumps(meta))


def shard_keys(store: Path, name: str) -> list[str]:
    """The keys of a shard, in row order (each line of its key file is the key, a tab and its checksum)."""
    return [line.split("\t")[0] for line in (store / f"{name}.keys.txt").read_text().splitlines()]


def rewrite_shard(store: Path, name: str, part: str, edit) -> None:
    path = store / f"{name}.{part}.npy"
    array = np.load(path)
    np.save(path, edit(array))


STORE_DAMAGE = {
    "duplicate key": (
        lambda store: (store / "shard-00001.keys.txt").write_text(
            (store / "shard-00000.keys.txt").read_text().splitlines()[0]
            + "\n"
            + "\n".join((store / "shard-00001.keys.txt").read_text().splitlines()[1:])
            + "\n"
        ),
        r"key 'n00000001/n00000001_0' is stored twice \(shards shard-00000 and shard-00001\)",
    ),
    "shard outside": (lambda store: edit_meta(store, shards=["../elsewhere"]), r"`shards` must list shard names"),
    "complex scores": (
        lambda store: rewrite_shard(store, "shard-00000", "scores", lambda a: a.astype(np.complex64)),
        r"shard-00000.scores.npy: scores must be real floats, found complex64",
    ),
    "float indices": (
        lambda store: rewrite_shard(store, "shard-00000", "indices", lambda a: a.astype(np.float32) + 0.5),
        r"shard-00000.indices.npy: class indices must be integers, found float32",
    ),
    "shape against metadata": (
        lambda store: edit_meta(store, map_shape=[5, 7, 7]),
        r"shard-00000.scores.npy: shape \(5, 5, 6, 6\), but the store describes maps of \(k, h, w\) = \(5, 7, 7\)",
    ),
    "fewer keys": (
        lambda store: (store / "shard-00000.keys.txt").write_text("n00000001/a\t0123456789abcdef\n"),
        r"the shard lists 1 keys",
    ),
    "bad metadata": (lambda store: edit_meta(store, num_classes="ten"), r"`num_classes` must be a positive integer"),
}


@pytest.mark.parametrize("damage", list(STORE_DAMAGE))
def test_a_damaged_packed_store_is_refused_when_opened(tmp_path, damage):
    store = packed_store(tmp_path)
    edit, message = STORE_DAMAGE[damage]
    edit(store)
    with pytest.raises(RelabelError, match=message):
        PackedRelabelStore(store)


def test_bad_values_are_named_by_key_when_read_and_by_the_full_check(tmp_path):
    store = packed_store(tmp_path)
    keys = shard_keys(store, "shard-00001")

    def poison(array):
        array = array.copy()
        array[2, 0, 1, 1] = np.nan
        return array

    original = np.load(store / "shard-00001.scores.npy")
    rewrite_shard(store, "shard-00001", "scores", poison)
    opened = PackedRelabelStore(store)  # the cheap checks pass: no value is read
    with pytest.raises(RelabelError, match=rf"map '{keys[2]}': scores contain NaN"):
        opened[keys[2]]
    assert torch.isfinite(opened[keys[1]].scores).all()
    with pytest.raises(RelabelError, match=rf"map '{keys[2]}': scores contain NaN"):
        PackedRelabelStore(store, full_check=True)

    rewrite_shard(store, "shard-00001", "scores", lambda a: original)
    rewrite_shard(store, "shard-00002", "indices", lambda a: np.where(a == a.max(), 10, a))
    last = shard_keys(store, "shard-00002")
    with pytest.raises(RelabelError, match=rf"map '{last[0]}': class indices range over \[0, 10\], expected \[0, 10\)"):
        PackedRelabelStore(store, full_check=True)


def test_the_writer_refuses_bad_maps_and_finalize_checks_everything(tmp_path):
    writer = PackedRelabelWriter(tmp_path / "store", shard_size=4)
    writer.add("n0/a", torch.randn(2, 3, 3), torch.randint(0, 9, (2, 3, 3)))
    nan = torch.randn(2, 3, 3)
    nan[0, 0, 0] = float("nan")
    with pytest.raises(RelabelError, match="n0/b: scores contain NaN"):
        writer.add("n0/b", nan, torch.zeros(2, 3, 3, dtype=torch.long))
    with pytest.raises(RelabelError, match=r"n0/c: map shape \(2, 4, 4\), the others have \(2, 3, 3\)"):
        writer.add("n0/c", torch.randn(2, 4, 4), torch.zeros(2, 4, 4, dtype=torch.long))
    writer.add("n0/d", torch.randn(2, 3, 3), torch.full((2, 3, 3), 12))
    writer.flush()
    with pytest.raises(RelabelError, match=r"map 'n0/d': class indices range over \[12, 12\], expected \[0, 10\)"):
        finalize_packed_store(tmp_path / "store", num_classes=10)
    assert not (tmp_path / "store" / "relabel_meta.json").exists()
    assert finalize_packed_store(tmp_path / "store", num_classes=13) == 2


def test_the_packer_reads_only_regular_files_inside_the_tree(tmp_path):
    root = tmp_path / "relabel"
    write_relabel_dir(root)
    os.mkfifo(root / "n00000001" / "n00000001_fifo.pt")  # reading it would block forever
    outside = tmp_path / "elsewhere.pt"
    torch.save(torch.zeros(2, 5, 6, 6), outside)
    (root / "n00000002" / "n00000002_link.pt").symlink_to(outside)
    report = pack_relabel_store(root, tmp_path / "packed", num_classes=10, allow_bad=True)
    assert report.packed == 12 and len(report.bad) == 2
    assert any("n00000001_fifo.pt: a FIFO, not a regular file" in problem for problem in report.bad)
    assert any(re.search(r"n00000002_link.pt: a symbolic link to .*elsewhere.pt, outside", p) for p in report.bad)
    store = PerFileRelabelStore(root)
    assert "n00000001/n00000001_fifo" not in store
    with pytest.raises(RelabelError, match="outside the relabel directory"):
        store["n00000002/n00000002_link"]
