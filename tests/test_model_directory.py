"""
Model directories: self-contained remote code whatever path a model takes, the proof of a written directory, safe
replacement of a previous one, and cleanup after writers that died.
"""

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
import transformers.modeling_utils
import transformers.utils.hub
from helpers import FIXTURES, randomize_, tiny_config
from huggingface_hub import HfApi, ModelCard
from huggingface_hub.hf_api import CommitInfo, RepoUrl
from PIL import Image
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from transformers import AutoImageProcessor, AutoModelForImageClassification

from refiner_hf import RefinerViTForImageClassification, convert_checkpoint
from refiner_hf.assets import sample_image_path
from refiner_hf.image_processing_refiner_vit import image_processor_for_config
from refiner_hf.model_directory import (
    ModelDirectoryError,
    compare_logits,
    logits_on_image,
    remote_code_files,
    save_model_directory,
    verify_model_directory,
)


RELEASED = FIXTURES / "released_tiny.pth"
PACKAGE = Path(convert_checkpoint.__file__).parent

# Runs where `import refiner_hf` fails: `load DIR...` loads each directory as a user without the package would and
# prints what it got; `resave SRC DST` loads SRC (model and default processor only) and saves both to DST.
NO_PACKAGE_SCRIPT = textwrap.dedent(
    """
    import json, sys
    sys.modules["refiner_hf"] = None
    import torch
    from transformers import AutoConfig, AutoImageProcessor, AutoModel, AutoModelForImageClassification

    command, *paths = sys.argv[1:]
    if command == "resave":
        source, target = paths
        model = AutoModelForImageClassification.from_pretrained(source, trust_remote_code=True)
        AutoImageProcessor.from_pretrained(source, trust_remote_code=True).save_pretrained(target)
        model.save_pretrained(target)
        sys.exit(0)
    pixel_values = torch.load(paths[0], weights_only=True)
    for directory in paths[1:]:
        model = AutoModelForImageClassification.from_pretrained(directory, trust_remote_code=True).eval()
        with torch.no_grad():
            logits = model(pixel_values).logits
        report = {
            "directory": directory,
            "module": type(model).__module__,
            "config": type(AutoConfig.from_pretrained(directory, trust_remote_code=True)).__name__,
            "base": type(AutoModel.from_pretrained(directory, trust_remote_code=True)).__name__,
            "processors": [
                type(AutoImageProcessor.from_pretrained(directory, trust_remote_code=True, backend=b)).__name__
                for b in ("torchvision", "pil")
            ],
            "logits": logits.tolist(),
        }
        print(json.dumps(report))
    """
)


def run_without_package(tmp_path: Path, *args) -> subprocess.CompletedProcess:
    script = tmp_path / "no_package.py"
    script.write_text(NO_PACKAGE_SCRIPT)
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_MODULES_CACHE": str(tmp_path / f"modules-{len(args)}-{args[0]}")}
    result = subprocess.run(
        [sys.executable, str(script), *map(str, args)],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=600,
        env=env,
    )
    assert result.returncode == 0, result.stderr
    return result


def auto_map_modules(directory: Path) -> set[str]:
    names = set()
    for file_name in ("config.json", "preprocessor_config.json"):
        for entry in json.loads((directory / file_name).read_text())["auto_map"].values():
            names.update(
                value.rsplit(".", 1)[0] + ".py" for value in (entry.values() if isinstance(entry, dict) else [entry])
            )
    return names


def fake_hub(monkeypatch) -> dict[str, bytes]:
    """Replaces the Hub API with one that keeps the uploaded files."""
    uploaded = {}

    def create_repo(self, repo_id, **kwargs):
        return RepoUrl(f"https://huggingface.co/{repo_id}")

    def create_commit(self, repo_id, operations, **kwargs):
        for operation in operations:
            uploaded[operation.path_in_repo] = Path(operation.path_or_fileobj).read_bytes()
        return CommitInfo(
            commit_url=f"https://huggingface.co/{repo_id}/commit/0", commit_message="", commit_description="", oid="0"
        )

    monkeypatch.setattr(HfApi, "create_repo", create_repo)
    monkeypatch.setattr(HfApi, "create_commit", create_commit)
    # `push_to_hub` starts from the repository's model card, which it would download.
    new_card = lambda repo_id, *args, **kwargs: ModelCard("---\nlibrary_name: transformers\n---\n")  # noqa: E731
    monkeypatch.setattr(transformers.utils.hub, "create_and_tag_model_card", new_card)
    return uploaded


