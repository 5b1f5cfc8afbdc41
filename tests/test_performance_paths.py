"""The fast inference path, memory-lean training, the fused CPU kernels and their PyTorch fallbacks, bf16 and
torch.compile: each against the reference computation."""

import copy
import subprocess
import sys
import textwrap

import pytest
import torch
from helpers import (
    FIXTURES,
    SWITCHES_RUN,
    assert_matches_original,
    eager,
    loss_gradients_and_statistics,
    original_outputs,
    randomize_,
    tiny_config,
)

from refiner_hf import RefinerViTConfig, RefinerViTForImageClassification, convert_original_checkpoint
from refiner_hf.cpu_kernels import kernels_available, set_kernels_enabled
from refiner_hf.modeling_refiner_vit import RefinerViTRefiner


TOLERANCE = 1e-4


@pytest.fixture(params=["kernels", "pytorch"])
def backend(request):
    """Runs a test with the fused C++ kernels (when they can be built here) and with the PyTorch fallbacks."""
    if request.param == "kernels" and not kernels_available():
        pytest.skip(reason="the fused CPU kernels cannot be built on this machine")
    previous = set_kernels_enabled(request.param == "kernels")
    yield request.param
    set_kernels_enabled(previous)


def reference_model(config: RefinerViTConfig) -> RefinerViTForImageClassification:
    """A model with random weights and BatchNorm statistics on the reference computation."""
    return eager(randomize_(RefinerViTForImageClassification(config)))


def pixel_values(batch_size: int = 2, size: int = 32, seed: int = 1) -> torch.Tensor:
    return torch.randn(batch_size, 3, size, size, generator=torch.Generator().manual_seed(seed))


def fast_copy(model: RefinerViTForImageClassification) -> RefinerViTForImageClassification:
    fast = copy.deepcopy(model)
    fast.set_fast_inference()
    return fast


def assert_same_outputs(fast, reference, inputs, atol=TOLERANCE, **kwargs) -> None:
    with torch.no_grad():
        expected = reference(inputs, output_hidden_states=True, output_attentions=True, **kwargs)
        actual = fast(inputs, output_hidden_states=True, output_attentions=True, **kwargs)
    for name in ("logits", "cls_logits", "aux_logits"):
        torch.testing.assert_close(getattr(actual, name), getattr(expected, name), atol=atol, rtol=0, msg=name)
    for i, (a, e) in enumerate(zip(actual.hidden_states, expected.hidden_states)):
        torch.testing.assert_close(a, e, atol=atol, rtol=0, msg=f"hidden state {i}")
    for i, (a, e) in enumerate(zip(actual.attentions, expected.attentions)):
        torch.testing.assert_close(a, e, atol=atol, rtol=0, msg=f"attention map {i}")


# ---------------------------------------------------------------------------------------------------------------------
# Inference fast path


@pytest.mark.parametrize("name", ["released_tiny", "paper_tiny"])
def test_fast_path_reproduces_the_original_fixtures(backend, name):
    fixture = original_outputs(name)
    model = convert_original_checkpoint(FIXTURES / f"{name}.pth").eval().set_fast_inference()
    # The converter loads a timm checkpoint's EMA weights by default; the other fixture has raw weights only.
    expected = fixture.get("expected_ema", fixture["expected"])
    assert_matches_original(model, fixture["input"], expected, tolerance=TOLERANCE)


def test_fast_path_matches_reference_on_a_preset_shaped_model(backend):
    """Refiner-ViT-S at 224 px with random weights and BatchNorm statistics, maps and hidden states included."""
    torch.manual_seed(0)
    model = eager(RefinerViTForImageClassification(RefinerViTConfig.from_preset("refiner-vit-s")))
    generator = torch.Generator().manual_seed(0)

    def noise(tensor: torch.Tensor) -> torch.Tensor:
        return torch.randn(tensor.shape, generator=generator) * 0.2

    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, torch.nn.BatchNorm2d):
                module.weight.copy_(1 + noise(module.weight))
                module.bias.copy_(noise(module.bias))
                module.running_mean.copy_(noise(module.running_mean))
                module.running_var.copy_(torch.rand(module.running_var.shape, generator=generator) + 0.5)
    model.eval()
    assert_same_outputs(fast_copy(model), model, pixel_values(1, 224))


