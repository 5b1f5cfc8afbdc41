"""
Checked loading (refiner_hf.loading) in every tool that loads a model directory (export, fine-tuning, the examples):
weights that do not fit the configuration, non-finite weights, damaged safetensors files and invalid image processor
configurations are one-line errors before anything is written; the processors read EXIF-rotated photos upright; and a
configuration too large to have been meant is refused from its numbers, before anything is built.
"""

import json
import math
import os
import shutil
import sys
import time
from pathlib import Path

import numpy as np
import PIL.Image
import PIL.ImageOps
import pytest
import torch
from helpers import FIXTURES, load_script, randomize_, tiny_config
from safetensors.torch import load_file, save_file

from refiner_hf import RefinerViTConfig, RefinerViTForImageClassification, RefinerViTModel, modeling_refiner_vit
from refiner_hf import export as export_cli
from refiner_hf.cli import EXIT_DATA, EXIT_USAGE, UsageError
from refiner_hf.configuration_refiner_vit import estimate_memory, format_bytes, machine_memory
from refiner_hf.conversion import CheckpointError, check_declared_sizes
from refiner_hf.image_processing_pil_refiner_vit import RefinerViTImageProcessorPil
from refiner_hf.image_processing_refiner_vit import RefinerViTImageProcessor, image_processor_for_config
from refiner_hf.loading import (
    ImageProcessorConfigError,
    ModelWeightsError,
    block_types_of_weights,
    check_safetensors_file,
    load_model_checked,
)
from refiner_hf.modeling_refiner_vit import ModelTooLargeError, RefinerViTPreTrainedModel


ROOT = Path(__file__).resolve().parents[1]
EXAMPLES = ROOT / "examples"
RECIPES = EXAMPLES / "recipes"
WEIGHTS = "model.safetensors"


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory) -> Path:
    """A tiny model directory (every block type, both heads) with its image processor."""
    directory = tmp_path_factory.mktemp("tiny") / "model"
    model = randomize_(RefinerViTForImageClassification(tiny_config())).eval()
    model.save_pretrained(directory)
    image_processor_for_config(model.config).save_pretrained(directory)
    return directory


def copy_of(model_dir: Path, tmp_path: Path, name: str = "copy") -> Path:
    target = tmp_path / name
    shutil.copytree(model_dir, target)
    return target


def rewrite_weights(directory: Path, change) -> None:
    tensors = load_file(directory / WEIGHTS)
    save_file(change(tensors), directory / WEIGHTS, metadata={"format": "pt"})


def rewrite_json(path: Path, change) -> None:
    values = json.loads(path.read_text())
    change(values)
    path.write_text(json.dumps(values))


def export_error(directory: Path, tmp_path: Path, capsys) -> tuple[int, str]:
    """Runs the exporter on `directory`: its exit status and its one error line; nothing may be written."""
    output = tmp_path / "export"
    capsys.readouterr()
    status = export_cli.main(["--model", str(directory), "--output", str(output)])
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1, lines
    assert lines[0].startswith("refiner-vit-export: error: ")
    assert not output.exists() and not any(p.name.startswith(".export") for p in tmp_path.iterdir())
    return status, lines[0].split(": error: ", 1)[1]


# 1. Weights that do not fit the configuration


def test_missing_unexpected_and_mismatched_tensors_are_refused_by_the_exporter(model_dir, tmp_path, capsys):
    half = copy_of(model_dir, tmp_path, "half")
    rewrite_weights(half, lambda tensors: {key: tensors[key] for key in sorted(tensors)[::2]})
    status, line = export_error(half, tmp_path, capsys)
    assert status == EXIT_DATA
    assert line.startswith(f"--model {half}: the weights do not fit the model its config.json describes: 74 (")
    assert "missing" in line and "re-save the model with save_pretrained" in line

    extra = copy_of(model_dir, tmp_path, "extra")
    rewrite_weights(extra, lambda tensors: {**tensors, "refiner_vit.stray.weight": torch.zeros(3)})
    status, line = export_error(extra, tmp_path, capsys)
    assert status == EXIT_DATA and "1 ('refiner_vit.stray.weight') not in the model (unexpected)" in line

    wrong = copy_of(model_dir, tmp_path, "wrong")
    rewrite_weights(wrong, lambda tensors: {**tensors, "classifier.weight": torch.zeros(7, 24)})
    status, line = export_error(wrong, tmp_path, capsys)
    assert status == EXIT_DATA and "1 ('classifier.weight') of another shape" in line


