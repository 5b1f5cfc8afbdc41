"""
Measures and views of Refiner-ViT attention maps, computed from what the model returns (`output_attentions=True`,
`output_unrefined_attentions=True`).

The paper argues that expanding and convolving the maps makes the heads more diverse and their attention more local.
It builds on DeepViT (Zhou et al., 2021), which measures how alike two attention maps are token by token: for a token
`t`, the column `A[h, :, t]` says how much `t` contributes to every output token, and DeepViT's cross-layer similarity
(its Eq. 2) is the cosine similarity of that column in head `h` of layers `p` and `q`,

    M[p, q, h, t] = <A_p[h, :, t], A_q[h, :, t]> / (|A_p[h, :, t]| |A_q[h, :, t]|),

1 when token `t` plays the same role in both layers; the same cosine between two heads of one layer measures how alike
the heads are. [`cross_layer_similarity`] and [`head_similarity`] compute these.

The plain cosine is not a fair measure of what refinement changes: a refined map is the expanded and convolved map put
through a BatchNorm, which scales it and adds an offset per head. A common positive offset pulls every cosine towards 1
and a map centred near zero pushes it towards 0 or below, whatever the pattern of the attention. Hence
`centered=True`: each column minus its mean before the cosine, i.e. the Pearson correlation of the two columns. It is
unchanged by any positive scale and any offset of either map (per map or per column), equals the cosine for maps
whose columns already have zero mean, and, unlike a distance between normalised distributions, it is defined for
refined maps, which have negative entries. It keeps the sign: an inverted map (a negative scale) correlates at -1.
A column that is constant (a token every output token attends to equally) has no pattern to compare; such columns
are left out of the mean.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F


# A column whose spread is below this fraction of the map's largest entry counts as constant (rounding noise only).
CONSTANT_COLUMN_RTOL = 1e-6


def column_similarity(first: torch.Tensor, second: torch.Tensor, centered: bool = False) -> torch.Tensor:
    """
    Cosine similarity (or, with `centered=True`, Pearson correlation) of matching columns of two sets of maps.

    Args:
        first, second: `(..., tokens, tokens)` maps of the same shape; column `t` (`[..., :, t]`) is what token `t`
            contributes to each output token.
        centered: subtract each column's mean first (scale- and offset-free; see the module docstring).

    Returns:
        `(..., tokens)`: one value in [-1, 1] per column; NaN where either column is constant (zero, or with
        `centered`, the same value throughout).
    """
    if first.shape != second.shape or first.ndim < 2:
        raise ValueError(f"Expected two (..., tokens, tokens) maps of one shape, got {first.shape} and {second.shape}.")
    first, second = first.double(), second.double()
    if centered:
        first = first - first.mean(dim=-2, keepdim=True)
        second = second - second.mean(dim=-2, keepdim=True)
    first_norm, second_norm = first.norm(dim=-2), second.norm(dim=-2)
    similarity = (first * second).sum(dim=-2) / (first_norm * second_norm)

    def floor(maps: torch.Tensor) -> torch.Tensor:
        # Relative to each map's scale: the norm a column of rounding noise would have.
        largest = maps.abs().amax(dim=(-2, -1), keepdim=True).squeeze(-1)
        return CONSTANT_COLUMN_RTOL * largest * math.sqrt(maps.shape[-2])

    constant = (first_norm <= floor(first)) | (second_norm <= floor(second))
    return similarity.masked_fill(constant, float("nan")).float()


def head_similarity(attention: torch.Tensor, centered: bool = False) -> torch.Tensor:
    """
    How alike the heads of one layer are: DeepViT's column-wise cosine similarity between two heads' maps, averaged
    over the tokens and over the head pairs `i < j`.

    Args:
        attention: `(batch, heads, tokens, tokens)` or `(heads, tokens, tokens)` maps of one layer.
        centered: the Pearson correlation of the columns instead of their cosine (free of the scale and offset a
            refinement's BatchNorm adds; see the module docstring).

    Returns:
        `(batch,)` (or a scalar for unbatched input): 1 for identical heads, 0 for heads attending to disjoint tokens
        (cosine) or with uncorrelated columns (centered); NaN if every column of some head is constant.
    """
    unbatched = attention.ndim == 3
    if unbatched:
        attention = attention.unsqueeze(0)
    if attention.ndim != 4 or attention.shape[1] < 2:
        raise ValueError(f"Expected (batch, heads >= 2, tokens, tokens) maps, got shape {tuple(attention.shape)}.")
    heads = attention.shape[1]
    pairs = torch.triu_indices(heads, heads, offset=1)
    per_column = column_similarity(attention[:, pairs[0]], attention[:, pairs[1]], centered)  # (batch, pairs, tokens)
    result = per_column.flatten(1).nanmean(dim=-1)
    return result[0] if unbatched else result


def cross_layer_similarity(first: torch.Tensor, second: torch.Tensor, centered: bool = False) -> torch.Tensor:
    """
    How alike two layers' maps are: DeepViT's cross-layer similarity (the cosine of column `t` of head `h` in both
    layers), averaged over heads and tokens.

    Args:
        first, second: `(batch, heads, tokens, tokens)` or `(heads, tokens, tokens)` maps of two layers.
        centered: the Pearson correlation of the columns instead of their cosine (see the module docstring).

    Returns:
        `(batch,)` (or a scalar for unbatched input): 1 when every token plays the same role in both layers.
    """
    unbatched = first.ndim == 3
    if unbatched:
        first, second = first.unsqueeze(0), second.unsqueeze(0)
    if first.ndim != 4:
        raise ValueError(f"Expected (batch, heads, tokens, tokens) maps, got shape {tuple(first.shape)}.")
    result = column_similarity(first, second, centered).flatten(1).nanmean(dim=-1)
    return result[0] if unbatched else result


@dataclass
class LayerSimilarity:
    """
    The similarity measures of one block, before its refinement (the map it refines; for a plain block, the map it
    uses) and after (the map it uses), averaged over the batch. `cross_layer_*` compare with the map the block before
    used (NaN for the first block); `*_cosine` is DeepViT's measure, `*_pearson` the centred one. NaN for head
    similarities of a one-head model.
    """

    layer: int
    block_type: str
    head_cosine_before: float
    head_cosine_after: float
    head_pearson_before: float
    head_pearson_after: float
    cross_layer_cosine_before: float
    cross_layer_cosine_after: float
    cross_layer_pearson_before: float
    cross_layer_pearson_after: float


def similarity_by_layer(
    attentions: Sequence[torch.Tensor], unrefined_attentions: Sequence[torch.Tensor], block_types: Sequence[str]
) -> list[LayerSimilarity]:
    """
    Per block, head and cross-layer similarity (cosine and centred) before and after refinement.

    Args:
        attentions: per block, the `(batch, heads, tokens, tokens)` maps it used (`output_attentions=True`).
        unrefined_attentions: per block, the maps before refinement (`output_unrefined_attentions=True`).
        block_types: the config's `block_types`.
    """
    if not len(attentions) == len(unrefined_attentions) == len(block_types):
        raise ValueError(
            f"Got {len(attentions)} used and {len(unrefined_attentions)} unrefined maps for {len(block_types)} blocks."
        )

    def mean(values: torch.Tensor) -> float:
        return float(values.float().nanmean())

    def heads(maps: torch.Tensor, centered: bool) -> float:
        return mean(head_similarity(maps, centered)) if maps.shape[-3] > 1 else float("nan")

    def across(maps: torch.Tensor, previous: torch.Tensor | None, centered: bool) -> float:
        return float("nan") if previous is None else mean(cross_layer_similarity(maps, previous, centered))

    rows = []
    previous = None
    for index, (used, before, kind) in enumerate(zip(attentions, unrefined_attentions, block_types)):
        rows.append(
            LayerSimilarity(
                index,
                kind,
                heads(before, False),
                heads(used, False),
                heads(before, True),
                heads(used, True),
                across(before, previous, False),
                across(used, previous, False),
                across(before, previous, True),
                across(used, previous, True),
            )  # fmt: skip
        )
        previous = used
    return rows


def class_token_attention(attention: torch.Tensor) -> torch.Tensor:
    """
    The class token's attention over the patch grid: `(..., heads, 1 + h*w, 1 + h*w)` → `(..., heads, h, w)`.
    """
    patches = attention[..., 0, 1:]
    side = math.isqrt(patches.shape[-1])
    if side * side != patches.shape[-1]:
        raise ValueError(f"{patches.shape[-1]} patch tokens do not form a square grid.")
    return patches.reshape(*patches.shape[:-1], side, side)


def upsample_to_image(
    grid_map: torch.Tensor, size: tuple[int, int], value_range: tuple[float, float] | None = None
) -> torch.Tensor:
    """
    A map over the patch grid `(h, w)` stretched over an image of `size` `(height, width)` (bilinear, pixel centres
    aligned as in `F.interpolate(align_corners=False)`) and scaled to [0, 1].

    Args:
        grid_map: `(h, w)` values.
        size: the image's `(height, width)`.
        value_range: `(low, high)` mapped to 0 and 1 (values outside are clipped), to draw several maps on one
            colour scale; by default the map's own minimum and maximum, and a constant map gives zeros.
    """
    if grid_map.ndim != 2:
        raise ValueError(f"Expected a (h, w) map, got shape {tuple(grid_map.shape)}.")
    image_map = F.interpolate(grid_map[None, None].float(), size=size, mode="bilinear", align_corners=False)[0, 0]
    if value_range is not None:
        low, high = value_range
        if not high > low:
            raise ValueError(f"`value_range` must have low < high, got {value_range}.")
        return ((image_map - low) / (high - low)).clamp(0, 1)
    low, high = image_map.min(), image_map.max()
    # A constant map (up to the interpolation's rounding) has no place to show: zeros, not amplified rounding noise.
    if high - low <= 1e-6 * max(high.abs().item(), low.abs().item(), 1e-30):
        return torch.zeros_like(image_map)
    return (image_map - low) / (high - low)


def incoming_attention_maps(attentions: tuple[torch.Tensor, ...], block_types: list[str]) -> list[torch.Tensor | None]:
    """
    For each block, the map it received from the block before (`None` for the first): what a shared block refines.
    A plain or refined block passes on the map it used, a shared block passes on the map it received. (The model
    returns what each block refines directly with `output_unrefined_attentions=True`; this derives the incoming maps
    from `attentions` alone.)
    """
    if len(attentions) != len(block_types):
        raise ValueError(f"Got {len(attentions)} attention maps for {len(block_types)} blocks.")
    incoming: list[torch.Tensor | None] = []
    carried = None
    for used, block_type in zip(attentions, block_types):
        incoming.append(carried)
        if block_type != "shared":
            carried = used
    return incoming


__all__ = [
    "LayerSimilarity",
    "class_token_attention",
    "column_similarity",
    "cross_layer_similarity",
    "head_similarity",
    "incoming_attention_maps",
    "similarity_by_layer",
    "upsample_to_image",
]
