"""
Optimizer and learning-rate schedule of the training recipe, built from timm's implementations.

The original training (timm's `train.py`) steps the cosine schedule once per epoch: `t_initial = epochs`, a linear
warmup from `warmup_lr` over `warmup_epochs` that overrides the first epochs of the cosine, `lr_min` at the end, then
`cooldown_epochs` more epochs at `lr_min` (a single cycle, so past `t_initial` the schedule stays at `lr_min`).
With `lr_schedule_unit="step"` the same curve is evaluated after every optimizer step instead.
"""

from __future__ import annotations

from collections.abc import Iterable

import torch
from timm.optim import param_groups_weight_decay
from timm.scheduler import CosineLRScheduler
from torch import nn


# Parameters without weight decay besides the 1-D ones (norms, biases, layer scales), as name patterns.
NO_WEIGHT_DECAY = ("*embeddings.position_embeddings", "*embeddings.cls_token")


def no_weight_decay_names(model: nn.Module) -> set[str]:
    """Names of the parameters [`build_optimizer`] puts in its group without weight decay."""
    excluded = {
        id(p)
        for group in build_optimizer(model, 1e-3, 1.0).param_groups
        if group["weight_decay"] == 0
        for p in group["params"]
    }
    return {name for name, param in model.named_parameters() if id(param) in excluded}


def build_optimizer(
    model: nn.Module, lr: float, weight_decay: float, betas: Iterable[float] = (0.9, 0.999), eps: float = 1e-8
) -> torch.optim.AdamW:
    """AdamW with two groups: weight decay on the matrices and convolutions, none on the rest (see above)."""
    groups = param_groups_weight_decay(model, weight_decay=weight_decay, no_weight_decay_list=NO_WEIGHT_DECAY)
    return torch.optim.AdamW(groups, lr=lr, betas=tuple(betas), eps=eps)


def build_scheduler(
    optimizer: torch.optim.Optimizer,
    epochs: int,
    warmup_epochs: float,
    warmup_lr: float,
    min_lr: float,
    unit: str = "epoch",
    updates_per_epoch: int = 1,
) -> CosineLRScheduler:
    """
    timm's cosine schedule in the original recipe's form (see the module docstring). Call `step(epoch)` at the start
    of every epoch and `step_update(global_step)` after every optimizer step; the one that does not match `unit` does
    nothing.
    """
    if unit not in ("epoch", "step"):
        raise ValueError(f"`unit` must be 'epoch' or 'step', got {unit!r}.")
    scale = 1 if unit == "epoch" else updates_per_epoch
    return CosineLRScheduler(
        optimizer,
        t_initial=epochs * scale,
        lr_min=min_lr,
        warmup_t=round(warmup_epochs * scale),
        warmup_lr_init=warmup_lr,
        cycle_limit=1,
        t_in_epochs=unit == "epoch",
    )


__all__ = ["NO_WEIGHT_DECAY", "build_optimizer", "build_scheduler", "no_weight_decay_names"]
