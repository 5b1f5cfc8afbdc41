"""
Training augmentation, built from timm's implementations (batch mixing is in `mixing.py`).

The training transform is timm's `create_transform(is_training=True)` pipeline (RandomResizedCrop with random
interpolation, horizontal flip, RandAugment, normalisation, random erasing). It additionally returns where the crop was
taken and whether the image was flipped ([`CropRecord`]), which dense (token) labels need to follow the image.

Two orders are available ([`AugmentationOrder`]): timm's (`"timm"`: crop, then flip and RandAugment on the crop) and
the original token-labeling training's (`"token_labeling"`: flip and RandAugment on the whole image, the random resized
crop last). Random erasing is either the transform's last step (per sample, before batch mixing, as timm's transform
does it) or, with `erase_after_mixing`, applied to the mixed batch by [`BatchRandomErasing`] (as the original training's
prefetching loader does it).

timm's transforms draw from the global `random`, `numpy.random` and `torch` generators. [`seeded_rng`] seeds them from
(seed, epoch, sample index) for one sample and restores them afterwards, so a sample's augmentation depends on nothing
else: not on the number of processes or workers, nor on where training was interrupted and resumed.
"""

from __future__ import annotations

import contextlib
import math
import random
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Literal

import numpy as np
import PIL.Image
import torch
from timm.data import auto_augment, create_transform
from timm.data.transforms import RandomResizedCropAndInterpolation
from torchvision.transforms import functional as TF


# "timm": RandomResizedCrop, flip, then RandAugment (or colour jitter) on the crop; "token_labeling": flip and
# RandAugment on the whole image, the random resized crop last (the original token-labeling training's order).
AugmentationOrder = Literal["timm", "token_labeling"]
AUGMENTATION_ORDERS = ("timm", "token_labeling")


@dataclass(frozen=True)
class CropRecord:
    """
    The geometry of one training sample: the box `(top, left, height, width)` that RandomResizedCrop cut, in the
    original image's pixels, the original `(image_height, image_width)`, whether the image was flipped horizontally,
    and the affine transforms that augmentation applied after the flip, in order (`geometry`: PIL `Image.AFFINE`
    coefficients `(a, b, c, d, e, f)`, mapping a point `(x, y)` of a transform's output to `(a x + b y + c,
    d x + e y + f)` of its input). `output_size` is the `(height, width)` of the augmented image.

    With `augmented_before_crop` False (timm's order) the flip and `geometry` were applied to the crop, `geometry` in
    the pixels of `output_size`; with it True (the token-labeling order) they were applied to the whole image before
    the crop was cut, `geometry` in the original image's pixels, and the box lies in that augmented whole image.
    `box_xyxy_normalized` gives the box as fractions of the image, for cutting the same region from a label map of
    another resolution (e.g. with `torchvision.ops.roi_align`).
    """

    top: int
    left: int
    height: int
    width: int
    image_height: int
    image_width: int
    flipped: bool
    geometry: tuple[tuple[float, ...], ...] = ()
    output_size: tuple[int, int] = (0, 0)
    augmented_before_crop: bool = False

    @property
    def geometry_size(self) -> tuple[int, int]:
        """`(height, width)` of the image whose pixels `geometry` is given in."""
        return (self.image_height, self.image_width) if self.augmented_before_crop else self.output_size

    def box_xyxy_normalized(self) -> tuple[float, float, float, float]:
        return (
            self.left / self.image_width,
            self.top / self.image_height,
            (self.left + self.width) / self.image_width,
            (self.top + self.height) / self.image_height,
        )


