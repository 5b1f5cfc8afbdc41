"""
Building the model to train (from a preset, a configuration or a pretrained directory / Hub id) with a classifier head
for the data set's classes, and the image processor it is evaluated and saved with.
"""

from __future__ import annotations

import copy
import os
from collections.abc import Sequence
from dataclasses import dataclass, field

import torch
from torch import nn
from transformers import PreTrainedConfig

from ..configuration_refiner_vit import PRESETS, RefinerViTConfig
from ..image_processing_refiner_vit import RefinerViTImageProcessor, image_processor_for_config
from ..loading import (
    NO_IMAGE_PROCESSOR,
    LoadedModel,
    is_classifier_head,
    load_image_processor_checked,
    load_model_checked,
)
from ..modeling_refiner_vit import ModelTooLargeError, RefinerViTForImageClassification, check_model_size
from .arguments import ModelArguments
from .data import DataError
from .errors import UsageError, check_model_path, loading_error, one_line


# Configuration fields that change how a pretrained model trains, not the shapes of its weights.
PRETRAINED_OVERRIDABLE = frozenset(
    {
        "drop_path_rate",
        "hidden_dropout_prob",
        "attention_probs_dropout_prob",
        "aux_loss_weight",
        "aux_logits_weight",
        "attention_similarity_pairs",
        "attention_similarity_weight",
    }
)
# Class names shown in a log line before it is cut short.
SHOWN_NAMES = 4


@dataclass
class BuiltModel:
    """
    The model to train and its evaluation image processor, with what was decided on the way (a new classifier head,
    whose image processor) in `notes`, for the log.
    """

    model: RefinerViTForImageClassification
    image_processor: RefinerViTImageProcessor
    notes: list[str] = field(default_factory=list)


def label_maps(num_labels: int, class_names: Sequence[str] | None) -> tuple[dict[int, str], dict[str, int]]:
    names = list(class_names) if class_names else [f"LABEL_{i}" for i in range(num_labels)]
    names += [f"LABEL_{i}" for i in range(len(names), num_labels)]
    return dict(enumerate(names)), {name: i for i, name in enumerate(names)}


def _names(names: Sequence[str]) -> str:
    shown = ", ".join(names[:SHOWN_NAMES]) + (", ..." if len(names) > SHOWN_NAMES else "")
    return f"{len(names)} ({shown})"


# Classifier heads


def _heads(model: RefinerViTForImageClassification) -> list[nn.Linear]:
    return [head for head in (model.classifier, model.aux_classifier) if isinstance(head, nn.Linear)]


def _set_labels(config: RefinerViTConfig, id2label: dict[int, str]) -> None:
    config.id2label = dict(id2label)
    config.label2id = {name: index for index, name in id2label.items()}


def replace_classifier_heads(model: RefinerViTForImageClassification, id2label: dict[int, str]) -> None:
    """New, initialised classifier heads (class token and aux) for the classes `id2label` names."""
    config = model.config
    _set_labels(config, id2label)
    model.num_labels = config.num_labels
    model.classifier = nn.Linear(config.hidden_size, config.num_labels)
    if model.aux_classifier is not None:
        model.aux_classifier = nn.Linear(config.hidden_size, config.num_labels)
    for head in _heads(model):
        model._init_weights(head)


def reorder_classifier_heads(model: RefinerViTForImageClassification, class_names: Sequence[str]) -> None:
    """Puts the heads' outputs in the order of `class_names`, which must be a permutation of the model's classes."""
    order = torch.tensor([model.config.label2id[name] for name in class_names])
    with torch.no_grad():
        for head in _heads(model):
            head.weight.copy_(head.weight[order])
            head.bias.copy_(head.bias[order])
    _set_labels(model.config, dict(enumerate(class_names)))


def fit_classifier_heads(
    model: RefinerViTForImageClassification, num_labels: int, class_names: Sequence[str] | None, source: str
) -> str:
    """
    Makes a pretrained model's heads predict the data set's classes, and returns the log line saying how:

    - the data set names the model's classes, in the model's order: the heads are kept;
    - it names the same classes in another order: the heads are kept, their outputs reordered;
    - the model's classes have no names (`LABEL_i`) and the data set has as many: kept, named after the data set's;
    - the data set has no class names and its labels fit the head: kept (nothing tells the classes apart);
    - otherwise (other classes, or another number of them): new heads for the data set's classes.
    """
    config = model.config
    current = [config.id2label[i] for i in range(config.num_labels)]
    unnamed = all(name == f"LABEL_{i}" for i, name in enumerate(current))
    wanted = list(class_names) if class_names else None
    if wanted == current:
        return f"Classifier head: kept ({source} has the data set's {len(current)} classes)."
    if wanted is not None and not unnamed and sorted(wanted) == sorted(current):
        reorder_classifier_heads(model, wanted)
        return (
            f"Classifier head: kept, its outputs reordered to the data set's order of the same {len(wanted)} classes."
        )
    if wanted is not None and unnamed and len(wanted) == len(current):
        _set_labels(config, dict(enumerate(wanted)))
        return f"Classifier head: kept; its {len(current)} classes had no names and take the data set's."
    if wanted is None and num_labels <= len(current):
        return (
            f"Classifier head: kept ({len(current)} classes); the data set has no class names and its labels "
            f"0..{num_labels - 1} fit the head."
        )
    id2label, _ = label_maps(num_labels, wanted)
    replace_classifier_heads(model, id2label)
    return (
        f"Classifier head: NEW, randomly initialised: the data set's classes {_names(list(id2label.values()))} "
        f"differ from {source}'s {_names(current)}."
    )


