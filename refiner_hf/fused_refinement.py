"""
Fast and memory-lean implementations of Refiner-ViT's attention-map refinement, `adapt_bn(refiner(A)) * scale`.

- Inference (`fold_refinement` + `refine_folded`): the four BatchNorms and the scale are folded into the three
  convolutions, which then run as one fused kernel (Triton on CUDA: `triton_refinement`; C++ on CPU:
  `cpu_kernels`) or, without one, as three `channels_last` convolutions with in-place activations.
- Training (`refine_memory_lean`): only the input map is kept for the backward pass; the expanded intermediates
  (E times the size of the map, six of them in the reference) are recomputed. With the fused kernels the forward
  and backward are fused passes over the map; without them an autograd function recomputes the reference ops.

Both give the reference module's results up to float rounding.
"""

from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import nn

from . import triton_refinement
from .cpu_kernels import kernels_available


class FoldedRefinement(NamedTuple):
    """
    The refinement with its BatchNorms folded in (C = heads * expansion):

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


def fold_refinement(refiner: nn.Module, adapt_bn: nn.BatchNorm2d, scale: float = 1.0) -> FoldedRefinement:
    """
    Folds `adapt_bn(refiner(x)) * scale` (evaluation mode) into a `FoldedRefinement`. Computed from the parameters
    on every call (a few thousand multiply-adds), so it never goes stale and stays differentiable.
    """
    w_expand = b_expand = None
    if refiner.expand_conv is not None:
        a1, c1 = batch_norm_scale_shift(refiner.expand_bn)
        w_expand = refiner.expand_conv.weight.flatten(1) * a1[:, None]
        b_expand = c1
    a2, c2 = batch_norm_scale_shift(refiner.depthwise_bn)
    w_depthwise = refiner.depthwise_conv.weight.flatten(0, 1) * a2[:, None, None]
    a3, c3 = batch_norm_scale_shift(refiner.project_bn)
    a_adapt, c_adapt = batch_norm_scale_shift(adapt_bn)
    # scale * adapt_bn(bn3(W_p t2) + x) = (scale a_adapt a3) W_p t2 + scale (a_adapt c3 + c_adapt) + scale a_adapt x
    residual_scale = a_adapt * scale
    w_project = refiner.project_conv.weight.flatten(1) * (residual_scale * a3)[:, None]
    b_project = (a_adapt * c3 + c_adapt) * scale
    return FoldedRefinement(
        w_expand, b_expand, w_depthwise, c2, w_project, b_project, residual_scale, tuple(refiner.padding)
    )


def needs_grad(*tensors: torch.Tensor | None) -> bool:
    """Whether autograd would record an operation on these tensors (the fused inference kernels have no backward)."""
    return torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in tensors)


def use_kernels(x: torch.Tensor) -> bool:
    """Whether the fused CPU kernels can take `x` (a float32/bfloat16 CPU tensor, kernels built)."""
    return x.device.type == "cpu" and x.dtype in (torch.float32, torch.bfloat16) and kernels_available()


def _triton_takes(attention_map: torch.Tensor, w_depthwise: torch.Tensor) -> bool:
    heads, kernel_size = attention_map.shape[1], w_depthwise.shape[-1]
    return triton_refinement.can_refine(attention_map, heads, w_depthwise.shape[0], kernel_size)


def refine_folded(attention_map: torch.Tensor, folded: FoldedRefinement) -> torch.Tensor:
    """Applies a folded refinement to maps of shape (batch, heads, rows, cols); returns a contiguous tensor."""
    if _triton_takes(attention_map, folded.w_depthwise) and not needs_grad(attention_map, *folded[:-1]):
        return triton_refinement.ops().refine_eval(
            triton_refinement.autocast_input(attention_map), *folded[:-1], folded.padding[0]
        )
    if use_kernels(attention_map) and not needs_grad(attention_map, *folded[:-1]):
        return torch.ops.refiner_hf.refine_eval(
            attention_map,
            folded.w_expand,
            folded.b_expand,
            folded.w_depthwise.contiguous(),
            folded.b_depthwise,
            folded.w_project.contiguous(),
            folded.b_project,
            folded.residual_scale,
            folded.padding[0],
        )
    return _refine_folded_torch(attention_map, folded)


def _refine_folded_torch(attention_map: torch.Tensor, folded: FoldedRefinement) -> torch.Tensor:
    # channels_last makes the depthwise convolution about twice as fast and the 1x1 ones plain matrix products.
    x = attention_map.contiguous(memory_format=torch.channels_last)
    dtype = x.dtype
    hidden = x
    if folded.w_expand is not None:
        hidden = F.conv2d(x, folded.w_expand[:, :, None, None].to(dtype), folded.b_expand.to(dtype))
        hidden = F.hardtanh(hidden, 0.0, 6.0, inplace=True)
    before, after = folded.padding
    if before == after:
        padding = before
    else:  # even kernels: more zeros after than before, which conv2d's padding cannot express
        hidden = F.pad(hidden, (before, after, before, after))
        padding = 0
    channels = folded.w_depthwise.shape[0]
    hidden = F.conv2d(
        hidden, folded.w_depthwise[:, None].to(dtype), folded.b_depthwise.to(dtype), padding=padding, groups=channels
    )
    hidden = F.hardtanh(hidden, 0.0, 6.0, inplace=True)
    out = F.conv2d(hidden, folded.w_project[:, :, None, None].to(dtype), folded.b_project.to(dtype))
    out = torch.addcmul(out, x, folded.residual_scale.to(dtype)[:, None, None])
    return out.contiguous()


# ---------------------------------------------------------------------------------------------------------------------
# Training.


def _update_running_statistics(bn: nn.BatchNorm2d, mean: torch.Tensor, var: torch.Tensor, count: int) -> None:
    """What `nn.BatchNorm2d` does to its running statistics in a training forward, given the batch statistics."""
    if not bn.track_running_stats or bn.running_mean is None:
        return
    with torch.no_grad():
        bn.num_batches_tracked.add_(1)
        factor = 1.0 / float(bn.num_batches_tracked) if bn.momentum is None else bn.momentum
        unbiased = var * (count / max(count - 1, 1))
        bn.running_mean.lerp_(mean.to(bn.running_mean.dtype), factor)
        bn.running_var.lerp_(unbiased.to(bn.running_var.dtype), factor)


def _batch_norm(x: torch.Tensor, bn: nn.BatchNorm2d, update_statistics: bool) -> torch.Tensor:
    """`bn` in training mode; without `update_statistics`, its running statistics are left alone."""
    if not update_statistics:
        return F.batch_norm(x, None, None, bn.weight, bn.bias, True, 0.0, bn.eps)
    return bn(x)


def _refine_reference(
    x: torch.Tensor, refiner: nn.Module, adapt_bn: nn.BatchNorm2d, scale: float, update_statistics: bool
) -> torch.Tensor:
    """The reference module's computation in training mode (BatchNorms with batch statistics)."""
    hidden = x
    if refiner.expand_conv is not None:
        hidden = F.relu6(_batch_norm(refiner.expand_conv(hidden), refiner.expand_bn, update_statistics))
    if refiner.pad_input:
        hidden = F.pad(hidden, (refiner.padding[0], refiner.padding[1], refiner.padding[0], refiner.padding[1]))
    hidden = F.relu6(_batch_norm(refiner.depthwise_conv(hidden), refiner.depthwise_bn, update_statistics))
    hidden = _batch_norm(refiner.project_conv(hidden), refiner.project_bn, update_statistics) + x
    return _batch_norm(hidden, adapt_bn, update_statistics) * scale


