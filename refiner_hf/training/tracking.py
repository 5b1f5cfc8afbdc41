"""
Logging of a training run: accelerate trackers (TensorBoard, W&B, ...) plus a JSON-lines file that is always written,
so a run's losses and metrics can be read back without a tracker, and the per-epoch summary line.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

from accelerate.tracking import GeneralTracker


class JSONLinesTracker(GeneralTracker):
    """An accelerate tracker appending `{"step": ..., **values}` lines to `directory/metrics.jsonl`."""

    name = "jsonl"
    requires_logging_directory = True
    main_process_only = True

    def __init__(self, directory: str | Path) -> None:
        super().__init__()
        # The directory is made at the first record, so that a run refused before training leaves no logs/ behind.
        self.path = Path(directory) / "metrics.jsonl"

    @property
    def tracker(self) -> Path:
        return self.path

    def store_init_configuration(self, values: dict[str, Any]) -> None:
        self._write({"config": values})

    def log(self, values: dict[str, Any], step: int | None = None, **kwargs) -> None:
        self._write({"step": step, **values})

    def _write(self, record: dict[str, Any]) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        with self.path.open("a") as stream:
            stream.write(json.dumps(record, default=str) + "\n")


def read_metrics(directory: str | Path) -> list[dict[str, Any]]:
    """The records a [`JSONLinesTracker`] wrote, in order."""
    path = Path(directory) / "metrics.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def trackers_for(report_to: str, logging_dir: str | Path) -> list:
    """The `log_with` list for `--report_to` (tensorboard, wandb, all, none, or several comma-separated)."""
    names = [name.strip() for name in report_to.split(",") if name.strip() and name.strip() != "none"]
    return [*names, JSONLinesTracker(logging_dir)]


def tracker_config(values: dict[str, Any]) -> dict[str, Any]:
    """Run configuration in the scalar types every tracker accepts (lists and mappings as JSON)."""
    return {
        key: value if isinstance(value, (int, float, str, bool)) else json.dumps(value)
        for key, value in values.items()
        if value is not None
    }


def format_epoch_summary(epoch: int, total_epochs: int, summary: dict[str, Any]) -> str:
    """One line per epoch: training loss, learning rate, throughput, validation (and EMA) accuracy, best so far."""

    def percent(value: float) -> str:
        return f"{100 * value:.2f}"

    parts = [f"epoch {epoch + 1}/{total_epochs}"]
    loss = summary.get("train_loss")
    parts.append(f"train loss {loss:.4f}" if loss is not None and math.isfinite(loss) else f"train loss {loss}")
    parts.append(f"lr {summary['lr']:.3g}")
    parts.append(f"{summary['images_per_second']:.0f} img/s")
    parts.append(f"val top1 {percent(summary['eval_top1'])} top5 {percent(summary['eval_top5'])}")
    if "ema_top1" in summary:
        parts.append(f"ema top1 {percent(summary['ema_top1'])} top5 {percent(summary['ema_top5'])}")
    parts.append(f"best {percent(summary['best_top1'])} ({summary['best_weights']}, epoch {summary['best_epoch'] + 1})")
    if summary.get("bad_images"):
        parts.append(f"{summary['bad_images']} bad images skipped")
    parts.append(f"{summary['epoch_seconds']:.1f} s")
    return " | ".join(parts)


__all__ = ["JSONLinesTracker", "format_epoch_summary", "read_metrics", "tracker_config", "trackers_for"]