# Building


def _check_pretrained_overrides(args: ModelArguments, overrides: dict) -> None:
    architectural = sorted(set(overrides) - PRETRAINED_OVERRIDABLE)
    if architectural:
        raise UsageError(
            f"--config_overrides cannot change {architectural} of the pretrained {args.model_name_or_path}: its "
            f"weights have that architecture. Only {sorted(PRETRAINED_OVERRIDABLE)} can be changed (and the "
            "resolution, with --image_size)."
        )


def check_training_size(args: ModelArguments, config: RefinerViTConfig) -> None:
    """
    Refuses, before anything is built, a model too large to have been meant: more parameters or blocks than are built
    without being asked, or more memory than the machine has to train on one image of its size (the weights, AdamW's
    state and the activations: [`~configuration_refiner_vit.estimate_memory`]), unless `--allow_large_model`.
    """
    if args.allow_large_model:
        return
    try:
        check_model_size(config, "pass --allow_large_model", training=True)
    except ModelTooLargeError as error:
        raise UsageError(str(error)) from None


def load_pretrained_model(args: ModelArguments, overrides: dict, cache_dir: str | None = None) -> LoadedModel:
    """
    `--model_name_or_path` with its own head, every tensor checked ([`~loading.load_model_checked`]; only the
    classifier heads may be absent, fine-tuning then gives it new ones), after the size check at the resolution it
    will train at; a [`UsageError`] naming what is wrong with the argument, or a `DataError` naming what is wrong with
    the weights.
    """
    source = args.model_name_or_path
    _check_pretrained_overrides(args, overrides)
    check_model_path("--model_name_or_path", source)
    if source in PRESETS and not os.path.exists(source):  # a preset name would wait on the Hub for a generic error
        raise UsageError(
            f"--model_name_or_path {source}: a preset name, not a trained model; train one from scratch with "
            f"--model {source}, or convert the released weights with `refiner-vit-convert --checkpoint FILE` and "
            f"give the directory it writes."
        )
    try:
        model_type = PreTrainedConfig.get_config_dict(source, cache_dir=cache_dir)[0].get("model_type")
        if model_type != RefinerViTConfig.model_type:
            raise UsageError(f"--model_name_or_path {source} holds a {model_type!r} model, not a Refiner-ViT.")
        config = RefinerViTConfig.from_pretrained(source, cache_dir=cache_dir, **overrides)
    except (OSError, ValueError) as error:
        if isinstance(error, UsageError):
            raise
        raise loading_error("--model_name_or_path", source, error) from None
    if args.image_size and args.image_size % config.patch_size == 0:  # checked at the resolution it will train at
        config = copy.deepcopy(config)
        config.image_size = args.image_size
    check_training_size(args, config)
    return load_model_checked(
        source, "--model_name_or_path", allow_missing=is_classifier_head, cache_dir=cache_dir, **overrides
    )


def new_model_config(
    args: ModelArguments, overrides: dict, id2label: dict[int, str], cache_dir: str | None = None
) -> RefinerViTConfig:
    """The configuration of a new model: `--model`, `--config_name` or the default one, with the overrides."""
    fields = {**overrides, "id2label": id2label, "label2id": {name: i for i, name in id2label.items()}}
    fields.pop("num_labels", None)  # the head is sized from id2label
    try:
        if args.model:
            return RefinerViTConfig.from_preset(args.model, **fields)
        if args.config_name:
            check_model_path("--config_name", args.config_name)
            return RefinerViTConfig.from_pretrained(args.config_name, cache_dir=cache_dir, **fields)
        return RefinerViTConfig(**fields)
    except OSError as error:
        raise loading_error("--config_name", args.config_name, error) from None
    except UsageError:
        raise
    except (ValueError, TypeError) as error:  # an unknown preset, or overrides that make no valid architecture
        source = (
            f"--model {args.model}" if args.model else f"--config_name {args.config_name}" if args.config_name else ""
        )
        raise UsageError(
            f"The model configuration ({source + ' with ' if source else ''}--config_overrides and the model "
            f"arguments): {one_line(str(error))}"
        ) from None