@contextlib.contextmanager
def seeded_rng(*seed_words: int) -> Iterator[None]:
    """
    Seeds Python's, NumPy's and torch's global CPU generators from `seed_words` for the duration of the block, then
    restores their previous states (the caller's random streams are untouched). Only the CPU generator of torch is
    seeded, so GPU streams (dropout, stochastic depth) are not disturbed.
    """
    python_state, numpy_state, torch_state = random.getstate(), np.random.get_state(), torch.get_rng_state()
    words = np.random.SeedSequence([int(w) for w in seed_words]).generate_state(2, dtype=np.uint32)
    random.seed(int(words[0]))
    np.random.seed(int(words[0]))
    torch.default_generator.manual_seed(int(words[0]) << 32 | int(words[1]))
    try:
        yield
    finally:
        random.setstate(python_state)
        np.random.set_state(numpy_state)
        torch.set_rng_state(torch_state)


def sample_seed(*seed_words: int) -> int:
    """
    A non-negative 63-bit seed derived from a sample's seed words, for randomness drawn after its batch is collated
    (random erasing of the mixed batch): it depends on the sample alone, like the sample's augmentation.
    """
    high, low = np.random.SeedSequence([int(w) for w in seed_words]).generate_state(2, dtype=np.uint32)
    return (int(high) & 0x7FFFFFFF) << 32 | int(low)


# Keeps the random stream of a sample's erasing apart from that of its transform (both start from its seed words).
ERASING_STREAM = 0x45524153


class BatchRandomErasing:
    """
    Random erasing of a batch of normalised images (after batch mixing, as the original training erases), with the
    algorithm and defaults of timm's `RandomErasing` (Zhong et al.): each image, with probability `probability`, gets
    1 to `max_count` rectangles of 2 % to 1/3 of its area in all (aspect ratio log-uniform in [0.3, 1 / 0.3]) filled
    with normal noise per pixel (`"pixel"`), one normal colour per rectangle (`"rand"`) or zeros (`"const"`).

    Each image's draws are seeded by its own sample seed (see [`sample_seed`]), so the erasing of a sample does not
    depend on its batch, the number of processes or where training was resumed. The noise is drawn on the CPU and
    copied to the images' device.
    """

    def __init__(
        self,
        probability: float,
        mode: str = "pixel",
        max_count: int = 1,
        min_area: float = 0.02,
        max_area: float = 1 / 3,
        min_aspect: float = 0.3,
    ) -> None:
        if mode not in ("pixel", "rand", "const"):
            raise ValueError(f"`mode` must be 'pixel', 'rand' or 'const', got {mode!r}.")
        self.probability = probability
        self.mode = mode
        self.max_count = max_count
        self.min_area = min_area
        self.max_area = max_area
        self.log_aspect_range = (math.log(min_aspect), math.log(1 / min_aspect))

    def boxes(self, height: int, width: int) -> list[tuple[int, int, int, int]]:
        """The rectangles `(top, left, height, width)` one image gets, drawn from Python's global generator."""
        if random.random() >= self.probability:
            return []
        count = random.randint(1, self.max_count) if self.max_count > 1 else 1
        boxes = []
        for _ in range(count):
            for _attempt in range(10):  # timm's number of tries for a rectangle that fits
                area = random.uniform(self.min_area, self.max_area) * height * width / count
                aspect = math.exp(random.uniform(*self.log_aspect_range))
                box_height, box_width = round(math.sqrt(area * aspect)), round(math.sqrt(area / aspect))
                if box_height < height and box_width < width:
                    top, left = random.randint(0, height - box_height), random.randint(0, width - box_width)
                    boxes.append((top, left, box_height, box_width))
                    break
        return boxes

    def _fill(self, channels: int, height: int, width: int) -> torch.Tensor:
        if self.mode == "pixel":
            return torch.randn(channels, height, width)
        if self.mode == "rand":
            return torch.randn(channels, 1, 1).expand(channels, height, width)
        return torch.zeros(channels, height, width)

    def __call__(self, pixel_values: torch.Tensor, sample_seeds: torch.Tensor) -> torch.Tensor:
        """Erases `pixel_values` `(B, C, H, W)` in place, image `i` under `sample_seeds[i]`; returns it."""
        if len(sample_seeds) != len(pixel_values):
            raise ValueError(f"{len(sample_seeds)} sample seeds for a batch of {len(pixel_values)} images.")
        channels, height, width = pixel_values.shape[1:]
        for image, seed in zip(pixel_values, sample_seeds.tolist()):
            with seeded_rng(seed, ERASING_STREAM):
                for top, left, box_height, box_width in self.boxes(height, width):
                    fill = self._fill(channels, box_height, box_width)
                    image[:, top : top + box_height, left : left + box_width] = fill.to(image.device, image.dtype)
        return pixel_values

    def __repr__(self) -> str:
        return f"{type(self).__name__}(probability={self.probability}, mode={self.mode!r}, max_count={self.max_count})"


