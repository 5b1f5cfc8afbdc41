"""
Token labeling in the trainer: relabeling the embedded data with a tiny teacher (examples/generate_relabel.py), training
on the maps with MixToken and the dense loss (one and two processes), the checks before training, and the geometry of
the dense labels a batch carries.
"""

import json
import math
import pickle

import numpy as np
import PIL.Image
import pytest
import torch
from training_utils import (
    TINY_MODEL,
    read_results,
    run_in_process,
    run_relabel_script,
    run_script,
    save_tiny_teacher,
    tiny_run_args,
    two_process_launcher,
)

from refiner_hf.token_labeling import (
    RelabelError,
    RelabelMap,
    crop_soft_labels,
    open_relabel_store,
)
from refiner_hf.training.arguments import DataArguments
from refiner_hf.training.augmentation import TrainTransform, seeded_rng
from refiner_hf.training.data import DataError, load_image_data
from refiner_hf.training.errors import UsageError, run_command
from refiner_hf.training.loaders import SampleKey, SampleRecipe, TrainingSet, collate_training_batch
from refiner_hf.training.mixing import BatchMixing, mix_batch, mix_dense_labels
from refiner_hf.training.relabel_targets import (
    DENSE_LABELS,
    RELABEL_CLASS_TARGETS,
    DenseLabelBuilder,
    example_relabel_key,
    iter_relabel_keys,
)
from refiner_hf.training.teacher_relabeling import parse_relabel_args, relabel_training_set
from refiner_hf.training.tracking import read_metrics
from refiner_hf.training.trainer import STOPPING_ERRORS


NUM_SAMPLES = 64
GRID = 7  # the tiny model's token grid: 28 px with 4-pixel patches


def generate(argv: list[str]) -> dict:
    """examples/generate_relabel.py's command line `argv`, run in this process."""
    return relabel_training_set(*parse_relabel_args(argv))


def relabel_argv(teacher, output, **overrides) -> list[str]:
    values = {"teacher": teacher, "output": output, "max_train_samples": NUM_SAMPLES, "teacher_image_size": 56,
              "batch_size": 16, "shard_size": 24, "dataloader_num_workers": 0, **overrides}  # fmt: skip
    return [item for key, value in values.items() for item in (f"--{key}", str(value))]


def token_labeling_args(output_dir, store, **overrides) -> list[str]:
    """A tiny run (2 epochs of 8 steps, no augmentation besides the crop and flip) with token labeling."""
    values = dict(relabel_root=store, relabel_size=GRID, mix_token=True, dense_weight=0.5, aa="", reprob=0.0, lr=3e-3)
    return tiny_run_args(output_dir, **{**values, **overrides})


def training_keys(num_samples: int = NUM_SAMPLES) -> list[str]:
    data = load_image_data(DataArguments(max_train_samples=num_samples), seed=42)
    return list(iter_relabel_keys(data.train, "image"))


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    """A packed store of the tiny teacher's maps of the 64 training images of the tiny runs."""
    root = tmp_path_factory.mktemp("relabel")
    teacher = save_tiny_teacher(root / "teacher")
    results = generate(relabel_argv(teacher, root / "store"))
    assert results == {"written": NUM_SAMPLES, "skipped": 0, "stored": NUM_SAMPLES, "num_classes": 10}
    return root


def test_generated_store_covers_the_training_set_and_resumes(store):
    relabel = open_relabel_store(store / "store", num_classes=10)
    keys = training_keys()
    assert len(relabel) == NUM_SAMPLES and all(key in relabel for key in keys)
    assert keys[0].startswith("fashion_mnist/train_")
    assert relabel.map_shape == (5, GRID, GRID)
    first = relabel[keys[0]]
    assert first.indices.min() >= 0 and first.indices.max() < 10 and torch.isfinite(first.scores).all()
    # Started again, it finds everything stored and only rewrites the store's description.
    again = generate(relabel_argv(store / "teacher", store / "store"))
    assert again["written"] == 0 and again["stored"] == NUM_SAMPLES


