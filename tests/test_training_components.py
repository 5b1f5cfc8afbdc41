"""The trainer's pieces: schedule, weight-decay groups, augmentation geometry and determinism, data checks, metric,
atomic checkpoints."""

import io
import json
import math
import random
from pathlib import Path

import datasets
import numpy as np
import PIL.Image
import pytest
import torch
from accelerate import Accelerator
from accelerate.state import AcceleratorState
from helpers import tiny_config
from torchvision.transforms import functional as TF

from refiner_hf import RefinerViTForImageClassification
from refiner_hf.image_processing_refiner_vit import image_processor_for_config
from refiner_hf.training.augmentation import TrainTransform, seeded_rng
from refiner_hf.training.checkpointing import CheckpointManager, TrainingProgress
from refiner_hf.training.data import (
    BadImageError,
    DataError,
    check_columns,
    decode_image,
    load_embedded_dataset,
    split_class_names,
)
from refiner_hf.training.errors import UsageError
from refiner_hf.training.evaluation import top_k_hits
from refiner_hf.training.loaders import (
    EpochSampler,
    EvaluationCollator,
    EvaluationSet,
    SampleKey,
    SampleRecipe,
    TrainingSet,
    collate_training_batch,
)
from refiner_hf.training.mixing import BatchMixing
from refiner_hf.training.model_setup import convert_sync_batchnorm
from refiner_hf.training.optim import build_optimizer, build_scheduler, no_weight_decay_names


# Learning-rate schedule


def scheduled_lrs(unit: str, epochs: int = 300, cooldown: int = 10, updates_per_epoch: int = 1) -> list[float]:
    optimizer = torch.optim.AdamW([torch.nn.Parameter(torch.zeros(1))], lr=5e-4)
    scheduler = build_scheduler(optimizer, epochs, 5, 1e-6, 1e-5, unit=unit, updates_per_epoch=updates_per_epoch)
    lrs = []
    for epoch in range(epochs + cooldown):
        scheduler.step(epoch)
        for update in range(updates_per_epoch):
            scheduler.step_update(epoch * updates_per_epoch + update)
            lrs.append(optimizer.param_groups[0]["lr"])
    return lrs


def test_schedule_per_epoch_is_the_papers():
    lrs = scheduled_lrs("epoch")
    assert len(lrs) == 310
    # Linear warmup from 1e-6 over 5 epochs ...
    assert lrs[:5] == pytest.approx([1e-6 + e * (5e-4 - 1e-6) / 5 for e in range(5)])
    # ... then the cosine from epoch 5 of the 300-epoch cycle down to 1e-5 ...
    cosine = [1e-5 + 0.5 * (5e-4 - 1e-5) * (1 + math.cos(math.pi * e / 300)) for e in range(5, 300)]
    assert lrs[5:300] == pytest.approx(cosine)
    # ... and 10 cooldown epochs at the minimum.
    assert lrs[300:] == pytest.approx([1e-5] * 10)


def test_schedule_per_step_follows_the_same_curve():
    per_step = scheduled_lrs("step", epochs=20, cooldown=2, updates_per_epoch=4)
    per_epoch = scheduled_lrs("epoch", epochs=20, cooldown=2)
    assert len(per_step) == 88
    assert per_step[::4] == pytest.approx(per_epoch)  # equal at epoch boundaries
    assert per_step[1] > per_step[0]  # and it moves within an epoch
    assert per_step[-1] == pytest.approx(1e-5)


# Optimizer


