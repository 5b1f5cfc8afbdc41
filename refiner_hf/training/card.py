"""
The model card of a trained model: what it is, what it was trained on and from, the recipe it was trained with and the
metrics measured. A card is written to be published: it names the base model and the data by their Hub ids, and no
local path of the machine that trained it.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import yaml

from ..configuration_refiner_vit import RefinerViTConfig
from ..hub import build_model_card, hub_id_of_directory, is_hub_id
from .arguments import DataArguments
from .checkpointing import describe_changes
from .data import EMBEDDED_DATASET_NAME, ImageData


# Arguments that always name a local path, and arguments that name a Hub id or a local path.
LOCAL_PATH_ARGUMENTS = ("train_dir", "validation_dir", "output_dir", "cache_dir", "relabel_root")
SOURCE_ARGUMENTS = ("model_name_or_path", "config_name", "dataset_name")
# What a card shows instead of a local path.
LOCAL_PATH = "<local path>"


def is_public_source(value: str) -> bool:
    """Whether a model or data set argument is a Hub id (not a path on this machine)."""
    return is_hub_id(value) and not Path(value).expanduser().exists()


def base_model_id(model_name_or_path: str | None) -> str | None:
    """
    The Hub id of the model a run fine-tuned (`--model_name_or_path`): a Hub id as given; for a local directory, the
    id it was downloaded from or uploaded to when its config or card says so ([`hub_id_of_directory`]); else None.
    """
    if not model_name_or_path:
        return None
    path = Path(model_name_or_path).expanduser()
    if path.exists():
        return hub_id_of_directory(path) if path.is_dir() else None
    return model_name_or_path if is_hub_id(model_name_or_path) else None


def card_hub_dataset(data_args: DataArguments) -> str | None:
    """The Hub id of the training data for the card's metadata (`--dataset_name` when it is one)."""
    name = data_args.dataset_name
    return name if name and is_public_source(name) else None


def card_data_description(data_args: DataArguments, data: ImageData) -> str:
    """What a run trained on, for its card: the data set's Hub id, or "an image folder (3 classes, 90 training
    images)" for local data, never its path."""
    if data_args.uses_embedded_data:
        return EMBEDDED_DATASET_NAME
    counts = f"{data.num_labels} classes"
    if not data_args.streaming:
        counts += f", {len(data.train):,} training images"
    if hub_id := card_hub_dataset(data_args):
        config = f", configuration {data_args.dataset_config}" if data_args.dataset_config else ""
        return f"{hub_id} ({counts}{config})"
    if data_args.dataset_name:
        return f"a local data set ({counts})"
    return f"an image folder ({counts})"


def card_model_name(hub_model_id: str | None, output_dir: str | Path) -> str:
    """The name a card's code examples load: the Hub id (--hub_model_id, made full by the check before a run that
    uploads), else the output directory's name (the default repository id), never its path."""
    return hub_model_id or Path(output_dir).resolve().name or "refiner-vit"


def without_local_paths(values: dict[str, Any], base_model: str | None = None) -> dict[str, Any]:
    """`values` (arguments by name) with each local path replaced: a local `--model_name_or_path` by `base_model`
    when known, every other one by [`LOCAL_PATH`]."""
    public = dict(values)
    for name, value in values.items():
        if not isinstance(value, str) or not value:
            continue
        if name in LOCAL_PATH_ARGUMENTS or (name in SOURCE_ARGUMENTS and not is_public_source(value)):
            public[name] = base_model if name == "model_name_or_path" and base_model else LOCAL_PATH
    return public