def build_image_processor(
    args: ModelArguments, config: RefinerViTConfig, resized: bool, cache_dir: str | None = None
) -> tuple[RefinerViTImageProcessor, str]:
    """
    The evaluation image processor, and a log line saying whose it is: with `--model_name_or_path` the model's own
    (its crop_pct, normalisation and resampling; `--crop_pct` and a new `--image_size` still apply), else, or when the
    model has none, the default for its configuration (the preset's crop_pct unless `--crop_pct`).
    """
    source = args.model_name_or_path
    if source:
        changes: dict = {} if args.crop_pct is None else {"crop_pct": args.crop_pct}
        if resized:
            size = config.image_size
            changes.update(size={"shortest_edge": size}, crop_size={"height": size, "width": size})
        processor, note = load_image_processor_checked(
            source, config, "--model_name_or_path", RefinerViTImageProcessor, cache_dir, **changes
        )
        if note.startswith(NO_IMAGE_PROCESSOR):  # only an absent processor falls back; an invalid one is refused
            return processor, f"Image processor: {source} has none; the default for its configuration."
        given = " (--crop_pct)" if args.crop_pct is not None else ""
        return processor, f"Image processor: {source}'s, crop_pct {processor.crop_pct}{given}."
    processor = image_processor_for_config(config, crop_pct=args.crop_pct)
    return processor, f"Image processor: the default for the configuration, crop_pct {processor.crop_pct}."


def build_model(
    args: ModelArguments, num_labels: int, class_names: Sequence[str] | None, cache_dir: str | None = None
) -> BuiltModel:
    """
    The model the arguments describe, with heads for the data set's `num_labels` classes named `class_names`, and its
    image processor:

    - `--model_name_or_path`: pretrained weights and image processor; the heads are kept when they predict the data
      set's classes, else replaced ([`fit_classifier_heads`]); `--image_size` resizes the position embedding.
    - `--model PRESET` / `--config_name` / neither: a new model from the preset, the config file or the default
      configuration, each with `--config_overrides` applied (a `num_labels` there may make the head larger).
    """
    overrides = args.config_overrides_dict()
    for argument, config_field in (
        ("drop_path", "drop_path_rate"),
        ("aux_head", "use_aux_head"),
        ("attention_similarity_pairs", "attention_similarity_pairs"),
        ("attention_similarity_weight", "attention_similarity_weight"),
        ("image_size", "image_size"),
    ):
        value = getattr(args, argument)
        if value is None:
            continue
        if config_field in overrides and overrides[config_field] != value:  # e.g. a recipe's --image_size
            raise UsageError(
                f"--config_overrides sets {config_field} {overrides[config_field]!r} but --{argument} is "
                f"{value!r}: give it once (--{argument} {overrides[config_field]!r})."
            )
        if argument != "image_size":  # a pretrained model's resolution is changed by resizing, below
            overrides[config_field] = value
    notes = []
    resized = False
    if args.model_name_or_path:
        loaded = load_pretrained_model(args, overrides, cache_dir)
        model = loaded.model
        if loaded.initialised:  # saved without classifier heads (e.g. a `RefinerViTModel`): new ones, said so
            id2label, _ = label_maps(num_labels, class_names)
            replace_classifier_heads(model, id2label)
            notes.append(
                f"Classifier head: NEW, randomly initialised for the data set's classes "
                f"{_names(list(id2label.values()))}: {args.model_name_or_path} has no classifier weights."
            )
        else:
            notes.append(fit_classifier_heads(model, num_labels, class_names, args.model_name_or_path))
        if args.image_size is not None and args.image_size != model.config.image_size:
            if args.image_size % model.config.patch_size:
                raise UsageError(
                    f"--image_size {args.image_size} must be a multiple of the patch size {model.config.patch_size}."
                )
            model.resize_position_embeddings(args.image_size)
            resized = True
    else:
        head = overrides.get("num_labels", num_labels)
        if head < num_labels:
            raise DataError(
                f"config_overrides num_labels {head} is fewer than the data set's {num_labels} classes; remove it."
            )
        if args.image_size is not None:
            overrides["image_size"] = args.image_size
        config = new_model_config(args, overrides, label_maps(head, class_names)[0], cache_dir)
        check_training_size(args, config)
        model = RefinerViTForImageClassification(config)
    model.config.check_architecture()
    image_processor, note = build_image_processor(args, model.config, resized, cache_dir)
    notes.append(note)

    if args.gradient_checkpointing:
        enable = getattr(model, "activation_checkpointing_enable", None) or model.gradient_checkpointing_enable
        enable()
    model.set_memory_lean_training(args.memory_lean_training)
    return BuiltModel(model, image_processor, notes)


def convert_sync_batchnorm(model: nn.Module, device: torch.device, num_processes: int) -> nn.Module:
    """The stem's and the refinement's BatchNorms as SyncBatchNorm (PyTorch implements it for GPUs only)."""
    if num_processes == 1:
        return model
    if device.type == "cpu":
        raise UsageError("--sync_batchnorm needs GPUs: PyTorch's SyncBatchNorm does not run on CPU.")
    return nn.SyncBatchNorm.convert_sync_batchnorm(model)


__all__ = [
    "BuiltModel",
    "build_image_processor",
    "build_model",
    "convert_sync_batchnorm",
    "fit_classifier_heads",
    "label_maps",
    "reorder_classifier_heads",
    "replace_classifier_heads",
]
