"""
Relabel maps that can be trusted: a packed store binds every map to its key (a key list out of step with its maps is
an error naming the key), a map of an odd shape is the odd one (never the reference), and the relabel tools answer
bad input, occupied outputs and interruptions with one line, the policy's exit status and nothing half-written.
"""

import json
import os
import subprocess
import sys
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch

from refiner_hf.cli import run_command
from refiner_hf.interruption import Terminated
from refiner_hf.token_labeling import (
    PackedRelabelStore,
    PackedRelabelWriter,
    PerFileRelabelStore,
    RelabelError,
    finalize_packed_store,
    open_relabel_store,
    pack_relabel_store,
)
from refiner_hf.token_labeling import store as store_module
from refiner_hf.token_labeling.pack_cli import PROG
from refiner_hf.token_labeling.pack_cli import main as pack_main
from refiner_hf.token_labeling.teacher import UnsupportedTeacherError, top_k_maps


ROOT = Path(__file__).resolve().parents[1]
SHAPE = (3, 4, 4)


def save_map(path: Path, shape=SHAPE, seed: int = 0, **tensor_options) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    scores = torch.randn(*shape, generator=generator)
    indices = torch.randint(0, 10, shape, generator=generator).float()
    tensor = torch.stack([scores, indices]).to(**tensor_options) if tensor_options else torch.stack([scores, indices])
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save(tensor, path)
    return tensor


def relabel_tree(root: Path, count: int = 8, odd: dict[int, tuple[int, int, int]] | None = None) -> list[str]:
    """`count` maps `n0000000{i % 2}/img_{i}.pt`; those numbered in `odd` have the shape given there."""
    keys = []
    for index in range(count):
        key = f"n0000000{index % 2}/img_{index:02d}"
        save_map(root / f"{key}.pt", (odd or {}).get(index, SHAPE), seed=index)
        keys.append(key)
    return keys


def shard_lines(store: Path, name: str) -> list[str]:
    return (store / f"{name}.keys.txt").read_text().splitlines()


def packed(tmp_path: Path, count: int = 8, shard_size: int = 3) -> tuple[Path, list[str]]:
    keys = relabel_tree(tmp_path / "relabel", count)
    pack_relabel_store(tmp_path / "relabel", tmp_path / "packed", num_classes=10, shard_size=shard_size)
    return tmp_path / "packed", keys


def run_pack(argv, capsys) -> tuple[int, list[str]]:
    """The pack command in this process: its exit status and its `PROG: error:` lines (and no traceback)."""
    status = pack_main([str(a) for a in argv])
    err = capsys.readouterr().err
    assert "Traceback" not in err
    return status, [line for line in err.splitlines() if line.startswith(f"{PROG}: ")]


def only_these(directory: Path) -> list[str]:
    return sorted(path.name for path in directory.iterdir())


# 1. A map belongs to its key.


def test_swapped_keys_of_a_packed_store_are_named_on_read_and_by_the_full_check(tmp_path):
    store, keys = packed(tmp_path)
    lines = shard_lines(store, "shard-00000")
    first, second = (line.split("\t")[0] for line in lines[:2])
    # Two entries of the key index exchanged (each with its checksum): the rows keep their maps.
    (store / "shard-00000.keys.txt").write_text("\n".join([lines[1], lines[0], *lines[2:]]) + "\n")
    opened = PackedRelabelStore(store)  # opening reads no map
    for key in (first, second):
        with pytest.raises(RelabelError, match=rf"{store}: map '{key}' fails its checksum") as error:
            opened[key]
        assert "pack or relabel the store again" in str(error.value) and "\n" not in str(error.value)
    untouched = shard_lines(store, "shard-00000")[2].split("\t")[0]
    assert torch.isfinite(opened[untouched].scores).all()
    with pytest.raises(RelabelError, match=rf"map '{second}' fails its checksum"):  # the first row read
        open_relabel_store(store, num_classes=10, full_check=True)


