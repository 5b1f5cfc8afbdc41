"""
Command-line arguments of the trainer and YAML recipes.

Every argument is a field of one of three groups, as in transformers' image-classification example:
[`ModelArguments`] (what to train), [`DataArguments`] (what to train on) and [`TrainingArguments`] (how to train),
held together by [`Arguments`]; argument names are unique across the groups. A recipe is a YAML mapping from argument
names to values. Values are
resolved in this order: the field's default, then the recipe (`--recipe FILE`), then the command line, so
`--recipe refiner_vit_s.yaml --lr 1e-3` trains with the recipe's values except the learning rate. A recipe key that is
not a field, or a value of the wrong type, is an error that names the file and the key.

Without `--recipe`, the run's arguments choose it ([`default_recipe`]): no data, model or recipe argument is the
embedded Fashion-MNIST run (`embedded_fashion_mnist.yaml`), `--model_name_or_path` is fine-tuning
(`finetune_own_data.yaml`), data without a model argument on a machine without a GPU is a small model at 64 px
(`own_data_cpu.yaml`), and anything else uses the argument defaults, the paper's Refiner-ViT-S ImageNet pretraining
recipe. The recipe in force is recorded in `Arguments.recipe_source`, printed by the trainer and shown by `--help`,
whose defaults are the ones the other arguments given select. Loader workers are never more than the CPUs
([`fit_workers`]).

Usage errors (an unknown argument, with a suggestion; a value outside its range, see [`ARGUMENT_RANGES`], on the
command line or in a recipe; a path that is missing or not what it should be; inconsistent arguments) are
[`UsageError`]s with a one-line message naming the argument, its value and what it may be, raised before anything
is written; abbreviations of argument names are not accepted. A warmup that the recipe sets and a short `--epochs`
leaves no shorter than the run is shortened with one line ([`fit_warmup`]).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import os
import sys
import textwrap
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import torch
import yaml
from transformers import HfArgumentParser
from transformers.hf_argparser import string_to_bool

from ..configuration_refiner_vit import RefinerViTConfig
from .errors import (
    OneLineErrors,
    UsageError,
    check_input_directory,
    check_input_file,
    check_output_path,
    did_you_mean,
    is_main_process,
    looks_like_a_path,
)


# Fields a recipe may not set: the recipe itself, where it came from, and the Hub token (a secret that does not belong
# in a file).
NOT_IN_RECIPES = frozenset({"recipe", "recipe_source", "hub_token"})
# Fields about how this process was started rather than what it trains: left out of the model card, so that a resumed
# run writes the card an uninterrupted one does.
RUN_CONTROL_FIELDS = frozenset({"resume_from_checkpoint", "overwrite_output_dir", "allow_changed_settings"})
# Arguments that select a data source; with none of them the embedded Fashion-MNIST subset is used.
DATA_SOURCE_FIELDS = ("dataset_name", "train_dir", "validation_dir")
MODEL_SOURCE_FIELDS = ("model", "model_name_or_path", "config_name")
# Arguments that say which model to train: with any of them, no CPU recipe replaces the model they describe.
MODEL_CHOICE_FIELDS = MODEL_SOURCE_FIELDS + ("config_overrides",)
EMBEDDED_RECIPE = "embedded_fashion_mnist.yaml"
FINETUNE_RECIPE = "finetune_own_data.yaml"
CPU_RECIPE = "own_data_cpu.yaml"
PAPER_RECIPE = "refiner_vit_s.yaml"
DEFAULTS_DESCRIPTION = "the argument defaults: the paper's Refiner-ViT-S ImageNet pretraining recipe"

# Names other trainers give these arguments (transformers' TrainingArguments and image-classification example, timm's
# train.py), for the suggestion that answers an unknown argument.
ARGUMENT_ALIASES = {
    "learning_rate": "lr",
    "num_train_epochs": "epochs",
    "batch_size": "per_device_train_batch_size",
    "train_batch_size": "per_device_train_batch_size",
    "eval_batch_size": "per_device_eval_batch_size",
    "validation_batch_size": "per_device_eval_batch_size",
    "max_steps": "max_train_steps",
    "warmup_steps": "warmup_epochs (in epochs)",
    "num_workers": "dataloader_num_workers",
    "workers": "dataloader_num_workers",
    "save_steps": "checkpointing_steps",
    "save_total_limit": "checkpoints_total_limit",
    "resume": "resume_from_checkpoint",
    "drop_path_rate": "drop_path",
    "img_size": "image_size",
    "input_size": "image_size",
    "model_name": "model",
    "pretrained": "model_name_or_path",
    "initial_checkpoint": "model_name_or_path",
    "data_dir": "train_dir",
    "train_data_dir": "train_dir",
    "ema": "model_ema",
    "ema_decay": "model_ema_decay",
    "label_smoothing": "smoothing",
    "label_smoothing_factor": "smoothing",
    "mixup_alpha": "mixup",
    "cutmix_alpha": "cutmix",
    "auto_augment": "aa",
    "grad_accum_steps": "gradient_accumulation_steps",
    "max_grad_norm": "clip_grad",
    "fp16": "mixed_precision fp16",
    "bf16": "mixed_precision bf16",
    "amp": "mixed_precision bf16",
}
# Arguments the trainer no longer has, with what replaced them.
RETIRED_ARGUMENTS = {
    "ignore_mismatched_sizes": "is no longer needed: a model whose classes differ from the data set's gets a new "
    "classifier head, and the log says so",
}
# Configuration fields `config_overrides` may not set, with the reason.
NOT_OVERRIDABLE = {
    "id2label": "the class names come from the data set",
    "label2id": "the class names come from the data set",
}


class RecipeError(UsageError):
    """A recipe file that cannot be used: unreadable, not a mapping, an unknown key or a value of the wrong type."""


def _arg(help: str, **kwargs: Any) -> Any:
    default = kwargs.pop("default", None)
    if isinstance(default, list):
        return field(default_factory=lambda: list(default), metadata={"help": help, **kwargs})
    return field(default=default, metadata={"help": help, **kwargs})


@dataclass(frozen=True)
class Range:
    """
    The values a numeric argument may take: finite numbers from `low` to `high` (None: unbounded), each bound
    included unless `low_open` / `high_open`; `hint` ends the refusal (e.g. the unit the value is in).
    """

    low: float | None = None
    high: float | None = None
    low_open: bool = False
    high_open: bool = False
    integer: bool = False
    hint: str = ""

    def __contains__(self, value: Any) -> bool:
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
            return False
        if self.integer and not float(value).is_integer():
            return False
        if self.low is not None and (value <= self.low if self.low_open else value < self.low):
            return False
        return self.high is None or (value < self.high if self.high_open else value <= self.high)

    def describe(self) -> str:
        kind = "an integer" if self.integer else "a finite number"
        if self.low is not None and self.high is not None:
            opening, closing = "(" if self.low_open else "[", ")" if self.high_open else "]"
            return f"{kind} in {opening}{_shown(self.low)}, {_shown(self.high)}{closing}"
        if self.low is not None:
            return f"{kind} {'>' if self.low_open else '>='} {_shown(self.low)}"
        return kind


POSITIVE = Range(0, low_open=True)
NON_NEGATIVE = Range(0)
PROBABILITY = Range(0, 1)
FRACTION_BELOW_1 = Range(0, 1, high_open=True)
COUNT = Range(1, integer=True)
COUNT_OR_ZERO = Range(0, integer=True)

# The range of every numeric argument (of a list argument, of each of its numbers), checked on the command line and in
# recipes before anything is built or written; tests/test_training_trust_inputs.py checks that none is missing.
ARGUMENT_RANGES: dict[str, Range] = {
    # Model
    "image_size": COUNT,
    "crop_pct": Range(0, 2, low_open=True, hint=" (a fraction of the resized image: 0.9, not 90)"),
    "drop_path": FRACTION_BELOW_1,
    "attention_similarity_pairs": COUNT_OR_ZERO,
    "attention_similarity_weight": NON_NEGATIVE,
    "dense_weight": NON_NEGATIVE,
    # Data
    "train_val_split": Range(0, 1, high_open=True, hint=" (the fraction of the training split held out)"),
    "max_train_samples": COUNT,
    "max_eval_samples": COUNT,
    "dataloader_num_workers": COUNT_OR_ZERO,
    "shuffle_buffer_size": COUNT,
    "train_samples_per_epoch": COUNT,
    "relabel_size": COUNT,
    # Training
    "epochs": COUNT,
    "cooldown_epochs": COUNT_OR_ZERO,
    "warmup_epochs": NON_NEGATIVE,
    "warmup_lr": NON_NEGATIVE,
    "lr": POSITIVE,
    "min_lr": NON_NEGATIVE,
    "weight_decay": NON_NEGATIVE,
    "opt_betas": FRACTION_BELOW_1,
    "opt_eps": POSITIVE,
    "clip_grad": POSITIVE,
    "per_device_train_batch_size": COUNT,
    "per_device_eval_batch_size": COUNT,
    "gradient_accumulation_steps": COUNT,
    "max_train_steps": COUNT,
    "seed": Range(0, 2**32 - 1, integer=True, hint=" (NumPy's seeds)"),
    "scale": Range(0, 1, low_open=True, hint=" (fractions of the image area)"),
    "ratio": POSITIVE,
    "hflip": PROBABILITY,
    "color_jitter": NON_NEGATIVE,
    "reprob": PROBABILITY,
    "recount": COUNT,
    "mixup": NON_NEGATIVE,
    "cutmix": NON_NEGATIVE,
    "cutmix_minmax": Range(0, 1, low_open=True, hint=" (fractions of the image side)"),
    "mixup_prob": PROBABILITY,
    "mixup_switch_prob": PROBABILITY,
    "mixup_off_epoch": COUNT_OR_ZERO,
    "smoothing": FRACTION_BELOW_1,
    "model_ema_decay": PROBABILITY,
    "checkpointing_steps": COUNT,
    "checkpoints_total_limit": COUNT,
    "logging_steps": COUNT,
}


def _shown(value: Any) -> str:
    if isinstance(value, (list, tuple)):
        return " ".join(_shown(item) for item in value)
    return f"{value:g}" if isinstance(value, float) else str(value)


def range_error(name: str, value: Any) -> str | None:
    """Why `value` is not a valid value of argument `name` (see [`ARGUMENT_RANGES`]), or None when it is."""
    allowed = ARGUMENT_RANGES.get(name)
    if allowed is None or value is None:
        return None
    if isinstance(value, (list, tuple)):
        if any(item not in allowed for item in value):
            return f"each must be {allowed.describe()}{allowed.hint}"
        return None
    return None if value in allowed else f"must be {allowed.describe()}{allowed.hint}"


def check_ranges(group: Any) -> None:
    """Raises a [`UsageError`] naming the first argument of `group` outside its range, its value and the range."""
    for f in dataclasses.fields(group):
        value = getattr(group, f.name)
        if (problem := range_error(f.name, value)) is not None:
            raise UsageError(f"--{f.name} {_shown(value)}: {problem}.")


def check_report_to(report_to: str) -> None:
    """Raises a [`UsageError`] for a `--report_to` name that is not an accelerate tracker (or `none`)."""
    from accelerate.utils import LoggerType

    known = [*LoggerType.list(), "none"]
    for name in (name.strip() for name in report_to.split(",")):
        if name not in known:
            raise UsageError(
                f"--report_to {report_to}: unknown tracker {name!r}; choose from {', '.join(known)} (comma-separated "
                f"for several).{did_you_mean(name, known)}"
            )


@dataclass
class ModelArguments:
    """What to train: the model, its source and the configuration fields the trainer sets."""

    _argument_group_name = "Model"

    model: str | None = _arg("Train from scratch: a preset name such as `refiner-vit-s` (see RefinerViTConfig).")
    model_name_or_path: str | None = _arg(
        "Fine-tune a model directory or Hub id: its image processor is kept (see --crop_pct), and a data set with "
        "other classes gets a new classifier head. Without --recipe, finetune_own_data.yaml applies."
    )
    config_name: str | None = _arg("Train from scratch with this config.json (a file, a directory or a Hub id).")
    config_overrides: str | None = _arg(
        "RefinerViTConfig fields to change, as a JSON object (a mapping in a recipe), e.g. '{\"hidden_size\": 192}'. "
        "Without --model, --config_name or --model_name_or_path they apply to the default configuration."
    )
    image_size: int | None = _arg(
        "Training resolution. Differing from the model's, the position embedding is resized (bicubic) and the new "
        "size is saved with the model."
    )
    crop_pct: float | None = _arg(
        "Evaluation crop ratio of the saved image processor (default: with --model_name_or_path the model's own image "
        "processor's; else the preset's, S 0.9 / M 1.0 / L 1.13, or 0.9)."
    )
    drop_path: float | None = _arg("Stochastic depth rate of the last block (config `drop_path_rate`).")
    aux_head: bool | None = _arg(
        "Build the model with (true) or without (false) the auxiliary dense head (config `use_aux_head`; default: the "
        "model's, which every preset has). The original's plain S and M scripts train without it (return_dense: false)."
    )
    attention_similarity_pairs: int | None = _arg(
        "The original's attention regulariser (cos_reg_component): penalise the similarity of the first N pairs of "
        "consecutive attention maps (config `attention_similarity_pairs`; 0: off; default: the model's)."
    )
    attention_similarity_weight: float | None = _arg(
        "Weight of that regulariser (config `attention_similarity_weight`; default: the model's, 0.1)."
    )
    gradient_checkpointing: bool = _arg(
        "Activation checkpointing: recompute whole blocks in the backward pass to save memory (combines with "
        "--memory_lean_training).",
        default=False,
    )
    memory_lean_training: bool = _arg(
        "Keep only each refinement's input map for the backward pass and recompute the rest "
        "(model.set_memory_lean_training(): the same gradients and BatchNorm statistics with under half the activation "
        "memory; fused kernels on CPU, Triton kernels on CUDA). On by default; false (--no_memory_lean_training) "
        "trains with the reference computation.",
        default=True,
    )
    allow_large_model: bool = _arg(
        "Build a model of more than 2 billion parameters (refused otherwise: the largest Refiner-ViT has 81 million, "
        "and a typo such as num_hidden_layers 100000 would be built until the process is killed).",
        default=False,
    )
    sync_batchnorm: bool = _arg(
        "Synchronise the BatchNorm statistics of the stem and the refinement across processes (GPUs only).",
        default=False,
    )

    dense_weight: float | None = _arg(
        "Weight of the aux head's dense (per-token) loss, config `aux_loss_weight` (default: the model's, 0.5)."
    )
    mix_token: bool = _arg(
        "MixToken: in training, swap a random box of tokens with the reversed batch's (config `use_mix_token`).",
        default=False,
    )

    def __post_init__(self) -> None:
        if isinstance(self.config_overrides, dict):
            self.config_overrides = json.dumps(self.config_overrides)

    def validate(self) -> None:
        """Raises a [`UsageError`] naming the first inconsistent model argument or value out of range."""
        check_ranges(self)
        sources = [name for name in MODEL_SOURCE_FIELDS if getattr(self, name)]
        if len(sources) > 1:
            raise UsageError(f"Give at most one of --model, --model_name_or_path, --config_name (got {sources}).")
        self.config_overrides_dict()

    def config_overrides_dict(self) -> dict[str, Any]:
        """The `--config_overrides` mapping, each key a `RefinerViTConfig` field (see [`check_config_overrides`])."""
        if not self.config_overrides:
            return {}
        try:
            overrides = json.loads(self.config_overrides)
        except json.JSONDecodeError as error:
            raise UsageError(f"--config_overrides is not valid JSON: {error}") from None
        if not isinstance(overrides, dict):
            raise UsageError(f"--config_overrides must be a JSON object, got {self.config_overrides!r}.")
        check_config_overrides(overrides, "--config_overrides")
        return overrides


@dataclass
class DataArguments:
    """What to train on: the data set, its columns and selection, data loading, and the relabel maps."""

    _argument_group_name = "Data"

    dataset_name: str | None = _arg("A `datasets` Hub id (e.g. ILSVRC/imagenet-1k) or a local dataset directory.")
    dataset_config: str | None = _arg("The configuration name of --dataset_name.")
    streaming: bool = _arg(
        "Stream the data set instead of downloading it: each process reads only its own shards.", default=False
    )
    train_dir: str | None = _arg("A local `imagefolder` tree of training images (one sub-directory per class).")
    validation_dir: str | None = _arg("A local `imagefolder` tree of validation images.")
    train_split: str = _arg("Name of the training split.", default="train")
    validation_split: str = _arg("Name of the validation split.", default="validation")
    train_val_split: float = _arg(
        "Fraction of the training split held out for validation when the data set has no validation split.",
        default=0.15,
    )
    image_column_name: str = _arg("Column holding the images.", default="image")
    label_column_name: str = _arg("Column holding the class indices.", default="label")
    max_train_samples: int | None = _arg("Use only the first N training samples (after a seeded shuffle).")
    max_eval_samples: int | None = _arg("Use only the first N validation samples.")
    skip_bad_images: bool = _arg(
        "Skip (and count) images that cannot be decoded instead of stopping with an error naming them.", default=False
    )
    dataloader_num_workers: int = _arg("Data loading worker processes per training process.", default=8)
    shuffle_buffer_size: int = _arg("Shuffle buffer of a streamed training set.", default=10_000)
    train_samples_per_epoch: int | None = _arg(
        "Size of a streamed training set (default: the number of examples the data set's metadata states)."
    )
    cache_dir: str | None = _arg("Where `datasets` caches downloaded and prepared data.")

    # Token labeling: the teacher's relabel maps of the training images
    relabel_root: str | None = _arg(
        "Token labeling: the teacher's relabel maps, a packed store (refiner-vit-pack-relabel, "
        "examples/generate_relabel.py) or a per-file tree <wnid>/<image stem>.pt. Every training image needs a map."
    )
    relabel_size: int | None = _arg(
        "Side of the dense-label grid; must be the model's token grid (14 at 224 px). Default: the model's grid."
    )
    relabel_normalization: Literal["softmax", "sum"] = _arg(
        "Turn each token's pooled top-k scores into a distribution with a softmax (stored logits, as the NFNet "
        "relabel set) or by dividing by their sum (stored probabilities).",
        default="softmax",
    )
    relabel_layout: Literal["hw", "wh"] = _arg(
        "How the relabel maps are laid out: hw (rows are the image's y, as TokenLabeling's generator writes the public "
        "NFNet-F6 set and as examples/generate_relabel.py writes) or wh (transposed). See the README for telling "
        "which from one file.",
        default="hw",
    )
    relabel_full_check: bool = _arg(
        "Read every map of a packed relabel store before training (finite scores, class indices in range); opening "
        "checks only its description and shapes, and each map is checked when read.",
        default=False,
    )

    def validate(self) -> None:
        """
        Raises a [`UsageError`] naming the first inconsistent data argument, value out of range, or directory that is
        missing or not a directory.
        """
        check_ranges(self)
        if self.dataset_name and (self.train_dir or self.validation_dir):
            raise UsageError("Give either --dataset_name or --train_dir/--validation_dir, not both.")
        if self.validation_dir and not self.train_dir:
            raise UsageError("--validation_dir needs --train_dir.")
        image_tree = " Give a folder with one sub-folder of images per class."
        for name, what in (("train_dir", image_tree), ("validation_dir", image_tree), ("relabel_root", "")):
            if getattr(self, name) is not None:
                check_input_directory(f"--{name}", getattr(self, name), what)
        if self.dataset_name and (looks_like_a_path(self.dataset_name) or Path(self.dataset_name).exists()):
            check_input_directory(
                "--dataset_name",
                self.dataset_name,
                " Give a local data set directory or a Hub id such as ILSVRC/imagenet-1k.",
            )
        if self.cache_dir is not None:
            check_output_path("--cache_dir", self.cache_dir)
        if self.streaming and self.max_train_samples is not None:
            raise UsageError(
                "--max_train_samples needs a map-style data set; use --train_samples_per_epoch when streaming."
            )

    @property
    def uses_embedded_data(self) -> bool:
        """True when no data source is given: the embedded Fashion-MNIST subset is used."""
        return all(getattr(self, name) is None for name in DATA_SOURCE_FIELDS)


@dataclass
class TrainingArguments:
    """How to train: optimisation, augmentation, mixing, the EMA and the run (checkpoints, logging, the Hub)."""

    _argument_group_name = "Training"

    # Recipe
    recipe: str | None = _arg(
        "YAML file of argument values (a path, or a file name in examples/recipes). Command-line arguments override it."
    )

    # Optimisation (AdamW, cosine schedule)
    epochs: int = _arg("Epochs of the cosine schedule; training runs for epochs + cooldown_epochs.", default=300)
    cooldown_epochs: int = _arg("Epochs at min_lr after the cosine schedule.", default=10)
    warmup_epochs: float = _arg("Linear warmup from warmup_lr, in epochs.", default=5)
    warmup_lr: float = _arg("Learning rate at the start of the warmup.", default=1e-6)
    lr: float = _arg("Peak learning rate.", default=5e-4)
    min_lr: float = _arg("Learning rate at the end of the cosine schedule and during the cooldown.", default=1e-5)
    lr_schedule_unit: Literal["epoch", "step"] = _arg(
        "Update the learning rate once per epoch (as the original training) or after every optimizer step.",
        default="epoch",
    )
    weight_decay: float = _arg(
        "AdamW weight decay; none on norms, biases, position embedding and class token.", default=0.05
    )
    opt_betas: list[float] = _arg("AdamW betas.", default=[0.9, 0.999])
    opt_eps: float = _arg("AdamW epsilon.", default=1e-8)
    clip_grad: float | None = _arg("Clip the gradient norm to this value.")
    per_device_train_batch_size: int = _arg("Training batch per process.", default=32)
    per_device_eval_batch_size: int = _arg("Evaluation batch per process.", default=64)
    gradient_accumulation_steps: int = _arg("Micro-batches per optimizer step.", default=1)
    max_train_steps: int | None = _arg("Stop after this many optimizer steps (the schedule is unchanged).")
    seed: int = _arg("Seed of the model initialisation, the data order, the augmentation and mixing.", default=42)

    # Augmentation and regularisation
    scale: list[float] = _arg("RandomResizedCrop area range.", default=[0.08, 1.0])
    ratio: list[float] = _arg("RandomResizedCrop aspect-ratio range.", default=[3 / 4, 4 / 3])
    train_interpolation: str = _arg(
        "Interpolation of the training crop: bilinear, bicubic or random (either).", default="random"
    )
    hflip: float = _arg("Horizontal flip probability.", default=0.5)
    aa: str | None = _arg(
        "timm auto-augment policy, e.g. rand-m9-mstd0.5-inc1 (RandAugment).", default="rand-m9-mstd0.5-inc1"
    )
    color_jitter: float = _arg("Colour jitter strength (unused with auto-augment, as in timm).", default=0.4)
    reprob: float = _arg("Random erasing probability.", default=0.25)
    remode: str = _arg("Random erasing fill: pixel, rand or const.", default="pixel")
    recount: int = _arg("Random erasing regions per image.", default=1)
    augmentation_order: Literal["timm", "token_labeling"] = _arg(
        "Order of the training augmentation: timm (random resized crop, then flip and RandAugment on the crop) or "
        "token_labeling (flip and RandAugment on the whole image, the crop last: the original token-labeling "
        "training's order; relabel maps follow every step).",
        default="timm",
    )
    erase_after_mixing: bool = _arg(
        "Random erasing on the mixed batch (as the original training's prefetching loader does it) rather than on "
        "each image before mixing (timm's transform).",
        default=False,
    )
    mixup: float = _arg("Mixup alpha (0 disables).", default=0.8)
    cutmix: float = _arg("CutMix alpha (0 disables).", default=1.0)
    cutmix_minmax: list[float] | None = _arg("CutMix box size range; overrides the CutMix alpha.")
    mixup_prob: float = _arg("Probability of mixing a batch.", default=1.0)
    mixup_switch_prob: float = _arg("Probability of CutMix instead of mixup when both are on.", default=0.5)
    mixup_mode: Literal["batch", "pair", "elem"] = _arg("Mix per batch, pair or element.", default="batch")
    mixup_off_epoch: int = _arg("Stop mixing from this epoch on (0: never).", default=0)
    smoothing: float = _arg("Label smoothing.", default=0.1)

    # Token labeling: what the class token and the dense labels are trained towards
    relabel_class_target: Literal["teacher", "ground_truth"] = _arg(
        "With relabel maps, the class token's target: teacher (the map pooled over the training crop, smoothed and "
        "mixed like the images: the original training's) or ground_truth (the data set's label).",
        default="teacher",
    )
    dense_label_cutmix: Literal["box", "blend"] = _arg(
        "How CutMix mixes the dense labels: box (the tokens inside the pasted box take the other image's labels) or "
        "blend (every token's label is blended with the CutMix λ, as the original training does).",
        default="box",
    )

    # Model EMA
    model_ema: bool = _arg("Keep an exponential moving average of the weights and evaluate it.", default=True)
    model_ema_decay: float = _arg("EMA decay per optimizer step.", default=0.99996)
    model_ema_warmup: bool = _arg(
        "Ramp the EMA decay up from 0 (timm's warmup), for short runs where a fixed decay never forgets the "
        "initialisation.",
        default=False,
    )

    # Run
    output_dir: str | None = _arg(
        "Run directory: the final model in model/, checkpoints in checkpoints/, logs in logs/ "
        "(default: outputs/refiner-vit-fashion-mnist for the embedded data, else outputs/refiner-vit)."
    )
    checkpointing_steps: int | None = _arg("Also save a checkpoint every N optimizer steps (always at epoch ends).")
    checkpoints_total_limit: int = _arg("Keep the last N checkpoints.", default=3)
    resume_from_checkpoint: str | None = _arg("`latest` (of output_dir/checkpoints) or a checkpoint directory.")
    overwrite_output_dir: bool = _arg(
        "Start a new run in an output_dir that holds a previous run: its checkpoints/, model/, logs/ and "
        "all_results.json are removed first (other files are left alone). Without it such a run is refused.",
        default=False,
    )
    allow_changed_settings: bool = _arg(
        "Resume with settings that change the computation (batch size, data, schedule, seed, ...) from those the "
        "checkpoint was trained with: the log and the model card record the changes. Without it such a resume is "
        "refused.",
        default=False,
    )
    mixed_precision: Literal["no", "fp16", "bf16"] | None = _arg(
        "Autocast precision (default: accelerate's configuration, else fp32)."
    )
    report_to: str = _arg(
        "Trackers: tensorboard, wandb, all or none (comma-separated for several).", default="tensorboard"
    )
    logging_steps: int = _arg("Log the training loss every N optimizer steps.", default=50)
    push_to_hub: bool = _arg("Upload the final model directory to the Hub.", default=False)
    hub_model_id: str | None = _arg("Hub repository id (default: the name of output_dir).")
    hub_token: str | None = _arg("Hub token (default: the logged-in user's).")
    hub_private: bool | None = _arg("Create the Hub repository as private.")

    def validate(self) -> None:
        """
        Raises a [`UsageError`] naming the first inconsistent training argument, value out of range, missing
        checkpoint, or output directory that cannot be created.
        """
        check_ranges(self)
        resume = self.resume_from_checkpoint
        if resume not in (None, "latest"):
            check_input_directory(
                "--resume_from_checkpoint",
                resume,
                " Give a checkpoint directory (`latest` takes the newest of OUTPUT_DIR/checkpoints).",
            )
        if self.output_dir is not None:
            check_output_path("--output_dir", self.output_dir)
        for name in ("scale", "ratio") + (("cutmix_minmax",) if self.cutmix_minmax is not None else ()):
            low_high = getattr(self, name)
            if len(low_high) != 2 or low_high[0] > low_high[1]:
                raise UsageError(f"--{name} must be two numbers, low then high; got {_shown(low_high)}.")
        if len(self.opt_betas) != 2:
            raise UsageError(f"--opt_betas must be two numbers, beta1 then beta2; got {_shown(self.opt_betas)}.")
        if self.warmup_epochs >= self.epochs:
            raise UsageError(
                f"--warmup_epochs {_shown(self.warmup_epochs)}: must be below --epochs {self.epochs} (the warmup is "
                "part of the cosine schedule's epochs); give a shorter warmup or more epochs."
            )
        if self.mixing_enabled and self.per_device_train_batch_size % 2:
            raise UsageError(
                "Mixup/CutMix pair each image with another of its batch: --per_device_train_batch_size must be even, "
                f"got {self.per_device_train_batch_size}."
            )
        if self.aa:
            from .augmentation import auto_augment_problem  # (timm and torch are imported by training only)

            if problem := auto_augment_problem(self.aa):
                raise UsageError(f"--aa {self.aa}: {problem}.")
        check_report_to(self.report_to)
        if self.train_interpolation not in ("bilinear", "bicubic", "random"):
            raise UsageError(
                f"--train_interpolation must be bilinear, bicubic or random, got {self.train_interpolation!r}."
            )
        if self.remode not in ("pixel", "rand", "const"):
            raise UsageError(f"--remode must be pixel, rand or const, got {self.remode!r}.")

    def keywords(self, component: dict[str, str]) -> dict[str, Any]:
        """The keyword arguments that build `component` (one of the `*_KEYWORDS` tables) from these arguments."""
        return {keyword: getattr(self, name) for name, keyword in component.items()}

    @property
    def mixing_enabled(self) -> bool:
        return self.mixup_prob > 0 and (self.mixup > 0 or self.cutmix > 0 or self.cutmix_minmax is not None)

    @property
    def total_epochs(self) -> int:
        """Epochs actually trained: the cosine schedule's plus the cooldown."""
        return self.epochs + self.cooldown_epochs