def test_training_with_token_labeling_lowers_the_loss(tmp_path):
    oracle_store(tmp_path / "store")  # teacher labels one can learn (the tiny random teacher's are near uniform)
    results = run_in_process(token_labeling_args(tmp_path, tmp_path / "store"))
    losses = [r["train/loss"] for r in read_metrics(tmp_path / "logs") if "train/loss" in r]
    assert len(losses) == 16 and all(math.isfinite(loss) for loss in losses)
    assert np.mean(losses[-4:]) < np.mean(losses[:4]) - 0.05, losses
    assert results["global_step"] == 16
    config = json.loads((tmp_path / "model" / "config.json").read_text())
    assert config["use_mix_token"] is True and config["aux_loss_weight"] == 0.5


def test_relabeling_and_training_on_two_processes(store, tmp_path):
    output = tmp_path / "store"
    run_relabel_script(relabel_argv(store / "teacher", output), launcher=two_process_launcher(29531))
    relabel = open_relabel_store(output, num_classes=10)
    assert all(key in relabel for key in training_keys()) and len(relabel) == NUM_SAMPLES
    assert {path.name.split("-")[0] for path in output.glob("*.keys.txt")} == {"rank0", "rank1"}

    run_dir = tmp_path / "run"
    stdout = run_script(token_labeling_args(run_dir, output, epochs=3), launcher=two_process_launcher(29532)).stdout
    assert "8 per process x 2 processes" in stdout and "MixToken on" in stdout, stdout
    losses = [r["train/loss"] for r in read_metrics(run_dir / "logs") if "train/loss" in r]
    assert len(losses) == 12 and all(math.isfinite(loss) for loss in losses)
    assert np.mean(losses[-3:]) < np.mean(losses[:3]), losses
    assert read_results(run_dir)["global_step"] == 12


def test_missing_maps_and_mismatches_fail_before_training(store, tmp_path):
    # 80 training images: the first 64 are the relabeled ones (the same seeded shuffle), 16 have no map.
    with pytest.raises(RelabelError, match=r"16 of 80 training images have no relabel map \(e\.g\. fashion_mnist/"):
        run_in_process(token_labeling_args(tmp_path / "missing", store / "store", max_train_samples=80))
    missing = sorted(set(training_keys(80)) - set(training_keys()))
    with pytest.raises(RelabelError) as error:
        run_in_process(token_labeling_args(tmp_path / "missing", store / "store", max_train_samples=80))
    assert any(key in str(error.value) for key in missing)
    with pytest.raises(ValueError, match="--relabel_size 14 differs from the model's token grid 7 x 7"):
        run_in_process(token_labeling_args(tmp_path / "size", store / "store", relabel_size=14))
    without_aux = json.dumps({**TINY_MODEL, "use_aux_head": False})
    with pytest.raises(ValueError, match="the model has none"):
        run_in_process(
            token_labeling_args(tmp_path / "aux", store / "store", config_overrides=without_aux, mix_token=False)
        )
    with pytest.raises(RelabelError, match="index 10 classes but the model has 12"):
        run_in_process(token_labeling_args(tmp_path / "classes", store / "store",
                                           config_overrides=json.dumps({**TINY_MODEL, "num_labels": 12})))  # fmt: skip
    assert not any((tmp_path / name / "checkpoints").exists() for name in ("missing", "size", "aux", "classes"))


