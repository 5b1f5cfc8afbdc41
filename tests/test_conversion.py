"""Conversion of original checkpoints: exact outputs on the original code's fixtures, inference, and bad inputs."""

import argparse
import os
import re

import pytest
import torch
import torchvision
from helpers import FIXTURES, assert_matches_original, hf_to_original, original_outputs, randomize_, tiny_config

from refiner_hf import CheckpointError, RefinerViTForImageClassification, convert_original_checkpoint
from refiner_hf.conversion import infer_config, load_checkpoint_file, load_original_weights


TOLERANCE = 1e-5
RELEASED = FIXTURES / "released_tiny.pth"
PAPER = FIXTURES / "paper_tiny.pth"


@pytest.mark.parametrize("implementation", ["fused", "eager"])
@pytest.mark.parametrize("weights, key", [("raw", "expected"), ("ema", "expected_ema")])
def test_released_format_reproduces_original_outputs(weights, key, implementation):
    # Both computations: the default ("fused": the fast path in evaluation) and the reference ("eager").
    fixture = original_outputs("released_tiny")
    model = convert_original_checkpoint(RELEASED, weights=weights)
    assert model.config._attn_implementation == "fused"
    model.set_attn_implementation(implementation)
    assert_matches_original(model, fixture["input"], fixture[key])


def test_timm_checkpoint_defaults_to_ema_weights():
    original = load_original_weights(RELEASED)
    assert original.weights == "ema" and original.has_ema
    fixture = original_outputs("released_tiny")
    assert_matches_original(convert_original_checkpoint(RELEASED), fixture["input"], fixture["expected_ema"])


@pytest.mark.parametrize("implementation", ["fused", "eager"])
def test_ddp_state_dict_reproduces_original_outputs(implementation):
    fixture = original_outputs("paper_tiny")
    model = convert_original_checkpoint(PAPER)
    model.set_attn_implementation(implementation)
    assert_matches_original(model, fixture["input"], fixture["expected"])


def test_bare_state_dict_without_prefix_and_model_key():
    fixture = original_outputs("paper_tiny")
    state_dict = torch.load(PAPER, weights_only=True)
    bare = {k.removeprefix("module."): v for k, v in state_dict.items()}
    assert_matches_original(convert_original_checkpoint(bare), fixture["input"], fixture["expected"])
    assert_matches_original(convert_original_checkpoint({"model": bare}), fixture["input"], fixture["expected"])


def test_inferred_configurations():
    released = infer_config(load_original_weights(RELEASED).state_dict)
    assert released.block_types == ["plain", "shared"] * 3
    assert (released.image_size, released.patch_size, released.hidden_size) == (64, 16, 48)
    assert (released.num_attention_heads, released.intermediate_size, released.num_labels) == (4, 144, 10)
    assert released.stem_type == "conv" and released.stem_hidden_sizes == [32, 64, 128]
    assert released.use_aux_head and released.qkv_bias and released.shared_expansion == 3

    paper = infer_config(load_original_weights(PAPER).state_dict)
    assert paper.block_types == ["refined", "shared", "plain", "refined", "shared"]
    assert (paper.image_size, paper.patch_size, paper.hidden_size) == (48, 16, 36)
    assert (paper.num_attention_heads, paper.intermediate_size, paper.num_labels) == (3, 72, 7)
    assert (paper.refine_expansion, paper.shared_expansion) == (2, 3)
    assert paper.stem_type == "patch" and not paper.use_aux_head and not paper.qkv_bias


@pytest.mark.parametrize(
    "overrides",
    [
        {},
        {"block_types": ["plain", "refined", "refined", "shared"], "refine_expansion": 1, "stem_type": "patch"},
        {"block_types": ["refined", "plain", "shared", "shared"], "shared_expansion": 2, "use_aux_head": False},
        {"qkv_bias": False, "num_channels": 1, "image_size": 48, "mlp_ratio": 1.5, "refine_kernel_size": 5},
    ],
)
def test_other_architectures_round_trip(overrides):
    model = randomize_(RefinerViTForImageClassification(tiny_config(**overrides))).eval()
    converted = convert_original_checkpoint({"state_dict": hf_to_original(model), "epoch": 3})
    for field in (
        "block_types",
        "refine_expansion",
        "shared_expansion",
        "refine_kernel_size",
        "stem_type",
        "use_aux_head",
        "qkv_bias",
        "num_channels",
        "image_size",
        "intermediate_size",
        "hidden_size",
    ):
        assert getattr(converted.config, field) == getattr(model.config, field), field
    pixel_values = torch.randn(2, model.config.num_channels, model.config.image_size, model.config.image_size)
    with torch.no_grad():
        torch.testing.assert_close(converted(pixel_values).logits, model(pixel_values).logits, atol=0, rtol=0)