def test_every_saved_directory_loads_without_the_package(tmp_path, monkeypatch):
    pixel_values = torch.randn(2, 3, 64, 64, generator=torch.Generator().manual_seed(0))
    torch.save(pixel_values, tmp_path / "pixel_values.pt")
    directories = {}

    directories["converted"] = tmp_path / "converted"
    assert convert_checkpoint.main(["--checkpoint", str(RELEASED), "--output-dir", str(directories["converted"])]) == 0
    converted = AutoModelForImageClassification.from_pretrained(directories["converted"]).eval()
    with torch.no_grad():
        expected = {"converted": converted(pixel_values).logits}

    # Loaded with the package and re-saved: the everyday "load, fine-tune, save" path.
    directories["resaved"] = tmp_path / "resaved"
    converted.save_pretrained(directories["resaved"])
    AutoImageProcessor.from_pretrained(directories["converted"]).save_pretrained(directories["resaved"])
    expected["resaved"] = expected["converted"]

    # Built here, saved with transformers' own methods.
    new = randomize_(RefinerViTForImageClassification(tiny_config(image_size=64, patch_size=16))).eval()
    directories["new"] = tmp_path / "new"
    new.save_pretrained(directories["new"])
    image_processor_for_config(new.config).save_pretrained(directories["new"])
    with torch.no_grad():
        expected["new"] = new(pixel_values).logits

    # Pushed: what reaches the Hub.
    uploaded = fake_hub(monkeypatch)
    new.push_to_hub("someone/refiner-vit-tiny")
    image_processor_for_config(new.config).push_to_hub("someone/refiner-vit-tiny")
    directories["pushed"] = tmp_path / "pushed"
    directories["pushed"].mkdir()
    for name, content in uploaded.items():
        (directories["pushed"] / name).write_bytes(content)
    expected["pushed"] = expected["new"]

    # Loaded where the package is not installed and re-saved there: before, this dropped the code and the PIL backend.
    directories["resaved_remote"] = tmp_path / "resaved_remote"
    run_without_package(tmp_path, "resave", directories["converted"], directories["resaved_remote"])
    expected["resaved_remote"] = expected["converted"]

    for kind, directory in directories.items():
        names = {path.name for path in directory.iterdir()}
        assert set(remote_code_files()) <= names, kind
        assert auto_map_modules(directory) <= names, kind
    result = run_without_package(tmp_path, "load", tmp_path / "pixel_values.pt", *directories.values())
    reports = [json.loads(line) for line in result.stdout.strip().splitlines()]
    assert [report["directory"] for report in reports] == [str(d) for d in directories.values()]
    for kind, report in zip(directories, reports):
        assert report["module"].startswith("transformers_modules."), kind
        assert report["config"] == "RefinerViTConfig" and report["base"] == "RefinerViTModel", kind
        assert report["processors"] == ["RefinerViTImageProcessor", "RefinerViTImageProcessorPil"], kind
        torch.testing.assert_close(torch.tensor(report["logits"]), expected[kind], atol=1e-5, rtol=0, msg=kind)


def test_code_files_are_the_package_sources(tmp_path):
    model = RefinerViTForImageClassification(tiny_config())
    model.save_pretrained(tmp_path)
    image_processor_for_config(model.config).save_pretrained(tmp_path)
    assert {"configuration_refiner_vit.py", "modeling_refiner_vit.py", "mix_token.py"} <= set(remote_code_files())
    assert {"image_processing_refiner_vit.py", "image_processing_pil_refiner_vit.py"} <= set(remote_code_files())
    for name in remote_code_files():
        assert (tmp_path / name).read_bytes() == (PACKAGE / name).read_bytes(), name
    assert json.loads((tmp_path / "preprocessor_config.json").read_text())["auto_map"] == {
        "AutoImageProcessor": {
            "torchvision": "image_processing_refiner_vit.RefinerViTImageProcessor",
            "pil": "image_processing_pil_refiner_vit.RefinerViTImageProcessorPil",
        }
    }