def test_batch_dense_labels_follow_the_crop_flip_and_cutmix_box(store):
    data = load_image_data(DataArguments(max_train_samples=NUM_SAMPLES), seed=42)
    relabel = open_relabel_store(store / "store", num_classes=10)
    builder = DenseLabelBuilder(store / "store", "image", GRID, 10, "softmax")
    builder = pickle.loads(pickle.dumps(builder))  # as DataLoader workers get it under spawn
    transform = TrainTransform(
        28, mean=(0.5,) * 3, std=(0.5,) * 3, scale=(0.2, 0.6), auto_augment="rand-m9", re_prob=0.5
    )
    train_set = TrainingSet(
        data.train, SampleRecipe("image", "label", transform, seed=0, target_builders={DENSE_LABELS: builder})
    )
    samples = [train_set[SampleKey(0, index)] for index in range(8)]
    batch = collate_training_batch(samples)
    assert batch[DENSE_LABELS].shape == (8, 10, GRID, GRID)
    keys = training_keys()
    assert any(s["crop"].flipped for s in samples) and not all(s["crop"].flipped for s in samples)
    for i, sample in enumerate(samples):
        crop = sample["crop"]
        expected = crop_soft_labels(
            relabel[keys[i]], (crop.top, crop.left, crop.height, crop.width), (28, 28), GRID, 10, flipped=crop.flipped,
            geometry=crop.geometry, output_size_pixels=crop.output_size,
        ).dense  # fmt: skip
        torch.testing.assert_close(batch[DENSE_LABELS][i], expected)
    assert any(sample["crop"].geometry for sample in samples)  # RandAugment moved some images: their labels followed

    # CutMix: the box pasted into the images is the one the dense labels are mixed with, on the token grid.
    torch.manual_seed(3)
    np.random.seed(3)
    mixing = BatchMixing(10, mixup_alpha=0.0, cutmix_alpha=1.0, prob=1.0)
    original = batch["pixel_values"].clone()
    dense = batch[DENSE_LABELS].clone()
    pixel_values, targets, mixed = mix_batch(mixing, batch, epoch=0)
    record = mixing.last_mix
    assert record is not None and record.cutmix_box is not None
    y_low, y_high, x_low, x_high = record.cutmix_box
    inside = torch.zeros(28, 28, dtype=torch.bool)
    inside[y_low:y_high, x_low:x_high] = True
    assert inside.any() and not inside.all()
    assert torch.equal(pixel_values[..., inside], original.flip(0)[..., inside])
    assert torch.equal(pixel_values[..., ~inside], original[..., ~inside])
    torch.testing.assert_close(mixed, mix_dense_labels(dense, record.lam, record.cutmix_box, (28, 28)))
    token_inside = torch.zeros(GRID, GRID, dtype=torch.bool)
    scale = GRID / 28
    token_inside[round(y_low * scale) : round(y_high * scale), round(x_low * scale) : round(x_high * scale)] = True
    torch.testing.assert_close(mixed[..., token_inside], dense.flip(0)[..., token_inside])
    torch.testing.assert_close(mixed[..., ~token_inside], dense[..., ~token_inside])
    assert targets.shape == (8, 10)

    # Mixup blends every token's label with the same λ as the images.
    mixing = BatchMixing(10, mixup_alpha=1.0, cutmix_alpha=0.0, prob=1.0)
    batch = collate_training_batch(samples)
    _, _, mixed = mix_batch(mixing, batch, epoch=0)
    lam = mixing.last_mix.lam
    torch.testing.assert_close(mixed, lam * dense + (1 - lam) * dense.flip(0))


def test_imagenet_and_image_folder_examples_are_keyed_by_file_name():
    import datasets

    paths = ["n01440764_10026.JPEG", "/data/train/n01443537/n01443537_2.JPEG"]
    features = datasets.Features({"image": datasets.Image(decode=False), "label": datasets.Value("int64")})
    split = datasets.Dataset.from_dict(
        {"image": [{"path": path, "bytes": b""} for path in paths], "label": [0, 1]}, features=features
    )
    expected = ["n01440764/n01440764_10026", "n01443537/n01443537_2"]
    # The keys checked before training are the keys the target builder looks up for each example.
    assert list(iter_relabel_keys(split, "image")) == expected
    assert [example_relabel_key(split[i], "image") for i in range(2)] == expected
    nameless = datasets.Dataset.from_dict({"image": [{"path": None, "bytes": b""}], "label": [0]}, features=features)
    with pytest.raises(RelabelError, match="Training example 0 has no file name"):
        list(iter_relabel_keys(nameless, "image"))