def posterize_zero_bits_allowed(image: PIL.Image.Image, bits_to_keep: int, **kwargs) -> PIL.Image.Image:
    """
    timm's Posterize operation, keeping Pillow's former meaning of keeping 0 bits (a black image). RandAugment's
    `PosterizeIncreasing` asks for 0 bits at magnitudes of 10 and more (reached with `mstd` noise), which Pillow 12
    and later reject with a `ValueError`.
    """
    if bits_to_keep <= 0:
        return image.point(lambda _: 0)
    return auto_augment.posterize(image, bits_to_keep, **kwargs)


def _augment_ops(transform) -> list[auto_augment.AugmentOp]:
    """The operations of a timm auto-augment transform (RandAugment's `ops`, AutoAugment's `policy`)."""
    ops = list(getattr(transform, "ops", ()))
    for sub_policy in getattr(transform, "policy", ()):
        ops.extend(sub_policy)
    return [op for op in ops if isinstance(op, auto_augment.AugmentOp)]


def _rotation(size: tuple[int, int], degrees: float) -> tuple[float, ...]:
    """The affine coefficients of PIL's `Image.rotate(degrees)` about the image centre (what timm's Rotate uses)."""
    width, height = size
    angle = -math.radians(degrees % 360.0)
    a, b = round(math.cos(angle), 15), round(math.sin(angle), 15)
    d, e = round(-math.sin(angle), 15), round(math.cos(angle), 15)
    cx, cy = width / 2, height / 2
    return (a, b, a * -cx + b * -cy + cx, d, e, d * -cx + e * -cy + cy)


# The affine coefficients, from the image size and the operation's arguments, of each timm augmentation that moves
# pixels (as timm's functions compute them). Colour operations leave the labels where they are.
GEOMETRIC_OPS = {
    "Rotate": _rotation,
    "ShearX": lambda size, factor: (1.0, factor, 0.0, 0.0, 1.0, 0.0),
    "ShearY": lambda size, factor: (1.0, 0.0, 0.0, factor, 1.0, 0.0),
    "TranslateX": lambda size, pixels: (1.0, 0.0, pixels, 0.0, 1.0, 0.0),
    "TranslateY": lambda size, pixels: (1.0, 0.0, 0.0, 0.0, 1.0, pixels),
    "TranslateXRel": lambda size, pct: (1.0, 0.0, pct * size[0], 0.0, 1.0, 0.0),
    "TranslateYRel": lambda size, pct: (1.0, 0.0, 0.0, 0.0, 1.0, pct * size[1]),
}


def _patch_posterize(transform) -> None:
    """Gives every Posterize operation of a timm auto-augment policy [`posterize_zero_bits_allowed`]."""
    for op in _augment_ops(transform):
        if getattr(op, "aug_fn", None) is auto_augment.posterize:
            op.aug_fn = posterize_zero_bits_allowed


class _GeometryRecorder:
    """Wraps the geometric operations of an auto-augment policy so that each records the affine transform it applies."""

    def __init__(self) -> None:
        self.matrices: list[tuple[float, ...]] | None = None

    def wrap(self, transform) -> None:
        for op in _augment_ops(transform):
            if op.name in GEOMETRIC_OPS:
                op.aug_fn = self._recording(op.aug_fn, GEOMETRIC_OPS[op.name])

    def _recording(self, aug_fn, coefficients):
        def apply(image: PIL.Image.Image, *args, **kwargs) -> PIL.Image.Image:
            if self.matrices is not None:
                self.matrices.append(tuple(float(v) for v in coefficients(image.size, *args)))
            return aug_fn(image, *args, **kwargs)

        return apply


