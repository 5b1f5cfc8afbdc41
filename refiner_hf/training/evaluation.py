"""
Validation top-1 / top-5 through `evaluate`, with the metric module shipped in this package (loaded by path: no Hub
access). Predictions are gathered across processes with `accelerator.gather_for_metrics`, which drops the samples
accelerate repeats to give every process equally many batches, so each validation sample is counted exactly once.
"""

from __future__ import annotations

import uuid
from pathlib import Path

import evaluate
import torch
from accelerate import Accelerator
from torch import nn


TOP_K_METRIC = Path(__file__).parent / "evaluate_metrics" / "top_k_accuracy.py"


def load_top_k_metric() -> evaluate.EvaluationModule:
    """The top-k accuracy metric, in memory (every process computes it on the gathered predictions)."""
    return evaluate.load(str(TOP_K_METRIC), keep_in_memory=True, experiment_id=uuid.uuid4().hex)


@torch.no_grad()
def evaluate_classifier(
    accelerator: Accelerator, model: nn.Module, dataloader, top_k: tuple[int, ...] = (1, 5)
) -> dict[str, float | int]:
    """
    Top-k accuracies of `model` over the validation loader (prepared by accelerate), the number of samples counted
    and the number of undecodable images left out (`bad_images`, with `--skip_bad_images`).
    """
    metric = load_top_k_metric()
    was_training = model.training
    model.eval()
    bad_images = 0
    for batch in dataloader:
        with accelerator.autocast():
            logits = model(pixel_values=batch["pixel_values"]).logits
        ranked = logits.float().topk(min(max(top_k), logits.shape[-1]), dim=-1).indices
        ranked, labels, valid = accelerator.gather_for_metrics((ranked, batch["labels"], batch["valid"]))
        bad_images += int((~valid).sum())
        metric.add_batch(predictions=ranked[valid].cpu().tolist(), references=labels[valid].cpu().tolist())
    model.train(was_training)
    results = metric.compute(top_k=list(top_k))
    results["bad_images"] = bad_images
    return results


__all__ = ["TOP_K_METRIC", "evaluate_classifier", "load_top_k_metric"]
