"""
The Hub and the saved model from a newcomer's side: `--push_to_hub` checked before any work (offline mode, an invalid
id, no token, an unreachable or refusing Hub), an upload failure after the work as one line with the `hf upload`
command, model cards with `base_model` and without local paths, and preset names given to `from_pretrained` answered at
once. Nothing here reaches the network: the Hub client's calls are replaced.
"""

import json
import subprocess
import threading
import time
from pathlib import Path

import httpx2
import pytest
from helpers import tiny_config
from huggingface_hub import HfApi, ModelCard, constants
from huggingface_hub.errors import HfHubHTTPError
from huggingface_hub.hf_api import CommitInfo, RepoUrl
from training_utils import (
    ROOT,
    SCRIPT,
    run_in_process,
    subprocess_env,
    tiny_run_args,
    two_process_launcher,
    write_image_folder,
)

from refiner_hf import (
    RefinerViTConfig,
    RefinerViTForImageClassification,
    RefinerViTImageProcessor,
    RefinerViTModel,
    convert_checkpoint,
    hub,
)
from refiner_hf.cli import EXIT_DATA, EXIT_USAGE, DataError, UsageError, command_status
from refiner_hf.configuration_refiner_vit import PRESETS, PresetNameError
from refiner_hf.image_processing_pil_refiner_vit import RefinerViTImageProcessorPil
from refiner_hf.image_processing_refiner_vit import image_processor_for_config
from refiner_hf.model_directory import save_model_directory
from refiner_hf.training.arguments import DataArguments
from refiner_hf.training.card import (
    LOCAL_PATH,
    base_model_id,
    card_data_description,
    card_model_name,
    training_model_card,
)
from refiner_hf.training.data import ImageData
from refiner_hf.training.run_lock import LOCK_FILE


WRITE_USER = {"name": "alice", "auth": {"accessToken": {"role": "write"}}}


class FakeHub:
    """Stands in for the Hub: records the calls of `HfApi` and answers as told (a token is set, offline mode off)."""

    def __init__(self, monkeypatch, whoami=WRITE_USER, commit_error: Exception | None = None):
        self.calls: list[tuple[str, tuple, dict]] = []
        self.whoami_answer, self.commit_error = whoami, commit_error
        monkeypatch.setenv("HF_TOKEN", "hf_test_token")
        monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
        monkeypatch.delenv("TRANSFORMERS_OFFLINE", raising=False)
        monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
        monkeypatch.setattr(HfApi, "whoami", lambda api, *args, **kwargs: self._whoami(*args, **kwargs))
        monkeypatch.setattr(HfApi, "create_repo", lambda api, *args, **kwargs: self._create_repo(*args, **kwargs))
        monkeypatch.setattr(HfApi, "create_commit", lambda api, *args, **kwargs: self._create_commit(*args, **kwargs))

    def names(self) -> list[str]:
        return [name for name, _, _ in self.calls]

    def _whoami(self, *args, **kwargs):
        self.calls.append(("whoami", args, kwargs))
        if isinstance(self.whoami_answer, Exception):
            raise self.whoami_answer
        return self.whoami_answer

    def _create_repo(self, repo_id, **kwargs):
        self.calls.append(("create_repo", (repo_id,), kwargs))
        full_id = repo_id if "/" in repo_id else f"alice/{repo_id}"
        return RepoUrl(f"https://huggingface.co/{full_id}")

    def _create_commit(self, repo_id, operations, *, commit_message, **kwargs):
        self.calls.append(("create_commit", (repo_id,), {"message": commit_message, "files": len(operations)}))
        if self.commit_error is not None:
            raise self.commit_error
        return CommitInfo(
            commit_url=f"https://huggingface.co/{repo_id}/commit/abc",
            commit_message=commit_message,
            commit_description="",
            oid="abc",
        )


def http_error(status: int) -> HfHubHTTPError:
    request = httpx2.Request("POST", "https://huggingface.co/api/repos/create")
    return HfHubHTTPError(f"{status} Client Error", response=httpx2.Response(status, request=request))