GROUPS = (ModelArguments, DataArguments, TrainingArguments)

# The training components built from the training arguments: which argument sets which keyword (the components keep
# timm's names, the arguments timm's train.py's).
OPTIMIZER_KEYWORDS = {"lr": "lr", "weight_decay": "weight_decay", "opt_betas": "betas", "opt_eps": "eps"}
SCHEDULE_KEYWORDS = {
    "epochs": "epochs", "warmup_epochs": "warmup_epochs", "warmup_lr": "warmup_lr", "min_lr": "min_lr",
    "lr_schedule_unit": "unit",
}  # fmt: skip
AUGMENTATION_KEYWORDS = {
    "scale": "scale", "ratio": "ratio", "train_interpolation": "interpolation", "hflip": "hflip",
    "aa": "auto_augment", "color_jitter": "color_jitter", "reprob": "re_prob", "remode": "re_mode",
    "recount": "re_count", "augmentation_order": "order", "erase_after_mixing": "erase_after_mixing",
}  # fmt: skip
MIXING_KEYWORDS = {
    "mixup": "mixup_alpha", "cutmix": "cutmix_alpha", "cutmix_minmax": "cutmix_minmax", "mixup_prob": "prob",
    "mixup_switch_prob": "switch_prob", "mixup_mode": "mode", "smoothing": "label_smoothing",
    "mixup_off_epoch": "off_epoch",
}  # fmt: skip