def test_no_weight_decay_on_norms_biases_position_embedding_and_class_token():
    model = RefinerViTForImageClassification(tiny_config())
    optimizer = build_optimizer(model, lr=1e-3, weight_decay=0.05)
    decays = {id(p): group["weight_decay"] for group in optimizer.param_groups for p in group["params"]}
    for name, param in model.named_parameters():
        exempt = (
            param.ndim == 1
            or name.endswith(".bias")
            or name.endswith(("embeddings.position_embeddings", "embeddings.cls_token"))
        )
        assert decays[id(param)] == (0.0 if exempt else 0.05), name
    names = no_weight_decay_names(model)
    assert {"refiner_vit.embeddings.position_embeddings", "refiner_vit.embeddings.cls_token"} <= names
    assert "refiner_vit.layers.0.mlp.layer_scale" in names and "classifier.weight" not in names
    assert sum(p.numel() for group in optimizer.param_groups for p in group["params"]) == model.num_parameters()


# Augmentation


def test_the_recorded_crop_and_flip_reproduce_the_augmented_image():
    image = PIL.Image.fromarray(np.random.default_rng(0).integers(0, 255, (40, 60, 3), dtype=np.uint8))
    transform = TrainTransform(
        28, mean=(0.5,) * 3, std=(0.5,) * 3, scale=(0.2, 1.0), interpolation="bilinear", color_jitter=0.0
    )
    flips = set()
    for seed in range(12):
        with seeded_rng(seed):
            pixels, crop = transform(image)
        flips.add(crop.flipped)
        assert (crop.image_height, crop.image_width) == (40, 60)
        expected = TF.resized_crop(image, crop.top, crop.left, crop.height, crop.width, [28, 28])
        expected = TF.hflip(expected) if crop.flipped else expected
        expected = (TF.to_tensor(expected) - 0.5) / 0.5
        torch.testing.assert_close(pixels, expected, atol=1e-6, rtol=0)
        x0, y0, x1, y1 = crop.box_xyxy_normalized()
        assert 0 <= x0 < x1 <= 1 and 0 <= y0 < y1 <= 1
    assert flips == {True, False}


def test_augmentation_depends_only_on_its_seed():
    image = decode_image(load_embedded_dataset()["train"][0]["image"], 0)
    assert image.mode == "L" and image.size == (28, 28)
    transform = TrainTransform(28, (0.5,) * 3, (0.5,) * 3, auto_augment="rand-m9-mstd0.5-inc1", re_prob=1.0)
    with seeded_rng(1, 2, 3):
        first = transform(image)
    random.random(), np.random.rand(), torch.rand(3)  # other draws in between change nothing
    state = (random.getstate(), np.random.get_state()[1].copy(), torch.get_rng_state())
    with seeded_rng(1, 2, 3):
        second = transform(image)
    assert torch.equal(first[0], second[0]) and first[1] == second[1]
    # ... and the caller's random streams are left as they were.
    assert random.getstate() == state[0] and np.array_equal(np.random.get_state()[1], state[1])
    assert torch.equal(torch.get_rng_state(), state[2])
    with seeded_rng(1, 2, 4):
        assert not torch.equal(transform(image)[0], first[0])


def test_grayscale_rgba_and_cmyk_images_become_rgb():
    transform = TrainTransform(28, (0.5,) * 3, (0.5,) * 3)
    for mode in ("L", "RGBA", "CMYK", "P", "RGB"):
        image = PIL.Image.new(mode, (30, 30))
        assert transform(image)[0].shape == (3, 28, 28)


def test_label_smoothing_and_mixing_targets():
    labels = torch.tensor([0, 1, 2, 3])
    pixels = torch.randn(4, 3, 8, 8)
    _, smoothed = BatchMixing(5, label_smoothing=0.1)(pixels, labels, epoch=0)
    torch.testing.assert_close(smoothed.sum(-1), torch.ones(4))
    assert smoothed[0, 0] == pytest.approx(0.92) and smoothed[0, 1] == pytest.approx(0.02)
    _, indices = BatchMixing(5)(pixels, labels, epoch=0)
    assert torch.equal(indices, labels)
    mixing = BatchMixing(5, mixup_alpha=0.8, cutmix_alpha=1.0, label_smoothing=0.1, off_epoch=3)
    np.random.seed(0)
    mixed_pixels, mixed = mixing(pixels.clone(), labels, epoch=0)
    # Each target mixes the image's smoothed label with its mirror's in the batch (timm pairs b with B-1-b).
    lam = (mixed[0, 0] - 0.02) / 0.9
    torch.testing.assert_close(mixed, lam * smoothed + (1 - lam) * smoothed.flip(0))
    assert 0 < lam < 1 and not torch.equal(mixed_pixels, pixels)
    assert not mixing.active(3)