def test_keys_swapped_without_their_checksums_or_across_shards_are_caught(tmp_path):
    store, _ = packed(tmp_path)
    a, b = shard_lines(store, "shard-00000")[0], shard_lines(store, "shard-00001")[0]
    key_a, sum_a = a.split("\t")
    key_b, sum_b = b.split("\t")
    rest_a, rest_b = shard_lines(store, "shard-00000")[1:], shard_lines(store, "shard-00001")[1:]
    # The keys of two shards' first rows exchanged, the checksums left in place.
    (store / "shard-00000.keys.txt").write_text("\n".join([f"{key_b}\t{sum_a}", *rest_a]) + "\n")
    (store / "shard-00001.keys.txt").write_text("\n".join([f"{key_a}\t{sum_b}", *rest_b]) + "\n")
    opened = PackedRelabelStore(store)
    for key in (key_a, key_b):
        with pytest.raises(RelabelError, match=rf"map '{key}' fails its checksum"):
            opened[key]


def test_rows_of_a_shard_reordered_are_caught_too(tmp_path):
    store, _ = packed(tmp_path)
    scores = np.load(store / "shard-00001.scores.npy")
    np.save(store / "shard-00001.scores.npy", scores[::-1].copy())  # values still finite and in range
    first = shard_lines(store, "shard-00001")[0].split("\t")[0]
    with pytest.raises(RelabelError, match=rf"map '{first}' fails its checksum"):
        PackedRelabelStore(store)[first]


def test_the_teacher_writer_binds_its_maps_and_finalize_refuses_a_swapped_store(tmp_path):
    writer = PackedRelabelWriter(tmp_path / "store", shard_size=4, shard_prefix="rank0")
    for index in range(6):
        writer.add(f"n0/img_{index}", torch.randn(2, 3, 3), torch.randint(0, 9, (2, 3, 3)))
    writer.flush()
    lines = shard_lines(tmp_path / "store", "rank0-00000")
    assert all(len(line.split("\t")[1]) == 16 for line in lines)
    (tmp_path / "store" / "rank0-00000.keys.txt").write_text("\n".join([lines[2], *lines[:2], lines[3]]) + "\n")
    with pytest.raises(RelabelError, match=r"map 'n0/img_2' fails its checksum"):
        finalize_packed_store(tmp_path / "store", num_classes=10)
    assert not (tmp_path / "store" / "relabel_meta.json").exists()  # not described: it would not open
    with pytest.raises(RelabelError, match=r"a relabel key must be a non-empty string without tabs"):
        writer.add("n0/with\ttab", torch.randn(2, 3, 3), torch.zeros(2, 3, 3, dtype=torch.long))


def test_a_version_1_store_is_read_with_one_warning_and_a_future_one_is_refused(tmp_path):
    store, keys = packed(tmp_path)
    for keys_file in store.glob("*.keys.txt"):  # as version 1 wrote it: keys alone
        keys_file.write_text("".join(line.split("\t")[0] + "\n" for line in keys_file.read_text().splitlines()))
    meta = json.loads((store / "relabel_meta.json").read_text())
    (store / "relabel_meta.json").write_text(json.dumps({**meta, "version": 1}))
    with pytest.warns(UserWarning, match=r"version 1, whose maps are not bound to their keys") as caught:
        opened = open_relabel_store(store, num_classes=10, full_check=True)
    assert len(caught) == 1 and "refiner-vit-pack-relabel" in str(caught[0].message)
    assert sorted(opened.keys()) == sorted(keys) and opened.map_shape == SHAPE
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        open_relabel_store(store, warn_unverified=False)  # a DataLoader worker reopening it stays quiet
    (store / "relabel_meta.json").write_text(json.dumps({**meta, "version": 3}))
    with pytest.raises(RelabelError, match=r"unsupported store format \('refiner-relabel-packed', 3\).*pack it again"):
        PackedRelabelStore(store)


