"""
The evaluation-mode fast path of Refiner-ViT's modules. Each function computes what the module's reference forward
computes (up to float rounding), with constants folded into the weights on every call rather than applied to
activations:

- stem: each BatchNorm folded into the convolution before it, convolutions in `channels_last`, in-place ReLUs;
- LayerNorm of `x * r`: the same as a LayerNorm of `x` with epsilon `eps / r**2`, which saves the multiplication;
- attention: probabilities (`softmax(s q k^T) + s * previous`) and the context computed by fused kernels straight
  from the packed projection and into token layout (`cpu_kernels`; on CUDA the probabilities by a Triton kernel,
  `triton_attention`; without them, the scale is applied by `baddbmm` and the previous map added in place); the
  refinement with all its BatchNorms, `adapt_bn` and the shared blocks' scale folded into its three convolutions,
  run as one fused kernel (`fused_refinement`);
- residual branches: `1 / r` and the layer scale applied by the residual addition itself (`add` with alpha,
  `addcmul`).

Folding from the parameters on each call costs a few small tensor operations per block, so there is nothing to
cache or invalidate, saved weights are never touched, and gradients still flow to the parameters.
"""

import torch
import torch.nn.functional as F
from torch import nn

from . import triton_attention
from .fused_refinement import (
    batch_norm_scale_shift,
    can_fold,
    fold_refinement,
    needs_grad,
    refine_folded,
    use_kernels,
)


def _fold_into_conv(conv: nn.Conv2d, bn: nn.BatchNorm2d) -> tuple[torch.Tensor, torch.Tensor]:
    """Weight and bias of `bn(conv(x))` as one convolution (evaluation mode)."""
    scale, shift = batch_norm_scale_shift(bn)
    weight = conv.weight * scale.reshape(-1, 1, 1, 1)
    bias = shift if conv.bias is None else conv.bias * scale + shift
    return weight, bias


def can_run_conv_stem(stem: nn.Module) -> bool:
    """Whether the stem's BatchNorms can be folded (evaluation mode with running statistics)."""
    return can_fold(stem.bn1, stem.bn2, stem.bn3)


def conv_stem_forward(stem: nn.Module, pixel_values: torch.Tensor) -> torch.Tensor:
    """The convolutional stem with folded BatchNorms; returns a `channels_last` (batch, hidden, h, w) tensor."""
    hidden = pixel_values.contiguous(memory_format=torch.channels_last)
    for conv, bn in ((stem.conv1, stem.bn1), (stem.conv2, stem.bn2), (stem.conv3, stem.bn3)):
        weight, bias = _fold_into_conv(conv, bn)
        hidden = F.conv2d(hidden, weight, bias, conv.stride, conv.padding, conv.dilation, conv.groups)
        hidden = F.relu(hidden, inplace=True)
    return stem.projection(hidden)


def can_run_attention(attention: nn.Module) -> bool:
    """Whether the attention's BatchNorms, if any, can be folded (evaluation mode with running statistics)."""
    if attention.block_type == "plain":
        return True
    return can_fold(attention.adapt_bn, attention.refiner.expand_bn, attention.refiner.depthwise_bn,
                    attention.refiner.project_bn)  # fmt: skip


def attention_forward(
    attention: nn.Module, hidden_states: torch.Tensor, previous_attention: torch.Tensor | None
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """`RefinerViTAttention.forward` in evaluation mode (attention dropout is the identity)."""
    if attention.block_type == "shared":
        if previous_attention is None:
            raise ValueError("A shared block needs the attention map of a previous block.")
        values = attention.v_proj(hidden_states)
        previous_attention = attention.unrefined_map(previous_attention)
        folded = fold_refinement(attention.refiner, attention.adapt_bn, attention.scaling)
        attention_map = refine_folded(previous_attention, folded)
        context = _attention_context(attention_map, values, 0, attention.num_heads)
        return attention.o_proj(context), attention_map, previous_attention
    qkv = attention.qkv(hidden_states)
    attention_map = attention.unrefined_map(
        _attention_probs(qkv, previous_attention, attention.num_heads, attention.scaling)
    )
    if attention.block_type == "refined":
        attention_map = refine_folded(attention_map, fold_refinement(attention.refiner, attention.adapt_bn))
    context = _attention_context(attention_map, qkv, 2 * hidden_states.shape[-1], attention.num_heads)
    return attention.o_proj(context), attention_map, attention_map


def _attention_probs(
    qkv: torch.Tensor, previous_attention: torch.Tensor | None, heads: int, scaling: float
) -> torch.Tensor:
    """softmax((sqrt(s) q)(sqrt(s) k)^T) + s * previous, from the packed (batch, tokens, 3 * hidden) projection."""
    if triton_attention.can_fuse(qkv, previous_attention, heads):
        return triton_attention.attention_probs(qkv, previous_attention, heads, scaling)
    if use_kernels(qkv) and not needs_grad(qkv, previous_attention):
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


def _attention_context(attention_map: torch.Tensor, values: torch.Tensor, offset: int, heads: int) -> torch.Tensor:
    """The attention map times the values (columns `offset:` of `values`), in token layout (batch, tokens, hidden)."""
    if use_kernels(attention_map) and not needs_grad(attention_map, values):
        return torch.ops.refiner_hf.attention_context(attention_map, values, offset)
    batch_size, seq_len, width = values.shape
    hidden_size = width - offset
    value = values[..., offset:].view(batch_size, seq_len, heads, hidden_size // heads).transpose(1, 2)
    return (attention_map @ value).transpose(1, 2).reshape(batch_size, seq_len, hidden_size)


def layer_forward(
    layer: nn.Module, hidden_states: torch.Tensor, previous_attention: torch.Tensor | None
) -> tuple[torch.Tensor, torch.Tensor]:
    """`RefinerViTLayer.forward` in evaluation mode (drop path and dropout are the identity)."""
    r = layer.residual_scale
    attention_output, _, next_attention = layer.attention(
        _scaled_layer_norm(layer.layernorm_before, hidden_states, r), previous_attention
    )
    hidden_states = torch.add(hidden_states, attention_output, alpha=1.0 / r)
    mlp = layer.mlp
    hidden = mlp.activation_fn(mlp.fc1(_scaled_layer_norm(layer.layernorm_after, hidden_states, r)))
    # x + layer_scale * fc2(h) / r in one pass.
    return torch.addcmul(hidden_states, mlp.fc2(hidden), mlp.layer_scale / r), next_attention


def _scaled_layer_norm(norm: nn.LayerNorm, hidden_states: torch.Tensor, r: float) -> torch.Tensor:
    """`norm(hidden_states * r)`: LayerNorm is scale invariant except for its epsilon, which scales by 1 / r^2."""
    return F.layer_norm(hidden_states, norm.normalized_shape, norm.weight, norm.bias, norm.eps / (r * r))