# Data


def test_epoch_sampler_is_a_seeded_permutation_per_epoch():
    sampler = EpochSampler(50, seed=7)
    first = list(sampler)
    assert sorted(key.index for key in first) == list(range(50)) and {key.epoch for key in first} == {0}
    assert list(EpochSampler(50, seed=7)) == first
    sampler.set_epoch(1)
    second = list(sampler)
    assert {key.epoch for key in second} == {1} and [k.index for k in second] != [k.index for k in first]


def png_bytes(array: np.ndarray) -> bytes:
    stream = io.BytesIO()
    PIL.Image.fromarray(array).save(stream, format="PNG")
    return stream.getvalue()


def small_dataset(num: int = 6, corrupt: tuple[int, ...] = ()) -> datasets.Dataset:
    images = []
    for i in range(num):
        data = png_bytes(np.full((12, 12), i * 20, dtype=np.uint8))
        images.append({"bytes": data[:20] if i in corrupt else data, "path": f"class_{i % 2}/img_{i}.png"})
    features = datasets.Features(
        {"image": datasets.Image(decode=False), "label": datasets.ClassLabel(names=["a", "b"])}
    )
    return datasets.Dataset.from_dict({"image": images, "label": [i % 2 for i in range(num)]}, features=features)


def test_a_corrupt_image_is_named_or_replaced_and_counted():
    source = small_dataset(corrupt=(2,))
    transform = TrainTransform(8, (0.5,) * 3, (0.5,) * 3, scale=(0.5, 1.0))
    with pytest.raises(BadImageError, match=r"image 2 \(class_0/img_2.png\)"):
        TrainingSet(source, SampleRecipe("image", "label", transform, seed=0))[SampleKey(0, 2)]
    skipping = TrainingSet(source, SampleRecipe("image", "label", transform, seed=0, skip_bad_images=True))
    sample = skipping[SampleKey(0, 2)]
    assert sample["index"] != 2 and sample["bad_images"] == [2]
    assert skipping[SampleKey(0, 2)]["index"] == sample["index"]  # the replacement is drawn under the sample's seed
    batch = collate_training_batch([skipping[SampleKey(0, i)] for i in range(4)])
    assert batch["pixel_values"].shape == (4, 3, 8, 8) and batch["bad_images"] == [2]
    assert batch["crop_boxes"].shape == (4, 4) and batch["flipped"].dtype == torch.bool
    assert batch["indices"].tolist() == [0, 1, sample["index"], 3]
    # Drawn at random, not the neighbour: over epochs the replacements spread over the data set.
    replacements = [skipping[SampleKey(epoch, 2)]["index"] for epoch in range(40)]
    assert len(set(replacements)) >= 5 and replacements.count(3) < 15


def test_extra_per_sample_targets_follow_the_crop():
    source = small_dataset()
    transform = TrainTransform(8, (0.5,) * 3, (0.5,) * 3, scale=(0.5, 1.0))
    builders = {"crop_area": lambda example, crop: torch.tensor(crop.height * crop.width / 144.0)}
    dataset = TrainingSet(source, SampleRecipe("image", "label", transform, seed=0, target_builders=builders))
    batch = collate_training_batch([dataset[SampleKey(0, i)] for i in range(3)])
    boxes = batch["crop_boxes"]
    torch.testing.assert_close(batch["crop_area"], (boxes[:, 2] - boxes[:, 0]) * (boxes[:, 3] - boxes[:, 1]))