def test_a_config_without_block_types_is_refused_with_the_pattern_of_the_weights(model_dir, tmp_path, capsys):
    directory = copy_of(model_dir, tmp_path)
    rewrite_json(directory / "config.json", lambda config: config.pop("block_types"))
    status, line = export_error(directory, tmp_path, capsys)
    assert status == EXIT_DATA
    assert "23 (" in line and "not in the model (unexpected)" in line
    assert "config.json has no block_types" in line and "the config does not describe the weights" in line
    assert "block_types ['refined', 'shared', 'plain', 'shared']" in line


def test_the_block_pattern_is_read_from_the_tensor_names(model_dir):
    assert block_types_of_weights(load_file(model_dir / WEIGHTS)) == ["refined", "shared", "plain", "shared"]
    assert block_types_of_weights(["classifier.weight"]) is None


# 2. Non-finite weights


def test_non_finite_weights_are_refused_with_the_tensors_named(model_dir, tmp_path, capsys):
    directory = copy_of(model_dir, tmp_path)

    def poison(tensors):
        tensors["refiner_vit.layers.1.mlp.fc1.weight"][0, :3] = math.nan
        tensors["classifier.bias"][2] = math.inf
        return tensors

    rewrite_weights(directory, poison)
    status, line = export_error(directory, tmp_path, capsys)
    assert status == EXIT_DATA
    assert line.startswith(
        f"--model {directory}: non-finite values (NaN or infinity) in 2 tensors: 'classifier.bias' (1 of 5), "
        "'refiner_vit.layers.1.mlp.fc1.weight' (3 of 1,152)."
    )


# 3. Damaged safetensors files