def test_relabeling_fewer_images_than_one_step_is_refused_then_trains_with_a_batch_that_fits(store, tmp_path):
    # Relabel 50 images (here: the first 50 of the 64 relabeled, the same seeded selection) and train on them with the
    # embedded recipe, whose global batch is 64: refused before training, naming the sizes and the fix.
    argv = ["--relabel_root", str(store / "store"), "--max_train_samples", "50", "--output_dir", str(tmp_path),
            "--config_overrides", json.dumps(TINY_MODEL), "--max_eval_samples", "20", "--dataloader_num_workers", "0",
            "--report_to", "none", "--logging_steps", "1"]  # fmt: skip
    with pytest.raises(DataError, match=r"has 50 images, fewer than one optimizer step takes \(64 per process x 1 "):
        run_in_process(argv)
    assert not (tmp_path / "checkpoints").exists()
    # With 16 per batch: 3 steps per epoch, and --max_train_steps stops the run in its second epoch.
    results = run_in_process(argv + ["--per_device_train_batch_size", "16", "--max_train_steps", "4"])
    assert results["global_step"] == 4 and [h["step"] for h in results["history"]] == [3, 4]
    losses = [r["train/loss"] for r in read_metrics(tmp_path / "logs") if "train/loss" in r]
    assert len(losses) == 4 and all(math.isfinite(loss) for loss in losses)


def test_relabel_problems_are_one_line_errors(store, tmp_path, capsys):
    argv = token_labeling_args(tmp_path / "missing", store / "store", max_train_samples=80)
    with pytest.raises(SystemExit) as exit_info:
        run_command(lambda: run_in_process(argv), usage_errors=STOPPING_ERRORS)
    assert exit_info.value.code == 1  # a data error: the store does not cover the training set
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1 and ": error: 16 of 80 training images have no relabel map (e.g. fashion_mnist/" in lines[0]
    assert "examples/generate_relabel.py relabels the training images its data arguments select" in lines[0]
    with pytest.raises(UsageError, match="--relabel_size 14 differs from the model's token grid 7 x 7"):
        run_in_process(token_labeling_args(tmp_path / "size", store / "store", relabel_size=14))


def crop_label_by_hand(relabel, crop, num_classes: int, smoothing: float) -> torch.Tensor:
    """The original's class target, written out: the top-k scores scattered, the crop pooled with RoIAlign to one
    position, a softmax over classes, then `p * on + off` with on = 1 - s + s / C and off = s / C."""
    from torchvision.ops import roi_align

    full = torch.zeros(num_classes, *relabel.scores.shape[1:]).scatter_(0, relabel.indices, relabel.scores)
    height, width = full.shape[1:]
    box = torch.tensor([[0.0, crop.left / crop.image_width * width, crop.top / crop.image_height * height,
                         (crop.left + crop.width) / crop.image_width * width,
                         (crop.top + crop.height) / crop.image_height * height]])  # fmt: skip
    pooled = roi_align(full[None], box, output_size=(1, 1), aligned=True)[0, :, 0, 0]
    return pooled.softmax(0) * (1 - smoothing + smoothing / num_classes) + smoothing / num_classes


def test_the_class_target_is_the_teachers_label_of_the_crop_smoothed_and_mixed_like_the_images(store):
    data = load_image_data(DataArguments(max_train_samples=NUM_SAMPLES), seed=42)
    relabel = open_relabel_store(store / "store", num_classes=10)
    builder = DenseLabelBuilder(store / "store", "image", GRID, 10, "softmax", smoothing=0.1)
    transform = TrainTransform(28, mean=(0.5,) * 3, std=(0.5,) * 3, scale=(0.2, 0.6))
    train_set = TrainingSet(
        data.train, SampleRecipe("image", "label", transform, seed=0, target_builders={DENSE_LABELS: builder})
    )
    samples = [train_set[SampleKey(0, index)] for index in range(8)]
    batch = collate_training_batch(samples)
    keys = training_keys()
    for i, sample in enumerate(samples):
        expected = crop_label_by_hand(relabel[keys[i]], sample["crop"], 10, 0.1)
        torch.testing.assert_close(batch[RELABEL_CLASS_TARGETS][i], expected, atol=1e-6, rtol=1e-6)
        # The dense labels are smoothed the same way: p * (1 - s + s / C) + s / C.
        unsmoothed = DenseLabelBuilder(store / "store", "image", GRID, 10, "softmax")(data.train[i], sample["crop"])
        torch.testing.assert_close(batch[DENSE_LABELS][i], unsmoothed[DENSE_LABELS] * 0.91 + 0.01)
    teacher = batch[RELABEL_CLASS_TARGETS]

    torch.manual_seed(3)
    np.random.seed(3)
    mixing = BatchMixing(10, mixup_alpha=0.0, cutmix_alpha=1.0, prob=1.0, label_smoothing=0.1)
    _, targets, _ = mix_batch(mixing, collate_training_batch(samples), epoch=0)
    lam = mixing.last_mix.lam
    assert 0 < lam < 1
    torch.testing.assert_close(targets, lam * teacher + (1 - lam) * teacher.flip(0))

    torch.manual_seed(3)
    np.random.seed(3)
    _, ground_truth, _ = mix_batch(mixing, collate_training_batch(samples), 0, class_target="ground_truth")
    one_hot = torch.nn.functional.one_hot(batch["labels"], 10).float() * 0.9 + 0.01
    torch.testing.assert_close(ground_truth, lam * one_hot + (1 - lam) * one_hot.flip(0))


