"""
The converter's and the exporter's outputs can be trusted: one writer per output directory, a final move that never
deletes what the command did not write, no check that passes on NaN, no integer-truncated weights, and one-line
refusals of flag values, sizes, damaged weights files and output paths that cannot work, with nothing left behind.
"""

import json
import math
import os
import re
import socket
import struct
import subprocess
import sys
import textwrap
import time
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from helpers import FIXTURES, randomize_, tiny_config
from PIL import Image
from safetensors.torch import save_file

from refiner_hf import CheckpointError, RefinerViTForImageClassification, convert_checkpoint, onnx_export
from refiner_hf import export as export_cli
from refiner_hf.assets import sample_image_path
from refiner_hf.conversion import load_original_weights
from refiner_hf.image_processing_refiner_vit import image_processor_for_config
from refiner_hf.model_directory import ModelDirectoryError, OutputLock, OutputLockedError, save_model_directory
from refiner_hf.onnx_export import MAX_OPSET, check_export_memory, export_memory_estimate, save_onnx_directory


PAPER = FIXTURES / "paper_tiny.pth"
RELEASED = FIXTURES / "released_tiny.pth"
HOST = socket.gethostname()


def convert(*args, capsys) -> tuple[int, str, str]:
    code = convert_checkpoint.main([str(a) for a in args])
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def export(*args, capsys) -> tuple[int, str, str]:
    code = export_cli.main([str(a) for a in args])
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def one_error_line(err: str, prog: str) -> str:
    assert err.count("\n") == 1 and err.startswith(f"{prog}: error: "), err
    return err


def listing(directory: Path) -> list[str]:
    return sorted(path.name for path in directory.iterdir())


def tiny_model_directory(path: Path, nan_at: str | None = None) -> Path:
    """A random tiny model (28 px, patch 4, 4 heads) saved as a model directory, with one NaN in `nan_at`."""
    model = randomize_(RefinerViTForImageClassification(tiny_config(image_size=28, patch_size=4))).eval()
    if nan_at is not None:
        with torch.no_grad():
            model.get_parameter(nan_at)[0, 0] = float("nan")
    return save_model_directory(model, image_processor_for_config(model.config), path)


@pytest.fixture
def live_process():
    """A live process of this host that is not this one (a holder of a lock that is not stale)."""
    process = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(120)"])
    yield process.pid
    process.kill()
    process.wait()


def write_lock(output_dir: Path, host: str, pid: int) -> Path:
    lock = output_dir.parent / f".{output_dir.name}.lock"
    lock.write_text(json.dumps({"host": host, "pid": pid, "started": "2026-01-01 00:00:00"}))
    return lock


# 1. One writer per output directory.

HOLD_SCRIPT = textwrap.dedent(
    """
    import sys, time
    from pathlib import Path
    from refiner_hf import convert_checkpoint

    real = convert_checkpoint.verify_model_directory

    def held(directory, *args, **kwargs):  # the converted directory written, waiting before its check and move
        Path(sys.argv[1]).write_text(str(directory))
        deadline = time.monotonic() + 120
        while not Path(sys.argv[1] + ".go").exists() and time.monotonic() < deadline:
            time.sleep(0.05)
        return real(directory, *args, **kwargs)

    convert_checkpoint.verify_model_directory = held
    sys.exit(convert_checkpoint.main(sys.argv[2:]))
    """
)


