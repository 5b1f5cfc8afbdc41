"""
Dense teacher predictions for relabeling: every supported family's head applied at every position, prepared as it
prepares the pooled features, so that the dense logits relate to the image logits the way the architecture implies.
"""

import numpy as np
import pytest
import torch
import transformers
from helpers import randomize_, tiny_config
from PIL import Image

from refiner_hf import RefinerViTForImageClassification
from refiner_hf.assets import sample_image_path
from refiner_hf.token_labeling.teacher import dense_teacher_logits


def teacher(family: str, image_size: int = 64) -> torch.nn.Module:
    """A small random classifier of `family` with 10 classes, in eval mode."""
    cnn = dict(hidden_sizes=[16, 32, 32, 64], depths=[1, 1, 1, 1], num_labels=10)
    vit = dict(image_size=image_size, patch_size=16, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
               intermediate_size=64, num_labels=10)  # fmt: skip
    configs = {
        "resnet": lambda: transformers.ResNetConfig(embedding_size=16, **cnn),
        "regnet": lambda: transformers.RegNetConfig(embedding_size=16, groups_width=8, **cnn),
        "mobilenet_v2": lambda: transformers.MobileNetV2Config(
            image_size=image_size, depth_multiplier=0.35, num_labels=10
        ),
        "convnext": lambda: transformers.ConvNextConfig(**cnn),
        "convnextv2": lambda: transformers.ConvNextV2Config(**cnn),
        "poolformer": lambda: transformers.PoolFormerConfig(**cnn),
        "swin": lambda: transformers.SwinConfig(
            image_size=image_size,
            patch_size=4,
            embed_dim=16,
            depths=[1, 1],
            num_heads=[1, 2],
            window_size=4,
            num_labels=10,
        ),  # fmt: skip
        "beit": lambda: transformers.BeitConfig(use_mean_pooling=True, **vit),
        "vit": lambda: transformers.ViTConfig(**vit),
    }
    torch.manual_seed(0)
    return transformers.AutoModelForImageClassification.from_config(configs[family]()).eval()


def photos(size: int) -> torch.Tensor:
    """The sample photo and two mirror images of it, normalised to [-1, 1]."""
    image = np.asarray(Image.open(sample_image_path()).convert("RGB").resize((size, size)), dtype=np.float32)
    pixels = torch.from_numpy(image / 127.5 - 1).permute(2, 0, 1)[None]
    return torch.cat([pixels, pixels.flip(-1), pixels.flip(-2)])


def image_and_dense_logits(model, pixel_values):
    with torch.no_grad():
        return model(pixel_values).logits, dense_teacher_logits(model, pixel_values)


@pytest.mark.parametrize("family", ["resnet", "regnet", "mobilenet_v2", "poolformer", "swin"])
def test_where_pooling_commutes_the_dense_logits_average_to_the_image_logits_exactly(family):
    model = teacher(family, image_size=128)
    logits, dense = image_and_dense_logits(model, photos(128))
    assert dense.shape[:2] == (3, 10) and dense.shape[-1] > 1
    torch.testing.assert_close(dense.mean((2, 3)), logits, atol=1e-5 * max(1.0, logits.abs().max().item()), rtol=0)


@pytest.mark.parametrize("family, size", [("convnext", 32), ("convnextv2", 32), ("beit", 16)])
def test_normalising_heads_are_applied_at_every_position(family, size):
    # With a single position the pooling is the identity: the dense logits are the image logits, norm included (they
    # were not while the dense path skipped the head's normalisation).
    model = teacher(family, image_size=size)
    logits, dense = image_and_dense_logits(model, photos(size))
    assert dense.shape == (3, 10, 1, 1)
    torch.testing.assert_close(dense[..., 0, 0], logits, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("family", ["convnext", "convnextv2", "beit"])
def test_where_a_normalisation_follows_the_pooling_the_dense_logits_average_closely(family):
    model = teacher(family, image_size=224)
    logits, dense = image_and_dense_logits(model, photos(224))
    average = dense.mean((2, 3))
    centred = torch.nn.functional.cosine_similarity(
        average - average.mean(1, keepdim=True), logits - logits.mean(1, keepdim=True), dim=1
    )
    assert (centred > 0.97).all(), centred
    # The norm of an average is not the average of the norms: close, not equal (random weights make it far from 0).
    assert (average - logits).abs().max() < 0.5 * logits.abs().max()


def test_vit_classifies_every_patch_token_and_refiner_uses_its_aux_head():
    model = teacher("vit")
    pixel_values = photos(64)
    with torch.no_grad():
        tokens = model.vit(pixel_values).last_hidden_state
        dense = dense_teacher_logits(model, pixel_values)
    by_hand = model.classifier(tokens[:, 1:]).transpose(1, 2).reshape(3, 10, 4, 4)
    torch.testing.assert_close(dense, by_hand)

    refiner = randomize_(RefinerViTForImageClassification(tiny_config(image_size=64, patch_size=16))).eval()
    with torch.no_grad():
        outputs = refiner(pixel_values)
        dense = dense_teacher_logits(refiner, pixel_values)
    assert dense.shape == (3, 5, 4, 4)
    torch.testing.assert_close(outputs.logits, outputs.cls_logits + 0.5 * dense.amax((2, 3)))


def test_unknown_heads_are_refused_rather_than_guessed(monkeypatch):
    dinov2 = transformers.AutoModelForImageClassification.from_config(
        transformers.Dinov2Config(
            image_size=64, patch_size=16, hidden_size=32, num_hidden_layers=1, num_attention_heads=2, num_labels=10
        )  # fmt: skip
    ).eval()
    with pytest.raises(ValueError, match="Cannot relabel with a 'dinov2' teacher: how its head reads its tokens"):
        dense_teacher_logits(dinov2, photos(64))
    # A CNN family not listed whose head does more than classify pooled features: caught by the average check.
    model = teacher("convnext")
    monkeypatch.setattr(model.config, "model_type", "some-cnn")
    with pytest.raises(ValueError, match="Cannot relabel with a 'some-cnn' teacher: its dense logits do not average"):
        dense_teacher_logits(model, photos(64))
