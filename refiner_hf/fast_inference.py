"""
Tensor helpers of the evaluation fast path, `RefinerViTPreTrainedModel.set_fast_inference()`. Each module owns its
fast computation (the `forward_folded` methods beside the reference forwards in `modeling_refiner_vit`); what they
share is here:

- BatchNorms folded into the layer before them (`batch_norm_scale_shift`, `fold_into_conv`): constants applied to
  the weights rather than to the activations, recomputed from the parameters on every call (a few small tensor
  operations per block), so there is nothing to cache or invalidate and gradients still flow to the parameters;
- the folded refinement (`FoldedRefinement`) run as one fused kernel: Triton on CUDA (`triton_refinement`), C++ on
  CPU (`cpu_kernels`);
- the attention probabilities (`softmax(s q k^T) + s * previous`) and the context computed by fused kernels straight
  from the packed projection and into token layout (the probabilities' PyTorch fallback applies the scale with
  `baddbmm` and adds the previous map in place);
- LayerNorm of `x * r` as a LayerNorm of `x` with epsilon `eps / r**2`, which saves the multiplication.

All of them give the reference computation's results up to float rounding.
"""

from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import nn

# Imported by name: a model directory's copy of this code (remote code) carries only the files imported this way.
from .cpu_kernels import takes as cpu_kernels_take
from .triton_attention import attention_probs as triton_attention_probs
from .triton_attention import can_fuse as triton_can_fuse
from .triton_refinement import autocast_input, can_refine
from .triton_refinement import ops as triton_refinement_ops


class FoldedRefinement(NamedTuple):
    """
    An attention-map refinement with its BatchNorms (and `adapt_bn` and the shared blocks' scale) folded in
    (C = heads * expansion):

        t1 = relu6(w_expand @ x + b_expand)         (t1 = x when there is no expansion)
        t2 = relu6(depthwise(t1, w_depthwise) + b_depthwise)
        out = w_project @ t2 + b_project + residual_scale * x
    """

    w_expand: torch.Tensor | None  # (C, heads)
    b_expand: torch.Tensor | None  # (C,)
    w_depthwise: torch.Tensor  # (C, k, k)
    b_depthwise: torch.Tensor  # (C,)
    w_project: torch.Tensor  # (heads, C)
    b_project: torch.Tensor  # (heads,)
    residual_scale: torch.Tensor  # (heads,)
    padding: tuple[int, int]  # zero rows/columns before and after the map


def batch_norm_scale_shift(bn: nn.BatchNorm2d) -> tuple[torch.Tensor, torch.Tensor]:
    """The evaluation-mode BatchNorm as `x * scale + shift`, from its running statistics."""
    scale = bn.weight * torch.rsqrt(bn.running_var + bn.eps)
    return scale, bn.bias - bn.running_mean * scale


def can_fold(*norms: nn.BatchNorm2d | None) -> bool:
    """Whether these BatchNorms normalise with running statistics (evaluation mode, statistics tracked)."""
    return all(bn is None or (not bn.training and bn.running_mean is not None) for bn in norms)


def fold_into_conv(conv: nn.Conv2d, bn: nn.BatchNorm2d) -> tuple[torch.Tensor, torch.Tensor]:
    """Weight and bias of `bn(conv(x))` as one convolution (evaluation mode)."""
    scale, shift = batch_norm_scale_shift(bn)
    weight = conv.weight * scale.reshape(-1, *(1,) * (conv.weight.ndim - 1))
    bias = shift if conv.bias is None else conv.bias * scale + shift
    return weight, bias


def needs_grad(*tensors: torch.Tensor | None) -> bool:
    """Whether autograd would record an operation on these tensors (the fused inference kernels have no backward)."""
    return torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in tensors)


def refine_folded_fused(attention_map: torch.Tensor, folded: FoldedRefinement) -> torch.Tensor | None:
    """
    A folded refinement of maps `(batch, heads, rows, cols)` as one fused kernel (a contiguous result), or `None`
    where no kernel takes these tensors (other devices or dtypes, kernels unavailable, gradients needed).
    """
    weights = folded[:-1]
    if needs_grad(attention_map, *weights):
        return None
    heads, channels, kernel_size = attention_map.shape[1], folded.w_depthwise.shape[0], folded.w_depthwise.shape[-1]
    if can_refine(attention_map, heads, channels, kernel_size):
        x = autocast_input(attention_map)
        return triton_refinement_ops().refine_eval(x, *weights, folded.padding[0])
    if cpu_kernels_take(attention_map):
        w_expand, b_expand, w_depthwise, b_depthwise, w_project, b_project, residual_scale = weights
        return torch.ops.refiner_hf.refine_eval(
            attention_map, w_expand, b_expand, w_depthwise.contiguous(), b_depthwise, w_project.contiguous(),
            b_project, residual_scale, folded.padding[0],
        )  # fmt: skip
    return None


def attention_probs(
    qkv: torch.Tensor, previous_attention: torch.Tensor | None, heads: int, scaling: float
) -> torch.Tensor:
    """softmax((sqrt(s) q)(sqrt(s) k)^T) + s * previous, from the packed (batch, tokens, 3 * hidden) projection."""
    if triton_can_fuse(qkv, previous_attention, heads):
        return triton_attention_probs(qkv, previous_attention, heads, scaling)
    if cpu_kernels_take(qkv) and not needs_grad(qkv, previous_attention):
        return torch.ops.refiner_hf.attention_probs(qkv, previous_attention, heads, scaling, scaling)
    batch_size, seq_len, width = qkv.shape
    head_dim = width // (3 * heads)
    qkv = qkv.view(batch_size, seq_len, 3, heads, head_dim)
    query = qkv[:, :, 0].transpose(1, 2).reshape(batch_size * heads, seq_len, head_dim)
    key = qkv[:, :, 1].transpose(1, 2).reshape(batch_size * heads, seq_len, head_dim)
    # (sqrt(s) q)(sqrt(s) k)^T = s (q k^T): the scale comes free with the batched product (beta=0: `scores` is
    # only written).
    scores = torch.baddbmm(query.new_empty(batch_size * heads, seq_len, seq_len), query, key.transpose(1, 2),
                           beta=0.0, alpha=scaling)  # fmt: skip
    probs = torch.softmax(scores.view(batch_size, heads, seq_len, seq_len), dim=-1)
    if previous_attention is None:
        return probs
    if needs_grad(probs, previous_attention):
        return torch.add(probs, previous_attention, alpha=scaling)
    return probs.add_(previous_attention, alpha=scaling)  # the softmax output is not needed afterwards


def attention_context_fused(attention_map: torch.Tensor, values: torch.Tensor, offset: int) -> torch.Tensor | None:
    """
    The attention map times the values (columns `offset:` of the packed `values`), in token layout (batch, tokens,
    hidden), as one fused kernel; `None` where the kernel does not take these tensors.
    """
    if cpu_kernels_take(attention_map) and not needs_grad(attention_map, values):
        return torch.ops.refiner_hf.attention_context(attention_map, values, offset)
    return None


def scaled_layer_norm(norm: nn.LayerNorm, hidden_states: torch.Tensor, r: float) -> torch.Tensor:
    """`norm(hidden_states * r)`: LayerNorm is scale invariant except for its epsilon, which scales by 1 / r^2."""
    return F.layer_norm(hidden_states, norm.normalized_shape, norm.weight, norm.bias, norm.eps / (r * r))