def check(repo_id: str = "alice/tiny", **kwargs) -> str:
    return hub.check_hub_access(repo_id, "--push_to_hub", "--hub_model_id", **kwargs)


# The check before the work


def test_the_check_creates_the_repository_and_returns_its_full_id(monkeypatch):
    fake = FakeHub(monkeypatch)
    assert check("tiny", private=True) == "alice/tiny"  # the Hub adds the user's namespace
    assert fake.names() == ["whoami", "create_repo"]
    assert fake.calls[1][2] == {"private": True, "exist_ok": True, "repo_type": "model"}


def test_offline_mode_is_refused_at_once_without_a_call(monkeypatch):
    fake = FakeHub(monkeypatch)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    start = time.perf_counter()
    with pytest.raises(UsageError) as caught:
        check()
    assert time.perf_counter() - start < 0.5 and fake.calls == []
    message = str(caught.value)
    assert "--push_to_hub needs the Hugging Face Hub, but HF_HUB_OFFLINE is set" in message
    assert "unset HF_HUB_OFFLINE" in message and "drop --push_to_hub" in message and "hf upload" in message


def test_an_invalid_repository_id_and_a_missing_token_are_usage_errors(monkeypatch):
    fake = FakeHub(monkeypatch)
    with pytest.raises(UsageError, match=r"--hub_model_id: 'my model' is not a valid Hub repository id \(.*\); give"):
        check("my model")
    with pytest.raises(UsageError, match="not a valid Hub repository id"):
        check("a/b/c")
    monkeypatch.delenv("HF_TOKEN")
    monkeypatch.setattr(hub, "get_token", lambda: None)
    with pytest.raises(UsageError) as caught:
        check()
    assert "needs a Hugging Face token" in str(caught.value)
    assert "`hf auth login`" in str(caught.value) and "HF_TOKEN" in str(caught.value)
    assert fake.calls == []


@pytest.mark.parametrize(
    ("answer", "expected"),
    [
        (httpx2.ConnectError("[Errno -2] Name or service not known"), "cannot reach the Hub (https://huggingface.co"),
        (http_error(401), "the token was refused (invalid or expired): log in again with `hf auth login --force`"),
        (http_error(500), "the Hub answered: 500 Client Error"),
        ({"name": "alice", "auth": {"accessToken": {"role": "read"}}}, "the token of alice is read-only"),
    ],
)
def test_hub_refusals_are_one_data_error_line(monkeypatch, answer, expected):
    FakeHub(monkeypatch, whoami=answer)
    with pytest.raises(hub.HubAccessError) as caught:
        check()
    message = str(caught.value)
    assert isinstance(caught.value, DataError) and "\n" not in message
    assert expected in message and "drop --push_to_hub" in message


def test_a_hub_that_does_not_answer_is_given_up_after_the_timeout(monkeypatch):
    release = threading.Event()
    FakeHub(monkeypatch)
    monkeypatch.setattr(HfApi, "whoami", lambda api, *a, **k: release.wait(5))
    start = time.perf_counter()
    try:
        with pytest.raises(hub.HubAccessError, match=r"did not answer within 0.2 s: check the network"):
            check(timeout=0.2)
    finally:
        release.set()
    assert time.perf_counter() - start < 2


# The trainer


def test_training_with_push_to_hub_stops_before_any_work_without_a_token(tmp_path, monkeypatch):
    FakeHub(monkeypatch)
    monkeypatch.delenv("HF_TOKEN")
    monkeypatch.setattr(hub, "get_token", lambda: None)
    output_dir = tmp_path / "run"
    argv = tiny_run_args(output_dir) + ["--push_to_hub"]
    with pytest.raises(UsageError, match="--push_to_hub needs a Hugging Face token"):
        run_in_process(argv)
    assert not output_dir.exists()  # no lock, no checkpoint, nothing trained

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(UsageError, match="HF_HUB_OFFLINE is set"):
        run_in_process(argv)
    monkeypatch.delenv("HF_HUB_OFFLINE")
    monkeypatch.setenv("HF_TOKEN", "hf_test_token")
    with pytest.raises(
        UsageError, match="--push_to_hub without --hub_model_id uses the name of --output_dir: 'my run'"
    ):
        run_in_process(tiny_run_args(tmp_path / "my run") + ["--push_to_hub"])
    assert not (tmp_path / "my run").exists()