def test_finalize_refuses_shards_written_without_checksums(tmp_path):
    writer = PackedRelabelWriter(tmp_path / "store", shard_size=2)
    for index in range(2):
        writer.add(f"n0/img_{index}", torch.randn(2, 3, 3), torch.randint(0, 9, (2, 3, 3)))
    writer.flush()
    keys_file = tmp_path / "store" / "shard-00000.keys.txt"
    keys_file.write_text("n0/img_0\nn0/img_1\n")  # an interrupted run of the older version
    with pytest.raises(RelabelError, match=r"shard shard-00000 was written by an older version.*shard-00000\.\*"):
        finalize_packed_store(tmp_path / "store", num_classes=10)


# 2. The odd map is the odd one.


def test_the_per_file_store_names_the_odd_file_not_a_good_one(tmp_path):
    keys = relabel_tree(tmp_path / "relabel", count=8, odd={0: (3, 5, 5)})  # the first file (sorted) is the odd one
    store = PerFileRelabelStore(tmp_path / "relabel")
    with pytest.raises(RelabelError, match=r"img_00\.pt: map shape \(k, h, w\) = \(3, 5, 5\), but most files have"):
        store[keys[0]]  # read first, it is still not the reference
    assert store.map_shape == SHAPE and all(store[key].scores.shape == SHAPE for key in keys[1:])


def test_a_per_file_store_without_a_majority_shape_is_refused(tmp_path):
    relabel_tree(tmp_path / "relabel", count=4, odd={0: (3, 5, 5), 1: (3, 5, 5)})
    with pytest.raises(RelabelError, match=r"disagree on their shape \(k, h, w\): \(\d, \d, \d\) in 2 files"):
        PerFileRelabelStore(tmp_path / "relabel").map_shape


def test_the_packer_keeps_the_majority_shape_and_lists_the_odd_file(tmp_path, capsys):
    keys = relabel_tree(tmp_path / "relabel", count=8, odd={0: (3, 5, 5)})
    odd_file = tmp_path / "relabel" / f"{keys[0]}.pt"
    status, errors = run_pack([tmp_path / "relabel", tmp_path / "strict", "--num-classes", 10], capsys)
    assert status == 1 and len(errors) == 1
    assert (
        f"1 of 8 relabel files in {tmp_path / 'relabel'} cannot be packed (the first: {odd_file}: map shape"
        in (errors[0])
    )
    assert "nothing was written" in errors[0] and not (tmp_path / "strict").exists()
    status = pack_main([str(tmp_path / "relabel"), str(tmp_path / "packed"), "--num-classes", "10", "--allow-bad"])
    captured = capsys.readouterr()
    assert status == 0 and "1 bad relabel file(s):" in captured.err
    assert f"  {odd_file}: map shape (k, h, w) = (3, 5, 5), but most files (7 of 8) have {SHAPE}." in captured.err
    store = PackedRelabelStore(tmp_path / "packed", full_check=True)
    assert len(store) == 7 and store.map_shape == SHAPE and keys[0] not in store
    assert "Packed 7 relabel maps" in captured.out


@pytest.mark.parametrize("allow_bad", [False, True])
def test_the_packer_writes_no_store_from_a_minority_shape(tmp_path, capsys, allow_bad):
    relabel_tree(tmp_path / "relabel", count=4, odd={0: (3, 5, 5), 2: (2, 4, 4)})  # 2 of 4 share a shape: no majority
    argv = [tmp_path / "relabel", tmp_path / "packed", "--num-classes", 10, "--num-workers", 1]
    status, errors = run_pack(argv + (["--allow-bad"] if allow_bad else []), capsys)
    assert status == 1 and len(errors) == 1
    assert "disagree on their shape (k, h, w): (3, 4, 4) in 2 files, " in errors[0]
    assert "no shape is shared by more than half" in errors[0]
    assert only_these(tmp_path) == ["relabel"]  # no store, no staging directory


# 3. One line, the policy's exit status, nothing half-written.


