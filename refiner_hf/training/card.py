"""The model card of a trained model: what it is, the recipe it was trained with and the metrics measured."""

from __future__ import annotations

from typing import Any

import yaml

from ..configuration_refiner_vit import RefinerViTConfig
from ..hub import build_model_card
from .checkpointing import describe_changes


def training_model_card(
    config: RefinerViTConfig,
    name: str,
    data_description: str,
    recipe: dict[str, Any],
    metrics: dict[str, Any],
    num_parameters: int,
    hub_dataset: str | None = None,
    settings_changes: list[dict[str, Any]] | None = None,
) -> str:
    """
    The README.md of a model directory written by the trainer.

    Args:
        config: the model's configuration.
        name: the directory or Hub id the card describes (used in its code examples).
        data_description: what it was trained on.
        recipe: the training arguments (as `Arguments.model_card_recipe()`), recorded in full.
        metrics: the measured validation metrics of the saved weights (`top1`, `top5`, `num_samples`, `epoch`,
            `weights`, `epochs`).
        num_parameters: the model's parameter count.
        hub_dataset: the Hub id of the training data, for the card's metadata.
        settings_changes: the settings resumes changed (`TrainingProgress.settings_changes`): the recipe shown is the
            last one, and the card says which values the training before each change used.
    """
    architecture = config.matching_preset() or "custom architecture"
    weights = "exponential moving average (EMA)" if metrics["weights"] == "ema" else "trained weights (no EMA)"
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
    evaluation = (
        f"Measured by the trainer on {metrics['num_samples']} validation images with this directory's image processor, "
        f"after epoch {metrics['epoch'] + 1} of {metrics['epochs']} (the best epoch by validation top-1 of the "
        f"{'EMA' if metrics['weights'] == 'ema' else 'model'} weights so far).\n\n"
        f"| metric | value |\n|---|---|\n| top-1 | {100 * metrics['top1']:.2f} % |\n"
        f"| top-5 | {100 * metrics['top5']:.2f} % |"
    )
    recipe_text = yaml.safe_dump(recipe, sort_keys=False, default_flow_style=None).strip()
    sections = {
        "Evaluation": evaluation,
        "Training recipe": "Trained with `examples/run_imagenet.py` of refiner-hf and these arguments:\n\n"
        f"```yaml\n{recipe_text}\n```",
    }
    if settings_changes:
        lines = [
            f"- resumed at step {change['step']}: {describe_changes(change['changes'])}" for change in settings_changes
        ]
        sections["Settings changed on resume"] = (
            "The run was resumed with other settings (`--allow_changed_settings`); the recipe above gives the last "
            "ones, the steps before each change were trained with the earlier values:\n\n" + "\n".join(lines)
        )
    return build_model_card(
        config,
        name,
        summary=f"Refiner-ViT ({architecture}) trained on {data_description}.",
        details=details,
        sections=sections,
        datasets=[hub_dataset] if hub_dataset else None,
    )


__all__ = ["training_model_card"]