def test_damaged_weights_files_are_one_line_naming_the_file(model_dir, tmp_path, capsys):
    data = (model_dir / WEIGHTS).read_bytes()
    header_size = int.from_bytes(data[:8], "little")

    truncated = copy_of(model_dir, tmp_path, "truncated")
    (truncated / WEIGHTS).write_bytes(data[: len(data) // 2])
    status, line = export_error(truncated, tmp_path, capsys)
    assert status == EXIT_DATA and line.startswith(f"{truncated / WEIGHTS}: tensor '")
    assert "(the file is truncated or damaged)" in line

    linked = copy_of(model_dir, tmp_path, "linked")
    (linked / WEIGHTS).unlink()
    (linked / WEIGHTS).symlink_to(linked / "config.json")
    status, line = export_error(linked, tmp_path, capsys)
    assert status == EXIT_DATA
    assert line.startswith(f"{linked / WEIGHTS} (a link to {os.path.realpath(linked / 'config.json')}): ")
    assert "the file is truncated, or not a safetensors file" in line

    huge = copy_of(model_dir, tmp_path, "huge")
    header = json.loads(data[8 : 8 + header_size])
    header["classifier.bias"]["shape"] = [2**40]  # declares a 4 TiB tensor at the same offsets
    raw = json.dumps(header).encode()
    (huge / WEIGHTS).write_bytes(len(raw).to_bytes(8, "little") + raw + data[8 + header_size :])
    status, line = export_error(huge, tmp_path, capsys)
    assert status == EXIT_DATA
    assert line.startswith(
        f"{huge / WEIGHTS}: tensor 'classifier.bias' (F32 [1099511627776]) needs 4,398,046,511,104 bytes but is "
        "given 20 (the file is damaged); re-save the model"
    )

    legacy = copy_of(model_dir, tmp_path, "legacy")  # PyTorch's format, truncated
    (legacy / WEIGHTS).unlink()
    (legacy / "pytorch_model.bin").write_bytes((FIXTURES / "released_tiny.pth").read_bytes()[:3000])
    status, line = export_error(legacy, tmp_path, capsys)
    assert status == EXIT_DATA and line.startswith(f"--model {legacy}: its weights cannot be loaded (")
    assert line.endswith(
        "the file is damaged: re-save the model with save_pretrained, or re-convert its original checkpoint."
    )

    dtype = tmp_path / "dtype.safetensors"
    header = {"x": {"dtype": "F33", "shape": [1], "data_offsets": [0, 4]}}
    raw = json.dumps(header).encode()
    dtype.write_bytes(len(raw).to_bytes(8, "little") + raw + b"\0" * 4)
    with pytest.raises(ModelWeightsError, match=r"dtype.safetensors: tensor 'x' has the unknown dtype 'F33'"):
        check_safetensors_file(dtype)
    # The converter's check of its inputs is the same one, with its own error class.
    with pytest.raises(CheckpointError, match=r"unknown dtype 'F33'; give the whole checkpoint file"):
        check_declared_sizes(dtype)
    assert check_safetensors_file(model_dir / WEIGHTS).keys() == load_file(model_dir / WEIGHTS).keys()


# 4. Image processor configurations


@pytest.mark.parametrize(
    "field, value, message",
    [
        ("image_std", [0.0, 0.5, 0.5], "`image_std` must hold positive finite numbers"),
        ("image_mean", [math.nan, 0.5, 0.5], "`image_mean` must hold finite numbers"),
        ("crop_pct", -0.5, "`crop_pct` must be a positive number or None, got -0.5"),
    ],
)
def test_an_invalid_image_processor_is_an_error_not_replaced(model_dir, tmp_path, capsys, field, value, message):
    directory = copy_of(model_dir, tmp_path)
    rewrite_json(directory / "preprocessor_config.json", lambda config: config.update({field: value}))
    status, line = export_error(directory, tmp_path, capsys)
    assert status == EXIT_DATA
    assert line.startswith(f"{directory / 'preprocessor_config.json'}: {message}")
    assert line.endswith("Fix the file, or delete it to use the evaluation processor for the model's configuration.")


def test_an_image_processor_that_is_not_json_is_an_error(model_dir, tmp_path, capsys):
    directory = copy_of(model_dir, tmp_path)
    (directory / "preprocessor_config.json").write_text("{not json")
    status, line = export_error(directory, tmp_path, capsys)
    assert status == EXIT_DATA and line.startswith(f"{directory / 'preprocessor_config.json'}: not valid JSON. Fix")


def test_only_an_absent_image_processor_falls_back_to_the_default_and_says_so(model_dir, tmp_path):
    _, processor, note = export_cli.load_model(str(model_dir), None)
    assert note == "its image processor"
    directory = copy_of(model_dir, tmp_path)
    (directory / "preprocessor_config.json").unlink()
    _, processor, note = export_cli.load_model(str(directory), None)
    assert note == "no image processor there (preprocessor_config.json): the evaluation one for its configuration " \
        "(crop_pct 0.9)"  # fmt: skip
    assert processor.crop_size == {"height": 32, "width": 32}


# The other tools: fine-tuning, visualize_attention, classify_image


def finetune_args(directory: Path, *extra: str):
    from refiner_hf.training.arguments import parse_args

    argv = ["--model_name_or_path", str(directory), "--dataset_name", "x", *extra]
    return parse_args(argv, recipe_dirs=[RECIPES]).model


def test_fine_tuning_refuses_a_damaged_model_and_keeps_replaced_heads_allowed(model_dir, tmp_path):
    from refiner_hf.training.model_setup import build_model

    half = copy_of(model_dir, tmp_path, "half")
    rewrite_weights(half, lambda tensors: {key: tensors[key] for key in sorted(tensors)[::2]})
    with pytest.raises(ModelWeightsError, match=rf"--model_name_or_path {half}: the weights do not fit .* 72 \("):
        build_model(finetune_args(half), 3, ["a", "b", "c"])

    bad_processor = copy_of(model_dir, tmp_path, "processor")
    rewrite_json(bad_processor / "preprocessor_config.json", lambda config: config.update(image_std=[0, 1, 1]))
    with pytest.raises(ImageProcessorConfigError, match="preprocessor_config.json: `image_std` must hold"):
        build_model(finetune_args(bad_processor), 3, ["a", "b", "c"])

    # Other classes: new heads, as before.
    built = build_model(finetune_args(model_dir), 3, ["a", "b", "c"])
    assert built.model.config.num_labels == 3 and any("Classifier head: NEW" in note for note in built.notes)
    # A directory saved without heads (the encoder alone): its encoder is loaded, the heads are new and said so.
    encoder = tmp_path / "encoder"
    RefinerViTForImageClassification.from_pretrained(model_dir).refiner_vit.save_pretrained(encoder)
    built = build_model(finetune_args(encoder), 3, ["a", "b", "c"])
    assert f"{encoder} has no classifier weights" in built.notes[0]
    reference = load_file(model_dir / WEIGHTS)["refiner_vit.layernorm.weight"]
    assert torch.equal(built.model.refiner_vit.layernorm.weight, reference)


def test_visualize_attention_and_classify_image_refuse_damaged_models(model_dir, tmp_path, capsys, monkeypatch):
    from refiner_hf.cli import command_status

    directory = copy_of(model_dir, tmp_path)
    rewrite_json(directory / "config.json", lambda config: config.pop("block_types"))
    visualizer = load_script(EXAMPLES / "visualize_attention.py")
    out = tmp_path / "maps.png"
    capsys.readouterr()
    status = command_status(lambda: visualizer.main(["--model", str(directory), "--out", str(out)]), "visualize")
    lines = capsys.readouterr().err.strip().splitlines()
    assert status == EXIT_DATA and len(lines) == 1 and "config.json has no block_types" in lines[0]
    assert not out.exists()

    classify = load_script(EXAMPLES / "classify_image.py").main
    monkeypatch.setattr(sys, "argv", ["classify_image.py", "--model", str(directory)])
    status = command_status(classify, "classify")
    captured = capsys.readouterr()
    lines = captured.err.strip().splitlines()
    assert status == EXIT_DATA and len(lines) == 1 and "config.json has no block_types" in lines[0]
    assert "Top" not in captured.out


# 5. EXIF orientation


def test_both_processors_read_an_exif_rotated_photo_upright(tmp_path):
    pixels = np.zeros((24, 40, 3), dtype=np.uint8)
    pixels[:, :10] = (250, 20, 20)  # a red band on the left of the stored (sideways) pixels
    pixels[:12, 10:] = (20, 20, 250)
    exif = PIL.Image.Exif()
    exif[PIL.Image.ExifTags.Base.Orientation] = 6  # "rotate 90 degrees clockwise to view"
    path = tmp_path / "rotated.jpg"
    PIL.Image.fromarray(pixels).save(path, exif=exif, quality=95)
    with PIL.Image.open(path) as stored:
        stored.load()
        upright = PIL.ImageOps.exif_transpose(stored)
        assert upright.size == (24, 40)  # the photo is portrait
        for backend in (RefinerViTImageProcessor, RefinerViTImageProcessorPil):
            processor = backend(size={"shortest_edge": 16}, crop_size={"height": 16, "width": 16}, crop_pct=1.0)
            opened = processor(stored, return_tensors="pt")["pixel_values"]
            expected = processor(upright, return_tensors="pt")["pixel_values"]
            as_stored = PIL.Image.fromarray(np.asarray(stored))  # the same pixels without the tag
            sideways = processor(as_stored, return_tensors="pt")["pixel_values"]
            assert torch.equal(opened, expected), backend.__name__
            assert not torch.allclose(sideways, expected), backend.__name__


# 6. Size


def test_a_100000_layer_typo_at_a_small_width_is_refused_in_well_under_a_second():
    config = RefinerViTConfig(
        image_size=32, patch_size=8, hidden_size=24, num_attention_heads=4, num_hidden_layers=100_000, mlp_ratio=2.0
    )
    start = time.perf_counter()
    with pytest.raises(ModelTooLargeError) as error:
        RefinerViTForImageClassification(config)
    assert time.perf_counter() - start < 0.5
    assert str(error.value).startswith(
        "This configuration has 100,000 blocks (`num_hidden_layers`), more than the 1,000 built without being asked"
    )
    assert error.value.count < RefinerViTPreTrainedModel.max_parameters  # under the parameter bound


def test_a_model_needing_more_memory_than_the_machine_has_is_refused(monkeypatch):
    config = tiny_config()
    inference, training = estimate_memory(config), estimate_memory(config, training=True)
    assert inference.parameters == RefinerViTForImageClassification(config).num_parameters()
    assert training.parameter_bytes == 3 * inference.parameter_bytes and training.total_bytes > inference.total_bytes
    assert machine_memory() > 2**28
    monkeypatch.setattr(modeling_refiner_vit, "machine_memory", lambda: inference.total_bytes - 1)
    with pytest.raises(ModelTooLargeError) as error:
        RefinerViTModel(config)
    assert str(error.value).startswith(
        f"This configuration describes a model that needs at least {format_bytes(inference.total_bytes)} "
        f"({format_bytes(inference.parameter_bytes)} of weights for {inference.parameters:,} parameters, "
        f"{format_bytes(inference.activation_bytes)} of activations for one image) to run one 32-px image, more than "
        f"the {format_bytes(inference.total_bytes - 1)} of memory this machine has: check `num_hidden_layers`"
    )
    monkeypatch.setattr(RefinerViTPreTrainedModel, "max_parameters", None)  # the opt-out lifts every bound
    assert RefinerViTModel(config).num_parameters() > 0


def test_training_checks_the_memory_of_training_and_allow_large_model_lifts_it(tmp_path, monkeypatch):
    from refiner_hf.training.arguments import parse_args
    from refiner_hf.training.model_setup import build_model

    overrides = json.dumps({**{k: v for k, v in tiny_config().to_diff_dict().items() if k in TINY_KEYS}})
    argv = ["--dataset_name", "x", "--config_overrides", overrides, "--image_size", "32"]
    estimate = estimate_memory(RefinerViTConfig(**json.loads(overrides), image_size=32, num_labels=3), training=True)
    monkeypatch.setattr(modeling_refiner_vit, "machine_memory", lambda: estimate.total_bytes - 1)
    with pytest.raises(UsageError) as error:
        build_model(parse_args(argv, recipe_dirs=[RECIPES]).model, 3, ["a", "b", "c"])
    assert error.value.exit_status == EXIT_USAGE
    assert "to train on one 32-px image" in str(error.value) and str(error.value).endswith("pass --allow_large_model.")
    built = build_model(parse_args(argv + ["--allow_large_model"], recipe_dirs=[RECIPES]).model, 3, ["a", "b", "c"])
    assert built.model.num_parameters() == estimate.parameters


TINY_KEYS = ("patch_size", "hidden_size", "num_hidden_layers", "num_attention_heads", "mlp_ratio", "block_types",
             "refine_expansion", "stem_hidden_sizes")  # fmt: skip


def test_the_loader_names_a_model_that_is_not_a_refiner_vit(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "vit"}))
    with pytest.raises(UsageError, match=r"--model .*: a 'vit' model, not a Refiner-ViT"):
        load_model_checked(str(tmp_path))