def test_labels_outside_the_head_are_named():
    transform = TrainTransform(8, (0.5,) * 3, (0.5,) * 3)
    with pytest.raises(DataError, match="Training example 1 has label 1, outside the model's 1 classes"):
        TrainingSet(small_dataset(), SampleRecipe("image", "label", transform, seed=0, num_labels=1))[SampleKey(0, 1)]


def test_missing_columns_are_named_with_the_columns_there_are():
    with pytest.raises(DataError, match=r"no label column 'fine_label'; its columns are \['image', 'label'\]"):
        check_columns(small_dataset(), "train", "image", "fine_label")
    with pytest.raises(DataError, match="no image column 'img'"):
        check_columns(small_dataset(), "train", "img", "label")
    text_labels = datasets.Dataset.from_dict({"image": [None], "label": ["cat"]})
    with pytest.raises(DataError, match="not class indices"):
        check_columns(text_labels, "train", "image", "label")


def test_splits_with_different_classes_are_an_error():
    def split(names):
        features = datasets.Features({"image": datasets.Image(), "label": datasets.ClassLabel(names=names)})
        return datasets.Dataset.from_dict({"image": [], "label": []}, features=features)

    assert split_class_names(split(["cat", "dog"]), split(["cat", "dog"]), "label") == ["cat", "dog"]
    with pytest.raises(DataError, match=r"only in training: \['dog'\], only in validation: \['cow'\]"):
        split_class_names(split(["cat", "dog"]), split(["cat", "cow"]), "label")
    with pytest.raises(DataError, match="or the order differs"):
        split_class_names(split(["cat", "dog"]), split(["dog", "cat"]), "label")


def test_sync_batchnorm_needs_gpus():
    model = RefinerViTForImageClassification(tiny_config())
    assert convert_sync_batchnorm(model, torch.device("cpu"), num_processes=1) is model
    with pytest.raises(ValueError, match="needs GPUs"):
        convert_sync_batchnorm(model, torch.device("cpu"), num_processes=2)


def test_decode_image_names_truncated_files(tmp_path):
    path = tmp_path / "broken.jpg"
    stream = io.BytesIO()
    PIL.Image.new("RGB", (64, 64), "red").save(stream, format="JPEG")
    path.write_bytes(stream.getvalue()[:200])
    with pytest.raises(BadImageError, match=r"image 5 \(.*broken.jpg\)"):
        decode_image({"path": str(path), "bytes": None}, 5)
    assert decode_image({"path": None, "bytes": stream.getvalue()}, 0).size == (64, 64)


def test_evaluation_batches_use_the_image_processor_and_mark_bad_images():
    processor = image_processor_for_config(tiny_config(image_size=16, patch_size=4), crop_pct=1.0)
    dataset = EvaluationSet(small_dataset(corrupt=(1,)), "image", "label", skip_bad_images=True)
    batch = EvaluationCollator(processor)([dataset[i] for i in range(3)])
    assert batch["pixel_values"].shape == (3, 3, 16, 16)
    assert batch["valid"].tolist() == [True, False, True]
    expected = processor(decode_image(small_dataset()[2]["image"], 2), return_tensors="pt")["pixel_values"][0]
    torch.testing.assert_close(batch["pixel_values"][2], expected)


# Metric


def test_top_k_hits():
    ranked = torch.tensor([[3, 1, 2, 0, 4, 5], [0, 1, 2, 3, 4, 5], [1, 2, 3, 4, 5, 0]])
    assert top_k_hits(ranked, torch.tensor([3, 4, 0]), (1, 5)) == {1: 1, 5: 2}
    assert top_k_hits(ranked[:0], torch.tensor([], dtype=torch.long), (1,)) == {1: 0}


# Model