@dataclass
class Arguments:
    """
    A run's arguments, in the three groups of transformers' image-classification example: `model`, `data` and
    `training`. `recipe_source` says which recipe is in force and why (set by [`parse_args`]).
    """

    model: ModelArguments = field(default_factory=ModelArguments)
    data: DataArguments = field(default_factory=DataArguments)
    training: TrainingArguments = field(default_factory=TrainingArguments)
    recipe_source: str | None = None

    def flat(self) -> dict[str, Any]:
        """Every argument by name, whatever its group (the names are unique: they are the command line's)."""
        groups = (self.model, self.data, self.training)
        return {f.name: getattr(group, f.name) for group in groups for f in dataclasses.fields(group)}

    def validate(self) -> None:
        """Raises a [`UsageError`] naming the first inconsistent argument (or a missing directory)."""
        self.model.validate()
        self.data.validate()
        self.training.validate()
        if self.data.relabel_root and self.training.mixing_enabled and self.training.mixup_mode != "batch":
            # Dense labels are mixed with the batch's one λ and CutMix box (mix_dense_labels).
            raise UsageError(f"--relabel_root needs --mixup_mode batch, got {self.training.mixup_mode!r}.")

    def recipe_values(self) -> dict[str, Any]:
        """The values a recipe can hold, e.g. to record them in a model card."""
        values = {name: value for name, value in self.flat().items() if name not in NOT_IN_RECIPES}
        if values.get("config_overrides"):
            values["config_overrides"] = self.model.config_overrides_dict()
        return values

    def model_card_recipe(self) -> dict[str, Any]:
        """The recipe recorded in a model card: [`recipe_values`] without how this process was started (resuming)."""
        return {key: value for key, value in self.recipe_values().items() if key not in RUN_CONTROL_FIELDS}


