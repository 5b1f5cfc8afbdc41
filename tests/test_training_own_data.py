"""
Training on your own data: a preset recipe on a 3-class image folder trains a 3-class head, fine-tuning keeps the
model's image processor and replaces a head whose classes differ (and says so) under the fine-tuning recipe, and a
training set smaller than one optimizer step is refused before training; an unknown configuration field is an
error whatever the model's source.
"""

import json
import re

import pytest
import torch
from helpers import randomize_
from safetensors.torch import load_file
from training_utils import TINY_MODEL, run_in_process, tiny_run_args, write_image_folder
from transformers import AutoModelForImageClassification

from refiner_hf import RefinerViTConfig, RefinerViTForImageClassification
from refiner_hf.image_processing_refiner_vit import image_processor_for_config
from refiner_hf.training.data import DataError
from refiner_hf.training.embedded_data import class_names as fashion_mnist_classes
from refiner_hf.training.errors import UsageError
from refiner_hf.training.loaders import check_one_step_fits
from refiner_hf.training.model_setup import fit_classifier_heads


FOLDER_CLASSES = ["Pullover", "T-shirt-top", "Trouser"]  # imagefolder's order: sorted folder names


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    """A 3-class image folder: 8 training and 3 validation images per class, and a `datasets` cache."""
    root = tmp_path_factory.mktemp("folders")
    write_image_folder(root / "train", per_class=8)
    write_image_folder(root / "val", per_class=3, offset=8)
    return root


def folder_args(folders, output_dir, **overrides) -> list[str]:
    values = dict(
        train_dir=folders / "train", validation_dir=folders / "val", cache_dir=folders / "cache",
        max_train_samples=None, max_eval_samples=None, per_device_train_batch_size=4, epochs=1, max_train_steps=2,
    )  # fmt: skip
    return tiny_run_args(output_dir, **{**values, **overrides})


def head_shapes(model_dir) -> dict[str, tuple[int, ...]]:
    weights = load_file(model_dir / "model.safetensors")
    return {
        name: tuple(weights[f"{name}.weight"].shape)
        for name in ("classifier", "aux_classifier")
        if f"{name}.weight" in weights
    }


# 1. Presets


def test_a_preset_sized_by_id2label_has_that_many_labels():
    id2label = {0: "cat", 1: "dog", 2: "bird"}
    config = RefinerViTConfig.from_preset(
        "refiner-vit-s", id2label=id2label, label2id={v: k for k, v in id2label.items()}
    )
    assert config.num_labels == 3 and config.id2label == id2label
    assert RefinerViTConfig.from_preset("refiner-vit-s").num_labels == 1000  # the ImageNet head otherwise
    assert RefinerViTConfig.from_preset("refiner-vit-s", num_labels=10).num_labels == 10


def test_a_preset_recipe_on_an_image_folder_trains_its_classes(folders, tmp_path, capsys):
    # The README's `--recipe refiner_vit_s.yaml --train_dir ... --validation_dir ...`, the preset cut to a tiny size.
    results = run_in_process(folder_args(folders, tmp_path, recipe="refiner_vit_s.yaml", image_size=28))
    assert "24 training / 9 validation images, 3 classes" in capsys.readouterr().out
    config = json.loads((tmp_path / "model" / "config.json").read_text())
    assert config["id2label"] == {"0": "Pullover", "1": "T-shirt-top", "2": "Trouser"}
    assert head_shapes(tmp_path / "model") == {"classifier": (3, 32)}  # the plain recipe: no aux head
    model = AutoModelForImageClassification.from_pretrained(tmp_path / "model")
    assert model(torch.zeros(1, 3, 28, 28)).logits.shape == (1, 3)
    assert results["eval_samples"] == 9


# 2. Fine-tuning


@pytest.fixture(scope="module")
def fashion_model(tmp_path_factory):
    """A tiny model of the 10 Fashion-MNIST classes with an image processor of crop_pct 0.8 (not a default)."""
    directory = tmp_path_factory.mktemp("fashion-model")
    names = fashion_mnist_classes()
    config = RefinerViTConfig(
        **TINY_MODEL, id2label=dict(enumerate(names)), label2id={n: i for i, n in enumerate(names)}
    )
    torch.manual_seed(0)
    RefinerViTForImageClassification(config).save_pretrained(directory)
    image_processor_for_config(config, crop_pct=0.8).save_pretrained(directory)
    return directory