@pytest.fixture
def written(tmp_path):
    """A tiny model, its processor, the photo, and the directory they were saved to."""
    model = randomize_(RefinerViTForImageClassification(tiny_config())).eval()
    processor = image_processor_for_config(model.config)
    image = Image.open(sample_image_path()).convert("RGB")
    directory = save_model_directory(model, processor, tmp_path / "model")
    return model, processor, image, directory


def test_verify_proves_tensors_configs_code_and_logits(written):
    model, processor, image, directory = written
    check = verify_model_directory(directory, model, processor, image)
    assert check.num_tensors == len(model.state_dict())
    assert check.max_difference <= check.tolerance
    scale = max(1.0, logits_on_image(model, processor, image).abs().max().item())
    assert check.tolerance == pytest.approx(1e-5 * scale)


def test_verify_catches_a_tensor_changed_by_one_ulp(written):
    model, processor, image, directory = written
    tensors = load_file(directory / "model.safetensors")
    key = "refiner_vit.layers.1.attention.v_proj.weight"
    tensors[key].view(torch.int32)[0, 0] += 1  # the next float: invisible in the logits, not in the file
    save_file(tensors, directory / "model.safetensors", metadata={"format": "pt"})
    with pytest.raises(ModelDirectoryError, match=rf"1 written tensors differ.*{key}"):
        verify_model_directory(directory, model, processor, image)


@pytest.mark.parametrize(
    "file_name, field, value, message",
    [
        (
            "config.json",
            "layer_norm_eps",
            1e-5,
            r"config.json does not load back equal \(fields \['layer_norm_eps'\]\)",
        ),
        ("preprocessor_config.json", "crop_pct", 1.0, r"preprocessor_config.json does not load back equal"),
        (
            "preprocessor_config.json",
            "auto_map",
            {"AutoImageProcessor": "image_processing_refiner_vit.RefinerViTImageProcessor"},
            r"the `auto_map` of preprocessor_config.json is .*, expected .*'pil': ",
        ),
    ],
)
def test_verify_catches_configs_that_do_not_load_back(written, file_name, field, value, message):
    model, processor, image, directory = written
    path = directory / file_name
    content = json.loads(path.read_text())
    content[field] = value
    path.write_text(json.dumps(content))
    with pytest.raises(ModelDirectoryError, match=message):
        verify_model_directory(directory, model, processor, image)


def test_verify_catches_missing_code(written):
    model, processor, image, directory = written
    (directory / "mix_token.py").unlink()
    with pytest.raises(ModelDirectoryError, match="mix_token.py is missing"):
        verify_model_directory(directory, model, processor, image)


def test_logits_are_compared_relative_to_their_scale():
    expected = torch.tensor([[12.0, -3.5, 0.25, 7.0]])
    # Two ulps at |logit| = 12: what float rounding in another model object gives, which an absolute 1e-6 refused.
    rounded = expected.clone()
    rounded.view(torch.int32)[0, 0] += 2
    difference, tolerance = compare_logits(rounded, expected)
    assert 1e-6 < difference < 2e-6 and tolerance == pytest.approx(1.2e-4)
    assert compare_logits(expected * 1e-3, expected * 1e-3)[1] == pytest.approx(1e-5)  # small logits: absolute 1e-5
    with pytest.raises(ModelDirectoryError, match="differ from the in-memory model's by 0.012"):
        compare_logits(expected + torch.tensor([[0.0, 0.0, 0.012, 0.0]]), expected)