def test_cutmix_blends_every_dense_label_with_lambda_when_asked():
    dense = torch.rand(4, 3, 5, 5)
    blended = mix_dense_labels(dense, 0.7, cutmix_box=(0, 10, 0, 10), image_size=(20, 20), cutmix_mode="blend")
    torch.testing.assert_close(blended, 0.7 * dense + 0.3 * dense.flip(0))
    boxed = mix_dense_labels(dense, 0.7, cutmix_box=(0, 10, 0, 10), image_size=(20, 20))
    assert torch.equal(boxed[..., :2, :2], dense.flip(0)[..., :2, :2]) and torch.equal(
        boxed[..., 4, 4], dense[..., 4, 4]
    )


def test_a_transposed_store_reads_the_same_labels_with_its_layout():
    generator = torch.Generator().manual_seed(0)
    relabel = RelabelMap(scores=torch.randn(3, 6, 9, generator=generator) * 3,
                         indices=torch.randint(0, 8, (3, 6, 9), generator=generator))  # fmt: skip
    transposed = RelabelMap(scores=relabel.scores.transpose(1, 2), indices=relabel.indices.transpose(1, 2))
    box, image = (10, 40, 50, 70), (60, 120)  # an off-centre, non-square crop of a wide image
    expected = crop_soft_labels(relabel, box, image, 4, 8, flipped=True)
    read = crop_soft_labels(transposed, box, image, 4, 8, flipped=True, layout="wh")
    torch.testing.assert_close(read.dense, expected.dense)
    torch.testing.assert_close(read.class_target, expected.class_target)
    misread = crop_soft_labels(transposed, box, image, 4, 8, flipped=True)  # the mirrored region
    assert not torch.allclose(misread.dense, expected.dense)


CELL, CELLS = 16, 7  # a 112-pixel image of 7 x 7 cells, one token each


def coded_grid_image() -> tuple[PIL.Image.Image, dict]:
    """An image whose cell (r, c) has its own colour, and a relabel map saying that cell holds class 7 r + c."""
    palette = {k: (37 * k % 256, 91 * k % 256, (5 + 11 * k) % 256) for k in range(CELLS * CELLS)}
    pixels = np.zeros((CELL * CELLS, CELL * CELLS, 3), dtype=np.uint8)
    for k, colour in palette.items():
        row, column = divmod(k, CELLS)
        pixels[row * CELL : (row + 1) * CELL, column * CELL : (column + 1) * CELL] = colour
    scores = torch.zeros(1, CELLS, CELLS)
    scores[0] = 20.0
    indices = torch.arange(CELLS * CELLS).reshape(1, CELLS, CELLS)
    return PIL.Image.fromarray(pixels), {"relabel": RelabelMap(scores=scores, indices=indices), "palette": palette}