@pytest.mark.parametrize(
    "overrides",
    [
        {},
        {"refine_expansion": 1, "block_types": ["refined", "refined", "plain", "shared"]},  # no expansion conv
        {"refine_kernel_size": 4},  # even kernel: one more zero after than before
        {"refine_kernel_size": 5, "stem_type": "patch"},
        {"use_aux_head": False, "qkv_bias": False},
    ],
    ids=["tiny", "expansion-1", "kernel-4", "kernel-5-patch-stem", "no-aux-no-qkv-bias"],
)
def test_fast_path_matches_reference_on_other_architectures(backend, overrides):
    model = reference_model(tiny_config(**overrides)).eval()
    fast = fast_copy(model)
    inputs = pixel_values()
    with torch.no_grad():
        expected, actual = model(inputs), fast(inputs)
    torch.testing.assert_close(actual.logits, expected.logits, atol=TOLERANCE, rtol=0)
    # Another token grid (49 tokens + class token) and a batch of one.
    with torch.no_grad():
        expected = model(pixel_values(1, 56), interpolate_pos_encoding=True).logits
        actual = fast(pixel_values(1, 56), interpolate_pos_encoding=True).logits
    torch.testing.assert_close(actual, expected, atol=TOLERANCE, rtol=0)


def test_fast_path_leaves_training_and_saved_weights_alone(tmp_path):
    model = reference_model(tiny_config(drop_path_rate=0.2)).eval()
    reference = copy.deepcopy(model)
    state_before = {name: tensor.clone() for name, tensor in model.state_dict().items()}
    model.set_fast_inference()
    inputs = pixel_values()
    with torch.no_grad():
        model(inputs)  # folds the BatchNorms for this forward only
    for name, tensor in model.state_dict().items():
        torch.testing.assert_close(tensor, state_before[name], atol=0, rtol=0, msg=name)

    # Saved after using the fast path: the original weights; reloaded, the fast path by default, the reference
    # computation bit for bit with attn_implementation="eager".
    model.save_pretrained(tmp_path)
    loaded = RefinerViTForImageClassification.from_pretrained(tmp_path).eval()
    assert loaded.config._attn_implementation == "fused"
    assert all(module.fast_inference for module in loaded.modules() if hasattr(module, "fast_inference"))
    assert loaded.state_dict().keys() == state_before.keys()
    for name, tensor in loaded.state_dict().items():
        torch.testing.assert_close(tensor, state_before[name], atol=0, rtol=0, msg=name)
    assert_same_outputs(loaded, reference, inputs)
    loaded = RefinerViTForImageClassification.from_pretrained(tmp_path, attn_implementation="eager").eval()
    assert not any(getattr(module, "fast_inference", False) for module in loaded.modules())
    with torch.no_grad():
        torch.testing.assert_close(loaded(inputs).logits, reference(inputs).logits, atol=0, rtol=0)

    # Training mode runs the reference computation, bit for bit (same drop-path draws, same statistics updates).
    model.train()
    reference.train()
    torch.manual_seed(3)
    trained = model(inputs).logits
    torch.manual_seed(3)
    expected = reference(inputs).logits
    torch.testing.assert_close(trained, expected, atol=0, rtol=0)
    for (name, a), b in zip(model.state_dict().items(), reference.state_dict().values()):
        torch.testing.assert_close(a, b, atol=0, rtol=0, msg=name)


def test_fast_path_is_differentiable_in_evaluation_mode(backend):
    model = reference_model(tiny_config()).eval()
    fast = fast_copy(model)
    grads = []
    for m in (model, fast):
        inputs = pixel_values().requires_grad_()
        m(inputs).logits.square().sum().backward()
        grads.append((inputs.grad, {name: p.grad for name, p in m.named_parameters()}))
    torch.testing.assert_close(grads[1][0], grads[0][0], atol=TOLERANCE, rtol=1e-4)
    for name, grad in grads[0][1].items():
        torch.testing.assert_close(grads[1][1][name], grad, atol=TOLERANCE, rtol=1e-4, msg=name)