def recipe_keys() -> list[str]:
    """The keys a recipe may hold: every argument but `recipe` and `hub_token`."""
    return [f.name for group in GROUPS for f in dataclasses.fields(group) if f.name not in NOT_IN_RECIPES]


def config_override_keys() -> set[str]:
    """The `RefinerViTConfig` fields `config_overrides` may set (its dataclass fields and `num_labels`)."""
    fields = {f.name for f in dataclasses.fields(RefinerViTConfig)} | {"num_labels"}
    return fields - set(NOT_OVERRIDABLE)


def check_config_overrides(overrides: dict[str, Any], source: str) -> None:
    """
    Raises a [`UsageError`] for a key of `overrides` that is not a `RefinerViTConfig` field, with the closest fields:
    the configuration would otherwise keep such a key as an unused attribute and train its default instead.
    """
    allowed = config_override_keys()
    for key in overrides:
        if key in NOT_OVERRIDABLE:
            raise UsageError(f"{source}: `{key}` cannot be set: {NOT_OVERRIDABLE[key]}.")
        if key not in allowed:
            hint = did_you_mean(str(key), allowed)
            raise UsageError(f"{source}: {key!r} is not a RefinerViTConfig field.{hint}")


def resolve_recipe_path(name: str | Path, recipe_dirs: Iterable[str | Path] = ()) -> Path:
    """A recipe path as given, or the file of that name in one of `recipe_dirs`."""
    path = Path(name).expanduser()
    candidates = [path] + ([] if path.is_absolute() else [Path(directory) / name for directory in recipe_dirs])
    for candidate in candidates:
        if candidate.exists() or candidate.is_symlink():
            try:  # a directory, a FIFO or a device is named as such, not taken for a missing file
                return check_input_file("--recipe", candidate)
            except UsageError as error:
                raise RecipeError(str(error)) from None
    searched = ", ".join(str(d) for d in recipe_dirs) or "nowhere else"
    raise RecipeError(f"Recipe {str(name)!r} not found (looked for it as a path, then in {searched}).")


