"""Shared helpers of the test suite: fixture paths and small configurations that keep the tests fast on CPU."""

from pathlib import Path

import pytest
import torch

from refiner_hf import RefinerViTConfig


FIXTURES = Path(__file__).parent / "fixtures"


def tiny_config(**overrides) -> RefinerViTConfig:
    """A 4-block model that has every block type and both heads, on 32x32 images with 8-pixel patches."""
    fields = {
        "image_size": 32,
        "patch_size": 8,
        "hidden_size": 24,
        "num_hidden_layers": 4,
        "num_attention_heads": 4,
        "mlp_ratio": 2.0,
        "block_types": ["refined", "shared", "plain", "shared"],
        "refine_expansion": 2,
        "stem_hidden_sizes": [4, 8, 8],
        "num_labels": 5,
    }
    fields.update(overrides)
    return RefinerViTConfig(**fields)


def randomize_(model: torch.nn.Module, seed: int = 0) -> torch.nn.Module:
    """Gives every parameter and buffer a random value, so that each one changes the outputs."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, tensor in model.state_dict().items():
            if name.endswith("num_batches_tracked"):
                continue
            values = torch.randn(tensor.shape, generator=generator) * 0.2
            if name.endswith("running_var"):
                values = values.abs() + 0.5
            tensor.copy_(values)
    return model


@pytest.fixture
def fixtures_dir() -> Path:
    return FIXTURES