def test_pack_usage_errors_exit_2_with_one_line(tmp_path, capsys):
    relabel_tree(tmp_path / "relabel", count=2)
    (tmp_path / "file").write_text("mine")
    cases = [
        ([], "the following arguments are required: relabel_root, output"),
        ([tmp_path / "relabel", tmp_path / "out", "--num-classes", 0], "--num-classes must be at least 1, got 0."),
        ([tmp_path / "relabel", tmp_path / "out", "--num-classes", "ten"], "argument --num-classes: invalid int"),
        ([tmp_path / "relabel", tmp_path / "out", "--shard-size", -1], "--shard-size must be at least 1, got -1."),
        ([tmp_path / "relabel", tmp_path / "out", "--num-worker", 2], "unknown argument --num-worker"),
        ([tmp_path / "relabel", tmp_path / "file"], f"OUT {tmp_path / 'file'}: a file is there"),
        (
            [tmp_path / "relabel", tmp_path / "file" / "out"],
            f"OUT {tmp_path / 'file' / 'out'}: {tmp_path / 'file'} is a file",
        ),
        ([tmp_path / "relabel", tmp_path / "relabel" / "out"], "lies inside RELABEL_ROOT"),
    ]
    for argv, message in cases:
        status, errors = run_pack(argv, capsys)
        assert status == 2 and len(errors) == 1 and errors[0].startswith(f"{PROG}: error: "), (argv, errors)
        assert message in errors[0], (argv, errors)
    assert only_these(tmp_path) == ["file", "relabel"] and (tmp_path / "file").read_text() == "mine"


def test_pack_data_errors_exit_1_naming_the_root(tmp_path, capsys):
    (tmp_path / "empty").mkdir()
    (tmp_path / "a_file").write_text("x")
    os.mkfifo(tmp_path / "fifo")
    cases = [
        (tmp_path / "absent", f"Relabel directory not found: {tmp_path / 'absent'}"),
        (tmp_path / "empty", f"{tmp_path / 'empty'}: no relabel files (<wnid>/<stem>.pt) found"),
        (tmp_path / "a_file", f"{tmp_path / 'a_file'}: a file, not a directory"),
        (tmp_path / "fifo", f"{tmp_path / 'fifo'}: a FIFO, not a directory"),
        (Path("/dev/null"), "/dev/null: a device, not a directory"),
    ]
    for root, message in cases:
        status, errors = run_pack([root, tmp_path / "out"], capsys)
        assert status == 1 and len(errors) == 1 and errors[0].startswith(f"{PROG}: error: {message}"), errors
    assert not (tmp_path / "out").exists()


def test_bad_files_are_named_as_what_they_are_and_nothing_is_written_without_allow_bad(tmp_path, capsys):
    root = tmp_path / "relabel"
    relabel_tree(root, count=6)
    bad = root / "n00000009"
    bad.mkdir()
    save_map(bad / "truncated.pt")
    (bad / "truncated.pt").write_bytes((bad / "truncated.pt").read_bytes()[:100])
    save_map(bad / "complex.pt", dtype=torch.complex64)
    torch.save(torch.zeros(2, *SHAPE, dtype=torch.bool), bad / "bool.pt")
    torch.save(torch.zeros(2, *SHAPE).to_sparse(), bad / "sparse.pt")
    torch.save({"scores": torch.zeros(SHAPE)}, bad / "dict.pt")
    (bad / "folder.pt").mkdir()
    os.mkfifo(bad / "fifo.pt")
    save_map(root / "n00000000" / "grad.pt", seed=9)
    torch.save(torch.load(root / "n00000000" / "grad.pt").requires_grad_(True), root / "n00000000" / "grad.pt")
    expected = {
        "truncated.pt": "cannot be read as a relabel tensor",
        "complex.pt": "expected a real tensor, found torch.complex64",
        "bool.pt": "expected a real tensor, found torch.bool",
        "sparse.pt": "expected a dense tensor, found a torch.sparse_coo one",
        "dict.pt": "expected a tensor, found dict",
        "folder.pt": "a directory, not a regular file",
        "fifo.pt": "a FIFO, not a regular file",
    }
    status = pack_main([str(root), str(tmp_path / "out"), "--num-classes", "10"])
    err = capsys.readouterr().err
    listed = [line.strip() for line in err.splitlines() if line.startswith("  ")]
    errors = [line for line in err.splitlines() if line.startswith(f"{PROG}: error: ")]
    assert status == 1 and len(errors) == 1 and len(listed) == len(expected) and "Traceback" not in err
    assert f"{PROG}: error: 7 of 14 relabel files in {root} cannot be packed" in errors[0]
    for name, message in expected.items():
        assert any(line.startswith(f"{bad / name}: {message}") for line in listed), (name, listed)
    assert not (tmp_path / "out").exists() and only_these(tmp_path) == ["relabel"]
    assert pack_main([str(root), str(tmp_path / "out"), "--num-classes", "10", "--allow-bad"]) == 0
    assert len(PackedRelabelStore(tmp_path / "out")) == 7  # the map saved with requires_grad is packed