def test_position_embedding_resize_keeps_the_class_token_the_freezing_and_updates_the_config():
    model = RefinerViTForImageClassification(tiny_config())
    before = model.refiner_vit.embeddings.position_embeddings.detach().clone()
    model.refiner_vit.embeddings.position_embeddings.requires_grad_(False)  # e.g. frozen for fine-tuning
    model.resize_position_embeddings(48)
    after = model.refiner_vit.embeddings.position_embeddings
    assert after.shape == (1, 37, 24) and model.config.image_size == 48 and not after.requires_grad
    torch.testing.assert_close(after[:, 0], before[:, 0])
    assert model(torch.randn(1, 3, 48, 48)).logits.shape == (1, 5)
    with pytest.raises(ValueError, match="must be a multiple of `patch_size`"):
        model.resize_position_embeddings(50)


# Checkpoints


@pytest.fixture
def accelerator():
    accelerator = Accelerator(cpu=True)
    yield accelerator
    AcceleratorState._reset_state(reset_partial_state=True)


def test_checkpoints_are_atomic_and_pruned(tmp_path: Path, accelerator, monkeypatch):
    model = accelerator.prepare(torch.nn.Linear(3, 2))
    progress = TrainingProgress()
    manager = CheckpointManager(accelerator, tmp_path / "checkpoints", total_limit=2, progress=progress)
    assert manager.latest() is None
    for step in (1, 2, 3):
        progress.global_step = step
        with torch.no_grad():
            model.weight.fill_(step)
        manager.save(progress)
    assert [p.name for p in manager.checkpoints()] == ["step_00000002", "step_00000003"]

    # A save that dies half-way leaves the previous checkpoint as the latest, intact.
    original = accelerator.save_state

    def crashing_save_state(output_dir, **kwargs):
        original(output_dir, **kwargs)
        raise RuntimeError("disk full")

    monkeypatch.setattr(accelerator, "save_state", crashing_save_state)
    progress.global_step = 4
    with pytest.raises(RuntimeError, match="disk full"):
        manager.save(progress)
    assert manager.latest().name == "step_00000003"
    assert sorted(p.name for p in (tmp_path / "checkpoints").iterdir()) == ["step_00000002", "step_00000003"]

    # A killed save leaves a temporary folder, which is never taken for a checkpoint and is cleared by the next save.
    (tmp_path / "checkpoints" / ".tmp-step_00000004").mkdir()
    assert manager.latest().name == "step_00000003"
    monkeypatch.setattr(accelerator, "save_state", original)
    manager.save(progress)
    assert sorted(p.name for p in (tmp_path / "checkpoints").iterdir()) == ["step_00000003", "step_00000004"]

    # Loading restores the weights and the registered progress.
    with torch.no_grad():
        model.weight.zero_()
    progress.global_step = 0
    manager.load(manager.resolve("latest"))
    assert progress.global_step == 4 and torch.all(model.weight == 3)
    assert json.loads((manager.latest() / "training_state.json").read_text())["progress"]["global_step"] == 4


def test_resolve_rejects_a_missing_directory(tmp_path, accelerator):
    with pytest.raises(UsageError, match="no such checkpoint directory"):
        CheckpointManager(accelerator, tmp_path).resolve(str(tmp_path / "nope"))


def test_training_progress_round_trips():
    progress = TrainingProgress(epoch=3, batches_in_epoch=5, global_step=40, best_metric=0.5, history=[{"a": 1}])
    other = TrainingProgress()
    other.load_state_dict(progress.state_dict())
    assert other == progress


def test_randaugment_posterize_to_zero_bits_gives_a_black_image():
    transform = TrainTransform(28, (0.5,) * 3, (0.5,) * 3, auto_augment="rand-m10-n1-mstd0.5-inc1")
    (randaugment,) = transform.colour.transforms
    posterize = [op for op in randaugment.ops if op.name == "PosterizeIncreasing"][0]
    posterize.prob, posterize.magnitude, posterize.magnitude_std = 1.0, 10, 0  # 4 - 4 = 0 bits kept
    image = PIL.Image.new("RGB", (28, 28), (200, 100, 50))
    assert posterize(image).getextrema() == ((0, 0), (0, 0), (0, 0))