def test_under_accelerate_every_process_stops_on_the_main_process_check(tmp_path):
    # Only the main process asks (here: refuses offline mode at once); the other one gets its answer and stops too,
    # instead of training alone. The launcher's environment has HF_HUB_OFFLINE=1 (training_utils.subprocess_env).
    command = [*two_process_launcher(29583), "-q", str(SCRIPT), *tiny_run_args(tmp_path / "run"), "--push_to_hub"]
    result = subprocess.run(command, capture_output=True, text=True, timeout=120, env=subprocess_env(), cwd=ROOT)
    errors = [line for line in result.stderr.splitlines() if line.startswith("run_imagenet.py: ")]
    assert result.returncode != 0 and len(errors) == 1, result.stderr[-3000:]
    assert errors[0].startswith("run_imagenet.py: error: --push_to_hub needs the Hugging Face Hub, but HF_HUB_OFFLINE")
    assert "Traceback" not in result.stderr and not (tmp_path / "run").exists()


def test_an_upload_failure_after_training_is_one_line_with_the_upload_command(tmp_path, monkeypatch, capsys):
    fake = FakeHub(monkeypatch, commit_error=httpx2.ConnectError("connection reset"))
    output_dir = tmp_path / "run"
    argv = tiny_run_args(output_dir, max_train_steps=1, epochs=1, max_eval_samples=8)
    status = command_status(
        lambda: run_in_process(argv + ["--push_to_hub", "--hub_private", "true"]), "run_imagenet.py"
    )
    error = [line for line in capsys.readouterr().err.splitlines() if line.startswith("run_imagenet.py")]
    assert status == EXIT_DATA and len(error) == 1  # (the rest of stderr is progress bars)
    model_dir = output_dir / "model"
    assert error[0] == (
        f"run_imagenet.py: error: Uploading {model_dir} to alice/run failed (ConnectError: connection reset). The run "
        f"finished and its model directory is complete; upload it again with `hf upload alice/run {model_dir} "
        "--private`."
    )
    assert fake.names() == [
        "whoami",
        "create_repo",
        "create_repo",
        "create_commit",
    ]  # the repository was checked before training
    assert (model_dir / "model.safetensors").is_file()
    assert json.loads((output_dir / "all_results.json").read_text())["global_step"] == 1
    assert not (output_dir / LOCK_FILE).exists()  # released: the run ended as a run
    card = (model_dir / "README.md").read_text()
    assert 'model="alice/run"' in card and str(tmp_path) not in card  # the full id from the check, no local path


def test_the_card_of_a_run_on_an_image_folder_names_no_local_path(tmp_path, monkeypatch):
    fake = FakeHub(monkeypatch)
    data = tmp_path / "my-photos"
    write_image_folder(data, per_class=4, names=["cat", "dog", "fox"])
    argv = tiny_run_args(tmp_path / "out", max_train_steps=1, epochs=1, max_eval_samples=None, max_train_samples=None)
    results = run_in_process(argv + ["--train_dir", str(data), "--train_val_split", "0.25", "--push_to_hub"])
    assert results["global_step"] == 1 and fake.names() == ["whoami", "create_repo", "create_repo", "create_commit"]
    assert fake.calls[3][2]["message"].endswith("top-1 on an image folder (3 classes, 9 training images)")
    card_text = (tmp_path / "out" / "model" / "README.md").read_text()
    card = ModelCard(card_text)
    assert str(tmp_path) not in card_text and "my-photos" not in card_text
    assert "an image folder (3 classes, 9 training images)" in card_text and "trained from scratch" in card_text
    assert card.data.base_model is None and card.data.datasets is None
    assert f"train_dir: {LOCAL_PATH}" in card_text and f"output_dir: {LOCAL_PATH}" in card_text


# The converter


