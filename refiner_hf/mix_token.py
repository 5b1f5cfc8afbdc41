"""
MixToken (Jiang et al., "All Tokens Matter: Token Labeling for Training Better Vision Transformers"), as the
released Refiner-ViT training code does it: after the stem, the tokens inside a random box of the token grid are
replaced by those of the batch in reverse order; after the heads, the auxiliary (per-token) outputs inside the same
box are swapped back, so that each one lines up with its own image's dense labels; the class target is mixed with
the share of tokens left in place.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class MixTokenBox:
    """A box of the token grid: rows `[row_start, row_end)` and columns `[col_start, col_end)` of `height x width`."""

    row_start: int
    row_end: int
    col_start: int
    col_end: int
    height: int
    width: int

    @property
    def area(self) -> int:
        return (self.row_end - self.row_start) * (self.col_end - self.col_start)

    @property
    def kept_fraction(self) -> float:
        """λ' = 1 - box area / number of tokens: the weight of each image's own class target."""
        return 1.0 - self.area / (self.height * self.width)

    def mask(self, device: torch.device | None = None) -> torch.Tensor:
        """`(height, width)` booleans, true inside the box."""
        mask = torch.zeros(self.height, self.width, dtype=torch.bool, device=device)
        mask[self.row_start : self.row_end, self.col_start : self.col_end] = True
        return mask

    def as_tensor(self) -> torch.Tensor:
        return torch.tensor([self.row_start, self.row_end, self.col_start, self.col_end])


def sample_mix_token_box(height: int, width: int, beta: float = 1.0) -> MixTokenBox:
    """
    Draws λ ~ Beta(beta, beta) and a box whose sides are `int(side * sqrt(1 - λ))` tokens, centred on a uniformly
    drawn token and clipped to the grid (so boxes at the border are smaller), from PyTorch's global generator.
    """
    lam = torch.distributions.Beta(beta, beta).sample().item()
    ratio = math.sqrt(1.0 - lam)
    cut_rows, cut_cols = int(height * ratio), int(width * ratio)
    center_row = int(torch.randint(height, ()))
    center_col = int(torch.randint(width, ()))

    def clip(value: int, limit: int) -> int:
        return min(max(value, 0), limit)

    return MixTokenBox(
        row_start=clip(center_row - cut_rows // 2, height),
        row_end=clip(center_row + cut_rows // 2, height),
        col_start=clip(center_col - cut_cols // 2, width),
        col_end=clip(center_col + cut_cols // 2, width),
        height=height,
        width=width,
    )


def swap_box_with_reversed_batch(grid: torch.Tensor, box: MixTokenBox, channels_last: bool = False) -> torch.Tensor:
    """
    Replaces the box of every sample by that of the reversed batch (sample b gets sample B-1-b's values there).
    `grid` is `(B, C, h, w)`, or `(B, h, w, C)` with `channels_last`. Applying it twice restores the input.
    """
    mask = box.mask(grid.device)
    mask = mask[:, :, None] if channels_last else mask
    return torch.where(mask, grid.flip(0), grid)


def mix_class_targets(targets: torch.Tensor, box: MixTokenBox) -> torch.Tensor:
    """`λ' * t + (1 - λ') * t reversed over the batch`, with λ' the share of tokens outside the box."""
    kept = box.kept_fraction
    return kept * targets + (1.0 - kept) * targets.flip(0)


__all__ = ["MixTokenBox", "mix_class_targets", "sample_mix_token_box", "swap_box_with_reversed_batch"]