def test_the_exporter_refuses_a_directory_whose_config_is_a_typo(model_dir, tmp_path, capsys):
    directory = copy_of(model_dir, tmp_path)
    rewrite_json(
        directory / "config.json",
        lambda config: config.update(num_hidden_layers=100_000, block_types=["plain", "shared"] * 50_000),
    )
    start = time.perf_counter()
    status, line = export_error(directory, tmp_path, capsys)
    assert time.perf_counter() - start < 5
    assert status == EXIT_DATA and line.startswith("This configuration has 100,000 blocks (`num_hidden_layers`)")


def test_the_trainer_refuses_to_fine_tune_a_model_whose_config_does_not_describe_its_weights(model_dir, tmp_path):
    from training_utils import run_in_process, tiny_run_args

    directory = copy_of(model_dir, tmp_path)
    rewrite_json(directory / "config.json", lambda config: config.pop("block_types"))
    argv = tiny_run_args(
        tmp_path / "run",
        config_overrides=None,
        model_name_or_path=directory,
        image_size=32,
        max_train_samples=16,
        per_device_train_batch_size=4,
        max_eval_samples=8,
    )
    with pytest.raises(ModelWeightsError, match=r"--model_name_or_path .*config.json has no block_types"):
        run_in_process(argv)
    assert not (tmp_path / "run" / "model").exists()
    assert not (tmp_path / "run").exists() or not any((tmp_path / "run").glob("checkpoint*"))


@pytest.mark.parametrize("flag, lean", [([], True), (["--memory_lean_training", "false"], False),
                                         (["--no_memory_lean_training"], False)])  # fmt: skip
def test_the_trainer_trains_memory_lean_unless_told_not_to(flag, lean):
    from refiner_hf.training.arguments import parse_args
    from refiner_hf.training.model_setup import build_model

    overrides = json.dumps({**{k: v for k, v in tiny_config().to_diff_dict().items() if k in TINY_KEYS}})
    argv = ["--dataset_name", "x", "--config_overrides", overrides, "--image_size", "32", *flag]
    model = build_model(parse_args(argv, recipe_dirs=[RECIPES]).model, 3, ["a", "b", "c"]).model
    attention = [layer.attention for layer in model.refiner_vit.layers]
    assert {a.memory_lean_training for a in attention} == {lean}
    # Evaluation runs the fast path either way (the model's default).
    assert all(layer.fast_inference for layer in model.refiner_vit.layers)