def test_non_finite_logits_fail_unless_allowed_and_then_must_match_in_place():
    expected = torch.tensor([[1.0, float("nan"), float("inf")]])
    # NaN against NaN is no proof: refused, naming both sides' counts.
    with pytest.raises(
        ModelDirectoryError,
        match=r"Non-finite logits \(NaN or infinity\): the reloaded model's 2 and the in-memory model's 2 of 3",
    ):
        compare_logits(expected.clone(), expected)
    with pytest.raises(ModelDirectoryError, match="the reloaded model's 3 of 3"):  # NaN > tolerance is False
        compare_logits(torch.tensor([[float("nan")] * 3]), torch.ones(1, 3))
    with pytest.raises(ModelDirectoryError, match="the in-memory model's 1 of 3"):
        compare_logits(torch.ones(1, 3), torch.tensor([[1.0, 1.0, float("nan")]]))
    # A model converted with non-finite weights on purpose: non-finite in the same places only.
    assert compare_logits(expected.clone(), expected, allow_non_finite=True) == (0.0, 1e-5)
    for actual in (
        [[float("nan"), float("nan"), float("inf")]],
        [[1.0, 2.0, float("inf")]],
        [[1.0, float("nan"), -float("inf")]],
    ):
        with pytest.raises(ModelDirectoryError, match="not finite where"):
            compare_logits(torch.tensor(actual), expected, allow_non_finite=True)


def test_a_previous_model_directory_is_replaced_only_once_the_new_one_is_complete(written, tmp_path):
    model, processor, image, directory = written
    before = {path.name: path.read_bytes() for path in directory.iterdir()}
    other = randomize_(RefinerViTForImageClassification(tiny_config()), seed=1).eval()

    def fail(staging):
        assert {path.name for path in staging.iterdir()} == set(before)  # complete, beside the untouched original
        assert {path.name: path.read_bytes() for path in directory.iterdir()} == before
        raise ModelDirectoryError("check failed")

    with pytest.raises(ModelDirectoryError, match="check failed"):
        save_model_directory(other, processor, directory, overwrite=True, verify=fail)
    assert {path.name: path.read_bytes() for path in directory.iterdir()} == before
    assert [path.name for path in tmp_path.iterdir()] == ["model"]

    save_model_directory(other, processor, directory, overwrite=True)
    assert (directory / "model.safetensors").read_bytes() != before["model.safetensors"]
    assert [path.name for path in tmp_path.iterdir()] == ["model"]


def dead_pid() -> int:
    process = subprocess.Popen([sys.executable, "-c", "pass"])
    process.wait()
    return process.pid


def test_leftovers_of_dead_writers_are_cleaned_up_and_a_set_aside_model_comes_back(written, tmp_path):
    import socket

    model, processor, image, directory = written
    host = socket.gethostname()
    before = (directory / "model.safetensors").read_bytes()
    # Killed between setting the previous model aside and moving its replacement in:
    set_aside = tmp_path / f".model.replaced.{dead_pid()}@{host}.1a2b"
    directory.rename(set_aside)
    dead_staging = tmp_path / f".model.partial.{dead_pid()}@{host}.x1"
    dead_staging.mkdir()
    (dead_staging / "config.json").write_text("{}")
    live_staging = tmp_path / f".model.partial.{os.getpid()}@{host}.x2"  # a live writer's: not ours to remove
    live_staging.mkdir()
    other_host = tmp_path / f".model.partial.{dead_pid()}@elsewhere.x3"  # another machine's: cannot tell, kept
    other_host.mkdir()

    with pytest.raises(ModelDirectoryError, match="exists and is not empty: pass overwrite=True"):
        save_model_directory(model, processor, directory)  # recovers first, then refuses to overwrite
    assert (directory / "model.safetensors").read_bytes() == before
    assert sorted(path.name for path in tmp_path.iterdir()) == sorted(["model", live_staging.name, other_host.name])


def test_a_full_disk_is_one_clear_error_and_leaves_nothing(tmp_path, monkeypatch):
    def no_space(*args, **kwargs):
        raise SafetensorError("Error while serializing: I/O error: No space left on device (os error 28)")

    monkeypatch.setattr(transformers.modeling_utils, "safe_save_file", no_space)
    model = RefinerViTForImageClassification(tiny_config())
    with pytest.raises(ModelDirectoryError, match=r"Writing .*model failed: .*No space left on device .* free space"):
        save_model_directory(model, image_processor_for_config(model.config), tmp_path / "model")
    assert list(tmp_path.iterdir()) == []