def test_finetuning_on_other_classes_keeps_the_processor_replaces_the_head_and_says_so(
    folders, fashion_model, tmp_path, capsys
):
    # A bare fine-tuning command: only the model, the data and a small batch (and no trackers).
    argv = ["--model_name_or_path", str(fashion_model), "--train_dir", str(folders / "train"), "--validation_dir",
            str(folders / "val"), "--cache_dir", str(folders / "cache"), "--per_device_train_batch_size", "8",
            "--max_train_steps", "2", "--dataloader_num_workers", "0", "--report_to", "none", "--output_dir",
            str(tmp_path / "run")]  # fmt: skip
    run_in_process(argv)
    printed = capsys.readouterr().out
    # The recipe in force is the fine-tuning one, named in the log: a per-step schedule without EMA.
    assert re.search(r"^Recipe: .*finetune_own_data.yaml \(the fine-tuning recipe: --model_name_or_path", printed, re.M)
    assert "lr 0.001 updated per step, no EMA" in printed
    assert "24 training / 9 validation images, 3 classes" in printed
    assert (
        "Classifier head: NEW, randomly initialised: the data set's classes 3 (Pullover, T-shirt-top, Trouser) differ "
        f"from {fashion_model}'s 10 (T-shirt/top, Trouser, Pullover, Dress, ...)." in printed
    )
    assert f"Image processor: {fashion_model}'s, crop_pct 0.8." in printed
    model_dir = tmp_path / "run" / "model"
    config = json.loads((model_dir / "config.json").read_text())
    assert config["id2label"] == {"0": "Pullover", "1": "T-shirt-top", "2": "Trouser"}
    assert head_shapes(model_dir) == {"classifier": (3, 32), "aux_classifier": (3, 32)}
    processor = json.loads((model_dir / "preprocessor_config.json").read_text())
    assert processor["crop_pct"] == 0.8 and processor["crop_size"] == {"height": 28, "width": 28}
    card = (model_dir / "README.md").read_text()
    assert "model_ema: false" in card and "lr_schedule_unit: step" in card

    # --crop_pct still decides when given.
    run_in_process(argv[:-1] + [str(tmp_path / "cropped"), "--crop_pct", "0.95"])
    processor = json.loads((tmp_path / "cropped" / "model" / "preprocessor_config.json").read_text())
    assert processor["crop_pct"] == 0.95


def test_finetuning_on_the_models_own_classes_keeps_its_head(fashion_model, tmp_path, capsys):
    argv = tiny_run_args(tmp_path, model_name_or_path=fashion_model, config_overrides=None, max_train_steps=1)
    run_in_process(argv)
    assert f"Classifier head: kept ({fashion_model} has the data set's 10 classes)." in capsys.readouterr().out
    config = json.loads((tmp_path / "model" / "config.json").read_text())
    assert list(config["id2label"].values()) == fashion_mnist_classes()


def tiny_classifier(names: list[str]) -> RefinerViTForImageClassification:
    config = RefinerViTConfig(
        **TINY_MODEL, id2label=dict(enumerate(names)), label2id={n: i for i, n in enumerate(names)}
    )
    return randomize_(RefinerViTForImageClassification(config)).eval()


def test_heads_are_kept_reordered_renamed_or_replaced_by_the_classes():
    images = torch.randn(2, 3, 28, 28)
    model = tiny_classifier(["a", "b", "c"])
    before = model(images).logits
    heads = {name: tensor.clone() for name, tensor in model.state_dict().items() if "classifier" in name}

    assert fit_classifier_heads(model, 3, ["a", "b", "c"], "m").startswith("Classifier head: kept")
    assert all(torch.equal(model.state_dict()[name], value) for name, value in heads.items())

    # The same classes in another order: the outputs follow the data set's order.
    message = fit_classifier_heads(model, 3, ["c", "a", "b"], "m")
    assert "reordered" in message and model.config.id2label == {0: "c", 1: "a", 2: "b"}
    torch.testing.assert_close(model(images).logits, before[:, [2, 0, 1]])

    # A head without class names takes the data set's; the weights stay.
    unnamed = tiny_classifier([f"LABEL_{i}" for i in range(3)])
    weights = unnamed.classifier.weight.clone()
    assert "had no names" in fit_classifier_heads(unnamed, 3, ["x", "y", "z"], "m")
    assert unnamed.config.id2label == {0: "x", 1: "y", 2: "z"} and torch.equal(unnamed.classifier.weight, weights)

    # A data set without class names whose labels fit: kept.
    assert "labels 0..1 fit the head" in fit_classifier_heads(unnamed, 2, None, "m")
    assert unnamed.config.num_labels == 3

    # Other classes: new heads of the data set's size, initialised as the model initialises them.
    message = fit_classifier_heads(model, 2, ["cat", "dog"], "m")
    assert message.startswith("Classifier head: NEW") and "2 (cat, dog) differ from m's 3 (c, a, b)" in message
    assert model.config.id2label == {0: "cat", 1: "dog"} and model.config.label2id == {"cat": 0, "dog": 1}
    assert model.classifier.weight.shape == model.aux_classifier.weight.shape == (2, 32)
    assert torch.equal(model.classifier.bias, torch.zeros(2)) and model.classifier.weight.std() < 0.05
    assert model(images).logits.shape == (2, 2)


