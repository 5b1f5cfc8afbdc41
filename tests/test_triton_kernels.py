"""
The Triton kernels (refinement and attention map) against the reference computation, on CPU through Triton's
interpreter: outputs, every gradient, BatchNorm running statistics, in float32 and bfloat16, on tiny shapes (the
interpreter costs about a millisecond per tensor operation, so each test keeps to a few seconds).

How the interpreter is turned on per test: `triton_support.interpreted()` sets `TRITON_INTERPRET=1` for the block
and loads a separate copy of each kernel module there, so Triton decorates those kernels in interpreter mode
(whatever it did at import); the kernels call only Triton builtins, which the interpreter patches per launch. Inside
the block CPU tensors take the Triton paths exactly where CUDA tensors would; outside it nothing changes.

The kernels themselves are the ones compiled for GPUs, with one difference: the interpreter multiplies bfloat16
operands as float32 (the products are the same; Triton's interpreter would otherwise multiply bit patterns).

On a GPU, `REFINER_HF_TEST_DEVICE=cuda` runs the same tests on CUDA tensors with the compiled kernels and no
interpreter (benchmarks/gpu_check.sh does); the references run there too, in float32 without TF32.
"""

import contextlib
import copy
import os
import subprocess
import sys
import textwrap

import pytest
import torch
from helpers import SWITCHES_RUN, eager, loss_gradients_and_statistics, randomize_, tiny_config

from refiner_hf import RefinerViTForImageClassification, triton_attention, triton_refinement, triton_support
from refiner_hf.modeling_refiner_vit import RefinerViTRefiner


pytest.importorskip("triton", reason="Triton is not installed (it comes with PyTorch's CUDA builds)")

# Where the Triton paths run: CPU under the interpreter, or CUDA (no skip there: a GPU check must not pass silently).
DEVICE = torch.device(os.environ.get("REFINER_HF_TEST_DEVICE", "cpu"))
if DEVICE.type == "cuda" and not torch.cuda.is_available():
    raise RuntimeError("REFINER_HF_TEST_DEVICE=cuda, but PyTorch sees no CUDA device.")


@contextlib.contextmanager
def triton_paths():
    """The block in which tensors on DEVICE take the Triton paths: on CPU, Triton's interpreter; on CUDA, as is."""
    if DEVICE.type == "cuda":
        yield
    else:
        with triton_support.interpreted():
            yield


@pytest.fixture(autouse=True)
def exact_float32():
    """Float32 references without TF32 on CUDA (cuDNN's convolutions use it by default; 1e-5 tolerances need IEEE)."""
    previous = torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32
    torch.backends.cudnn.allow_tf32 = torch.backends.cuda.matmul.allow_tf32 = False
    yield
    torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32 = previous


def assert_close_to_scale(actual: torch.Tensor, expected: torch.Tensor, relative: float, msg: str = "") -> None:
    """|actual - expected| <= relative * max(1, max |expected|): float tolerance relative to the values' scale."""
    scale = max(1.0, expected.abs().max().item())
    torch.testing.assert_close(actual.float().cpu(), expected.float().cpu(), atol=relative * scale, rtol=0, msg=msg)


def refinement_pair(expansion: int, kernel_size: int, heads: int = 4, seed: int = 1):
    """A refinement and its adapt_bn with random weights and statistics (BatchNorm weights near 1, as trained), on
    DEVICE."""
    refiner = randomize_(RefinerViTRefiner(heads, expansion, kernel_size), seed=seed)
    adapt_bn = randomize_(torch.nn.BatchNorm2d(heads), seed=seed + 1)
    with torch.no_grad():
        for bn in (refiner.expand_bn, refiner.depthwise_bn, refiner.project_bn, adapt_bn):
            if bn is not None:
                bn.weight.add_(1.0)
    return refiner.to(DEVICE), adapt_bn.to(DEVICE)


def maps(shape: tuple[int, ...], seed: int = 3) -> torch.Tensor:
    """Attention-map-like input on DEVICE: non-negative, rows of ~1 plus the previous map's share."""
    return (torch.rand(shape, generator=torch.Generator().manual_seed(seed)) * 0.5).to(DEVICE)


@contextlib.contextmanager
def counting(monkeypatch, module, name: str):
    """Counts the calls of module.name (a kernel launcher), to show which implementation a path took."""
    calls = []
    original = getattr(module, name)

    def wrapper(*args, **kwargs):
        calls.append(name)
        return original(*args, **kwargs)

    monkeypatch.setattr(module, name, wrapper)
    yield calls