def test_folded_refinement_matches_the_module(backend):
    """The folded refinement alone, on maps of several sizes and in bfloat16."""
    generator = torch.Generator().manual_seed(0)
    refiner = randomize_(RefinerViTRefiner(num_heads=6, expansion=3, kernel_size=3), seed=4).eval()
    adapt_bn = randomize_(torch.nn.BatchNorm2d(6), seed=5).eval()
    for shape in ((1, 6, 1, 1), (3, 6, 17, 17), (2, 6, 50, 50)):
        maps = torch.rand(shape, generator=generator)
        with torch.no_grad():
            expected = adapt_bn(refiner(maps)) * 0.3
            torch.testing.assert_close(refiner.forward_folded(maps, adapt_bn, 0.3), expected, atol=1e-5, rtol=0)
            actual = refiner.forward_folded(maps.bfloat16(), adapt_bn, 0.3).float()
        assert actual.shape == expected.shape
        torch.testing.assert_close(actual, expected, atol=5e-2, rtol=2e-2)


# ---------------------------------------------------------------------------------------------------------------------
# Memory-lean training


@pytest.mark.parametrize("checkpointing", [False, True], ids=["lean", "lean+checkpointing"])
@pytest.mark.parametrize(
    "overrides",
    [{}, {"refine_expansion": 1}, {"refine_kernel_size": 4, "shared_expansion": 2}],
    ids=["tiny", "expansion-1", "kernel-4"],
)
def test_memory_lean_training_matches_reference_gradients(backend, checkpointing, overrides):
    config = tiny_config(drop_path_rate=0.3, **overrides)
    reference = reference_model(config).train()
    lean = copy.deepcopy(reference)
    lean.set_memory_lean_training()
    if checkpointing:
        lean.activation_checkpointing_enable()
    inputs, labels = pixel_values(), torch.tensor([2, 0])
    loss_a, grads_a, buffers_a = loss_gradients_and_statistics(reference, inputs, labels)
    loss_b, grads_b, buffers_b = loss_gradients_and_statistics(lean, inputs, labels)
    torch.testing.assert_close(loss_b, loss_a, atol=TOLERANCE, rtol=0)
    assert grads_a.keys() == grads_b.keys()
    for name, grad in grads_a.items():
        torch.testing.assert_close(grads_b[name], grad, atol=TOLERANCE, rtol=1e-4, msg=name)
    # BatchNorm running statistics are updated once per forward, as in the reference.
    for name, buffer in buffers_a.items():
        torch.testing.assert_close(buffers_b[name], buffer, atol=1e-6, rtol=1e-5, msg=name)
    assert buffers_b["refiner_vit.layers.1.attention.adapt_bn.num_batches_tracked"].item() == 1
    assert buffers_b["refiner_vit.layers.1.attention.refiner.depthwise_bn.num_batches_tracked"].item() == 1


def saved_bytes(model, inputs) -> int:
    """Bytes of the distinct storages autograd keeps for the backward pass of one training forward."""
    storages = {}

    def pack(tensor):
        storage = tensor.untyped_storage()
        storages[storage.data_ptr()] = storage.nbytes()
        return tensor

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
        model(inputs, labels=torch.zeros(inputs.shape[0], dtype=torch.long)).loss
    return sum(storages.values())


def test_memory_lean_training_keeps_less_for_the_backward(backend):
    """On a model whose maps dominate the activations (as at 224 px), less than half of the reference is kept."""
    config = tiny_config(image_size=96, patch_size=8, hidden_size=48, num_attention_heads=4, refine_expansion=3)
    model = reference_model(config).train()
    inputs = pixel_values(2, 96)
    reference = saved_bytes(model, inputs)
    model.set_memory_lean_training()
    lean = saved_bytes(model, inputs)
    assert lean < 0.5 * reference