def test_an_occupied_output_is_refused_and_a_store_replaced_only_with_overwrite(tmp_path, capsys):
    relabel_tree(tmp_path / "relabel", count=4)
    others = tmp_path / "others"
    others.mkdir()
    (others / "notes.txt").write_text("mine")
    status, errors = run_pack([tmp_path / "relabel", others, "--overwrite"], capsys)
    assert status == 1 and "holds files that are not part of a relabel store (e.g. notes.txt)" in errors[0]
    assert only_these(others) == ["notes.txt"] and (others / "notes.txt").read_text() == "mine"

    store = tmp_path / "store"
    assert pack_main([str(tmp_path / "relabel"), str(store), "--num-classes", "10"]) == 0
    before = {path.name: path.read_bytes() for path in store.iterdir()}
    relabel_tree(tmp_path / "relabel", count=6)
    status, errors = run_pack([tmp_path / "relabel", store, "--num-classes", 10], capsys)
    assert status == 1 and len(errors) == 1 and "already holds a packed relabel store; give --overwrite" in errors[0]
    assert {path.name: path.read_bytes() for path in store.iterdir()} == before
    assert pack_main([str(tmp_path / "relabel"), str(store), "--num-classes", "10", "--overwrite"]) == 0
    assert len(PackedRelabelStore(store)) == 6 and only_these(tmp_path) == ["others", "relabel", "store"]

    unfinished = tmp_path / "unfinished"
    writer = PackedRelabelWriter(unfinished, shard_size=1, shard_prefix="rank0")
    writer.add("n0/a", torch.randn(*SHAPE), torch.zeros(SHAPE, dtype=torch.long))
    status, errors = run_pack([tmp_path / "relabel", unfinished, "--overwrite"], capsys)
    assert status == 1 and "holds an unfinished relabel store" in errors[0]
    assert only_these(unfinished) == ["rank0-00000.indices.npy", "rank0-00000.keys.txt", "rank0-00000.scores.npy"]

    (tmp_path / "empty").mkdir()
    assert pack_main([str(tmp_path / "relabel"), str(tmp_path / "empty"), "--num-classes", "10"]) == 0
    assert len(PackedRelabelStore(tmp_path / "empty")) == 6


@pytest.mark.parametrize("stop, status, said", [(KeyboardInterrupt, 130, "an interrupt"), (Terminated, 143, "SIGTERM")])
def test_an_interrupted_pack_leaves_nothing_behind(tmp_path, capsys, monkeypatch, stop, status, said):
    relabel_tree(tmp_path / "relabel", count=8)
    read = store_module._read_for_packing
    calls = []

    def stopping(*args):
        calls.append(args)
        if len(calls) == 6:
            raise stop
        return read(*args)

    monkeypatch.setattr(store_module, "_read_for_packing", stopping)
    code, errors = run_pack([tmp_path / "relabel", tmp_path / "out", "--num-classes", 10, "--shard-size", 2], capsys)
    assert code == status and errors == [f"{PROG}: error: stopped by {said}; nothing half-written was left behind."]
    assert only_these(tmp_path) == ["relabel"]  # neither the output nor the staging directory with its two shards