def _coerce(action: argparse.Action, key: str, value: Any, source: Path) -> Any:
    """Converts a YAML value to the argument's type, raising a `RecipeError` that names the file and key."""
    if value is None:
        return None
    if key == "config_overrides" and isinstance(value, dict):
        try:
            check_config_overrides(value, f"{source}: config_overrides")
        except UsageError as error:
            raise RecipeError(str(error)) from None
        return json.dumps(value)

    def convert(item: Any) -> Any:
        if action.type is string_to_bool:
            return item if isinstance(item, bool) else string_to_bool(str(item))
        if isinstance(item, bool):
            raise TypeError  # a YAML boolean where a number or a string is expected
        if action.type is float and isinstance(item, (int, float)):
            return float(item)
        if action.type is int and isinstance(item, int):
            return item
        if isinstance(item, str):
            return action.type(item)  # e.g. YAML reads `1e-3` as a string
        raise TypeError

    try:
        if action.nargs == "+":
            if not isinstance(value, (list, tuple)):
                raise TypeError
            converted: Any = [convert(item) for item in value]
        else:
            if isinstance(value, (list, tuple, dict)):
                raise TypeError
            converted = convert(value)
    except (TypeError, ValueError, argparse.ArgumentTypeError):
        name = getattr(action.type, "__name__", "value")
        expected = (
            "a list"
            if action.nargs == "+"
            else {"string_to_bool": "bool", "<lambda>": "one of the choices"}.get(name, name)
        )
        raise RecipeError(f"{source}: `{key}: {value!r}` has the wrong type (expected {expected}).") from None
    if action.choices is not None and converted not in action.choices:
        raise RecipeError(f"{source}: `{key}: {value!r}` is not one of {list(action.choices)}.")
    return converted


