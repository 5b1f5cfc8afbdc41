"""
Measures and views of Refiner-ViT attention maps, computed from what the model returns (`output_attentions=True`).

The paper argues that expanding and convolving the maps makes the heads more diverse and their attention more local;
[`head_similarity`] is the measure it uses for the first claim (mean pairwise cosine similarity between heads' maps:
1 for identical heads, 0 for orthogonal ones).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F


def head_similarity(attention: torch.Tensor) -> torch.Tensor:
    """
    Mean pairwise cosine similarity between the heads' attention maps, per sample.

    Args:
        attention: `(batch, heads, tokens, tokens)` or `(heads, tokens, tokens)` maps of one layer.

    Returns:
        `(batch,)` (or a scalar for unbatched input): the mean over head pairs `i < j` of the cosine similarity of the
        flattened maps.
    """
    unbatched = attention.ndim == 3
    if unbatched:
        attention = attention.unsqueeze(0)
    if attention.ndim != 4 or attention.shape[1] < 2:
        raise ValueError(f"Expected (batch, heads >= 2, tokens, tokens) maps, got shape {tuple(attention.shape)}.")
    flat = F.normalize(attention.flatten(2).float(), dim=-1)
    similarity = flat @ flat.transpose(1, 2)
    heads = attention.shape[1]
    pairs = torch.triu_indices(heads, heads, offset=1)
    result = similarity[:, pairs[0], pairs[1]].mean(dim=-1)
    return result[0] if unbatched else result


def class_token_attention(attention: torch.Tensor) -> torch.Tensor:
    """
    The class token's attention over the patch grid: `(..., heads, 1 + h*w, 1 + h*w)` → `(..., heads, h, w)`.
    """
    patches = attention[..., 0, 1:]
    side = math.isqrt(patches.shape[-1])
    if side * side != patches.shape[-1]:
        raise ValueError(f"{patches.shape[-1]} patch tokens do not form a square grid.")
    return patches.reshape(*patches.shape[:-1], side, side)


def upsample_to_image(grid_map: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """
    A map over the patch grid `(h, w)` stretched over an image of `size` `(height, width)` (bilinear, pixel centres
    aligned as in `F.interpolate(align_corners=False)`) and scaled to [0, 1]; a constant map gives zeros.
    """
    if grid_map.ndim != 2:
        raise ValueError(f"Expected a (h, w) map, got shape {tuple(grid_map.shape)}.")
    image_map = F.interpolate(grid_map[None, None].float(), size=size, mode="bilinear", align_corners=False)[0, 0]
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


__all__ = ["class_token_attention", "head_similarity", "incoming_attention_maps", "upsample_to_image"]