def test_a_second_converter_into_the_same_output_is_refused_while_the_first_finishes(tmp_path, capsys):
    work, scripts = tmp_path / "work", tmp_path / "scripts"
    work.mkdir(), scripts.mkdir()
    script, marker = scripts / "hold.py", scripts / "marker"
    script.write_text(HOLD_SCRIPT)
    out = work / "model"
    first = subprocess.Popen(
        [sys.executable, str(script), str(marker), "--checkpoint", str(PAPER), "--output-dir", str(out)],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        deadline = time.monotonic() + 120
        while not marker.exists() and first.poll() is None and time.monotonic() < deadline:
            time.sleep(0.1)
        assert marker.exists(), first.communicate()
        code, stdout, err = convert("--checkpoint", RELEASED, "--output-dir", out, capsys=capsys)
        assert code == 1 and "Loaded" not in stdout  # refused at once, before any work
        assert f"is being written by another command (process {first.pid} on {HOST}, since " in one_error_line(
            err, "refiner-vit-convert"
        )
        (scripts / "marker.go").touch()
        stdout, stderr = first.communicate(timeout=120)
    finally:
        if first.poll() is None:
            first.kill()
            first.wait()
    assert first.returncode == 0, stderr
    assert f"Wrote {out}" in stdout
    assert json.loads((out / "config.json").read_text())["image_size"] == 48  # the first writer's model, whole
    assert listing(work) == ["model"]  # no lock, no staging left


def test_a_live_holder_is_named_and_its_lock_kept_a_dead_or_own_one_is_taken_over(tmp_path, capsys, live_process):
    out = tmp_path / "model"
    for host, pid in ((HOST, live_process), ("gpu-node-7", 4242)):  # another machine's process: cannot tell, refused
        lock = write_lock(out, host, pid)
        code, stdout, err = convert("--checkpoint", PAPER, "--output-dir", out, capsys=capsys)
        assert code == 1 and "Loaded" not in stdout
        assert f"(process {pid} on {host}, since 2026-01-01 00:00:00; lock {lock})" in one_error_line(
            err, "refiner-vit-convert"
        )
        assert listing(tmp_path) == [lock.name] and json.loads(lock.read_text())["pid"] == pid

    process = subprocess.Popen([sys.executable, "-c", "pass"])
    process.wait()
    write_lock(out, HOST, process.pid)  # its process is gone: taken over
    code, stdout, err = convert("--checkpoint", PAPER, "--output-dir", out, capsys=capsys)
    assert code == 0, err
    assert listing(tmp_path) == ["model"]


def test_a_second_export_is_refused_before_loading(tmp_path, capsys, live_process):
    model = tiny_model_directory(tmp_path / "model")
    out = tmp_path / "onnx"
    lock = write_lock(out, HOST, live_process)
    code, stdout, err = export("--model", model, "--output", out, capsys=capsys)
    assert code == 1 and stdout == ""
    assert f"{out} is being written by another command (process {live_process} on {HOST}" in one_error_line(
        err, "refiner-vit-export"
    )
    assert listing(tmp_path) == [lock.name, "model"]


def test_the_lock_is_reentrant_in_one_process_and_cleans_up_the_folders_it_made(tmp_path, live_process):
    out = tmp_path / "new" / "deeper" / "model"
    with OutputLock(out) as lock:
        assert lock.path == tmp_path / "new" / "deeper" / ".model.lock" and lock.path.is_file()
        with OutputLock(out):  # the command holds it while write_directory takes it too
            pass
        assert lock.path.is_file()
    assert listing(tmp_path) == []  # nothing was written: the lock and the folders made for it are gone
    write_lock(tmp_path / "model", HOST, live_process)
    with pytest.raises(OutputLockedError, match=f"process {live_process} on {HOST}"):
        OutputLock(tmp_path / "model").acquire()


# 2. The final move never deletes what the command did not write.


def test_an_output_that_appears_during_a_conversion_is_left_untouched_and_the_result_kept(
    tmp_path, capsys, monkeypatch
):
    out = tmp_path / "model"
    real = convert_checkpoint.verify_model_directory

    def verify_while_the_user_writes(directory, *args, **kwargs):
        check = real(directory, *args, **kwargs)
        out.mkdir()
        (out / "notes.txt").write_text("mine")
        return check

    monkeypatch.setattr(convert_checkpoint, "verify_model_directory", verify_while_the_user_writes)
    code, stdout, err = convert("--checkpoint", PAPER, "--output-dir", out, capsys=capsys)
    assert code == 1 and "Wrote" not in stdout
    assert (
        f"{out} appeared while this command was writing it and was left untouched; the finished model directory was "
        f"kept at {tmp_path / 'model.new'} instead: move it where you want it, or remove it."
    ) in one_error_line(err, "refiner-vit-convert")
    assert listing(out) == ["notes.txt"] and (out / "notes.txt").read_text() == "mine"
    assert listing(tmp_path) == ["model", "model.new"]  # no lock, no hidden staging
    kept = json.loads((tmp_path / "model.new" / "config.json").read_text())
    assert kept["image_size"] == 48 and (tmp_path / "model.new" / "model.safetensors").is_file()


def test_a_previous_directory_that_gets_other_files_during_an_overwrite_is_left_untouched(
    tmp_path, capsys, monkeypatch
):
    out = tmp_path / "model"
    assert convert("--checkpoint", RELEASED, "--output-dir", out, capsys=capsys)[0] == 0
    before = {name: (out / name).read_bytes() for name in listing(out)}
    real = convert_checkpoint.verify_model_directory

    def verify_while_the_user_writes(directory, *args, **kwargs):
        check = real(directory, *args, **kwargs)
        (out / "notes.txt").write_text("mine")
        return check

    monkeypatch.setattr(convert_checkpoint, "verify_model_directory", verify_while_the_user_writes)
    code, _, err = convert("--checkpoint", PAPER, "--output-dir", out, "--overwrite", capsys=capsys)
    assert code == 1
    assert f"{out} got other files (notes.txt) while this command was writing it and was left untouched" in (
        one_error_line(err, "refiner-vit-convert")
    )
    assert {name: (out / name).read_bytes() for name in listing(out) if name != "notes.txt"} == before
    assert (out / "notes.txt").read_text() == "mine"
    assert listing(tmp_path) == ["model", "model.new"]


def test_an_export_directory_that_appears_during_the_export_is_left_untouched(tmp_path, capsys, monkeypatch):
    model = tiny_model_directory(tmp_path / "model")
    out = tmp_path / "onnx"
    real = onnx_export.verify_onnx_directory

    def verify_while_the_user_writes(directory, *args, **kwargs):
        result = real(directory, *args, **kwargs)
        out.mkdir()
        (out / "results.csv").write_text("mine")
        return result

    monkeypatch.setattr(onnx_export, "verify_onnx_directory", verify_while_the_user_writes)
    code, stdout, err = export("--model", model, "--output", out, capsys=capsys)
    assert code == 1 and "Wrote" not in stdout
    assert f"{out} appeared while this command was writing it and was left untouched; the finished ONNX export " in (
        one_error_line(err, "refiner-vit-export")
    )
    assert listing(out) == ["results.csv"] and (out / "results.csv").read_text() == "mine"
    assert listing(tmp_path) == ["model", "onnx", "onnx.new"]
    assert (tmp_path / "onnx.new" / "model.onnx").is_file()


# 3. No check passes on NaN.


def test_a_model_with_nan_weights_is_not_exported(tmp_path, capsys):
    model = tiny_model_directory(tmp_path / "model", nan_at="classifier.weight")
    capsys.readouterr()  # what saving the model printed (a progress bar when run alone) is not the command's
    out = tmp_path / "onnx"
    code, _, err = export("--model", model, "--output", out, capsys=capsys)
    assert code == 1
    line = one_error_line(err, "refiner-vit-export")
    assert "non-finite values (NaN or infinity)" in line and "'classifier.weight' (1 of " in line, line
    assert listing(tmp_path) == ["model"]


def test_the_export_check_fails_on_nan_outputs_even_when_both_sides_are_nan(tmp_path, monkeypatch):
    model = randomize_(RefinerViTForImageClassification(tiny_config(image_size=28, patch_size=4))).eval()
    with torch.no_grad():
        model.classifier.bias[2] = float("nan")
    monkeypatch.setattr(onnx_export, "check_finite_weights", lambda *args, **kwargs: None)  # only the check is left
    image = Image.open(sample_image_path()).convert("RGB")
    with pytest.raises(
        ModelDirectoryError,
        match=r"Non-finite logits \(NaN or infinity\) at batch size 1: the PyTorch model's 1 and ONNX Runtime's 1 of 5",
    ):
        save_onnx_directory(model, image_processor_for_config(model.config), tmp_path / "onnx", image)
    assert listing(tmp_path) == []


class NanSession:
    """An ONNX Runtime session stand-in whose logits have one NaN (an export that went wrong), the model's none."""

    def __init__(self, model: RefinerViTForImageClassification) -> None:
        self.model = model

    def get_inputs(self):
        return [SimpleNamespace(name="pixel_values")]

    def get_outputs(self):
        return [SimpleNamespace(name="logits")]

    def run(self, names, feeds):
        with torch.no_grad():
            logits = self.model(pixel_values=torch.from_numpy(feeds["pixel_values"])).logits.numpy().copy()
        logits[0, 1] = float("nan")
        return [logits]


def test_nan_on_the_onnx_side_alone_fails_the_check():
    model = randomize_(RefinerViTForImageClassification(tiny_config(image_size=28, patch_size=4))).eval()
    pixel_values = torch.randn(1, 3, 28, 28)
    with pytest.raises(
        ModelDirectoryError, match=r"Non-finite logits \(NaN or infinity\) at batch size 1: ONNX Runtime's 1 of 5"
    ):
        onnx_export.compare_outputs(NanSession(model), model, [(pixel_values, pixel_values.numpy())])


# 4. Float weights stored as integers.


def test_float_weights_stored_as_integers_are_refused_naming_them(tmp_path, capsys):
    state_dict = dict(load_original_weights(RELEASED, weights="raw").state_dict)
    state_dict["head.weight"] = (state_dict["head.weight"] * 100).to(torch.int64)
    state_dict["blocks.1.attn.proj.bias"] = state_dict["blocks.1.attn.proj.bias"].to(torch.int32)
    with pytest.raises(
        CheckpointError,
        match=r"float weights stored with a non-float dtype \(their fractional part is lost\): "
        r"'head.weight' \(int64\), 'blocks.1.attn.proj.bias' \(int32\)|'blocks.1.attn.proj.bias' \(int32\), "
        r"'head.weight' \(int64\)",
    ):
        refiner_convert(state_dict)
    checkpoint = tmp_path / "inputs" / "integers.pth"
    checkpoint.parent.mkdir()
    torch.save(state_dict, checkpoint)
    work = tmp_path / "work"
    work.mkdir()
    code, _, err = convert("--checkpoint", checkpoint, "--output-dir", work / "model", capsys=capsys)
    assert code == 1 and "'head.weight' (int64)" in one_error_line(err, "refiner-vit-convert")
    assert listing(work) == []


def refiner_convert(state_dict):
    from refiner_hf import convert_original_checkpoint

    return convert_original_checkpoint(state_dict)


# 5. Flag values that cannot work; 8. output paths that cannot be written.


@pytest.mark.parametrize(
    "flags, message",
    [
        (["--image-size", "0"], "--image-size 0: give a positive number of pixels"),
        (["--image-size", "-28"], "--image-size -28: give a positive number of pixels"),
        (["--opset", "99"], f"--opset 99: the exporter writes opsets 18 to {MAX_OPSET}; choose one of them"),
        (["--opset", "17"], f"--opset 17: the exporter writes opsets 18 to {MAX_OPSET}; choose one of them"),
        (["--output", "{tmp}/file.txt"], "--output {tmp}/file.txt: a file is there; give a directory path."),
        (
            ["--output", "{tmp}/file.txt/onnx"],
            "--output {tmp}/file.txt/onnx: {tmp}/file.txt is a file, so no directory can be created under it.",
        ),
    ],
)
def test_export_flags_that_cannot_work_are_usage_errors(tmp_path, capsys, flags, message):
    model = tiny_model_directory(tmp_path / "model")
    (tmp_path / "file.txt").write_text("a file")
    argv = ["--model", model, "--output", tmp_path / "onnx"] + [flag.format(tmp=tmp_path) for flag in flags]
    code, stdout, err = export(*argv, capsys=capsys)
    assert code == 2 and stdout == ""
    assert message.format(tmp=tmp_path) in one_error_line(err, "refiner-vit-export")
    assert listing(tmp_path) == ["file.txt", "model"] and (tmp_path / "file.txt").read_text() == "a file"


@pytest.mark.parametrize(
    "flags, message",
    [
        (["--image-size", "0"], "--image-size 0: give a positive number"),
        (["--image-size", "-48"], "--image-size -48: give a positive number"),
        (["--crop-pct", "0"], "--crop-pct 0.0: give a positive number"),
        (["--crop-pct", "nan"], "--crop-pct nan: give a positive number"),
        (["--max-tokens", "0"], "--max-tokens 0: give a positive number"),
        (["--layer-norm-eps=-1e-6"], "--layer-norm-eps -1e-06: give a positive number"),
        (["--image-size", "40"], "--image-size 40: not a multiple of the model's patch size 16; choose e.g. 32."),
        (
            ["--image-size", "1600"],
            "--image-size 1600: 10,001 tokens at patch 16, more than --max-tokens 4,097; each attention map of one "
            "image would take 1.1 GiB.",
        ),
        (["--output-dir", "{tmp}/file.txt"], "--output-dir {tmp}/file.txt: a file is there; give a directory path."),
        (["--output-dir", "{tmp}/file.txt/m"], "{tmp}/file.txt is a file, so no directory can be created under it."),
    ],
)
def test_converter_flags_that_cannot_work_are_usage_errors(tmp_path, capsys, flags, message):
    (tmp_path / "file.txt").write_text("a file")
    argv = ["--checkpoint", PAPER, "--output-dir", tmp_path / "model"] + [f.format(tmp=tmp_path) for f in flags]
    code, _, err = convert(*argv, capsys=capsys)
    assert code == 2
    assert message.format(tmp=tmp_path) in one_error_line(err, "refiner-vit-convert")
    assert listing(tmp_path) == ["file.txt"]


# 6. Export sizes that do not fit in memory are refused before anything is allocated.


def test_an_export_too_large_for_the_machine_is_refused_with_the_size_that_fits(tmp_path, capsys, monkeypatch):
    model = tiny_model_directory(tmp_path / "model")
    config = RefinerViTForImageClassification.config_class.from_pretrained(model)
    memory = 16 * 2**30
    monkeypatch.setattr(onnx_export, "machine_memory", lambda: memory)
    for size in (384, 2048):
        code, stdout, err = export("--model", model, "--output", tmp_path / "onnx", "--image-size", size, capsys=capsys)
        assert code == 2 and stdout == ""  # before the model was loaded
        line = one_error_line(err, "refiner-vit-export")
        needed = export_memory_estimate(config, size) / 2**30
        match = re.search(
            rf"Exporting and checking at {size} px needs about {needed:,.1f} GiB \(attention maps of "
            rf"{(size // 4) ** 2 + 1:,} tokens squared x 4 heads\), more than this machine's 16.0 GiB of memory; "
            r"the largest image size that fits is (\d+) \(--image-size \1\)\.",
            line,
        )
        assert match, line
        fits = int(match.group(1))
        assert fits % 4 == 0 and export_memory_estimate(config, fits) <= memory < export_memory_estimate(
            config, fits + 4
        )
    assert listing(tmp_path) == ["model"]
    # 2048 px asks for terabytes: refused on any machine.
    monkeypatch.undo()
    assert export_memory_estimate(config, 2048) > 2**40
    code, _, err = export("--model", model, "--output", tmp_path / "onnx", "--image-size", 2048, capsys=capsys)
    assert code == 2 and "more than this machine's" in one_error_line(err, "refiner-vit-export")
    check_export_memory(config, 28, memory=2 * 2**30)  # the model's own size fits in little memory


def test_the_estimate_grows_with_tokens_squared_heads_and_expansion():
    config = tiny_config(image_size=28, patch_size=4)
    small, large = export_memory_estimate(config, 112), export_memory_estimate(config, 224)
    maps_small = 3 * 4 * (28**2 + 1) ** 2 * 4  # the largest check batch x heads x tokens^2 x float32
    maps_large = 3 * 4 * (56**2 + 1) ** 2 * 4
    copies = 5 * (1 + max(config.refine_expansion, config.shared_expansion))
    assert math.isclose(large - small, copies * (maps_large - maps_small), rel_tol=0.01)
    assert export_memory_estimate(tiny_config(image_size=28, patch_size=4, num_attention_heads=8), 224) > large


# 7. Damaged or disguised safetensors inputs to the converter.


def safetensors_cases(directory: Path) -> dict[str, tuple[Path, str]]:
    good = directory / "good.safetensors"
    save_file({k: v.contiguous() for k, v in load_original_weights(PAPER).state_dict.items()}, good)
    data = good.read_bytes()
    truncated = directory / "truncated.safetensors"
    truncated.write_bytes(data[: len(data) // 2])
    notes = directory / "notes.txt"
    notes.write_text("not weights\n")
    link = directory / "link.safetensors"
    link.symlink_to(notes)
    header = json.dumps({"w": {"dtype": "F32", "shape": [2**20, 2**20], "data_offsets": [0, 2**42]}}).encode()
    huge = directory / "huge.safetensors"
    huge.write_bytes(struct.pack("<Q", len(header)) + header + bytes(64))
    return {
        "truncated": (truncated, r"truncated.safetensors: tensor '.*' \(.*\) lies at bytes .*the file is truncated"),
        "link": (
            link,
            rf"link.safetensors \(a link to {re.escape(str(notes))}\): not a safetensors file \(it does not start",
        ),
        "huge": (
            huge,
            r"huge.safetensors: tensor 'w' \(.*\) lies at bytes 0 to 4,398,046,511,104 of 64 bytes of data",
        ),
    }


@pytest.mark.parametrize("case", ["truncated", "link", "huge"])
def test_damaged_safetensors_are_one_line_checkpoint_errors(tmp_path, capsys, case):
    inputs, work = tmp_path / "inputs", tmp_path / "work"
    inputs.mkdir(), work.mkdir()
    checkpoint, message = safetensors_cases(inputs)[case]
    with pytest.raises(CheckpointError, match=message):
        refiner_convert(load_original_weights(checkpoint).state_dict)
    code, _, err = convert("--checkpoint", checkpoint, "--output-dir", work / "model", capsys=capsys)
    assert code == 1 and re.search(message, one_error_line(err, "refiner-vit-convert")), err
    assert listing(work) == []


def test_a_good_safetensors_checkpoint_converts(tmp_path, capsys):
    checkpoint, _ = safetensors_cases(tmp_path)["truncated"]
    code, _, err = convert("--checkpoint", tmp_path / "good.safetensors", "--output-dir", tmp_path / "m", capsys=capsys)
    assert code == 0, err
    assert checkpoint.exists() and os.path.isdir(tmp_path / "m")