def load_recipe(path: str | Path, parser: ArgumentParser | None = None) -> dict[str, Any]:
    """
    Reads a recipe and checks it against the arguments: every key must be an argument (a typo is reported with the
    closest names) and every value of the argument's type. Returns the values converted to the arguments' types.
    """
    path = Path(path)
    parser = parser or build_parser()
    try:
        recipe = yaml.safe_load(path.read_text())
    except (OSError, yaml.YAMLError) as error:
        raise RecipeError(f"Cannot read recipe {path}: {error}") from None
    if recipe is None:
        return {}
    if not isinstance(recipe, dict):
        raise RecipeError(f"Recipe {path} must be a mapping of argument names to values, got {type(recipe).__name__}.")
    actions: dict[str, argparse.Action] = {}
    for action in parser._actions:
        # The first action of a destination is the argument itself (`--no_x` complements come after it).
        if action.option_strings:
            actions.setdefault(action.dest, action)
    allowed = set(recipe_keys())
    values = {}
    for key, value in recipe.items():
        if key not in allowed:
            if key in NOT_IN_RECIPES:
                raise RecipeError(f"{path}: unknown recipe key {key!r}: it may not be set in a recipe.")
            hint = RETIRED_ARGUMENTS.get(str(key))
            raise RecipeError(
                f"{path}: unknown recipe key {key!r}: it "
                + (hint if hint else f"is not an argument of the trainer.{did_you_mean(str(key), allowed)}")
            )
        values[key] = _coerce(actions[key], key, value, path)
        if (problem := range_error(key, values[key])) is not None:
            raise RecipeError(f"{path}: `{key}: {_shown(values[key])}` {problem}.")
    return values