def decode_cells(pixel_values: torch.Tensor, palette: dict, fill: tuple) -> list:
    """The class each token's centre shows (None for the fill colour), read back from the augmented image."""
    image = ((pixel_values * 0.5 + 0.5) * 255).round().permute(1, 2, 0)
    colours = torch.tensor([*palette.values(), fill], dtype=torch.float32)
    found = []
    for row in range(CELLS):
        for column in range(CELLS):
            pixel = image[row * CELL + CELL // 2, column * CELL + CELL // 2]
            nearest = int((colours - pixel).abs().sum(1).argmin())
            found.append(None if nearest == len(palette) else nearest)
    return found


@pytest.mark.parametrize("operation", ["Rotate", "ShearX", "ShearY", "TranslateXRel", "TranslateYRel"])
@pytest.mark.parametrize("flip", [False, True])
def test_dense_labels_stay_on_their_content_under_every_geometric_augmentation(operation, flip):
    image, coded = coded_grid_image()
    transform = TrainTransform(CELL * CELLS, mean=(0.5,) * 3, std=(0.5,) * 3, scale=(1.0, 1.0), ratio=(1.0, 1.0),
                               hflip=1.0 if flip else 0.0, auto_augment="rand-m9-n1-mstd0")  # fmt: skip
    (randaugment,) = transform.colour.transforms
    randaugment.ops = [op for op in randaugment.ops if op.name == operation]
    (op,) = randaugment.ops
    op.prob, op.kwargs["resample"] = 1.0, PIL.Image.NEAREST  # nearest: each pixel shows one cell's colour
    fill = tuple(op.kwargs["fillcolor"])
    matched = moved = 0
    for seed in range(4):  # both signs of the operation's magnitude
        with seeded_rng(seed):
            pixel_values, crop = transform(image)
        assert len(crop.geometry) == 1 and crop.flipped == flip
        labels = crop_soft_labels(coded["relabel"], (0, 0, 112, 112), (112, 112), CELLS, CELLS * CELLS,
                                  flipped=crop.flipped, geometry=crop.geometry,
                                  output_size_pixels=crop.output_size).dense  # fmt: skip
        shown = decode_cells(pixel_values, coded["palette"], fill)
        still = crop_soft_labels(coded["relabel"], (0, 0, 112, 112), (112, 112), CELLS, CELLS * CELLS,
                                 flipped=crop.flipped).dense.flatten(1).argmax(0).tolist()  # fmt: skip
        for token, cell in enumerate(shown):
            label = labels[:, token // CELLS, token % CELLS]
            if cell is None:  # the fill colour came in: the label is (mostly) uniform
                assert label.max() < 0.6, (operation, token)
                continue
            matched += int(label.argmax()) == cell
            moved += still[token] != cell
    shown_cells = sum(cell is not None for cell in shown)
    assert moved > 0  # the operation did move the content: labels that stayed put would be wrong
    assert matched >= 0.9 * 4 * shown_cells - 2, (operation, matched, shown_cells)  # boundary tokens may differ


def oracle_store(directory) -> None:
    """A store whose maps name each training image's own class everywhere: a teacher that is always right."""
    from refiner_hf.token_labeling import PackedRelabelWriter, finalize_packed_store

    data = load_image_data(DataArguments(max_train_samples=NUM_SAMPLES), seed=42)
    writer = PackedRelabelWriter(directory, shard_size=64)
    for key, label in zip(iter_relabel_keys(data.train, "image"), data.train["label"]):
        indices = torch.tensor([label] + [c for c in range(10) if c != label][:4])[:, None, None].expand(5, GRID, GRID)
        scores = torch.tensor([8.0, 0, 0, 0, 0])[:, None, None].expand(5, GRID, GRID)
        writer.add(key, scores, indices)
    writer.flush()
    finalize_packed_store(directory, num_classes=10)


def test_layout_evidence_tells_a_transposed_store_from_one_map():
    from refiner_hf.token_labeling.dense_labels import layout_evidence

    # An object in the top right of a wide image (x 300..450 of 480, y 20..120 of 320), its class 4 on an 8 x 12 map.
    scores, indices = torch.zeros(1, 8, 12), torch.zeros(1, 8, 12, dtype=torch.long)
    scores[0, 0:3, 7:11], indices[0, 0:3, 7:11] = 5.0, 4
    scores[0, 5:8, 0:4], indices[0, 5:8, 0:4] = 1.0, 2  # another class elsewhere
    relabel = RelabelMap(scores=scores, indices=indices)
    box, image = (300, 20, 450, 120), (320, 480)
    shares = layout_evidence(relabel, 4, box, image)
    assert shares["hw"] > 0.9 and shares["wh"] < 0.1
    transposed = RelabelMap(scores=scores.transpose(1, 2), indices=indices.transpose(1, 2))
    flipped = layout_evidence(transposed, 4, box, image)
    assert flipped["wh"] > 0.9 and flipped["hw"] < 0.1
