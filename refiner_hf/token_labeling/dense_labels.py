"""
Dense (per-token) soft labels from relabel maps, following the crop and flip applied to the image.

A relabel map covers the whole training image on the teacher's grid. For a training crop, the map's top-k scores are
scattered into a `(num_classes, h, w)` map, the crop's box is pooled onto the model's token grid with
`torchvision.ops.roi_align`, the result is mirrored when the image was flipped, and each token's scores are turned into
a distribution over classes.
"""

from __future__ import annotations

from typing import Literal

import torch
from torchvision.ops import roi_align

from .store import RelabelMap


Normalization = Literal["softmax", "sum"]


def scatter_top_k(relabel: RelabelMap, num_classes: int) -> torch.Tensor:
    """The `(num_classes, h, w)` score map with the top-k scores at their classes and zeros elsewhere."""
    k, height, width = relabel.scores.shape
    full = relabel.scores.new_zeros(num_classes, height, width)
    return full.scatter_(0, relabel.indices, relabel.scores)


def dense_soft_labels(
    relabel: RelabelMap,
    crop_box: tuple[float, float, float, float],
    image_size: tuple[int, int],
    output_size: int,
    num_classes: int,
    flipped: bool = False,
    normalization: Normalization = "softmax",
) -> torch.Tensor:
    """
    The `(num_classes, output_size, output_size)` soft labels of the tokens of a crop.

    Args:
        relabel: the image's relabel map (top-k scores and class indices on the teacher's grid).
        crop_box: `(top, left, height, width)` of the crop in the original image's pixels (as returned by
            `RandomResizedCrop.get_params`).
        image_size: `(height, width)` of the original image.
        output_size: side of the model's token grid (14 at 224 px with 16-pixel patches).
        num_classes: number of classes of the model's head.
        flipped: whether the crop was mirrored horizontally afterwards.
        normalization: `"softmax"` over classes (the released training code; the stored scores are logits) or
            `"sum"` (divide by the pooled scores' sum, for stored probabilities).
    """
    image_height, image_width = image_size
    top, left, height, width = crop_box
    _, map_height, map_width = relabel.scores.shape
    # Pixel i of a map covers [i, i + 1) in map units; `aligned=True` samples at pixel centres accordingly.
    box = torch.tensor(
        [[
            0.0,
            left / image_width * map_width,
            top / image_height * map_height,
            (left + width) / image_width * map_width,
            (top + height) / image_height * map_height,
        ]],
        dtype=relabel.scores.dtype,
    )  # fmt: skip
    full = scatter_top_k(relabel, num_classes).unsqueeze(0)
    pooled = roi_align(full, box, output_size=(output_size, output_size), spatial_scale=1.0, aligned=True)[0]
    if flipped:
        pooled = pooled.flip(-1)
    if normalization == "softmax":
        return pooled.softmax(dim=0)
    if normalization == "sum":
        return pooled / pooled.sum(dim=0, keepdim=True).clamp_min(torch.finfo(pooled.dtype).tiny)
    raise ValueError(f"`normalization` must be 'softmax' or 'sum', got {normalization!r}.")


def image_label_dense_targets(targets: torch.Tensor, grid_size: int) -> torch.Tensor:
    """Without relabel maps every token takes its image's (soft) target: `(B, C)` → `(B, C, grid, grid)`."""
    return targets[:, :, None, None].expand(-1, -1, grid_size, grid_size)


def mix_dense_labels(
    dense: torch.Tensor,
    lam: float,
    cutmix_box: tuple[int, int, int, int] | None = None,
    image_size: tuple[int, int] | None = None,
) -> torch.Tensor:
    """
    Mixes a batch of dense labels `(B, C, S, S)` the way the images were mixed with the batch reversed: mixup blends
    every token's label (`lam * own + (1 - lam) * reversed`); CutMix replaces the labels of the tokens inside the box
    `(y_low, y_high, x_low, x_high)` (image pixels of `image_size`) by the reversed batch's.
    """
    reversed_batch = dense.flip(0)
    if cutmix_box is None:
        return lam * dense + (1.0 - lam) * reversed_batch
    if image_size is None:
        raise ValueError("`image_size` is needed to place a CutMix box on the token grid.")
    size = dense.shape[-1]
    y_low, y_high, x_low, x_high = (
        round(value * size / extent)
        for value, extent in zip(cutmix_box, (image_size[0], image_size[0], image_size[1], image_size[1]))
    )
    mixed = dense.clone()
    mixed[..., y_low:y_high, x_low:x_high] = reversed_batch[..., y_low:y_high, x_low:x_high]
    return mixed


def flatten_dense_labels(dense: torch.Tensor) -> torch.Tensor:
    """`(B, C, S, S)` → `(B, S * S, C)`, the token order of the model's patch tokens (row-major)."""
    return dense.flatten(2).transpose(1, 2)


__all__ = [
    "dense_soft_labels",
    "flatten_dense_labels",
    "image_label_dense_targets",
    "mix_dense_labels",
    "scatter_top_k",
]