def test_the_converter_checks_the_hub_before_converting(tmp_path, monkeypatch, capsys):
    from test_convert_cli import write_imagenet_checkpoint

    checkpoint = tmp_path / "imagenet_tiny.pth"
    write_imagenet_checkpoint(checkpoint)
    out = tmp_path / "converted"
    argv = ["--checkpoint", str(checkpoint), "--output-dir", str(out), "--push-to-hub", "someone/refiner-vit-test"]
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    start = time.perf_counter()
    assert convert_checkpoint.main(argv) == EXIT_USAGE
    assert time.perf_counter() - start < 1 and not out.exists()
    error = capsys.readouterr().err.strip().splitlines()
    assert len(error) == 1 and error[0].startswith(
        "refiner-vit-convert: error: --push-to-hub needs the Hugging Face Hub, but HF_HUB_OFFLINE is set"
    )

    fake = FakeHub(monkeypatch, commit_error=http_error(403))
    assert convert_checkpoint.main(argv) == EXIT_DATA
    error = capsys.readouterr().err.strip().splitlines()
    assert len(error) == 1 and error[0].endswith(
        f"The model directory is complete; upload it again with `hf upload someone/refiner-vit-test {out}`."
    )
    assert (
        fake.names() == ["whoami", "create_repo", "create_repo", "create_commit"]
        and (out / "model.safetensors").is_file()
    )
    card = (out / "README.md").read_text()
    assert str(tmp_path) not in card and "imagenet_tiny.pth" in card and ModelCard(card).data.base_model is None


# Model cards


def tiny_card(tmp_path: Path, recipe: dict, base_model: str | None, **weights) -> ModelCard:
    metrics = {"top1": 0.9, "top5": 1.0, "num_samples": 30, "epoch": 2, "epochs": 3, "weights": "ema", **weights}
    data_args = DataArguments(train_dir=str(tmp_path / "photos"))
    data = ImageData(train=list(range(90)), validation=[], class_names=["a", "b", "c"], num_labels=3, description="")
    text = training_model_card(
        tiny_config(num_labels=3),
        card_model_name(None, tmp_path / "outputs" / "my-classes"),
        card_data_description(data_args, data),
        recipe={"train_dir": str(tmp_path / "photos"), "output_dir": str(tmp_path / "outputs"), **recipe},
        metrics=metrics,
        num_parameters=1234,
        base_model=base_model,
    )
    assert str(tmp_path) not in text  # no local path anywhere
    assert "an image folder (3 classes, 90 training images)" in text and 'model="my-classes"' in text
    return ModelCard(text)


def test_card_of_a_model_trained_from_scratch(tmp_path):
    card = tiny_card(tmp_path, {"model": "refiner-vit-s"}, base_model=None)
    assert card.data.base_model is None and "base_model_relation" not in card.data.to_dict()
    assert "trained from scratch on an image folder" in card.text


@pytest.mark.parametrize(
    "weights, model_ema, line",
    [
        ("ema", True, "| Weights | exponential moving average (EMA), which measured better than the raw weights |"),
        ("raw", True, "| Weights | raw trained weights, which measured better than their exponential moving average"),
        ("raw", False, "| Weights | trained weights (no EMA) |"),
    ],
)
def test_the_card_says_which_weights_were_kept(tmp_path, weights, model_ema, line):
    card = tiny_card(tmp_path, {}, base_model=None, weights=weights, model_ema=model_ema)
    assert line in card.text
    kept = ", of the raw and the EMA weights at each," if model_ema else ""
    assert f"after epoch 3 of 3 (the best evaluation by validation top-1{kept} so far)" in card.text


def test_card_of_a_model_fine_tuned_from_a_hub_id(tmp_path):
    base = base_model_id("someone/refiner-vit-base")
    assert base == "someone/refiner-vit-base"
    card = tiny_card(tmp_path, {"model_name_or_path": "someone/refiner-vit-base"}, base_model=base)
    assert card.data.base_model == "someone/refiner-vit-base"
    assert card.data.to_dict()["base_model_relation"] == "finetune"
    assert "fine-tuned from [someone/refiner-vit-base](https://huggingface.co/someone/refiner-vit-base)" in card.text
    assert "model_name_or_path: someone/refiner-vit-base" in card.text