def training_model_card(
    config: RefinerViTConfig,
    name: str,
    data_description: str,
    recipe: dict[str, Any],
    metrics: dict[str, Any],
    num_parameters: int,
    hub_dataset: str | None = None,
    settings_changes: list[dict[str, Any]] | None = None,
    base_model: str | None = None,
) -> str:
    """
    The README.md of a model directory written by the trainer.

    Args:
        config: the model's configuration.
        name: the Hub id (or the name) the card's code examples load ([`card_model_name`]); not a local path.
        data_description: what it was trained on ([`card_data_description`]).
        recipe: the training arguments (as `Arguments.model_card_recipe()`), recorded in full, local paths replaced.
        metrics: the measured validation metrics of the saved weights (`top1`, `top5`, `num_samples`, `epoch`,
            `weights`: "raw" or "ema", `model_ema`: whether an EMA was kept, `epochs`).
        num_parameters: the model's parameter count.
        hub_dataset: the Hub id of the training data, for the card's metadata.
        settings_changes: the settings resumes changed (`TrainingProgress.settings_changes`): the recipe shown is the
            last one, and the card says which values the training before each change used.
        base_model: the Hub id of the model it was fine-tuned from ([`base_model_id`]), for the card's metadata
            (`base_model`, `base_model_relation: finetune`).
    """
    architecture = config.matching_preset() or "custom architecture"
    if metrics["weights"] == "ema":
        weights = "exponential moving average (EMA), which measured better than the raw weights"
    elif metrics.get("model_ema"):
        weights = "raw trained weights, which measured better than their exponential moving average (EMA)"
    else:
        weights = "trained weights (no EMA)"
    details = {
        "Architecture": f"{architecture}, {config.num_hidden_layers} blocks, hidden size {config.hidden_size}",
        "Parameters": f"{num_parameters:,}",
        "Resolution": f"{config.image_size} px",
        "Classes": config.num_labels,
        "Training data": data_description,
        "Weights": weights,
        "Validation top-1": f"{100 * metrics['top1']:.2f} %",
        "Validation top-5": f"{100 * metrics['top5']:.2f} %",
    }
    fine_tuned = bool(recipe.get("model_name_or_path"))
    if fine_tuned:
        details = {"Fine-tuned from": base_model or "a local model directory", **details}
    evaluation = (
        f"Measured by the trainer on {metrics['num_samples']} validation images with this directory's image processor, "
        f"after epoch {metrics['epoch'] + 1} of {metrics['epochs']} (the best evaluation by validation top-1"
        f"{', of the raw and the EMA weights at each,' if metrics.get('model_ema') else ''} so far).\n\n"
        f"| metric | value |\n|---|---|\n| top-1 | {100 * metrics['top1']:.2f} % |\n"
        f"| top-5 | {100 * metrics['top5']:.2f} % |"
    )
    recipe_text = yaml.safe_dump(without_local_paths(recipe, base_model), sort_keys=False, default_flow_style=None)
    sections = {
        "Evaluation": evaluation,
        "Training recipe": "Trained with `examples/run_imagenet.py` of refiner-hf and these arguments (local paths "
        f"shown as `{LOCAL_PATH}`):\n\n```yaml\n{recipe_text.strip()}\n```",
    }
    if settings_changes:
        lines = [
            f"- resumed at step {change['step']}: {describe_changes(_changes_without_local_paths(change['changes']))}"
            for change in settings_changes
        ]
        sections["Settings changed on resume"] = (
            "The run was resumed with other settings (`--allow_changed_settings`); the recipe above gives the last "
            "ones, the steps before each change were trained with the earlier values:\n\n" + "\n".join(lines)
        )
    if fine_tuned:
        origin = f"fine-tuned from [{base_model}](https://huggingface.co/{base_model})" if base_model else "fine-tuned"
    else:
        origin = "trained from scratch"
    return build_model_card(
        config,
        name,
        summary=f"Refiner-ViT ({architecture}) {origin} on {data_description}.",
        details=details,
        sections=sections,
        datasets=[hub_dataset] if hub_dataset else None,
        base_model=base_model if fine_tuned else None,
    )


def _changes_without_local_paths(changes: dict[str, list[Any]]) -> dict[str, list[Any]]:
    """A resume's changed settings (`{name: [old, new]}`) with local paths replaced, as [`without_local_paths`]."""
    old = without_local_paths({name: values[0] for name, values in changes.items()})
    new = without_local_paths({name: values[1] for name, values in changes.items()})
    return {name: [old[name], new[name]] for name in changes}


__all__ = [
    "LOCAL_PATH",
    "base_model_id",
    "card_data_description",
    "card_hub_dataset",
    "card_model_name",
    "training_model_card",
    "without_local_paths",
]