# (expansion, kernel size, map shape): odd token counts, an even kernel (one more zero after than before), no
# expansion conv, a non-square map (rows and columns must not be mixed up).
SHAPES = [
    pytest.param(3, 3, (2, 4, 13, 13), id="E3-k3-13x13"),
    pytest.param(1, 3, (2, 4, 9, 9), id="E1-k3-9x9"),
    pytest.param(2, 4, (3, 4, 11, 7), id="E2-k4-11x7"),
]


@pytest.mark.parametrize("expansion, kernel_size, shape", SHAPES)
def test_inference_refinement_kernel_matches_the_module(expansion, kernel_size, shape):
    """
    The folded evaluation kernel (`set_fast_inference`'s refinement) against `adapt_bn(refiner(x)) * scale` in
    evaluation mode: float32 within 1e-5 of the maps' scale; bfloat16 no further from the float32 reference than
    twice the reference's own bfloat16 autocast result is.
    """
    refiner, adapt_bn = refinement_pair(expansion, kernel_size)
    refiner.eval(), adapt_bn.eval()
    x = maps(shape)
    with torch.no_grad():
        expected = adapt_bn(refiner(x)) * 0.3
        with torch.autocast(DEVICE.type, dtype=torch.bfloat16):
            autocast_error = (adapt_bn(refiner(x)) * 0.3 - expected).abs().max().item()
        folded = refiner.fold(adapt_bn, 0.3)
        with triton_paths():
            assert triton_refinement.can_refine(x, shape[1], folded.w_depthwise.shape[0], kernel_size)
            actual = refiner.forward_folded(x, adapt_bn, 0.3)
            with torch.autocast(DEVICE.type, dtype=torch.bfloat16):
                low = refiner.forward_folded(x, adapt_bn, 0.3)
    assert actual.dtype == torch.float32 and low.dtype == torch.bfloat16
    assert_close_to_scale(actual, expected, 1e-5)
    assert (low.float() - expected).abs().max().item() <= 2 * autocast_error + 1e-3


def run_training(refiner, adapt_bn, x, weights, lean: bool, dtype=torch.float32):
    """One training forward and backward of the refinement (memory-lean path or the module); the output, the input's
    gradient and the parameters' gradients."""
    x = x.clone().requires_grad_()
    if lean:
        with torch.autocast(DEVICE.type, dtype=torch.bfloat16, enabled=dtype == torch.bfloat16):
            out = refiner.forward_memory_lean(x, adapt_bn, 0.3)
    else:
        out = adapt_bn(refiner(x)) * 0.3
    (out.float() * weights).sum().backward()
    params = {f"refiner.{n}": p.grad for n, p in refiner.named_parameters()}
    params.update({f"adapt_bn.{n}": p.grad for n, p in adapt_bn.named_parameters()})
    return out.detach(), x.grad, params


def assert_same_training(refiner, adapt_bn, x, relative: float) -> None:
    """The memory-lean (Triton) refinement against the module: output, input and parameter gradients, running
    statistics and the batch counters, within `relative` of each value's scale."""
    lean_refiner, lean_bn = copy.deepcopy(refiner), copy.deepcopy(adapt_bn)
    weights = torch.randn(x.shape, generator=torch.Generator().manual_seed(4)).to(DEVICE)
    out_a, grad_a, params_a = run_training(refiner, adapt_bn, x, weights, lean=False)
    with triton_paths():
        out_b, grad_b, params_b = run_training(lean_refiner, lean_bn, x, weights, lean=True)
    assert_close_to_scale(out_b, out_a, relative, "output")
    assert_close_to_scale(grad_b, grad_a, relative, "input gradient")
    assert params_a.keys() == params_b.keys()
    for name, grad in params_a.items():
        assert_close_to_scale(params_b[name], grad, relative, name)
    expected_buffers = dict(refiner.named_buffers(prefix="refiner")) | dict(adapt_bn.named_buffers(prefix="adapt_bn"))
    actual_buffers = dict(lean_refiner.named_buffers(prefix="refiner")) | dict(lean_bn.named_buffers(prefix="adapt_bn"))
    for name, buffer in expected_buffers.items():
        if name.endswith("num_batches_tracked"):
            assert actual_buffers[name].item() == buffer.item() == 1, name
        else:
            assert_close_to_scale(actual_buffers[name], buffer, 1e-6, name)