class _RecomputedRefinement(torch.autograd.Function):
    """
    The PyTorch fallback of the memory-lean refinement: the forward runs without recording a graph (updating the
    running statistics once), the backward reruns it with a graph, without touching them, and differentiates it.
    """

    @staticmethod
    def forward(ctx, x, refiner, adapt_bn, scale, *params):
        ctx.refiner, ctx.adapt_bn, ctx.scale = refiner, adapt_bn, scale
        # The recomputation must run under the same autocast state as this forward.
        device = x.device.type
        ctx.autocast = (device, torch.is_autocast_enabled(device), torch.get_autocast_dtype(device))
        ctx.save_for_backward(x, *params)
        with torch.no_grad():
            return _refine_reference(x, refiner, adapt_bn, scale, update_statistics=True)

    @staticmethod
    def backward(ctx, grad_output):
        x, *params = ctx.saved_tensors
        inputs = [t for t in (x, *params) if t.requires_grad]
        device, autocast, dtype = ctx.autocast
        with torch.enable_grad(), torch.autocast(device, dtype=dtype, enabled=autocast):
            x_again = x.detach().requires_grad_(x.requires_grad)
            if x.requires_grad:
                inputs[0] = x_again
            output = _refine_reference(x_again, ctx.refiner, ctx.adapt_bn, ctx.scale, update_statistics=False)
            grads = iter(torch.autograd.grad(output, inputs, grad_output, allow_unused=True))
        return (
            next(grads) if x.requires_grad else None,
            None,
            None,
            None,
            *(next(grads) if p.requires_grad else None for p in params),
        )


