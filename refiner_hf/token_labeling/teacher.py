"""
Dense predictions of a teacher classifier, for making relabel maps with any `AutoModelForImageClassification`.

The teacher classifies every position instead of the pooled image: a Refiner-ViT uses its dense auxiliary head; the
others apply their classifier's head to the features at every position, prepared as the head prepares the pooled
features. A CNN whose head reads average-pooled features classifies each position of its last feature map; ConvNeXt
normalises the pooled features first (a LayerNorm), so each position is normalised the same way (channels last);
PoolFormer normalises the whole map before pooling, so the map is normalised as a whole. A ViT-like model classifies
every patch token with its classifier; BEiT with mean pooling normalises the pooled tokens, so each token is
normalised. Where the head is linear after the pooling (ResNet, RegNet, PoolFormer, Swin), the dense logits average
to the image's logits exactly; where a normalisation follows the pooling (ConvNeXt, BEiT), closely.
"""

from __future__ import annotations

import inspect
import math
from collections.abc import Callable

import torch
from torch import nn

from ..cli import DataError, UsageError


class UnsupportedTeacherError(DataError, ValueError):
    """A teacher model that cannot classify every position (what it lacks or does differently is named)."""


def _final_linear(module: nn.Module, name: str) -> nn.Linear:
    linears = (
        [m for m in module.modules() if isinstance(m, nn.Linear)] if not isinstance(module, nn.Linear) else [module]
    )
    if not linears:
        raise UnsupportedTeacherError(f"The teacher's `{name}` has no linear layer to apply at every position.")
    return linears[-1]


def _tokens_to_grid(tokens: torch.Tensor) -> torch.Tensor:
    """`(B, prefix + h*w, C)` → `(B, C, h, w)`, dropping the class (and distillation) token before the square grid."""
    batch, length, channels = tokens.shape
    side = math.isqrt(length)
    if length - side * side > 2:
        raise UnsupportedTeacherError(f"Cannot read {length} tokens as a square grid after at most two prefix tokens.")
    patches = tokens[:, length - side * side :]
    return patches.transpose(1, 2).reshape(batch, channels, side, side)


def _channels_last(norm: nn.Module) -> Callable[[torch.Tensor], torch.Tensor]:
    """A normalisation over channels applied at every position of a `(B, C, h, w)` map."""
    return lambda features: norm(features.permute(0, 2, 3, 1)).permute(0, 3, 1, 2)


def _beit_pooler_norm(model: nn.Module) -> Callable[[torch.Tensor], torch.Tensor] | None:
    pooler = getattr(model.base_model, "pooler", None)
    norm = getattr(pooler, "layernorm", None)
    return _channels_last(norm) if norm is not None else None  # None: the class token is classified, unnormalised


# What a family's head does to the pooled features before its linear layer, applied at every position instead (on the
# `(B, C, h, w)` map of features or tokens). Families not listed apply the linear layer to the features as they come:
# CNNs whose head reads average-pooled features (their dense logits are checked to average to the image's logits) and
# the ViT-like families here.
POSITION_NORMS: dict[str, Callable[[nn.Module], Callable[[torch.Tensor], torch.Tensor] | None]] = {
    "convnext": lambda model: _channels_last(model.base_model.layernorm),
    "convnextv2": lambda model: _channels_last(model.base_model.layernorm),
    "poolformer": lambda model: model.norm,
    "beit": _beit_pooler_norm,
    "data2vec-vision": _beit_pooler_norm,
}
# ViT-like families whose tokens (normalised by the backbone) the classifier reads as they are.
TOKEN_FAMILIES = frozenset({"vit", "deit", "swin", "beit", "data2vec-vision"})


@torch.no_grad()
def dense_teacher_logits(model: nn.Module, pixel_values: torch.Tensor) -> torch.Tensor:
    """
    Class logits of `model` at every position of its output grid, `(B, num_labels, h, w)`.

    Args:
        model: an image classifier in eval mode: a `RefinerViTForImageClassification` with its auxiliary head, a
            ViT-like model of the families in `TOKEN_FAMILIES` (`base_model` returns tokens, `classifier` is linear),
            or a CNN (`base_model` returns a `(B, C, h, w)` feature map, `classifier` ends with a linear layer).
        pixel_values: the whole images, prepared for the teacher.

    Raises:
        [`UnsupportedTeacherError`] (a `ValueError`): a teacher this cannot apply at every position: no classifier, a
            ViT-like family not known here, or a CNN whose dense logits do not average to its image logits (its head
            does something per image that is not known here).
    """
    if getattr(model, "aux_classifier", None) is not None:
        aux_logits = model(pixel_values, interpolate_pos_encoding=True).aux_logits
        return _tokens_to_grid(aux_logits)
    classifier = getattr(model, "classifier", None)
    if classifier is None:
        raise UnsupportedTeacherError(f"{type(model).__name__} has no `classifier` head to apply densely.")
    family = getattr(model.config, "model_type", None)
    linear = _final_linear(classifier, "classifier")
    base = model.base_model
    accepts_interpolation = "interpolate_pos_encoding" in inspect.signature(base.forward).parameters
    kwargs = {"interpolate_pos_encoding": True} if accepts_interpolation else {}
    features = base(pixel_values, **kwargs).last_hidden_state
    if features.ndim == 3:  # tokens (B, L, D)
        if family not in TOKEN_FAMILIES:
            raise UnsupportedTeacherError(
                f"Cannot relabel with a {family!r} teacher: how its head reads its tokens is not known here (ViT-like "
                f"families: {', '.join(sorted(TOKEN_FAMILIES))}; CNNs with an average-pooling head)."
            )
        features = _tokens_to_grid(features)
    elif features.ndim != 4:
        raise UnsupportedTeacherError(f"Unexpected teacher features of shape {tuple(features.shape)}.")
    norm = POSITION_NORMS[family](model) if family in POSITION_NORMS else None
    if norm is not None:
        features = norm(features)
    dense = torch.einsum("bchw,kc->bkhw", features, linear.weight) + linear.bias[None, :, None, None]
    if family not in TOKEN_FAMILIES and family not in POSITION_NORMS:
        _check_average_pooling(model, pixel_values, dense, family)
    return dense


def _check_average_pooling(model: nn.Module, pixel_values: torch.Tensor, dense: torch.Tensor, family: str) -> None:
    """A CNN not listed in `POSITION_NORMS` must classify the average of its features: its dense logits average to its
    image logits. Anything else (a normalisation after the pooling, an attention pooling) would give wrong maps."""
    image_logits = model(pixel_values).logits
    difference = (dense.mean(dim=(2, 3)) - image_logits).abs().max().item()
    if not difference <= 1e-4 * max(1.0, image_logits.abs().max().item()):
        raise UnsupportedTeacherError(
            f"Cannot relabel with a {family!r} teacher: its dense logits do not average to its image logits (they "
            f"differ by {difference:.3g}), so its head does more than classify average-pooled features."
        )


def top_k_maps(dense_logits: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The top-k scores and class indices at every position: two `(B, k, h, w)` tensors."""
    if k > dense_logits.shape[1]:
        raise UsageError(f"--top_k {k}: cannot keep the top {k} of the teacher's {dense_logits.shape[1]} classes.")
    scores, indices = dense_logits.topk(k, dim=1)
    return scores, indices


__all__ = ["UnsupportedTeacherError", "dense_teacher_logits", "top_k_maps"]