# timm's auto-augment policy strings: `rand-m9-mstd0.5-inc1` (RandAugment), `augmix-m5-w3` (AugMix), `v0-mstd0.5`
# (AutoAugment: original, originalr, v0, v0r, 3a): the policy, then `-` sections of a key and a number. timm skips a
# section without a number (`rand-m9-foo` is `rand-m9`), so a typo would silently train another augmentation.
AUTO_AUGMENT_SECTIONS = {
    "rand": ("mstd", "mmax", "inc", "m", "n", "p"),
    "augmix": ("mstd", "m", "w", "d", "a", "b"),
    **{policy: ("mstd",) for policy in ("original", "originalr", "v0", "v0r", "3a")},
}


def auto_augment_problem(policy: str) -> str | None:
    """What is wrong with a timm auto-augment policy string (see [`AUTO_AUGMENT_SECTIONS`]), or None."""
    name, *sections = policy.split("-")
    if name not in AUTO_AUGMENT_SECTIONS:
        return (
            f"unknown policy {name!r}; it starts with one of {', '.join(AUTO_AUGMENT_SECTIONS)} (e.g. "
            "rand-m9-mstd0.5-inc1, timm's RandAugment), or give an empty value for none"
        )
    keys = AUTO_AUGMENT_SECTIONS[name]
    for section in sections:
        if name == "rand" and section.startswith("t") and len(section) > 1:
            continue  # a named choice of transforms (timm's `t` section)
        key = next((key for key in keys if section.startswith(key)), None)
        value = section[len(key) :] if key else ""
        try:
            float(value)
        except ValueError:
            key = None
        if key is None:
            expected = ", ".join(f"{key}<number>" for key in keys) + (", t<transforms>" if name == "rand" else "")
            return f"unknown section {section!r} of the {name!r} policy; its sections are {expected}"
    return None


