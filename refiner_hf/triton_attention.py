"""
Refiner-ViT's attention map, P = softmax(scale * q k^T) + scale * A, as Triton kernels (`triton_attention_kernels`)
for CUDA tensors, registered as the custom op `torch.ops.refiner_hf_triton.attention_probs` with a fake implementation
and an autograd formula:

- forward: one kernel from the packed (batch, tokens, 3 * hidden) projection to P, writing nothing else (PyTorch
  writes the scores, reads and writes them for the softmax, and again to add the previous map);
- backward: dS = S (dP - rowsum(dP S)) with S = P - scale * A (one kernel, S recovered from tensors autograd keeps
  anyway, so the op saves no softmax output: one map per plain block less than the reference), then dq = scale dS k
  and dk = scale dS^T q as batched products, and dA = scale dP.

P has the dtype PyTorch's `softmax(...) + scale * A` would have: float32 under CUDA autocast (which runs softmax in
float32), else the projection's; promoted with A's.
"""

import math

import torch

from .triton_support import OpRegistration, interpreting, kernel_module, next_power_of_2, runs_on


NAMESPACE = "refiner_hf_triton"
KERNELS = "triton_attention_kernels"
_OPS = ("attention_probs", "attention_softmax_backward")
MAX_HEAD_DIM = 256


def can_fuse(qkv: torch.Tensor, previous: torch.Tensor | None, heads: int) -> bool:
    """Whether the Triton attention map takes this packed projection (see `triton_support.runs_on`) and previous map."""
    if qkv.ndim != 3 or qkv.shape[-1] % (3 * heads) != 0 or qkv.shape[-1] // (3 * heads) > MAX_HEAD_DIM:
        return False
    if not runs_on(qkv):
        return False
    if previous is not None and (
        previous.device != qkv.device or previous.dtype not in (torch.float32, torch.bfloat16)
    ):
        return False
    return _registration.ensure()


def probs_dtype(qkv: torch.Tensor, previous: torch.Tensor | None) -> torch.dtype:
    """The dtype of `softmax(scores) + scale * previous` in PyTorch, autocast included (CUDA's runs softmax in float32,
    the CPU's in the input's dtype)."""
    device = qkv.device.type
    dtype = torch.float32 if device == "cuda" and torch.is_autocast_enabled(device) else qkv.dtype
    return dtype if previous is None else torch.promote_types(dtype, previous.dtype)


def attention_probs(qkv: torch.Tensor, previous: torch.Tensor | None, heads: int, scale: float) -> torch.Tensor:
    """softmax(scale * q k^T) + scale * previous (batch, heads, tokens, tokens), differentiable; see `can_fuse`."""
    return getattr(torch.ops, NAMESPACE).attention_probs(qkv, previous, heads, scale, probs_dtype(qkv, previous))


def _blocks(tokens: int) -> tuple[int, int]:
    if interpreting():  # the interpreter's cost is per operation: few, large blocks
        side = min(128, max(16, next_power_of_2(tokens)))
        return side, side
    return 64, 64


def _attention_probs(qkv, previous, heads, scale, dtype):
    qkv = qkv.contiguous()
    batch, tokens, width = qkv.shape
    hidden = width // 3
    head_dim = hidden // heads
    out = torch.empty(batch, heads, tokens, tokens, device=qkv.device, dtype=dtype)
    block_rows, block_cols = _blocks(tokens)
    kernel_module(KERNELS).attention_probs_kernel[(math.ceil(tokens / block_rows), batch * heads)](
        qkv, out if previous is None else previous.contiguous(), out, heads, tokens, hidden, head_dim, scale, scale,
        HAS_PREV=previous is not None, BM=block_rows, BN=block_cols, DP=max(16, next_power_of_2(head_dim)),
        LOW=qkv.dtype == torch.bfloat16, EMULATE=interpreting(), num_warps=8,
    )  # fmt: skip
    return out


def _softmax_backward(grad, probs, previous, scale, dtype):
    grad, probs = grad.contiguous(), probs.contiguous()
    batch, heads, tokens, _ = probs.shape
    out = torch.empty(probs.shape, device=probs.device, dtype=dtype)
    block_rows, block_cols = _blocks(tokens)
    kernel_module(KERNELS).softmax_backward_kernel[(math.ceil(tokens / block_rows), batch * heads)](
        grad, probs, probs if previous is None else previous.contiguous(), out, tokens, scale,
        HAS_PREV=previous is not None, BM=block_rows, BN=block_cols, num_warps=8,
    )  # fmt: skip
    return out


def _fake_attention_probs(qkv, previous, heads, scale, dtype):
    batch, tokens, _ = qkv.shape
    return qkv.new_empty((batch, heads, tokens, tokens), dtype=dtype)


def _fake_softmax_backward(grad, probs, previous, scale, dtype):
    return probs.new_empty(probs.shape, dtype=dtype)


def _setup_context(ctx, inputs, output) -> None:
    qkv, previous, heads, scale, _ = inputs
    ctx.save_for_backward(qkv, previous, output)
    ctx.heads, ctx.scale = heads, scale


def _backward(ctx, grad):
    qkv, previous, probs = ctx.saved_tensors
    scale = ctx.scale
    grad_qkv = grad_previous = None
    if ctx.needs_input_grad[0]:
        scores_grad = getattr(torch.ops, NAMESPACE).attention_softmax_backward(grad, probs, previous, scale, qkv.dtype)
        batch, tokens, width = qkv.shape
        packed = qkv.view(batch, tokens, 3, ctx.heads, width // (3 * ctx.heads))
        query, key = packed[:, :, 0].transpose(1, 2), packed[:, :, 1].transpose(1, 2)
        grad_qkv = qkv.new_zeros(packed.shape)
        grad_qkv[:, :, 0] = (scores_grad @ key).mul_(scale).transpose(1, 2)
        grad_qkv[:, :, 1] = (scores_grad.transpose(-2, -1) @ query).mul_(scale).transpose(1, 2)
        grad_qkv = grad_qkv.view(qkv.shape)
    if previous is not None and ctx.needs_input_grad[1]:
        grad_previous = (grad * scale).to(previous.dtype)
    return grad_qkv, grad_previous, None, None, None


def _define_ops() -> None:
    Tensor, OptionalTensor = torch.Tensor, torch.Tensor | None

    def attention_probs(qkv: Tensor, previous: OptionalTensor, heads: int, scale: float, dtype: torch.dtype) -> Tensor:
        return _attention_probs(qkv, previous, heads, scale, dtype)

    def attention_softmax_backward(grad: Tensor, probs: Tensor, previous: OptionalTensor, scale: float,
                                   dtype: torch.dtype) -> Tensor:  # fmt: skip
        return _softmax_backward(grad, probs, previous, scale, dtype)

    forward = torch.library.custom_op(f"{NAMESPACE}::attention_probs", attention_probs, mutates_args=())
    forward.register_fake(_fake_attention_probs)
    forward.register_autograd(_backward, setup_context=_setup_context)
    backward = torch.library.custom_op(
        f"{NAMESPACE}::attention_softmax_backward", attention_softmax_backward, mutates_args=()
    )
    backward.register_fake(_fake_softmax_backward)


_registration = OpRegistration(NAMESPACE, _OPS, KERNELS, _define_ops)
