"""
Soft labels from relabel maps, following the crop, flip and geometric augmentation applied to the image.

A relabel map covers the whole training image on the teacher's grid. For a training crop, the map's top-k scores are
scattered into a `(num_classes, h, w)` map and the crop's box is pooled with `torchvision.ops.roi_align`: onto the
model's token grid for the tokens' labels, and to a single position for the image's class target (the teacher's
label of the crop, as the original training uses for the class token). Each pooled position's scores become a
distribution over classes, smoothed like the class targets (`p * (1 - s + s / C) + s / C`, the original's formula),
and the token labels are mirrored when the image was flipped.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Literal

import torch
import torch.nn.functional as F
from torchvision.ops import roi_align

from .store import RelabelMap


Normalization = Literal["softmax", "sum"]
# How a store lays its maps out: "hw" (rows are the image's y, as the generator of the public relabel sets writes
# them) or "wh" (transposed).
Layout = Literal["hw", "wh"]


def scatter_top_k(relabel: RelabelMap, num_classes: int) -> torch.Tensor:
    """The `(num_classes, h, w)` score map with the top-k scores at their classes and zeros elsewhere."""
    k, height, width = relabel.scores.shape
    full = relabel.scores.new_zeros(num_classes, height, width)
    return full.scatter_(0, relabel.indices, relabel.scores)


def normalize_scores(pooled: torch.Tensor, normalization: Normalization) -> torch.Tensor:
    """Pooled scores `(num_classes, ...)` as distributions over classes: a softmax (stored logits) or by their sum."""
    if normalization == "softmax":
        return pooled.softmax(dim=0)
    if normalization == "sum":
        return pooled / pooled.sum(dim=0, keepdim=True).clamp_min(torch.finfo(pooled.dtype).tiny)
    raise ValueError(f"`normalization` must be 'softmax' or 'sum', got {normalization!r}.")


def smooth_labels(labels: torch.Tensor, smoothing: float) -> torch.Tensor:
    """
    Label smoothing of distributions over classes (dimension 0) as the original applies it to teacher labels:
    `p * (1 - s + s / C) + s / C`. (Their sum is 1 + s / C, as in the original.)
    """
    if smoothing == 0:
        return labels
    num_classes = labels.shape[0]
    off = smoothing / num_classes
    return labels * (1.0 - smoothing + off) + off


def follow_geometry(
    dense: torch.Tensor,
    matrices: Sequence[Sequence[float]],
    image_size: tuple[int, int],
    fill: torch.Tensor,
) -> torch.Tensor:
    """
    Moves token labels `(num_classes, h, w)` the way augmentation moved the image's pixels after the crop and flip.

    Args:
        dense: the labels of the tokens of the image as it was before the transforms.
        matrices: the transforms applied in turn, as PIL `Image.AFFINE` coefficients `(a, b, c, d, e, f)` mapping an
            output point `(x, y)` to the input point `(a x + b y + c, d x + e y + f)`, in pixels of `image_size`.
        image_size: `(height, width)` of the image the tokens tile.
        fill: `(num_classes,)` the label of what came from outside the image (the transforms' fill colour).

    Each token takes the labels at the point its centre came from (bilinear between token centres); a token whose
    point lies partly or wholly outside the image takes the fill label in that proportion.
    """
    if not matrices:
        return dense
    height, width = image_size
    rows, columns = dense.shape[-2:]
    y, x = torch.meshgrid(
        (torch.arange(rows, dtype=dense.dtype) + 0.5) * height / rows,
        (torch.arange(columns, dtype=dense.dtype) + 0.5) * width / columns,
        indexing="ij",
    )
    for a, b, c, d, e, f in reversed(matrices):  # the last transform's output back to the first one's input
        x, y = a * x + b * y + c, d * x + e * y + f
    grid = torch.stack([x / width * 2 - 1, y / height * 2 - 1], dim=-1)[None]
    sampled = F.grid_sample(dense[None], grid, mode="bilinear", padding_mode="zeros", align_corners=False)[0]
    inside = F.grid_sample(
        torch.ones_like(dense[:1])[None], grid, mode="bilinear", padding_mode="zeros", align_corners=False
    )[0]
    return sampled + (1 - inside) * fill[:, None, None]


def pool_through_augmentation(
    full: torch.Tensor,
    crop_box: tuple[float, float, float, float],
    image_size: tuple[int, int],
    output_size: int,
    flipped: bool,
    matrices: Sequence[Sequence[float]],
    fill: torch.Tensor,
) -> tuple[torch.Tensor, torch.Tensor]:
    """
    Pools a whole image's score map `(num_classes, h, w)` over a crop cut after the image was flipped and moved (the
    original token-labeling order): each of the `output_size` x `output_size` bins of the crop box averages the map at
    the points its sample points came from, sampled as `roi_align(aligned=True)` samples a bin (its adaptive number of
    points per bin, bilinear between map positions, clamped at the border); a point that came from outside the image
    counts as `fill`. Sampling the unmoved map at the points' origins keeps the map's own resolution (moving the
    coarse map first, then pooling, would interpolate twice). Without a flip or a transform this is `roi_align`.

    Args:
        full: the score map, covering the whole original image.
        crop_box: `(top, left, height, width)` of the crop in the pixels of the augmented whole image.
        image_size: `(height, width)` of the original image (the flip and `matrices` keep it).
        output_size: side of the token grid.
        flipped: whether the whole image was mirrored first.
        matrices: the affine transforms applied after the flip, as PIL `Image.AFFINE` coefficients (output point to
            input point) in the image's pixels.
        fill: `(num_classes,)` the scores of what came from outside the image.

    Returns:
        The bins' scores `(num_classes, output_size, output_size)` and the whole crop's `(num_classes,)`.
    """

    def pool(bins: int) -> torch.Tensor:
        height, width = image_size
        top, left, box_height, box_width = crop_box
        map_height, map_width = full.shape[-2:]
        # roi_align's adaptive sampling: ceil(bin size in map positions) points per bin and direction.
        rows = max(1, math.ceil(box_height / height * map_height / bins))
        columns = max(1, math.ceil(box_width / width * map_width / bins))
        y = top + (torch.arange(bins * rows, dtype=full.dtype) + 0.5) * box_height / (bins * rows)
        x = left + (torch.arange(bins * columns, dtype=full.dtype) + 0.5) * box_width / (bins * columns)
        y, x = torch.meshgrid(y, x, indexing="ij")
        for a, b, c, d, e, f in reversed(matrices):  # the last transform's output back to the first one's input
            x, y = a * x + b * y + c, d * x + e * y + f
        if flipped:
            x = width - x
        grid = torch.stack([x / width * 2 - 1, y / height * 2 - 1], dim=-1)[None]
        sampled = F.grid_sample(full[None], grid, mode="bilinear", padding_mode="border", align_corners=False)[0]
        inside = (x >= 0) & (x <= width) & (y >= 0) & (y <= height)
        sampled = torch.where(inside, sampled, fill[:, None, None])
        return F.avg_pool2d(sampled[None], kernel_size=(rows, columns))[0]

    return pool(output_size), pool(1)[:, 0, 0]


@dataclass(frozen=True)
class CropLabels:
    """A crop's teacher labels: `class_target` `(num_classes,)` and `dense` `(num_classes, size, size)`."""

    class_target: torch.Tensor
    dense: torch.Tensor