# 3. A training set smaller than one optimizer step


def test_a_training_set_smaller_than_one_step_is_refused_before_training(tmp_path):
    # The embedded recipe (a global batch of 64) on 50 images, per step and per epoch.
    message = (
        "The training set has 50 images, fewer than one optimizer step takes (64 per process x 1 processes x 1 "
        "accumulation steps = 64): an epoch would train nothing. Lower --per_device_train_batch_size to 50 or less "
        "or train on more images."
    )
    base = ["--output_dir", str(tmp_path / "run"), "--max_train_samples", "50", "--report_to", "none"]
    for unit in ("step", "epoch"):
        with pytest.raises(DataError, match=re.escape(message)):
            run_in_process(base + ["--lr_schedule_unit", unit])
    assert not (tmp_path / "run" / "checkpoints").exists()

    # With a batch that fits, 3 steps per epoch, and --max_train_steps is honoured in the second epoch.
    results = run_in_process(
        base + ["--per_device_train_batch_size", "16", "--max_train_steps", "4", "--config_overrides",
                json.dumps(TINY_MODEL), "--dataloader_num_workers", "0", "--max_eval_samples", "20"]
    )  # fmt: skip
    assert results["global_step"] == 4 and [h["step"] for h in results["history"]] == [3, 4]
    assert sorted(p.name for p in (tmp_path / "run" / "checkpoints").iterdir()) == ["step_00000003", "step_00000004"]


@pytest.mark.parametrize(
    "sizes, fix",
    [
        ((51, 64, 1, 1, True), "Lower --per_device_train_batch_size to 50 or less (even: mixup/CutMix pair"),
        ((40, 8, 2, 3, False), "Lower --per_device_train_batch_size to 6 or less or train on more images."),
        ((5, 8, 2, 3, False), "Train on more images."),
        ((1, 2, 1, 1, True), "Train on more images."),
    ],
)
def test_the_refusal_names_the_sizes_and_the_largest_batch_that_fits(sizes, fix):
    with pytest.raises(DataError, match=re.escape(fix)) as error:
        check_one_step_fits(*sizes)
    num_samples, batch, processes, accumulation, _ = sizes
    assert f"has {num_samples} images" in str(error.value)
    assert f"= {batch * processes * accumulation})" in str(error.value)
    check_one_step_fits(batch * processes * accumulation, batch, processes, accumulation)  # exactly one step: fine


def test_data_that_cannot_be_loaded_is_named(tmp_path):
    (tmp_path / "empty").mkdir()
    message = r"--train_dir .*empty: no files in it; the layout must be one sub-folder per class"
    with pytest.raises(DataError, match=message) as error:
        run_in_process(tiny_run_args(tmp_path / "run", train_dir=tmp_path / "empty", cache_dir=tmp_path / "cache"))
    assert not isinstance(error.value, UsageError) and error.value.exit_status == 1  # a data-set problem
    with pytest.raises(UsageError, match=r"--dataset_name .*missing: no such directory. Give a local data set"):
        run_in_process(tiny_run_args(tmp_path / "run", dataset_name=tmp_path / "missing", cache_dir=tmp_path / "cache"))


# 4. Unknown configuration fields


@pytest.mark.parametrize("source", ["default configuration", "model", "config_name", "model_name_or_path"])
def test_an_unknown_config_field_stops_every_kind_of_run(source, fashion_model, tmp_path):
    typo, field = (
        ("drop_path_rat", "drop_path_rate") if source == "model_name_or_path" else ("hiden_size", "hidden_size")
    )
    sources = {"model": "refiner-vit-s", "config_name": fashion_model, "model_name_or_path": fashion_model}
    overrides = {typo: 0.1} if source == "model_name_or_path" else {**TINY_MODEL, typo: 10}
    argv = tiny_run_args(tmp_path, config_overrides=json.dumps(overrides))
    if source in sources:
        argv += [f"--{source}", str(sources[source])]
    with pytest.raises(UsageError, match=re.escape(f"'{typo}' is not a RefinerViTConfig field. Did you mean {field}?")):
        run_in_process(argv)
    assert not (tmp_path / "checkpoints").exists()
