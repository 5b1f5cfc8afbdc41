"""
The original token-labeling data pipeline: flip and RandAugment on the whole image (its relabel map following them),
the random resized crop last, and random erasing on the mixed batch; checked on synthetic images whose labels are known.
"""

import math

import numpy as np
import PIL.Image
import pytest
import torch
from torchvision.transforms import InterpolationMode
from torchvision.transforms import functional as TF
from training_utils import RECIPES, read_results, run_in_process, tiny_run_args

from refiner_hf.token_labeling import RelabelMap, crop_soft_labels
from refiner_hf.training import trainer
from refiner_hf.training.arguments import parse_args
from refiner_hf.training.augmentation import (
    ERASING_STREAM,
    GEOMETRIC_OPS,
    BatchRandomErasing,
    TrainTransform,
    seeded_rng,
)
from refiner_hf.training.data import load_embedded_dataset
from refiner_hf.training.errors import UsageError
from refiner_hf.training.loaders import SampleKey, SampleRecipe, TrainingSet, collate_training_batch
from refiner_hf.training.mixing import BatchMixing, mix_batch
from refiner_hf.training.relabel_targets import DENSE_LABELS, DenseLabelBuilder, relabel_key_of_value


# A 40 x 60 image in 4 x 6 cells of 10 pixels; the relabel map gives cell column c class c (logit 8, one of 6
# classes) and the image's red channel says which class a pixel shows.
HEIGHT, WIDTH, CELL, CLASSES, LOGIT = 40, 60, 10, 6, 8.0
RED = [30 + 40 * c for c in range(CLASSES)]
FILL = 128  # RandAugment's fill colour for a mean of 0.5
BOX = (0, 10, 40, 30)  # (top, left, height, width): columns 1 to 3 of the (augmented) whole image
SIZE, GRID = 30, 3  # the crop is resized to 30 x 30 px (horizontally unscaled) and tiled by 3 x 3 tokens


