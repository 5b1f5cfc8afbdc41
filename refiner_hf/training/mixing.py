"""
Batch mixing for training: timm's mixup / CutMix of the images and their class targets, with the λ and the CutMix box
of each mix recorded so that the dense labels of token labeling and the teacher's class targets are mixed the same
way. (MixToken, which mixes tokens inside the model, is `refiner_hf.mix_token`.)
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Literal

import numpy as np
import torch
from timm.data import Mixup
from timm.data.mixup import cutmix_bbox_and_lam, mixup_target

from .augmentation import BatchRandomErasing
from .relabel_targets import DENSE_LABELS, RELABEL_CLASS_TARGETS


@dataclass(frozen=True)
class MixRecord:
    """
    How a batch was mixed with its reverse: the weight `lam` of the batch's own images and, for CutMix, the pasted box
    `(y_low, y_high, x_low, x_high)` in the images' pixels (None for mixup). Dense labels are mixed the same way.
    """

    lam: float
    cutmix_box: tuple[int, int, int, int] | None = None


class RecordingMixup(Mixup):
    """
    timm's `Mixup` that keeps the λ and the CutMix box of its last per-batch mix in `last_mix` (None: unmixed).

    timm does not return the box it pastes. Its draw is replayed instead: the NumPy random state right after the
    per-batch parameters are drawn is kept, and `cutmix_bbox_and_lam` is called again from that state with the same
    arguments, which gives the very box timm used.
    """

    last_mix: MixRecord | None = None

    def _params_per_batch(self) -> tuple[float, bool]:
        lam, use_cutmix = super()._params_per_batch()
        self._drawn = (lam, use_cutmix, np.random.get_state())
        return lam, use_cutmix

    def _mix_batch(self, x: torch.Tensor) -> float:
        self.last_mix = None
        lam = super()._mix_batch(x)
        drawn_lam, use_cutmix, state = self._drawn
        if drawn_lam == 1.0:
            return lam
        box = None
        if use_cutmix:
            after = np.random.get_state()
            np.random.set_state(state)
            box, _ = cutmix_bbox_and_lam(
                x.shape, drawn_lam, ratio_minmax=self.cutmix_minmax, correct_lam=self.correct_lam
            )
            np.random.set_state(after)
        self.last_mix = MixRecord(float(lam), tuple(int(v) for v in box) if box is not None else None)
        return lam

    def __call__(self, x: torch.Tensor, target: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        self.last_mix = None  # per-pair and per-element modes mix each image differently: nothing to record
        return super().__call__(x, target)


class BatchMixing:
    """
    Turns a batch's class indices into the training targets: timm's `Mixup` (mixup / CutMix with label smoothing)
    while mixing is on, otherwise label-smoothed one-hot targets (`mixup_target` with λ = 1), or the indices
    themselves when there is neither mixing nor smoothing. `last_mix` tells how the last batch was mixed (None when
    it was not, or not per batch), for mixing dense labels alike. `erasing`, when given, is the random erasing that
    [`mix_batch`] applies to the images after mixing them (the original training's order; the training transform
    then erases nothing).
    """

    def __init__(
        self,
        num_labels: int,
        mixup_alpha: float = 0.0,
        cutmix_alpha: float = 0.0,
        cutmix_minmax: Sequence[float] | None = None,
        prob: float = 1.0,
        switch_prob: float = 0.5,
        mode: str = "batch",
        label_smoothing: float = 0.0,
        off_epoch: int = 0,
        erasing: BatchRandomErasing | None = None,
    ) -> None:
        self.num_labels = num_labels
        self.erasing = erasing
        self.label_smoothing = label_smoothing
        self.off_epoch = off_epoch
        self.mixup = None
        self.last_mix: MixRecord | None = None
        if prob > 0 and (mixup_alpha > 0 or cutmix_alpha > 0 or cutmix_minmax is not None):
            self.mixup = RecordingMixup(
                mixup_alpha=mixup_alpha,
                cutmix_alpha=cutmix_alpha,
                cutmix_minmax=list(cutmix_minmax) if cutmix_minmax is not None else None,
                prob=prob,
                switch_prob=switch_prob,
                mode=mode,
                label_smoothing=label_smoothing,
                num_classes=num_labels,
            )

    def active(self, epoch: int) -> bool:
        return self.mixup is not None and not (self.off_epoch and epoch >= self.off_epoch)

    def __call__(
        self, pixel_values: torch.Tensor, labels: torch.Tensor, epoch: int
    ) -> tuple[torch.Tensor, torch.Tensor]:
        self.last_mix = None
        if self.active(epoch):
            mixed = self.mixup(pixel_values, labels)
            self.last_mix = self.mixup.last_mix
            return mixed
        if self.label_smoothing > 0:
            return pixel_values, mixup_target(labels, self.num_labels, lam=1.0, smoothing=self.label_smoothing)
        return pixel_values, labels


CutMixMode = Literal["box", "blend"]


def mix_dense_labels(
    dense: torch.Tensor,
    lam: float,
    cutmix_box: tuple[int, int, int, int] | None = None,
    image_size: tuple[int, int] | None = None,
    cutmix_mode: CutMixMode = "box",
) -> torch.Tensor:
    """
    Mixes a batch of dense labels `(B, C, S, S)` the way the images were mixed with the batch reversed: mixup blends
    every token's label (`lam * own + (1 - lam) * reversed`). For CutMix, `"box"` replaces the labels of the tokens
    inside the box `(y_low, y_high, x_low, x_high)` (image pixels of `image_size`) by the reversed batch's (where the
    pasted pixels are); `"blend"` blends every token's label with `lam` as for mixup, as the original training does.
    """
    reversed_batch = dense.flip(0)
    if cutmix_mode not in ("box", "blend"):
        raise ValueError(f"`cutmix_mode` must be 'box' or 'blend', got {cutmix_mode!r}.")
    if cutmix_box is None or cutmix_mode == "blend":
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


def mix_batch(
    mixing: BatchMixing,
    batch: Mapping[str, torch.Tensor],
    epoch: int,
    class_target: str = "teacher",
    cutmix_mode: str = "box",
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """
    Mixes a training batch: the images and ground-truth class targets with `mixing`, and the teacher's labels (when
    the batch has them) with the same λ and, for CutMix, the same box placed on the token grid (`cutmix_mode="box"`)
    or λ for every token (`"blend"`, the original's). Then `mixing.erasing`, if any, erases the mixed images, each
    under its sample's seed (`sample_seeds`); targets are left as they are, as in the original. Returns the pixel
    values, the class targets (with relabel maps, the teacher's crop labels unless `class_target="ground_truth"`) and
    the dense labels (None without relabel maps).
    """
    pixel_values, targets = mixing(batch["pixel_values"], batch["labels"], epoch)
    if mixing.erasing is not None:
        pixel_values = mixing.erasing(pixel_values, batch["sample_seeds"])
    dense, teacher = batch.get(DENSE_LABELS), batch.get(RELABEL_CLASS_TARGETS)
    record = mixing.last_mix
    if dense is not None and record is not None:
        dense = mix_dense_labels(
            dense, record.lam, record.cutmix_box, tuple(pixel_values.shape[-2:]), cutmix_mode=cutmix_mode
        )
    if teacher is not None and class_target == "teacher":
        targets = teacher if record is None else record.lam * teacher + (1.0 - record.lam) * teacher.flip(0)
    return pixel_values, targets, dense


__all__ = ["BatchMixing", "CutMixMode", "MixRecord", "RecordingMixup", "mix_batch", "mix_dense_labels"]