def test_a_store_missing_a_shard_or_given_as_a_file_is_named(tmp_path):
    store, _ = packed(tmp_path)
    (store / "shard-00001.indices.npy").unlink()
    with pytest.raises(RelabelError, match=r"shard file shard-00001\.indices\.npy is missing"):
        open_relabel_store(store)
    (store / "shard-00000.scores.npy").write_bytes(b"\x93NUMPY truncated")
    (store / "shard-00001.indices.npy").write_bytes(b"")
    with pytest.raises(RelabelError, match=r"shard shard-00000 cannot be read \(") as error:
        PackedRelabelStore(store)
    assert "\n" not in str(error.value)
    with pytest.raises(RelabelError, match=r"a file; give the directory of a packed relabel store"):
        PackedRelabelStore(store / "relabel_meta.json")


def test_teacher_problems_are_errors_of_the_policy():
    assert issubclass(UnsupportedTeacherError, ValueError) and UnsupportedTeacherError.exit_status == 1
    with pytest.raises(ValueError, match=r"--top_k 4: cannot keep the top 4 of the teacher's 3 classes") as error:
        top_k_maps(torch.zeros(1, 3, 2, 2), 4)
    assert error.value.exit_status == 2


def test_the_example_script_follows_the_policy(tmp_path):
    os.mkfifo(tmp_path / "fifo")
    result = subprocess.run(
        [sys.executable, str(ROOT / "examples" / "pack_relabel.py"), str(tmp_path / "fifo"), str(tmp_path / "out")],
        capture_output=True,
        text=True,
        timeout=120,
        env={**os.environ, "PYTHONPATH": str(ROOT)},
    )
    assert result.returncode == 1 and result.stderr.splitlines() == [
        f"{PROG}: error: {tmp_path / 'fifo'}: a FIFO, not a directory; give the relabel directory (<wnid>/<stem>.pt "
        "files) or a packed store."
    ]
    assert only_these(tmp_path) == ["fifo"]


# The teacher relabeling's output: continued only with the same settings, never mixed with another store or files.


def generate_status(argv: list[str], capsys) -> tuple[int, list[str]]:
    """examples/generate_relabel.py's command line in this process: its exit status and its stderr lines."""
    from helpers import load_script

    script = load_script(ROOT / "examples" / "generate_relabel.py")
    try:
        run_command(lambda: script.main(argv), stopped_hint=script.stopped_hint)
        status = 0
    except SystemExit as exit_info:
        status = exit_info.code
    err = capsys.readouterr().err
    assert "Traceback" not in err
    return status, [line for line in err.splitlines() if ": error: " in line]


def generate_argv(teacher: Path, output: Path, **overrides) -> list[str]:
    values = {"teacher": teacher, "output": output, "max_train_samples": 8, "teacher_image_size": 28,
              "batch_size": 2, "shard_size": 2, "dataloader_num_workers": 0, **overrides}  # fmt: skip
    return [item for key, value in values.items() for item in (f"--{key}", str(value))]


def store_bytes(directory: Path) -> dict[str, bytes]:
    return {path.name: path.read_bytes() for path in directory.iterdir()}