class TrainTransform:
    """
    timm's ImageNet training transform that also reports the crop geometry.

    Args:
        image_size: side of the square output.
        mean, std: normalisation (the model's image processor's).
        scale, ratio: RandomResizedCrop area and aspect-ratio ranges.
        interpolation: "bilinear", "bicubic" or "random" (either, per image).
        hflip: horizontal flip probability.
        auto_augment: a timm policy string such as "rand-m9-mstd0.5-inc1", or None.
        color_jitter: colour jitter strength (timm disables it with auto-augment).
        re_prob, re_mode, re_count: random erasing probability, fill mode and number of regions.
        order: `"timm"` (crop, flip, RandAugment) or `"token_labeling"` (flip and RandAugment on the whole image, the
            crop last); see [`AugmentationOrder`].
        erase_after_mixing: leave random erasing out of the transform; `batch_erasing` then erases the mixed batch.
    """

    def __init__(
        self,
        image_size: int,
        mean: Sequence[float],
        std: Sequence[float],
        scale: Sequence[float] = (0.08, 1.0),
        ratio: Sequence[float] = (3 / 4, 4 / 3),
        interpolation: str = "random",
        hflip: float = 0.5,
        auto_augment: str | None = None,
        color_jitter: float = 0.4,
        re_prob: float = 0.0,
        re_mode: str = "pixel",
        re_count: int = 1,
        order: AugmentationOrder = "timm",
        erase_after_mixing: bool = False,
    ) -> None:
        if order not in AUGMENTATION_ORDERS:
            raise ValueError(f"`order` must be one of {', '.join(AUGMENTATION_ORDERS)}, got {order!r}.")
        self.order = order
        # What erases the mixed batch instead of the transform (None: the transform erases, or nothing does).
        self.batch_erasing = (
            BatchRandomErasing(re_prob, re_mode, re_count) if erase_after_mixing and re_prob > 0 else None
        )
        # timm returns the pipeline in three stages: crop and flip, colour (RandAugment or jitter), tensor
        # conversion with normalisation and erasing. The first is run here step by step to record its parameters.
        primary, self.colour, self.final = create_transform(
            image_size,
            is_training=True,
            scale=tuple(scale),
            ratio=tuple(ratio),
            hflip=hflip,
            auto_augment=auto_augment,
            color_jitter=color_jitter or None,
            interpolation=interpolation,
            mean=tuple(mean),
            std=tuple(std),
            re_prob=0.0 if erase_after_mixing else re_prob,
            re_mode=re_mode,
            re_count=re_count,
            separate=True,
        )
        crops = [t for t in primary.transforms if isinstance(t, RandomResizedCropAndInterpolation)]
        if len(crops) != 1:
            raise RuntimeError(f"Unexpected timm training pipeline: {primary}")
        self.crop = crops[0]
        self.hflip = hflip
        self._geometry = _GeometryRecorder()
        for stage in self.colour.transforms:
            _patch_posterize(stage)
            self._geometry.wrap(stage)

    def _random_resized_crop(self, image: PIL.Image.Image) -> tuple[PIL.Image.Image, tuple[int, int, int, int]]:
        """What RandomResizedCropAndInterpolation.__call__ does, keeping the box `(top, left, height, width)`."""
        box = self.crop.get_params(image, self.crop.scale, self.crop.ratio)
        interpolation = self.crop.interpolation
        if isinstance(interpolation, (list, tuple)):
            interpolation = random.choice(interpolation)
        return TF.resized_crop(image, *box, list(self.crop.size), interpolation), box

    def _flip(self, image: PIL.Image.Image) -> tuple[PIL.Image.Image, bool]:
        # torchvision's RandomHorizontalFlip draw, which timm's pipeline uses.
        flipped = self.hflip > 0 and bool(torch.rand(1) < self.hflip)
        return (TF.hflip(image) if flipped else image), flipped

    def _colour(self, image: PIL.Image.Image) -> tuple[PIL.Image.Image, tuple[tuple[float, ...], ...]]:
        """RandAugment (or colour jitter), with the affine transforms its geometric operations applied."""
        self._geometry.matrices = []
        try:
            image = self.colour(image)
            return image, tuple(self._geometry.matrices)
        finally:
            self._geometry.matrices = None

    def __call__(self, image: PIL.Image.Image) -> tuple[torch.Tensor, CropRecord]:
        image = image.convert("RGB") if image.mode != "RGB" else image
        width, height = image.size
        if self.order == "token_labeling":
            image, flipped = self._flip(image)
            image, geometry = self._colour(image)
            image, (top, left, crop_height, crop_width) = self._random_resized_crop(image)
        else:
            image, (top, left, crop_height, crop_width) = self._random_resized_crop(image)
            image, flipped = self._flip(image)
            image, geometry = self._colour(image)
        pixel_values = self.final(image)
        record = CropRecord(
            top,
            left,
            crop_height,
            crop_width,
            height,
            width,
            flipped,
            geometry=geometry,
            output_size=(image.height, image.width),
            augmented_before_crop=self.order == "token_labeling",
        )
        return pixel_values, record

    def __repr__(self) -> str:
        return (
            f"{type(self).__name__}(order={self.order!r}, crop={self.crop}, hflip={self.hflip}, colour={self.colour}, "
            f"final={self.final}, batch_erasing={self.batch_erasing})"
        )


__all__ = [
    "AUGMENTATION_ORDERS",
    "AUTO_AUGMENT_SECTIONS",
    "AugmentationOrder",
    "BatchRandomErasing",
    "sample_seed",
    "auto_augment_problem",
    "GEOMETRIC_OPS",
    "CropRecord",
    "TrainTransform",
    "seeded_rng",
]
