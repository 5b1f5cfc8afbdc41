"""
Helpers of the test suite: the fixtures of the original code and the comparison with their outputs, the tiny
configurations that keep the tests fast on CPU, random weights, and scripts loaded as modules.
"""

import importlib.util
import sys
from pathlib import Path
from types import ModuleType

import torch

from refiner_hf import RefinerViTConfig, RefinerViTForImageClassification
from refiner_hf.conversion import original_key_to_hf


FIXTURES = Path(__file__).parent / "fixtures"


def load_script(path: Path) -> ModuleType:
    """A script (examples/, benchmarks/) as a module named after its file, to call its functions in this process."""
    spec = importlib.util.spec_from_file_location(path.stem, path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


# A 4-block model that has every block type, the convolutional stem and both heads, on 32x32 images with 8-pixel
# patches: the model of the unit tests. The trainer's tests use it at 28 px (tests/training_utils.py).
TINY_FIELDS = {
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


def tiny_config(**overrides) -> RefinerViTConfig:
    """[`TINY_FIELDS`] as a configuration, with `overrides`."""
    return RefinerViTConfig(**{**TINY_FIELDS, **overrides})


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


def hf_to_original(model: RefinerViTForImageClassification) -> dict[str, torch.Tensor]:
    """Writes a model's weights under the original code's names (the inverse of the conversion's mapping)."""
    block_types = model.config.block_types
    candidates = ["cls_token", "pos_embed", "norm.weight", "norm.bias", "head.weight", "head.bias"]
    candidates += ["aux_head.weight", "aux_head.bias", "patch_embed.proj.weight", "patch_embed.proj.bias"]
    for i in (1, 2, 3):
        candidates += [f"patch_embed.conv{i}.weight"]
        candidates += [
            f"patch_embed.bn{i}.{p}" for p in ("weight", "bias", "running_mean", "running_var", "num_batches_tracked")
        ]
    bn = ("weight", "bias", "running_mean", "running_var", "num_batches_tracked")
    for i in range(len(block_types)):
        b = f"blocks.{i}."
        candidates += [b + f"norm{n}.{p}" for n in (1, 2) for p in ("weight", "bias")]
        candidates += [b + "attn.qkv.weight", b + "attn.qkv.bias", b + "attn.proj.weight", b + "attn.proj.bias"]
        candidates += [b + f"attn.adapt_bn.{p}" for p in bn]
        candidates += [
            b + "attn.DLA.conv_exp.weight",
            b + "attn.DLA.depth_sep_conv.weight",
            b + "attn.DLA.conv_pro.weight",
        ]
        candidates += [b + f"attn.DLA.bn{n}.{p}" for n in (1, 2, 3) for p in bn]
        candidates += [b + f"mlp.fc{n}.{p}" for n in (1, 2) for p in ("weight", "bias")] + [b + "mlp.scale_channel"]
    ours = model.state_dict()
    original = {}
    for key in candidates:
        new_key = original_key_to_hf(key, block_types)
        if new_key in ours:
            original[key] = ours[new_key].clone()
    assert len(original) == len(ours)
    return original


# The original code's outputs


def original_outputs(name: str) -> dict:
    """What the original code computed for the fixture checkpoint `name` (`released_tiny`, `paper_tiny`)."""
    return torch.load(FIXTURES / f"{name}_expected.pt", weights_only=True)


def eager(model: torch.nn.Module) -> torch.nn.Module:
    """The model switched to the reference computation (`attn_implementation="eager"`), for tests comparing a fast or
    memory-lean path with it."""
    model.set_attn_implementation("eager")
    return model


def assert_matches_original(
    model: torch.nn.Module, pixel_values: torch.Tensor, expected: dict, tolerance: float = 1e-5
) -> None:
    """
    The model's logits, class-token logits, aux logits (or their absence) and last hidden state against the original
    code's, each within `tolerance` of its scale (float rounding differs between implementations and machines).
    """
    with torch.no_grad():
        outputs = model(pixel_values)
        hidden = model.refiner_vit(pixel_values).last_hidden_state
    actual = {"logits": outputs.logits, "cls_logits": outputs.cls_logits, "last_hidden_state": hidden}
    if "aux_logits" in expected:
        actual["aux_logits"] = outputs.aux_logits
    else:
        assert outputs.aux_logits is None
    for name, value in actual.items():
        reference = expected[name]
        torch.testing.assert_close(value, reference, atol=tolerance * max(1.0, reference.abs().max().item()), rtol=0)


def loss_gradients_and_statistics(model, inputs, labels, seed=123):
    """One seeded training forward + backward: the loss, every parameter's gradient and the buffers afterwards."""
    torch.manual_seed(seed)
    model.zero_grad()
    loss = model(inputs, labels=labels).loss
    loss.backward()
    grads = {name: p.grad.clone() for name, p in model.named_parameters()}
    buffers = {name: b.clone() for name, b in model.named_buffers()}
    return loss.detach(), grads, buffers


# Script lines (for a child process that changed how the package loads): a tiny model's fast inference equals its
# reference computation, and a memory-lean training step runs; `RefinerViTConfig`, `RefinerViTForImageClassification`
# and `torch` must be imported before them.
SWITCHES_RUN = """
config = RefinerViTConfig(image_size=32, patch_size=8, hidden_size=24, num_hidden_layers=2, num_attention_heads=4,
                          num_labels=3)
model = RefinerViTForImageClassification(config).eval()
inputs = torch.randn(1, 3, 32, 32)
with torch.no_grad():
    fast = model(inputs).logits  # the default: the fast path
    model.set_attn_implementation("eager")
    assert (model(inputs).logits - fast).abs().max() < 1e-5
model.train().set_attn_implementation("fused")  # memory-lean training
model(inputs, labels=torch.tensor([1])).loss.backward()
"""
