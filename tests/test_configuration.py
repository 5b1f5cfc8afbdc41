"""RefinerViTConfig: presets, defaults, validation and serialisation."""

import json
import time

import pytest
import torch
from helpers import tiny_config
from safetensors.torch import save_file
from transformers import AutoModelForImageClassification

import refiner_hf  # noqa: F401  (registers the Auto classes)
from refiner_hf import RefinerViTConfig, RefinerViTForImageClassification, RefinerViTModel, RefinerViTPreTrainedModel
from refiner_hf.modeling_refiner_vit import count_parameters


@pytest.mark.parametrize(
    "name, parameters",
    [("refiner-vit-s", 25_408_656), ("refiner-vit-m", 55_450_932), ("refiner-vit-l", 81_150_192)],
)
def test_preset_parameter_counts(name, parameters):
    config = RefinerViTConfig.from_preset(name)
    with torch.device("meta"):
        model = RefinerViTForImageClassification(config)
    assert sum(p.numel() for p in model.parameters()) == parameters


def test_presets_describe_the_released_models():
    small = RefinerViTConfig.from_preset("refiner-vit-s")
    assert small.block_types == ["plain", "shared"] * 8
    assert (small.hidden_size, small.num_attention_heads, small.intermediate_size) == (384, 12, 1152)
    assert (small.layer_norm_eps, small.stem_type, small.num_labels, small.shared_expansion) == (1e-6, "conv", 1000, 3)
    large = RefinerViTConfig.from_preset("refiner-vit-l-448", num_labels=10)
    assert (large.image_size, large.hidden_size, large.num_hidden_layers, large.num_labels) == (448, 512, 32, 10)
    assert "refiner-vit-m-384" in RefinerViTConfig.preset_names()
    with pytest.raises(ValueError, match="Unknown Refiner-ViT preset 'refiner-vit-xl'"):
        RefinerViTConfig.from_preset("refiner-vit-xl")


def test_defaults_are_the_small_model():
    assert (
        RefinerViTConfig().to_diff_dict() == RefinerViTConfig.from_preset("refiner-vit-s", num_labels=2).to_diff_dict()
    )


@pytest.mark.parametrize(
    "overrides, message",
    [
        ({"hidden_size": 26}, r"`hidden_size` \(26\) must be divisible by `num_attention_heads` \(4\)"),
        ({"block_types": ["plain", "shared"]}, r"`block_types` has 2 entries but `num_hidden_layers` is 4"),
        ({"block_types": ["shared", "plain", "plain", "plain"]}, "first block cannot be `shared`"),
        ({"block_types": ["plain", "dense", "plain", "plain"]}, r"Unknown block type\(s\) \['dense'\]"),
        ({"stem_type": "hybrid"}, "`stem_type` must be one of"),
        ({"patch_size": 7, "image_size": 35}, "even `patch_size`"),
        ({"image_size": 36}, r"`image_size` \(36\) must be a multiple of `patch_size` \(8\)"),
        ({"refine_expansion": 0}, "`refine_expansion` must be at least 1"),
        ({"drop_path_rate": 1.5}, r"`drop_path_rate` must be in \[0, 1\)"),
        ({"num_attention_heads": 0}, "`num_attention_heads` must be a positive integer"),
        ({"stem_hidden_sizes": [4, 8]}, "`stem_hidden_sizes` must list three"),
    ],
)
def test_inconsistent_configs_are_refused(overrides, message):
    with pytest.raises(ValueError, match=message):
        tiny_config(**overrides)


def test_a_config_edited_after_creation_is_checked_when_the_model_is_built():
    config = tiny_config()
    config.num_hidden_layers = 6
    with pytest.raises(ValueError, match="`block_types` has 4 entries"):
        RefinerViTForImageClassification(config)


def test_json_round_trip(tmp_path):
    config = tiny_config(drop_path_rate=0.1, id2label={0: "a", 1: "b", 2: "c", 3: "d", 4: "e"})
    config.save_pretrained(tmp_path)
    loaded = RefinerViTConfig.from_pretrained(tmp_path)
    assert loaded.to_dict() == config.to_dict()
    assert loaded.block_types == ["refined", "shared", "plain", "shared"]
    assert loaded.id2label[4] == "e"


@pytest.mark.parametrize(
    "field, value, message",
    [
        ("layer_norm_eps", float("nan"), r"`layer_norm_eps` must be finite and positive, got nan"),
        ("layer_norm_eps", 0.0, r"`layer_norm_eps` must be finite and positive, got 0.0"),
        ("aux_logits_weight", float("inf"), r"`aux_logits_weight` must be finite, got inf"),
        ("residual_scale", float("nan"), r"`residual_scale` must be finite and positive, got nan"),
        ("aux_loss_weight", -0.5, r"`aux_loss_weight` must be finite and >= 0"),
        ("mix_token_beta", 0.0, r"`mix_token_beta` must be finite and positive"),
    ],
)
def test_non_finite_and_out_of_range_fields_are_refused_when_loaded(tmp_path, field, value, message):
    tiny_config().save_pretrained(tmp_path)
    path = tmp_path / "config.json"
    path.write_text(json.dumps({**json.loads(path.read_text()), field: value}))  # NaN and Infinity, as Python writes
    with pytest.raises(ValueError, match=message):
        RefinerViTConfig.from_pretrained(tmp_path)


@pytest.mark.parametrize(
    "overrides",
    [
        {},
        {"stem_type": "patch", "qkv_bias": False, "use_aux_head": False},
        {"refine_expansion": 1, "shared_expansion": 1, "refine_kernel_size": 4, "num_labels": 0},
        {"block_types": ["plain", "refined", "refined", "shared"], "image_size": 48, "mlp_ratio": 3.5},
    ],
)
def test_parameters_are_counted_from_the_configuration_alone(overrides):
    config = tiny_config(**overrides)
    with torch.device("meta"):
        model, base = RefinerViTForImageClassification(config), RefinerViTModel(config)
    assert count_parameters(config) == sum(p.numel() for p in model.parameters())
    assert count_parameters(config, heads=False) == sum(p.numel() for p in base.parameters())


def test_a_model_too_large_to_be_meant_is_refused_before_anything_is_built(tmp_path, monkeypatch):
    huge = RefinerViTConfig(num_hidden_layers=100_000)
    start = time.perf_counter()
    with pytest.raises(
        ValueError, match=r"describes a model of 133,243,521,764 parameters .* more than the 2,000,000,000"
    ):
        RefinerViTForImageClassification(huge)
    assert time.perf_counter() - start < 10  # refused from the numbers, not after building blocks
    huge.save_pretrained(tmp_path)  # a model directory whose config.json asks for it, with a tiny weights file
    save_file({"classifier.bias": torch.zeros(1000)}, tmp_path / "model.safetensors", metadata={"format": "pt"})
    with pytest.raises(ValueError, match="RefinerViTPreTrainedModel.max_parameters"):
        AutoModelForImageClassification.from_pretrained(tmp_path)
    config = tiny_config()
    monkeypatch.setattr(RefinerViTPreTrainedModel, "max_parameters", count_parameters(config) - 1)
    with pytest.raises(ValueError, match="more than the"):
        RefinerViTForImageClassification(config)
    monkeypatch.setattr(RefinerViTPreTrainedModel, "max_parameters", None)
    assert RefinerViTForImageClassification(config).num_parameters() == count_parameters(config)