def test_generate_relabel_continues_only_its_own_store(tmp_path, capsys):
    from training_utils import save_tiny_teacher

    teacher = save_tiny_teacher(tmp_path / "teacher")
    output = tmp_path / "store"
    output.mkdir()
    (output / "notes.txt").write_text("mine")
    status, errors = generate_status(generate_argv(teacher, output), capsys)
    assert status == 1 and len(errors) == 1
    assert f"--output {output}: holds files that are not part of a relabel store (e.g. notes.txt)" in errors[0]
    assert only_these(output) == ["notes.txt"]
    (output / "notes.txt").unlink()

    assert generate_status(generate_argv(teacher, output), capsys) == (0, [])
    run = json.loads((output / "relabel_run.json").read_text())
    assert run["top_k"] == 5 and run["teacher_image_size"] == 28 and run["teacher"] == str(teacher.resolve())
    written = store_bytes(output)
    assert generate_status(generate_argv(teacher, output), capsys) == (0, [])  # the same settings: continued
    assert len(PackedRelabelStore(output)) == 8

    status, errors = generate_status(generate_argv(teacher, output, top_k=3), capsys)
    assert status == 1 and len(errors) == 1 and "holds the maps of another relabeling (top_k 5)" in errors[0]
    assert store_bytes(output) == written
    status, errors = generate_status(generate_argv(teacher, output, top_k=11), capsys)
    assert status == 2 and len(errors) == 1, errors
    assert errors[0].endswith(": error: --top_k 11 is more than the teacher's 10 classes."), errors
    assert generate_status(generate_argv(teacher, output, top_k=3, overwrite_output_dir="true"), capsys) == (0, [])
    assert PackedRelabelStore(output).map_shape[0] == 3

    packed_store, _ = packed(tmp_path)  # a store this command did not write
    status, errors = generate_status(generate_argv(teacher, packed_store), capsys)
    assert (
        status == 1 and "holds a relabel store this command did not write (no readable relabel_run.json)" in (errors[0])
    )


def test_an_interrupted_relabeling_leaves_complete_shards_and_continues(tmp_path, capsys, monkeypatch):
    from training_utils import save_tiny_teacher

    from refiner_hf.training import teacher_relabeling

    teacher = save_tiny_teacher(tmp_path / "teacher")
    output = tmp_path / "store"
    top_k_maps_of = teacher_relabeling.top_k_maps
    batches = []

    def stopping(*args):
        batches.append(args)
        if len(batches) == 3:
            raise KeyboardInterrupt
        return top_k_maps_of(*args)

    monkeypatch.setattr(teacher_relabeling, "top_k_maps", stopping)
    status, errors = generate_status(generate_argv(teacher, output), capsys)
    assert status == 130 and len(errors) == 1
    assert errors[0].endswith("run the same command again to continue."), errors
    assert only_these(output) == [
        *(f"rank0-0000{i}.{part}" for i in range(2) for part in ("indices.npy", "keys.txt", "scores.npy")),
        "relabel_run.json",
    ]
    monkeypatch.setattr(teacher_relabeling, "top_k_maps", top_k_maps_of)
    assert generate_status(generate_argv(teacher, output), capsys) == (0, [])
    assert len(PackedRelabelStore(output, full_check=True)) == 8


def test_an_unfinished_teacher_store_is_named_as_such(tmp_path):
    writer = PackedRelabelWriter(tmp_path / "store", shard_size=1, shard_prefix="rank0")
    writer.add("n0/a", torch.randn(*SHAPE), torch.zeros(SHAPE, dtype=torch.long))
    with pytest.raises(RelabelError, match=r"no relabel files .* found\. It holds shards of a packed store but no "):
        open_relabel_store(tmp_path / "store", num_classes=10).map_shape


def test_the_trainers_label_builder_stops_on_a_swapped_key_naming_it(tmp_path):
    from refiner_hf.training.augmentation import CropRecord
    from refiner_hf.training.relabel_targets import DENSE_LABELS, DenseLabelBuilder

    store, _ = packed(tmp_path)
    lines = shard_lines(store, "shard-00000")
    (store / "shard-00000.keys.txt").write_text("\n".join([lines[1], lines[0], *lines[2:]]) + "\n")
    builder = DenseLabelBuilder(store, "image", output_size=4, num_classes=10, normalization="softmax")
    crop = CropRecord(top=0, left=0, height=16, width=16, image_height=16, image_width=16, flipped=False)
    swapped, kept = lines[0].split("\t")[0], lines[2].split("\t")[0]
    assert builder({"image": {"path": f"{kept}.JPEG"}}, crop)[DENSE_LABELS].shape == (10, 4, 4)
    with pytest.raises(RelabelError, match=rf"{store}: map '{swapped}' fails its checksum"):
        builder({"image": {"path": f"{swapped}.JPEG"}}, crop)
