"""Building the model to train: from a preset, a configuration or a pretrained directory / Hub id."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

from ..configuration_refiner_vit import RefinerViTConfig
from ..modeling_refiner_vit import RefinerViTForImageClassification
from .data import DataError


# Configuration fields that change how a pretrained model trains, not the shapes of its weights.
PRETRAINED_OVERRIDABLE = frozenset(
    {"drop_path_rate", "hidden_dropout_prob", "attention_probs_dropout_prob", "aux_loss_weight", "aux_logits_weight"}
)


def label_maps(num_labels: int, class_names: Sequence[str] | None) -> tuple[dict[int, str], dict[str, int]]:
    names = list(class_names) if class_names else [f"LABEL_{i}" for i in range(num_labels)]
    names += [f"LABEL_{i}" for i in range(len(names), num_labels)]
    return dict(enumerate(names)), {name: i for i, name in enumerate(names)}


def resize_position_embeddings(model: RefinerViTForImageClassification, image_size: int) -> None:
    """
    Changes the model's training resolution: the patch part of the position embedding is resized bicubically to the
    new token grid (the class token's entry is kept) and `config.image_size` is updated, so the saved model and its
    image processor use the new size.
    """
    config = model.config
    if image_size % config.patch_size:
        raise ValueError(f"--image_size {image_size} must be a multiple of the patch size {config.patch_size}.")
    embeddings = model.refiner_vit.embeddings
    grid = image_size // config.patch_size
    with torch.no_grad():
        resized = embeddings.interpolate_pos_encoding(grid, grid).detach().clone()
    embeddings.position_embeddings = nn.Parameter(resized)
    embeddings.image_size = image_size
    config.image_size = image_size


def build_model(args, num_labels: int, class_names: Sequence[str] | None) -> RefinerViTForImageClassification:
    """
    The model the arguments describe, with a head of `num_labels` classes named after the data set's classes:

    - `--model_name_or_path`: pretrained weights. A head with fewer labels than the data set is an error unless
      `--ignore_mismatched_sizes`, which re-initialises a head of `num_labels` for any difference. `--image_size`
      resizes the position embedding.
    - `--model PRESET` / `--config_name` / neither: a new model from the preset, the config file or the default
      configuration, each with `--config_overrides` applied.
    """
    id2label, label2id = label_maps(num_labels, class_names)
    overrides = args.config_overrides_dict()
    if args.drop_path is not None:
        overrides["drop_path_rate"] = args.drop_path

    if args.model_name_or_path:
        architectural = sorted(set(overrides) - PRETRAINED_OVERRIDABLE)
        if architectural:
            raise ValueError(
                f"--config_overrides cannot change {architectural} of the pretrained {args.model_name_or_path}: its "
                f"weights have that architecture. Only {sorted(PRETRAINED_OVERRIDABLE)} can be changed (and the "
                "resolution, with --image_size)."
            )
        head = RefinerViTConfig.from_pretrained(args.model_name_or_path, cache_dir=args.cache_dir).num_labels
        if num_labels > head and not args.ignore_mismatched_sizes:
            raise DataError(
                f"The data set has {num_labels} classes but {args.model_name_or_path} has a head of {head} labels. "
                "Pass --ignore_mismatched_sizes to train a new head."
            )
        if num_labels == head or args.ignore_mismatched_sizes:
            overrides.update(id2label=id2label, label2id=label2id)
        model = RefinerViTForImageClassification.from_pretrained(
            args.model_name_or_path,
            cache_dir=args.cache_dir,
            ignore_mismatched_sizes=args.ignore_mismatched_sizes,
            **overrides,
        )
        if args.image_size is not None and args.image_size != model.config.image_size:
            resize_position_embeddings(model, args.image_size)
    else:
        if args.image_size is not None:
            overrides["image_size"] = args.image_size
        fields = {**overrides, "id2label": id2label, "label2id": label2id}
        if args.model:
            config = RefinerViTConfig.from_preset(args.model, **fields)
        elif args.config_name:
            config = RefinerViTConfig.from_pretrained(args.config_name, cache_dir=args.cache_dir, **fields)
        else:
            config = RefinerViTConfig(**fields)
        model = RefinerViTForImageClassification(config)
    model.config.check_architecture()

    if args.gradient_checkpointing:
        enable = getattr(model, "activation_checkpointing_enable", None) or model.gradient_checkpointing_enable
        enable()
    return model


def convert_sync_batchnorm(model: nn.Module, device: torch.device, num_processes: int) -> nn.Module:
    """The stem's and the refinement's BatchNorms as SyncBatchNorm (PyTorch implements it for GPUs only)."""
    if num_processes == 1:
        return model
    if device.type == "cpu":
        raise ValueError("--sync_batchnorm needs GPUs: PyTorch's SyncBatchNorm does not run on CPU.")
    return nn.SyncBatchNorm.convert_sync_batchnorm(model)


__all__ = ["build_model", "convert_sync_batchnorm", "label_maps", "resize_position_embeddings"]