def test_all_plain_checkpoint_needs_the_number_of_heads():
    model = randomize_(RefinerViTForImageClassification(tiny_config(block_types=["plain"] * 4))).eval()
    original = hf_to_original(model)
    with pytest.raises(CheckpointError, match="num_attention_heads"):
        convert_original_checkpoint(original)
    converted = convert_original_checkpoint(original, num_attention_heads=4)
    pixel_values = torch.randn(1, 3, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(converted(pixel_values).logits, model(pixel_values).logits, atol=0, rtol=0)


def test_resnet_state_dict_is_refused():
    resnet = torchvision.models.resnet18(weights=None).state_dict()
    with pytest.raises(CheckpointError, match=r"not a Refiner-ViT checkpoint.*'conv1.weight'"):
        convert_original_checkpoint(resnet)


def test_truncated_file_is_refused(tmp_path):
    truncated = tmp_path / "truncated.pth"
    truncated.write_bytes(RELEASED.read_bytes()[: RELEASED.stat().st_size // 2])
    with pytest.raises(CheckpointError, match=re.escape(str(truncated)) + ".*truncated or corrupt"):
        convert_original_checkpoint(truncated)


def test_non_checkpoint_file_is_refused(tmp_path):
    text = tmp_path / "notes.pth"
    text.write_text("not a checkpoint at all\n")
    with pytest.raises(CheckpointError, match="notes.pth"):
        convert_original_checkpoint(text)


class _RunsCode:
    """An object whose unpickling would create a file: what a hostile checkpoint does to run code."""

    def __init__(self, marker: str) -> None:
        self.marker = marker

    def __reduce__(self):
        return (os.mkdir, (self.marker,))


def test_code_executing_pickle_is_refused_and_not_run(tmp_path):
    marker = tmp_path / "pwned"
    hostile = tmp_path / "hostile.pth"
    torch.save({"state_dict": {"cls_token": torch.zeros(1, 1, 4)}, "payload": _RunsCode(str(marker))}, hostile)
    with pytest.raises(CheckpointError, match="refused to load.*nothing in it was executed"):
        convert_original_checkpoint(hostile)
    assert not marker.exists()


def test_missing_file():
    with pytest.raises(FileNotFoundError, match="nope.pth"):
        convert_original_checkpoint(FIXTURES / "nope.pth")


def test_argparse_namespace_is_the_only_extra_allowed_global():
    checkpoint = load_checkpoint_file(RELEASED)
    assert isinstance(checkpoint["args"], argparse.Namespace)


def released_state_dict() -> dict[str, torch.Tensor]:
    return dict(load_original_weights(RELEASED, weights="raw").state_dict)


def test_missing_tensor_is_named():
    state_dict = released_state_dict()
    del state_dict["blocks.3.attn.DLA.bn2.running_var"]
    with pytest.raises(
        CheckpointError, match=r"missing tensors.*layers\.3\.attention\.refiner\.depthwise_bn\.running_var"
    ):
        convert_original_checkpoint(state_dict)


def test_extra_tensor_is_named():
    state_dict = released_state_dict()
    state_dict["blocks.2.attn.extra_gate"] = torch.zeros(3)
    with pytest.raises(CheckpointError, match=r"unexpected tensors 'blocks\.2\.attn\.extra_gate'"):
        convert_original_checkpoint(state_dict)


def test_wrong_shape_is_named():
    state_dict = released_state_dict()
    state_dict["blocks.1.mlp.fc2.bias"] = torch.zeros(47)
    with pytest.raises(CheckpointError, match=r"wrong shape 'blocks\.1\.mlp\.fc2\.bias' \(47,\)"):
        convert_original_checkpoint(state_dict)


def test_missing_ema_weights_are_reported():
    with pytest.raises(CheckpointError, match="no 'state_dict_ema'"):
        convert_original_checkpoint({"state_dict": released_state_dict()}, weights="ema")
    with pytest.raises(CheckpointError, match="bare state dict"):
        convert_original_checkpoint(released_state_dict(), weights="ema")


def test_non_tensor_entries_are_refused():
    state_dict = released_state_dict()
    state_dict["blocks.0.norm1.weight"] = [1.0, 2.0]
    with pytest.raises(CheckpointError, match="not tensors: 'blocks.0.norm1.weight'"):
        convert_original_checkpoint(state_dict)


def test_safetensors_checkpoint(tmp_path):
    from safetensors.torch import save_file

    fixture = original_outputs("paper_tiny")
    bare = {k.removeprefix("module."): v for k, v in torch.load(PAPER, weights_only=True).items()}
    save_file(bare, tmp_path / "paper_tiny.safetensors")
    assert_matches_original(
        convert_original_checkpoint(tmp_path / "paper_tiny.safetensors"), fixture["input"], fixture["expected"]
    )