def test_memory_lean_refinement_alone(backend):
    """The training-mode refinement with its input's gradient, and a BatchNorm frozen in evaluation mode."""
    refiner = randomize_(RefinerViTRefiner(num_heads=4, expansion=3, kernel_size=3), seed=6).train()
    adapt_bn = randomize_(torch.nn.BatchNorm2d(4), seed=7).train()
    lean_refiner, lean_bn = copy.deepcopy(refiner), copy.deepcopy(adapt_bn)
    maps = torch.rand(3, 4, 21, 21, generator=torch.Generator().manual_seed(0))
    expected_input, actual_input = maps.clone().requires_grad_(), maps.clone().requires_grad_()
    weights = torch.randn(maps.shape, generator=torch.Generator().manual_seed(1))
    (adapt_bn(refiner(expected_input)) * 0.4 * weights).sum().backward()
    (lean_refiner.forward_memory_lean(actual_input, lean_bn, 0.4) * weights).sum().backward()
    torch.testing.assert_close(actual_input.grad, expected_input.grad, atol=TOLERANCE, rtol=1e-4)
    for (name, a), b in zip(refiner.named_parameters(), lean_refiner.parameters()):
        torch.testing.assert_close(b.grad, a.grad, atol=TOLERANCE, rtol=1e-4, msg=name)
    lean_refiner.depthwise_bn.eval()  # a frozen BatchNorm: the reference computation is used
    refiner.depthwise_bn.eval()
    with torch.no_grad():
        torch.testing.assert_close(
            lean_refiner.forward_memory_lean(maps, lean_bn, 0.4), adapt_bn(refiner(maps)) * 0.4, atol=1e-5, rtol=0
        )


# ---------------------------------------------------------------------------------------------------------------------
# bfloat16 and torch.compile


def test_bfloat16_autocast_stays_close_to_float32(backend):
    model = eager(convert_original_checkpoint(FIXTURES / "released_tiny.pth")).eval()
    fixture = original_outputs("released_tiny")
    inputs, expected = fixture["input"], fixture["expected_ema"]["logits"]
    for fast in (False, True):
        model.set_fast_inference(fast)
        with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
            logits = model(inputs).logits.float()
        # bf16 keeps 8 bits of mantissa: logits of magnitude ~3 move by ~1e-2.
        torch.testing.assert_close(logits, expected, atol=5e-2, rtol=0)
        assert torch.equal(logits.argmax(-1), expected.argmax(-1))
    model.train().set_memory_lean_training()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss = model(inputs, labels=torch.arange(inputs.shape[0]) % model.config.num_labels).loss
    loss.backward()
    assert torch.isfinite(loss) and all(torch.isfinite(p.grad).all() for p in model.parameters())


@pytest.mark.parametrize("fast", [False, True], ids=["reference", "fast"])
def test_torch_compile_fullgraph_matches_eager(backend, fast):
    model = reference_model(tiny_config()).eval()
    model.set_fast_inference(fast)
    inputs = pixel_values()
    torch._dynamo.reset()
    compiled = torch.compile(model, fullgraph=True)  # fails on any graph break
    with torch.no_grad():
        torch.testing.assert_close(compiled(inputs).logits, model(inputs).logits, atol=TOLERANCE, rtol=0)


# ---------------------------------------------------------------------------------------------------------------------
# Falling back


def test_without_kernel_sources_everything_falls_back_to_pytorch(tmp_path):
    """As in a model directory's copy of the code: no C++ sources, so the PyTorch implementations run."""
    script = (
        textwrap.dedent(
            f"""
            import pathlib, torch, warnings
            import refiner_hf.cpu_kernels as kernels
            kernels._SOURCE_DIR = pathlib.Path({str(tmp_path)!r})
            from refiner_hf import RefinerViTConfig, RefinerViTForImageClassification
            with warnings.catch_warnings():
                warnings.simplefilter("error")
                assert not kernels.kernels_available()
            """
        )
        + SWITCHES_RUN
        + 'print("ok")\n'
    )
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip().endswith("ok")
