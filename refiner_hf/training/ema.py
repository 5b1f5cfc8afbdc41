"""
Model EMA: an exponential moving average of the weights, evaluated beside the model (the published accuracies of
the original training are the EMA model's); each evaluation keeps the better of the two (`evaluation.better_weights`),
since over a short run the average lags behind the weights. It is timm's `ModelEmaV3`, an `nn.Module` whose
`state_dict` holds the averaged parameters and buffers, so accelerate checkpoints it as a registered object.
"""

from __future__ import annotations

from timm.utils import ModelEmaV3
from torch import nn


def build_model_ema(model: nn.Module, decay: float, warmup: bool = False) -> ModelEmaV3:
    """
    The EMA of `model` (parameters and buffers, in the model's dtype and on its device), updated by
    `ema.update(model, step=global_step)` after every optimizer step.

    Args:
        model: the unwrapped model, after its weights are final on every process (loaded or broadcast).
        decay: the decay per update (0.99996 in the original recipe).
        warmup: ramp the decay up from 0 as `1 - (1 + step)^(-2/3)`, capped at `decay` (timm's warmup), so that a
            short run's average forgets the random initialisation; without it every update uses `decay`, as the
            original training does.
    """
    return ModelEmaV3(model, decay=decay, use_warmup=warmup)


__all__ = ["build_model_ema"]