@pytest.mark.parametrize("expansion, kernel_size, shape", SHAPES)
def test_training_refinement_kernels_match_the_module(monkeypatch, expansion, kernel_size, shape):
    """
    `RefinerViTRefiner.forward_memory_lean` through the Triton training op (forward with batch statistics in four
    passes, backward recomputing from x) against the module in training mode: output, the input's and all 9-11
    parameters' gradients within 1e-5 of their scale, running means and variances within 1e-6, one batch counted.
    """
    refiner, adapt_bn = refinement_pair(expansion, kernel_size)
    with counting(monkeypatch, triton_refinement, "_refine_train") as forward:
        with counting(monkeypatch, triton_refinement, "_refine_train_backward") as backward:
            assert_same_training(refiner.train(), adapt_bn.train(), maps(shape), 1e-5)
    assert len(forward) == len(backward) == 1


def test_training_refinement_kernels_over_several_tiles(monkeypatch):
    """
    The training kernels with a 9 x 9 map split into 4 x 8 tiles, partial at the right and bottom edges, and more
    tiles than programs (each program loops over several and folds their statistics and weight gradients together).
    """
    refiner, adapt_bn = refinement_pair(3, 3)
    monkeypatch.setattr(triton_refinement, "multiprocessor_count", lambda device: 1)  # 4 programs for 6 tiles
    with triton_refinement.tiling(4, 8):
        assert_same_training(refiner.train(), adapt_bn.train(), maps((1, 4, 9, 9)), 1e-5)


def test_training_refinement_kernels_in_bfloat16():
    """
    Under bfloat16 autocast the map enters the kernels in bfloat16 (as autocast's convolutions would take it). Every
    gradient's relative L2 error against the float32 reference stays within 3 times that of the reference's own
    autocast run plus 0.02 (bfloat16 noise reaches 5-10 % here: ReLU6 masks flip where pre-activations round across
    0 or 6; a wrong term would give errors near 1), and the running statistics within 1e-2 of their scale.
    """
    refiner, adapt_bn = refinement_pair(3, 3)
    refiner.train(), adapt_bn.train()
    x = maps((2, 4, 13, 13))
    weights = torch.randn(x.shape, generator=torch.Generator().manual_seed(4)).to(DEVICE)
    exact_refiner, exact_bn = copy.deepcopy(refiner), copy.deepcopy(adapt_bn)
    _, exact_x, exact_params = run_training(exact_refiner, exact_bn, x, weights, lean=False)

    autocast_refiner, autocast_bn = copy.deepcopy(refiner), copy.deepcopy(adapt_bn)
    xa = x.clone().requires_grad_()
    with torch.autocast(DEVICE.type, dtype=torch.bfloat16):
        out = autocast_bn(autocast_refiner(xa)) * 0.3
    (out.float() * weights).sum().backward()
    autocast_grads = [xa.grad] + [p.grad for p in (*autocast_refiner.parameters(), *autocast_bn.parameters())]

    lean_refiner, lean_bn = copy.deepcopy(refiner), copy.deepcopy(adapt_bn)
    with triton_paths():
        out, grad_x, params = run_training(lean_refiner, lean_bn, x, weights, lean=True, dtype=torch.bfloat16)
    assert out.dtype == torch.bfloat16 and grad_x.dtype == torch.float32

    def error(actual: torch.Tensor, exact: torch.Tensor) -> float:
        # Relative L2 error; gradients that are zero up to rounding (bn3's bias before adapt_bn) get a floor.
        return ((actual - exact).norm() / max(exact.norm().item(), 1e-2 * exact.numel() ** 0.5)).item()

    names = ["input", *params]
    for name, actual, autocast, exact in zip(names, [grad_x, *params.values()], autocast_grads,
                                             [exact_x, *exact_params.values()]):  # fmt: skip
        assert error(actual, exact) <= 3 * error(autocast, exact) + 0.02, name
    lean_buffers = [*lean_refiner.named_buffers(), *lean_bn.named_buffers()]
    for (name, actual), expected in zip(lean_buffers, [*exact_refiner.buffers(), *exact_bn.buffers()]):
        assert_close_to_scale(actual, expected, 1e-2, name)