def test_card_of_a_model_fine_tuned_from_a_local_directory(tmp_path):
    # A directory whose card names the Hub id it was uploaded to (as this package's cards do): that id is the base.
    uploaded = tmp_path / "downloaded"
    model = RefinerViTForImageClassification(tiny_config())
    card = hub.build_model_card(model.config, "someone/refiner-vit-base", "A model.", {})
    save_model_directory(model, image_processor_for_config(model.config), uploaded, model_card=card)
    base = base_model_id(str(uploaded))
    assert base == "someone/refiner-vit-base"
    card = tiny_card(tmp_path, {"model_name_or_path": str(uploaded)}, base_model=base)
    assert card.data.base_model == "someone/refiner-vit-base"
    assert "model_name_or_path: someone/refiner-vit-base" in card.text

    # A local directory that names no Hub id (a run's OUTPUT_DIR/model): no base_model, and no path either.
    local = tmp_path / "outputs" / "model"
    save_model_directory(model, image_processor_for_config(model.config), local)
    (local / "README.md").write_text(hub.build_model_card(model.config, "model", "A model.", {}))
    assert base_model_id(str(local)) is None
    card = tiny_card(tmp_path, {"model_name_or_path": str(local)}, base_model=None)
    assert card.data.base_model is None and "Fine-tuned from | a local model directory" in card.text
    assert f"model_name_or_path: {LOCAL_PATH}" in card.text


# Preset names given to from_pretrained


PRESET_LOADERS = [
    RefinerViTConfig,
    RefinerViTModel,
    RefinerViTForImageClassification,
    RefinerViTImageProcessor,
    RefinerViTImageProcessorPil,
]


@pytest.mark.parametrize("loader", PRESET_LOADERS, ids=lambda cls: cls.__name__)
def test_a_preset_name_given_to_from_pretrained_answers_at_once(tmp_path, monkeypatch, loader):
    monkeypatch.chdir(tmp_path)  # no directory of that name here
    monkeypatch.setattr(HfApi, "model_info", lambda *a, **k: pytest.fail("the Hub was asked"))
    for name in ("refiner-vit-l", "refiner-vit-l-448"):
        start = time.perf_counter()
        with pytest.raises(PresetNameError) as caught:
            loader.from_pretrained(name)
        assert time.perf_counter() - start < 1
        message = str(caught.value)
        assert isinstance(caught.value, OSError) and isinstance(caught.value, UsageError) and "\n" not in message
        assert f"{name!r} is a Refiner-ViT preset name, not a model directory or a Hub repository" in message
        assert f"RefinerViTConfig.from_preset({name!r})" in message
        assert "`refiner-vit-convert --checkpoint CHECKPOINT.pth`" in message and f"./{name}" in message


def test_a_local_directory_named_like_a_preset_still_loads(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    name = "refiner-vit-s"
    assert name in PRESETS
    model = RefinerViTForImageClassification(tiny_config())
    save_model_directory(model, image_processor_for_config(model.config), tmp_path / name)
    assert RefinerViTConfig.from_pretrained(name).hidden_size == 24
    assert RefinerViTForImageClassification.from_pretrained(name).config.num_labels == 5
    assert RefinerViTModel.from_pretrained(name).config.hidden_size == 24
    assert RefinerViTImageProcessor.from_pretrained(name).crop_size == {"height": 32, "width": 32}
    assert RefinerViTImageProcessorPil.from_pretrained(name).crop_size == {"height": 32, "width": 32}


def test_the_trainer_refuses_a_preset_name_as_a_pretrained_model_at_once(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(HfApi, "model_info", lambda *a, **k: pytest.fail("the Hub was asked"))
    with pytest.raises(UsageError) as caught:
        run_in_process(["--output_dir", str(tmp_path / "run"), "--model_name_or_path", "refiner-vit-s"])
    message = str(caught.value)
    assert message.startswith("--model_name_or_path refiner-vit-s: a preset name, not a trained model")
    assert "--model refiner-vit-s" in message and "refiner-vit-convert" in message
    assert not [path for path in tmp_path.rglob("*") if path.is_file()]  # at most its empty output folder