def crop_soft_labels(
    relabel: RelabelMap,
    crop_box: tuple[float, float, float, float],
    image_size: tuple[int, int],
    output_size: int,
    num_classes: int,
    flipped: bool = False,
    normalization: Normalization = "softmax",
    smoothing: float = 0.0,
    layout: Layout = "hw",
    geometry: Sequence[Sequence[float]] = (),
    output_size_pixels: tuple[int, int] | None = None,
    augmented_before_crop: bool = False,
) -> CropLabels:
    """
    The teacher's labels of a crop: its class target (the crop pooled to one position) and its tokens' soft labels.

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
        smoothing: label smoothing, applied to both (see [`smooth_labels`]).
        layout: `"hw"` for maps whose rows are the image's y, `"wh"` for transposed ones.
        geometry: the affine transforms augmentation applied after the flip (see [`follow_geometry`]); the token
            labels follow them, the class target (the crop's label) does not.
        output_size_pixels: `(height, width)` of the augmented image, in whose pixels `geometry` is given.
        augmented_before_crop: the flip and `geometry` were applied to the whole image before the crop was cut (the
            original token-labeling order), `geometry` in the pixels of `image_size`: the crop's tokens and the crop
            itself are pooled from the map where their pixels came from ([`pool_through_augmentation`]), so that
            the class target follows the geometry too, as in the original.
    """
    if layout not in ("hw", "wh"):
        raise ValueError(f"`layout` must be 'hw' or 'wh', got {layout!r}.")
    if layout == "wh":
        relabel = RelabelMap(scores=relabel.scores.transpose(1, 2), indices=relabel.indices.transpose(1, 2))
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
    full = scatter_top_k(relabel, num_classes)
    if augmented_before_crop:
        # What moved in from outside the image is the fill colour: scores that normalise to a uniform label (zero
        # logits; probabilities of 1 / C, the mass of one stored position).
        fill = full.new_full((num_classes,), 0.0 if normalization == "softmax" else 1.0 / num_classes)
        dense, whole = pool_through_augmentation(
            full, crop_box, image_size, output_size, flipped=flipped, matrices=geometry, fill=fill
        )
        return CropLabels(
            class_target=smooth_labels(normalize_scores(whole, normalization), smoothing),
            dense=smooth_labels(normalize_scores(dense, normalization), smoothing),
        )
    full = full.unsqueeze(0)
    dense = roi_align(full, box, output_size=(output_size, output_size), spatial_scale=1.0, aligned=True)[0]
    whole = roi_align(full, box, output_size=(1, 1), spatial_scale=1.0, aligned=True)[0, :, 0, 0]
    if flipped:
        dense = dense.flip(-1)
    dense = smooth_labels(normalize_scores(dense, normalization), smoothing)
    if geometry:
        if output_size_pixels is None:
            raise ValueError("`output_size_pixels` is needed to move the labels with `geometry`.")
        # What moved in from outside the image is the transforms' fill colour: a uniform label, smoothed alike.
        fill = smooth_labels(dense.new_full((num_classes,), 1.0 / num_classes), smoothing)
        dense = follow_geometry(dense, geometry, output_size_pixels, fill)
    return CropLabels(class_target=smooth_labels(normalize_scores(whole, normalization), smoothing), dense=dense)


