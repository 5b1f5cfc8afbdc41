"""
Validation top-1 / top-5. Predictions are gathered across processes with `accelerator.gather_for_metrics`, which drops
the samples accelerate repeats to give every process equally many batches, so each validation sample is counted
exactly once; the counts are then plain sums (no metric library needed). With the model EMA on, each evaluation
measures both the trained (raw) weights and their average, and [`better_weights`] says which to keep.
"""

from __future__ import annotations

import torch
from accelerate import Accelerator
from torch import nn


def top_k_hits(ranked: torch.Tensor, labels: torch.Tensor, top_k: tuple[int, ...]) -> dict[int, int]:
    """How many `labels` are among the first k of their row of `ranked` class indices, for each k of `top_k`."""
    hits = ranked == labels[:, None]
    return {k: int(hits[:, :k].any(dim=1).sum()) for k in top_k}


@torch.no_grad()
def evaluate_classifier(
    accelerator: Accelerator, model: nn.Module, dataloader, top_k: tuple[int, ...] = (1, 5)
) -> dict[str, float | int]:
    """
    Top-k accuracies of `model` over the validation loader (prepared by accelerate) as `top1`, `top5`, ..., the
    number of samples counted (`num_samples`) and the number of undecodable images left out (`bad_images`, with
    `--skip_bad_images`).
    """
    was_training = model.training
    model.eval()
    hits, count, bad_images = dict.fromkeys(top_k, 0), 0, 0
    for batch in dataloader:
        with accelerator.autocast():
            logits = model(pixel_values=batch["pixel_values"]).logits
        ranked = logits.float().topk(min(max(top_k), logits.shape[-1]), dim=-1).indices
        ranked, labels, valid = accelerator.gather_for_metrics((ranked, batch["labels"], batch["valid"]))
        bad_images += int((~valid).sum())
        for k, found in top_k_hits(ranked[valid], labels[valid], top_k).items():
            hits[k] += found
        count += int(valid.sum())
    model.train(was_training)
    results: dict[str, float | int] = {f"top{k}": hits[k] / count if count else 0.0 for k in top_k}
    results.update(num_samples=count, bad_images=bad_images)
    return results


RAW_WEIGHTS, EMA_WEIGHTS = "raw", "ema"


def better_weights(
    raw: dict[str, float | int], ema: dict[str, float | int] | None
) -> tuple[str, dict[str, float | int]]:
    """
    Which of the raw and the EMA weights an evaluation keeps, and their results: the higher top-1, then the higher
    top-5; on equal top-1 and top-5 the EMA (the published accuracies of the original are the EMA's). Over a short
    run, or with a high decay, the average lags behind the trained weights, which are then kept.

    Args:
        raw: the results of [`evaluate_classifier`] for the trained weights.
        ema: those of their EMA, or None when the EMA is off.

    Returns:
        `("raw", raw)` or `("ema", ema)`.
    """
    if ema is None:
        return RAW_WEIGHTS, raw
    if (raw["top1"], raw.get("top5", 0.0)) > (ema["top1"], ema.get("top5", 0.0)):
        return RAW_WEIGHTS, raw
    return EMA_WEIGHTS, ema


__all__ = ["EMA_WEIGHTS", "RAW_WEIGHTS", "better_weights", "evaluate_classifier", "top_k_hits"]