class HelpFormatter(argparse.ArgumentDefaultsHelpFormatter, argparse.RawDescriptionHelpFormatter):
    """Shows each argument's default and keeps the description's paragraphs."""


class ArgumentParser(OneLineErrors, HfArgumentParser):
    """
    `HfArgumentParser` without abbreviations, whose usage errors are one-line [`UsageError`]s, and an unknown argument
    is answered with the closest argument (or the name this trainer gives it, for names from other trainers).
    """

    def __init__(self, dataclass_types, aliases: dict[str, str] | None = None, **kwargs) -> None:
        kwargs.setdefault("formatter_class", HelpFormatter)
        super().__init__(dataclass_types, **kwargs)
        self.aliases = aliases or {}

    def parse_dataclasses(self, argv: Sequence[str] | None = None) -> tuple[Any, ...]:
        """The arguments as instances of the parser's dataclasses; an unknown argument is a [`UsageError`]."""
        *instances, remaining = self.parse_args_into_dataclasses(
            args=argv, return_remaining_strings=True, look_for_args_file=False
        )
        if remaining:
            raise self.unknown_argument_error(remaining)
        return tuple(instances)

    def unknown_argument_error(self, remaining: Sequence[str]) -> UsageError:
        option = next((item for item in remaining if item.startswith("-")), None)
        if option is None:
            return UsageError(f"unexpected value {remaining[0]!r}: every value follows its --argument.")
        name = option.lstrip("-").split("=", 1)[0].replace("-", "_")
        if name in RETIRED_ARGUMENTS:
            return UsageError(f"--{name} {RETIRED_ARGUMENTS[name]}.")
        known = [f.name for dtype in self.dataclass_types for f in dataclasses.fields(dtype) if f.init]
        hint = f" Did you mean --{self.aliases[name]}?" if name in self.aliases else did_you_mean(name, known, "--")
        return UsageError(f"unknown argument {option}.{hint} (--help lists the arguments)")


DESCRIPTION = (
    "Train or fine-tune Refiner-ViT on an image classification data set with accelerate.",
    "Values come from the argument defaults, then a recipe (--recipe FILE), then the command line. Without --recipe, "
    f"a run with no data, model or recipe argument (a bare run) uses {EMBEDDED_RECIPE} (the embedded Fashion-MNIST "
    f"run); a run with --model_name_or_path uses {FINETUNE_RECIPE} (fine-tuning on your data); a run on your data "
    f"without a model argument, on a machine without a GPU, uses {CPU_RECIPE} (a small Refiner-ViT at 64 px); any "
    f"other run uses {DEFAULTS_DESCRIPTION}. The ImageNet recipes (refiner_vit_s.yaml, ...) apply only when named.",
)


def _paragraphs(*paragraphs: str) -> str:
    return "\n\n".join(textwrap.fill(paragraph, width=100) for paragraph in paragraphs)


def build_parser(add_help: bool = True) -> ArgumentParser:
    return ArgumentParser(GROUPS, aliases=ARGUMENT_ALIASES, description=_paragraphs(*DESCRIPTION), add_help=add_help)