def layout_evidence(
    relabel: RelabelMap, class_index: int, box: tuple[float, float, float, float], image_size: tuple[int, int]
) -> dict[str, float]:
    """
    Which way a store lays its maps out, from one map of an image whose object's bounding box is known (e.g. from
    ImageNet's training boxes): the share of the object class's score mass that falls inside the box when the map's
    rows are read as the image's y (`"hw"`) and as its x (`"wh"`). The reading with the larger share is the store's
    layout (`--relabel_layout`); a box far from square and off the diagonal tells them apart best.

    Args:
        relabel: the image's relabel map.
        class_index: the object's class.
        box: `(x_min, y_min, x_max, y_max)` of the object in the image's pixels.
        image_size: `(height, width)` of the image.
    """
    full = scatter_top_k(relabel, max(int(relabel.indices.max()) + 1, class_index + 1))[class_index].clamp_min(0)
    height, width = image_size
    x_min, y_min, x_max, y_max = box
    shares = {}
    for layout, grid in (("hw", full), ("wh", full.T)):
        rows, columns = grid.shape
        ys = (torch.arange(rows) + 0.5) * height / rows
        xs = (torch.arange(columns) + 0.5) * width / columns
        inside = ((ys >= y_min) & (ys <= y_max))[:, None] & ((xs >= x_min) & (xs <= x_max))[None, :]
        total = grid.sum()
        shares[layout] = float(grid[inside].sum() / total) if total > 0 else 0.0
    return shares


__all__ = [
    "CropLabels",
    "crop_soft_labels",
    "follow_geometry",
    "layout_evidence",
    "normalize_scores",
    "pool_through_augmentation",
    "scatter_top_k",
    "smooth_labels",
]