def column_image() -> PIL.Image.Image:
    pixels = np.zeros((HEIGHT, WIDTH, 3), dtype=np.uint8)
    for column in range(WIDTH // CELL):
        pixels[:, column * CELL : (column + 1) * CELL] = (RED[column], 90, 200)
    return PIL.Image.fromarray(pixels)


def column_map() -> RelabelMap:
    columns = torch.arange(WIDTH // CELL).expand(HEIGHT // CELL, -1)
    return RelabelMap(scores=torch.full((1, *columns.shape), LOGIT), indices=columns[None].clone())


def transform_with(order: str, **kwargs) -> TrainTransform:
    """A transform whose flip is always on and whose crop is always BOX, cut with bilinear interpolation."""
    options = dict(mean=(0.5,) * 3, std=(0.5,) * 3, hflip=1.0, interpolation="bilinear", color_jitter=0.0)
    transform = TrainTransform(SIZE, **{**options, **kwargs}, order=order)
    transform.crop.get_params = lambda image, scale, ratio: BOX
    return transform


def translate_only(transform: TrainTransform, fraction: float) -> None:
    """Makes the transform's RandAugment apply TranslateXRel by +-`fraction` of the width to every image."""
    (augment,) = transform.colour.transforms
    augment.ops = [op for op in augment.ops if op.name == "TranslateXRel"]
    augment.num_layers = 1
    (op,) = augment.ops
    op.prob, op.magnitude_std = 1.0, 0.0
    op.magnitude = fraction / op.hparams.get("translate_pct", 0.45) * 10


def normalized(image: PIL.Image.Image) -> torch.Tensor:
    return (TF.to_tensor(image) - 0.5) / 0.5


def builder_labels(crop) -> torch.Tensor:
    """The dense labels the trainer's target builder gives a sample of the column image with `crop`."""
    example = {"image": {"path": "train/n01/column.png"}}
    store = {relabel_key_of_value(example["image"]): column_map()}
    builder = DenseLabelBuilder("unused", "image", GRID, CLASSES, "softmax", store=store)
    return builder(example, crop)[DENSE_LABELS]


def one_class(label: int | None) -> torch.Tensor:
    """The softmax of the column map's logits at a position of class `label` (None: outside the image, zeros)."""
    if label is None:
        return torch.full((CLASSES,), 1 / CLASSES)
    target = torch.full((CLASSES,), 1 / (math.exp(LOGIT) + CLASSES - 1))
    target[label] = math.exp(LOGIT) / (math.exp(LOGIT) + CLASSES - 1)
    return target


def test_the_token_labeling_order_flips_and_moves_the_whole_image_and_map_then_crops():
    transform = transform_with("token_labeling", auto_augment="rand-m9-n1")
    translate_only(transform, 1 / 3)  # 20 px: two cells
    image = column_image()
    shifts = set()
    for seed in range(8):
        with seeded_rng(seed):
            pixels, crop = transform(image)
        assert crop.augmented_before_crop and crop.flipped and (crop.top, crop.left, crop.height, crop.width) == BOX
        ((a, b, shift, d, e, f),) = crop.geometry
        assert (a, b, d, e, f) == (1, 0, 0, 1, 0) and shift == pytest.approx(20 * np.sign(shift))
        shifts.add(round(shift))

        # The image: flipped whole, translated whole (in the whole image's pixels), then cut.
        flipped = TF.hflip(image)
        moved = flipped.transform(
            flipped.size, PIL.Image.AFFINE, (1, 0, shift, 0, 1, 0), PIL.Image.BILINEAR, fillcolor=(FILL,) * 3
        )
        expected = TF.resized_crop(moved, *BOX, [SIZE, SIZE], InterpolationMode.BILINEAR)
        torch.testing.assert_close(pixels, normalized(expected), atol=1e-6, rtol=0)

        # The labels, by hand: token column j covers whole-image column 1 + j after the flip and the move, which
        # showed original column 5 - (1 + j + cells moved), or came from outside the image (a uniform label).
        labels = builder_labels(crop)
        for j in range(GRID):
            source = 1 + j + round(shift) // CELL
            label = WIDTH // CELL - 1 - source if 0 <= source < WIDTH // CELL else None
            for i in range(GRID):
                torch.testing.assert_close(labels[:, i, j], one_class(label), atol=1e-6, rtol=0)
            # ... and they line up with what the image shows there.
            red = round(float(pixels[0, SIZE // 2, j * SIZE // GRID + SIZE // (2 * GRID)]) * 127.5 + 127.5)
            assert red == (FILL if label is None else RED[label])
    assert shifts == {-20, 20}


def test_timm_order_crops_first_so_the_same_draws_give_another_image():
    image = column_image()
    timm, original = transform_with("timm"), transform_with("token_labeling")
    with seeded_rng(0):
        timm_pixels, timm_crop = timm(image)
    with seeded_rng(0):
        pixels, crop = original(image)
    # timm: the box of the original image, mirrored afterwards: columns 3, 2, 1.
    expected = TF.hflip(TF.resized_crop(image, *BOX, [SIZE, SIZE], InterpolationMode.BILINEAR))
    torch.testing.assert_close(timm_pixels, normalized(expected), atol=1e-6, rtol=0)
    assert not timm_crop.augmented_before_crop
    # The original: the box of the mirrored image, i.e. columns 4, 3, 2 of the original image.
    expected = TF.resized_crop(TF.hflip(image), *BOX, [SIZE, SIZE], InterpolationMode.BILINEAR)
    torch.testing.assert_close(pixels, normalized(expected), atol=1e-6, rtol=0)
    for labels, columns in ((builder_labels(timm_crop), (3, 2, 1)), (builder_labels(crop), (4, 3, 2))):
        for j, column in enumerate(columns):
            torch.testing.assert_close(labels[:, 1, j], one_class(column), atol=1e-6, rtol=0)
    # Cutting the mirrored box and mirroring it is the same: the labels of both orders agree with their images.
    mirrored = (BOX[0], WIDTH - BOX[1] - BOX[3], BOX[2], BOX[3])
    relabel = column_map()
    first, second = (
        crop_soft_labels(relabel, box, (HEIGHT, WIDTH), GRID, CLASSES, flipped=True, augmented_before_crop=before)
        for box, before in ((BOX, True), (mirrored, False))
    )
    torch.testing.assert_close(first.dense, second.dense, atol=1e-6, rtol=0)
    torch.testing.assert_close(first.class_target, second.class_target, atol=1e-6, rtol=0)


def test_without_flip_or_geometry_the_pooling_is_roi_align():
    generator = torch.Generator().manual_seed(0)
    relabel = RelabelMap(scores=torch.randn(2, 5, 7, generator=generator), indices=torch.randint(0, 9, (2, 5, 7)))
    relabel.indices[1] = (relabel.indices[0] + 1) % 9  # the top-2 classes of a position differ
    for box in ((0, 0, 50, 70), (7, 3, 21, 40), (30, 44, 9, 13)):
        expected = crop_soft_labels(relabel, box, (50, 70), 4, 9, smoothing=0.1)
        actual = crop_soft_labels(relabel, box, (50, 70), 4, 9, smoothing=0.1, augmented_before_crop=True)
        torch.testing.assert_close(actual.dense, expected.dense, atol=1e-6, rtol=0)
        torch.testing.assert_close(actual.class_target, expected.class_target, atol=1e-6, rtol=0)


@pytest.mark.parametrize("order", ["timm", "token_labeling"])
def test_the_dense_labels_name_what_the_image_shows_under_geometric_randaugment(order):
    """RandAugment's rotations, shears and translations, in either order: each token's label is what it shows."""
    height, width = 96, 144
    pixels = np.zeros((height, width, 3), dtype=np.uint8)
    for column in range(CLASSES):
        pixels[:, column * width // CLASSES : (column + 1) * width // CLASSES] = (RED[column], 90, 200)
    transform = TrainTransform(
        56, (0.5,) * 3, (0.5,) * 3, auto_augment="rand-m9-mstd0.5-inc1", interpolation="bilinear", order=order
    )
    (augment,) = transform.colour.transforms
    augment.ops = [op for op in augment.ops if op.name in GEOMETRIC_OPS]  # colour operations would hide the class
    agree, total, moved = 0, 0, 0
    for seed in range(24):
        with seeded_rng(seed):
            image, crop = transform(PIL.Image.fromarray(pixels))
        moved += bool(crop.geometry)
        labels = crop_soft_labels(
            column_map(), (crop.top, crop.left, crop.height, crop.width), (height, width), 14, CLASSES,
            flipped=crop.flipped, geometry=crop.geometry, output_size_pixels=crop.geometry_size,
            augmented_before_crop=crop.augmented_before_crop,
        ).dense  # fmt: skip
        red = (image[0, 2::4, 2::4] * 127.5 + 127.5).round()  # the tokens' centres
        shown = [(value, label) for value, label in zip(red.flatten().tolist(), labels.argmax(0).flatten().tolist())]
        known = [(RED.index(value), label) for value, label in shown if value in RED]  # not fill, nor a blended edge
        agree += sum(value == label for value, label in known)
        total += len(known)
    assert moved >= 12 and total > 24 * 196 * 0.5
    assert agree / total > 0.995


def embedded_batch(transform: TrainTransform, indices: list[int]) -> dict:
    source = load_embedded_dataset()["train"].select(range(16))
    train_set = TrainingSet(source, SampleRecipe("image", "label", transform, seed=5))
    return collate_training_batch([train_set[SampleKey(1, index)] for index in indices])


def test_erasing_after_mixing_erases_the_mixed_images_and_leaves_the_targets():
    options = dict(mean=(0.5,) * 3, std=(0.5,) * 3, auto_augment="rand-m9-mstd0.5-inc1", re_count=2)
    erasing_later = TrainTransform(28, **options, re_prob=1.0, erase_after_mixing=True, order="token_labeling")
    unerased = TrainTransform(28, **options, re_prob=0.0, order="token_labeling")
    indices = [0, 3, 5, 8, 9, 12]
    batch = embedded_batch(erasing_later, indices)
    # The transform itself erases nothing: the images are those of a transform without erasing.
    assert torch.equal(batch["pixel_values"], embedded_batch(unerased, indices)["pixel_values"])
    assert isinstance(erasing_later.batch_erasing, BatchRandomErasing) and unerased.batch_erasing is None

    def mixed(erasing):
        mixing = BatchMixing(10, mixup_alpha=1.0, label_smoothing=0.1, erasing=erasing)
        np.random.seed(11)
        one = {**batch, "pixel_values": batch["pixel_values"].clone()}
        pixel_values, targets, _ = mix_batch(mixing, one, epoch=0)
        return pixel_values, targets, mixing.last_mix.lam

    plain, plain_targets, lam = mixed(None)
    erased, targets, erased_lam = mixed(erasing_later.batch_erasing)
    assert 0 < lam < 1 and erased_lam == lam
    torch.testing.assert_close(targets, plain_targets, atol=0, rtol=0)  # the targets are the mixed ones
    # Every image is erased (probability 1) where its own seed says, in the mixed image, with the noise of its seed.
    expected = plain.clone()
    for i, seed in enumerate(batch["sample_seeds"].tolist()):
        with seeded_rng(seed, ERASING_STREAM):
            boxes = erasing_later.batch_erasing.boxes(28, 28)
            assert 1 <= len(boxes) <= 2
            for top, left, height, width in boxes:
                expected[i, :, top : top + height, left : left + width] = torch.randn(3, height, width)
    assert torch.equal(erased, expected)
    changed = (erased != plain).any(dim=1)
    assert changed.any(dim=(1, 2)).all() and not changed.all(dim=(1, 2)).any()

    # A sample is erased the same in another batch (another process's share, a resumed epoch).
    other = embedded_batch(TrainTransform(28, **options, re_prob=1.0, erase_after_mixing=True), [9, 1])
    again = erasing_later.batch_erasing(other["pixel_values"].clone(), other["sample_seeds"])
    first = erasing_later.batch_erasing(batch["pixel_values"].clone(), batch["sample_seeds"])
    assert torch.equal(again[0] != other["pixel_values"][0], first[4] != batch["pixel_values"][4])


def test_batch_erasing_modes_and_probability():
    pixels = torch.full((4, 3, 16, 16), 5.0)
    seeds = torch.arange(4)
    assert torch.equal(BatchRandomErasing(0.0)(pixels.clone(), seeds), pixels)
    constant = BatchRandomErasing(1.0, mode="const")(pixels.clone(), seeds)
    assert set(constant.unique().tolist()) == {0.0, 5.0}
    colour = BatchRandomErasing(1.0, mode="rand")(pixels.clone(), seeds)
    for image in colour:
        erased = (image != 5).all(dim=0)
        assert erased.any() and all(len(channel[erased].unique()) == 1 for channel in image)
    with pytest.raises(ValueError, match="2 sample seeds for a batch of 4"):
        BatchRandomErasing(1.0)(pixels, seeds[:2])


def test_the_relabel_recipes_follow_the_original_pipeline_and_the_plain_ones_timms_order():
    for name in ("s", "m", "l"):
        flat = parse_args(
            ["--recipe", f"refiner_vit_{name}_relabel.yaml", "--dataset_name", "x"], recipe_dirs=[RECIPES]
        )
        assert (flat.flat()["augmentation_order"], flat.flat()["erase_after_mixing"]) == ("token_labeling", True)
        plain = parse_args(["--recipe", f"refiner_vit_{name}.yaml", "--dataset_name", "x"], recipe_dirs=[RECIPES])
        # The original's plain training uses timm's transform, and erases after mixing too (its prefetcher's erasing).
        assert (plain.flat()["augmentation_order"], plain.flat()["erase_after_mixing"]) == ("timm", True)
    assert parse_args([]).flat()["augmentation_order"] == "timm" and not parse_args([]).flat()["erase_after_mixing"]
    with pytest.raises(UsageError, match="invalid choice: 'crop_last' \\(choose from 'timm', 'token_labeling'\\)"):
        parse_args(["--augmentation_order", "crop_last"])


class Killed(BaseException):
    """A simulated kill."""


def test_a_run_in_the_original_order_resumes_to_the_same_model(tmp_path, monkeypatch):
    options = dict(augmentation_order="token_labeling", erase_after_mixing=True, reprob=1.0, mixup=0.8, cutmix=1.0,
                   epochs=1, max_train_samples=32, per_device_train_batch_size=4, max_eval_samples=8,
                   checkpointing_steps=4)  # fmt: skip
    erased, mixed = [], []  # the batches erased and mixed by each run
    erase, mix = BatchRandomErasing.__call__, trainer.mix_batch

    def counted_erasing(self, pixel_values, sample_seeds):
        erased.append(len(pixel_values))
        return erase(self, pixel_values, sample_seeds)

    def killed_at_the_sixth_batch(*args, **kwargs):
        mixed.append(1)
        if len(mixed) == 6:
            raise Killed
        return mix(*args, **kwargs)

    monkeypatch.setattr(BatchRandomErasing, "__call__", counted_erasing)
    run_in_process(tiny_run_args(tmp_path / "reference", **options))
    assert erased == [4] * 8  # the trainer erases every mixed batch
    argv = tiny_run_args(tmp_path / "resumed", **options)
    with monkeypatch.context() as patched:
        patched.setattr(trainer, "mix_batch", killed_at_the_sixth_batch)
        with pytest.raises(Killed):
            run_in_process(argv)
    erased.clear()
    run_in_process(argv + ["--resume_from_checkpoint", "latest"])
    assert len(erased) == 4  # resumed from the checkpoint of step 4
    assert read_results(tmp_path / "resumed")["global_step"] == 8
    model = "model/model.safetensors"
    assert (tmp_path / "resumed" / model).read_bytes() == (tmp_path / "reference" / model).read_bytes()