@pytest.mark.parametrize("previous", [False, True], ids=["first-block", "with-previous-map"])
def test_attention_map_kernel_matches_the_reference(previous):
    """
    softmax((sqrt(s) q)(sqrt(s) k)^T) + s * A from the packed projection: 17 tokens (odd, over one block), head
    dimension 6 (padded inside); the map, the projection's and the previous map's gradients within 1e-5 of their
    scale in float32; in bfloat16 the map as close to the float32 one as PyTorch's bfloat16 computation, within 2x.
    """
    batch, tokens, heads, head_dim = 2, 17, 3, 6
    scale = head_dim**-0.5
    generator = torch.Generator().manual_seed(0)
    qkv = (torch.randn(batch, tokens, 3 * heads * head_dim, generator=generator) * 2).to(DEVICE)
    prev = torch.rand(batch, heads, tokens, tokens, generator=generator).to(DEVICE) if previous else None
    weights = torch.randn(batch, heads, tokens, tokens, generator=generator).to(DEVICE)

    def reference(packed, prev_map):
        q, k, _ = packed.reshape(batch, tokens, 3, heads, head_dim).permute(2, 0, 3, 1, 4).unbind(0)
        probs = ((scale**0.5 * q) @ (scale**0.5 * k).transpose(-2, -1)).softmax(-1)
        return probs if prev_map is None else probs + prev_map * scale

    inputs_a = [qkv.clone().requires_grad_(), prev.clone().requires_grad_() if previous else None]
    expected = reference(*inputs_a)
    (expected * weights).sum().backward()
    inputs_b = [qkv.clone().requires_grad_(), prev.clone().requires_grad_() if previous else None]
    with triton_paths():
        assert triton_attention.can_fuse(inputs_b[0], inputs_b[1], heads)
        actual = triton_attention.attention_probs(*inputs_b, heads, scale)
        (actual * weights).sum().backward()
        with torch.no_grad(), torch.autocast(DEVICE.type, dtype=torch.bfloat16):
            low = triton_attention.attention_probs(qkv.bfloat16(), prev, heads, scale)
    assert_close_to_scale(actual, expected.detach(), 1e-5, "map")
    assert_close_to_scale(inputs_b[0].grad, inputs_a[0].grad, 1e-5, "projection gradient")
    if previous:
        assert_close_to_scale(inputs_b[1].grad, inputs_a[1].grad, 1e-5, "previous map gradient")
    with torch.no_grad(), torch.autocast(DEVICE.type, dtype=torch.bfloat16):
        autocast_error = (reference(qkv.bfloat16(), prev).float() - expected).abs().max().item()
    assert (low.float() - expected).abs().max().item() <= 2 * autocast_error


def test_model_switches_run_the_triton_kernels(monkeypatch):
    """
    A 4-block model with every block type (refined, shared, plain, shared) and drop path: memory-lean training
    through the Triton refinement and attention-map ops gives the reference's loss, every parameter's gradient and
    every buffer (running statistics) within float tolerance; the fast inference path gives its logits, hidden states
    and maps. The reference computation (no switch) never calls a Triton kernel, even where it could.
    """
    model = eager(randomize_(RefinerViTForImageClassification(tiny_config(drop_path_rate=0.3)))).to(DEVICE)
    inputs = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(1)).to(DEVICE)
    labels = torch.tensor([2, 0], device=DEVICE)
    reference = copy.deepcopy(model).train()
    loss_a, grads_a, buffers_a = loss_gradients_and_statistics(reference, inputs, labels)
    lean = copy.deepcopy(model).train().set_memory_lean_training()
    with contextlib.ExitStack() as stack:
        refinements = stack.enter_context(counting(monkeypatch, triton_refinement, "_refine_train"))
        maps_made = stack.enter_context(counting(monkeypatch, triton_attention, "_attention_probs"))
        stack.enter_context(triton_paths())
        loss_b, grads_b, buffers_b = loss_gradients_and_statistics(lean, inputs, labels)
        assert len(refinements) == 3 and len(maps_made) == 2  # refined + 2 shared blocks; refined + plain block
        untouched = copy.deepcopy(model).train()
        loss_gradients_and_statistics(untouched, inputs, labels)
        assert len(refinements) == 3 and len(maps_made) == 2
    torch.testing.assert_close(loss_b, loss_a, atol=1e-5, rtol=0)
    assert grads_a.keys() == grads_b.keys()
    for name, grad in grads_a.items():
        assert_close_to_scale(grads_b[name], grad, 1e-5, name)
    for name, buffer in buffers_a.items():
        assert_close_to_scale(buffers_b[name].float(), buffer.float(), 1e-6, name)

    reference.eval()
    fast = copy.deepcopy(reference).set_fast_inference()
    with torch.no_grad():
        expected = reference(inputs, output_hidden_states=True, output_attentions=True)
        with contextlib.ExitStack() as stack:
            folded = stack.enter_context(counting(monkeypatch, triton_refinement, "_refine_eval"))
            maps_made = stack.enter_context(counting(monkeypatch, triton_attention, "_attention_probs"))
            stack.enter_context(triton_paths())
            actual = fast(inputs, output_hidden_states=True, output_attentions=True)
    assert len(folded) == 3 and len(maps_made) == 2
    assert_close_to_scale(actual.logits, expected.logits, 1e-5, "logits")
    for i, (a, e) in enumerate(zip(actual.hidden_states, expected.hidden_states)):
        assert_close_to_scale(a, e, 1e-5, f"hidden state {i}")
    for i, (a, e) in enumerate(zip(actual.attentions, expected.attentions)):
        assert_close_to_scale(a, e, 1e-5, f"attention map {i}")


