"""
Dense predictions of a teacher classifier, for making relabel maps with any `AutoModelForImageClassification`.

The teacher classifies every position instead of the pooled image: a Refiner-ViT uses its dense auxiliary head, a
ViT-like model applies its classifier to every patch token, and a CNN applies the linear layer of its classifier to
every position of its last feature map (the per-position equivalent of classifying the average-pooled features).
"""

from __future__ import annotations

import inspect
import math

import torch
from torch import nn


def _final_linear(module: nn.Module, name: str) -> nn.Linear:
    linears = (
        [m for m in module.modules() if isinstance(m, nn.Linear)] if not isinstance(module, nn.Linear) else [module]
    )
    if not linears:
        raise ValueError(f"The teacher's `{name}` has no linear layer to apply at every position.")
    return linears[-1]


def _tokens_to_grid(tokens: torch.Tensor) -> torch.Tensor:
    """`(B, prefix + h*w, C)` → `(B, C, h, w)`, dropping the class (and distillation) token before the square grid."""
    batch, length, channels = tokens.shape
    side = math.isqrt(length)
    if length - side * side > 2:
        raise ValueError(f"Cannot read {length} tokens as a square grid after at most two prefix tokens.")
    patches = tokens[:, length - side * side :]
    return patches.transpose(1, 2).reshape(batch, channels, side, side)


@torch.no_grad()
def dense_teacher_logits(model: nn.Module, pixel_values: torch.Tensor) -> torch.Tensor:
    """
    Class logits of `model` at every position of its output grid, `(B, num_labels, h, w)`.

    Args:
        model: an image classifier in eval mode: a `RefinerViTForImageClassification` with its auxiliary head, a
            ViT-like model (`base_model` returns tokens, `classifier` is linear) or a CNN (`base_model` returns a
            `(B, C, h, w)` feature map, `classifier` ends with a linear layer).
        pixel_values: the whole images, prepared for the teacher.
    """
    if getattr(model, "aux_classifier", None) is not None:
        aux_logits = model(pixel_values, interpolate_pos_encoding=True).aux_logits
        return _tokens_to_grid(aux_logits)
    classifier = getattr(model, "classifier", None)
    if classifier is None:
        raise ValueError(f"{type(model).__name__} has no `classifier` head to apply densely.")
    linear = _final_linear(classifier, "classifier")
    base = model.base_model
    accepts_interpolation = "interpolate_pos_encoding" in inspect.signature(base.forward).parameters
    kwargs = {"interpolate_pos_encoding": True} if accepts_interpolation else {}
    features = base(pixel_values, **kwargs).last_hidden_state
    if features.ndim == 4:  # CNN feature map (B, C, h, w)
        return torch.einsum("bchw,kc->bkhw", features, linear.weight) + linear.bias[None, :, None, None]
    if features.ndim == 3:  # tokens (B, L, D)
        return _tokens_to_grid(linear(features))
    raise ValueError(f"Unexpected teacher features of shape {tuple(features.shape)}.")


def top_k_maps(dense_logits: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The top-k scores and class indices at every position: two `(B, k, h, w)` tensors."""
    if k > dense_logits.shape[1]:
        raise ValueError(f"Cannot keep the top {k} of {dense_logits.shape[1]} classes.")
    scores, indices = dense_logits.topk(k, dim=1)
    return scores, indices


__all__ = ["dense_teacher_logits", "top_k_maps"]