def _batch_norms(refiner: nn.Module, adapt_bn: nn.BatchNorm2d) -> list[nn.BatchNorm2d | None]:
    return [refiner.expand_bn, refiner.depthwise_bn, refiner.project_bn, adapt_bn]


def refine_memory_lean(
    attention_map: torch.Tensor, refiner: nn.Module, adapt_bn: nn.BatchNorm2d, scale: float = 1.0
) -> torch.Tensor:
    """
    `adapt_bn(refiner(attention_map)) * scale` in training mode (batch statistics, running statistics updated once)
    keeping only `attention_map` for the backward pass. The gradients are the reference's up to float rounding.
    """
    norms = _batch_norms(refiner, adapt_bn)
    if not all(bn is None or bn.training for bn in norms) or any(isinstance(bn, nn.SyncBatchNorm) for bn in norms):
        # A BatchNorm frozen in evaluation mode inside a training model, or a SyncBatchNorm (its statistics span
        # processes; only its own forward and backward compute them): keep the reference computation.
        return adapt_bn(refiner(attention_map)) * scale
    if _triton_takes(attention_map, refiner.depthwise_conv.weight):
        x = triton_refinement.autocast_input(attention_map)
        return _refine_memory_lean_kernels(x, refiner, adapt_bn, scale, triton_refinement.ops())
    if use_kernels(attention_map):
        return _refine_memory_lean_kernels(attention_map, refiner, adapt_bn, scale, torch.ops.refiner_hf)
    params = [p for m in (refiner, adapt_bn) for p in m.parameters()]
    return _RecomputedRefinement.apply(attention_map, refiner, adapt_bn, scale, *params)


def _refine_memory_lean_kernels(
    attention_map: torch.Tensor, refiner: nn.Module, adapt_bn: nn.BatchNorm2d, scale: float, ops
) -> torch.Tensor:
    """The fused training op of `ops` (the C++ `torch.ops.refiner_hf` or the Triton `torch.ops.refiner_hf_triton`:
    same signature) and the running statistics updated from the batch statistics it returns."""
    expand = refiner.expand_conv is not None
    norms = _batch_norms(refiner, adapt_bn)
    output, *stats = ops.refine_train(
        attention_map.contiguous(),
        refiner.expand_conv.weight.flatten(1) if expand else None,
        refiner.expand_bn.weight if expand else None,
        refiner.expand_bn.bias if expand else None,
        refiner.depthwise_conv.weight.flatten(0, 1),
        refiner.depthwise_bn.weight,
        refiner.depthwise_bn.bias,
        refiner.project_conv.weight.flatten(1),
        refiner.project_bn.weight,
        refiner.project_bn.bias,
        adapt_bn.weight,
        adapt_bn.bias,
        [1e-5 if bn is None else float(bn.eps) for bn in norms],
        float(scale),
        refiner.padding[0],
    )
    count = attention_map.numel() // attention_map.shape[1]
    for bn, mean_var in zip(norms, stats):
        if bn is not None:
            _update_running_statistics(bn, mean_var[0], mean_var[1], count)
    return output