def test_custom_ops_pass_opcheck():
    """The Triton ops' schemas, fake (meta) implementations and autograd registration, as `torch.compile` needs them."""
    refiner, adapt_bn = refinement_pair(2, 3)
    x = maps((2, 4, 9, 9)).requires_grad_()
    params = (refiner.expand_conv.weight.flatten(1), refiner.expand_bn.weight, refiner.expand_bn.bias,
              refiner.depthwise_conv.weight.flatten(0, 1), refiner.depthwise_bn.weight, refiner.depthwise_bn.bias,
              refiner.project_conv.weight.flatten(1), refiner.project_bn.weight, refiner.project_bn.bias,
              adapt_bn.weight, adapt_bn.bias)  # fmt: skip
    checks = ("test_schema", "test_faketensor", "test_autograd_registration")
    with triton_paths():
        assert triton_refinement.can_refine(x, 4, 8, 3)
        qkv = torch.randn(2, 9, 24, device=DEVICE, requires_grad=True)
        assert triton_attention.can_fuse(qkv, None, 2)
        ops = triton_refinement.ops()
        results = [
            torch.library.opcheck(ops.refine_train, (x, *params, [1e-5] * 4, 0.3, 1), test_utils=checks),
            torch.library.opcheck(
                ops.attention_probs, (qkv, maps((2, 2, 9, 9)), 2, 0.3, torch.float32), test_utils=checks
            ),
        ]
        folded = [t.detach() for t in refiner.eval().fold(adapt_bn.eval())[:-1]]
        results.append(
            torch.library.opcheck(ops.refine_eval, (x.detach(), *folded, 1), test_utils=checks[:2]),
        )
    for result in results:
        assert set(result.values()) == {"SUCCESS"}, result


def test_triton_paths_need_cuda_or_the_interpreter():
    """Outside `interpreted()` CPU tensors never take the Triton paths, and the switch and environment turn them off."""
    x = maps((1, 4, 5, 5))
    assert not triton_support.runs_on(x)
    with triton_support.interpreted():
        assert triton_support.runs_on(x)
        assert not triton_support.runs_on(x.double())  # float32 and bfloat16 only
        previous = triton_support.set_triton_enabled(False)
        try:
            assert not triton_support.runs_on(x)
        finally:
            triton_support.set_triton_enabled(previous)
    assert not triton_support.interpreting()


def test_without_triton_everything_falls_back(tmp_path):
    """Where Triton cannot be imported: nothing fails at import, the switches run the CPU paths, and asking for the
    interpreter says why not in one line."""
    script = (
        "import sys, torch\n"
        'sys.modules["triton"] = None  # import triton raises ImportError\n'
        "from refiner_hf import RefinerViTConfig, RefinerViTForImageClassification, triton_support\n"
        "assert not triton_support.triton_available()\n"
        + SWITCHES_RUN
        + textwrap.dedent(
            """
            try:
                with triton_support.interpreted():
                    pass
            except RuntimeError as error:
                print(error)
            """
        )
    )
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "Triton is not installed: its interpreter cannot run the Refiner-ViT kernels."