def accelerator_available() -> bool:
    """Whether this machine has a GPU (or another accelerator torch can train on)."""
    return torch.accelerator.is_available() if hasattr(torch, "accelerator") else torch.cuda.is_available()


def default_recipe(args: argparse.Namespace) -> tuple[str | None, str]:
    """
    The recipe a run without `--recipe` uses, and why: `finetune_own_data.yaml` with `--model_name_or_path`, the
    embedded run's without any data or model argument, `own_data_cpu.yaml` for data without a model argument (nor
    `--config_overrides`) on a machine without a GPU (the paper's recipe would train Refiner-ViT-S at 224 px for 310
    epochs there), else none (the argument defaults).
    """
    if args.model_name_or_path is not None:
        return FINETUNE_RECIPE, "the fine-tuning recipe: --model_name_or_path without --recipe"
    if all(getattr(args, name) is None for name in DATA_SOURCE_FIELDS + MODEL_SOURCE_FIELDS):
        return EMBEDDED_RECIPE, "the embedded default run: no data, model or recipe argument"
    if all(getattr(args, name) is None for name in MODEL_CHOICE_FIELDS) and not accelerator_available():
        return CPU_RECIPE, (
            "your data on a machine without a GPU, no --recipe or model argument: a small Refiner-ViT at 64 px; "
            f"--recipe {PAPER_RECIPE} trains the paper's Refiner-ViT-S at 224 px instead, --model_name_or_path "
            "fine-tunes a trained model"
        )
    return None, f"none: {DEFAULTS_DESCRIPTION} (--recipe names another)"


def parse_args(argv: Sequence[str] | None = None, recipe_dirs: Iterable[str | Path] = ()) -> Arguments:
    """
    Parses the command line over the recipe it names, or the one [`default_recipe`] chooses from the other arguments
    (looked up in `recipe_dirs`). `--help` shows the defaults of that recipe.
    """
    recipe_dirs = list(recipe_dirs)
    # A first pass finds the recipe; without help, so that `--help` shows the recipe's values as the defaults.
    first_pass, _ = build_parser(add_help=False).parse_known_args(argv)
    parser = build_parser()
    recipe_path, source = None, None
    if first_pass.recipe is not None:
        recipe_path = resolve_recipe_path(first_pass.recipe, recipe_dirs)
        source = f"{recipe_path} (--recipe)"
    else:
        name, reason = default_recipe(first_pass)
        if name is not None and any((Path(d) / name).is_file() for d in recipe_dirs):
            recipe_path = resolve_recipe_path(name, recipe_dirs)
            source = f"{recipe_path} ({reason})"
        else:
            source = reason if name is None else f"none: {DEFAULTS_DESCRIPTION} ({name} not found)"
    if recipe_path is not None:
        parser.set_defaults(**load_recipe(recipe_path, parser))
    parser.description = _paragraphs(
        *DESCRIPTION, f"The defaults shown below are those of this run's recipe: {source}."
    )
    model, data, training = parser.parse_dataclasses(argv)
    if recipe_path is not None:
        training.recipe = str(recipe_path)
    given = sys.argv[1:] if argv is None else argv
    note = fit_warmup(training, explicit=any(item.split("=", 1)[0] == "--warmup_epochs" for item in given))
    if note and is_main_process():
        print(note, flush=True)
    note = fit_workers(data)
    if note and is_main_process():
        print(note, flush=True)
    args = Arguments(model=model, data=data, training=training, recipe_source=source)
    args.validate()
    return args


def fit_warmup(training: TrainingArguments, explicit: bool) -> str | None:
    """
    Shortens a warmup that the recipe or the defaults set (not `--warmup_epochs`) to half of `--epochs` when it is
    not shorter than the run (e.g. `--epochs 1` with a recipe's 1-epoch warmup), and returns the line that says so;
    an explicit warmup that long stays a [`UsageError`] (see [`TrainingArguments.validate`]).
    """
    epochs, warmup = training.epochs, training.warmup_epochs
    if explicit or epochs not in ARGUMENT_RANGES["epochs"] or warmup not in ARGUMENT_RANGES["warmup_epochs"]:
        return None
    if warmup < epochs:
        return None
    training.warmup_epochs = epochs / 2
    origin = f"the recipe's ({Path(training.recipe).name})" if training.recipe else "the default"

    def epochs_text(value: float) -> str:
        return f"{_shown(float(value))} epoch{'' if value == 1 else 's'}"

    return (
        f"Note: {origin} warmup of {epochs_text(warmup)} is not shorter than --epochs {epochs}: it is shortened to "
        f"{epochs_text(training.warmup_epochs)} (--warmup_epochs sets it)."
    )


def available_cpus() -> int:
    """The CPUs this process may run on (its affinity, which a container or `taskset` may narrow), at least 1."""
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except AttributeError:  # not on Linux
        return max(1, os.cpu_count() or 1)


def fit_workers(data: DataArguments, cpus: int | None = None) -> str | None:
    """
    Lowers `dataloader_num_workers` to the CPUs there are when it asks for more (the defaults' 8 on a 2-core laptop:
    the workers then only compete with training), and returns the line that says so.
    """
    cpus = available_cpus() if cpus is None else cpus
    if data.dataloader_num_workers <= cpus:
        return None
    asked, data.dataloader_num_workers = data.dataloader_num_workers, cpus
    return (
        f"Note: --dataloader_num_workers {asked} is more than the {cpus} CPU{'' if cpus == 1 else 's'} here: using "
        f"{cpus}."
    )


__all__ = [
    "ARGUMENT_RANGES",
    "Arguments",
    "ArgumentParser",
    "DataArguments",
    "ModelArguments",
    "Range",
    "RecipeError",
    "UsageError",
    "TrainingArguments",
    "build_parser",
    "check_config_overrides",
    "check_input_directory",
    "check_ranges",
    "accelerator_available",
    "available_cpus",
    "default_recipe",
    "fit_warmup",
    "fit_workers",
    "load_recipe",
    "parse_args",
    "recipe_keys",
    "resolve_recipe_path",
]
