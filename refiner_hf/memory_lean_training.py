"""
Tensor helpers of memory-lean training, `RefinerViTPreTrainedModel.set_memory_lean_training()`. A training-mode
refinement (`RefinerViTRefiner.forward_memory_lean`) keeps only its input map for the backward pass instead of the
expanded intermediates (E times the size of the map, six of them in the reference). With a fused training kernel
(Triton on CUDA: `triton_refinement`; C++ on CPU: `cpu_kernels`) the forward and the backward are fused passes over
the map, and the kernel returns the batch statistics from which `refine_train_fused` updates the running statistics
as `nn.BatchNorm2d` does. Without one, the module checkpoints its own forward instead.
"""

from collections.abc import Sequence
from typing import NamedTuple

import torch
from torch import nn

# Imported by name: a model directory's copy of this code (remote code) carries only the files imported this way.
from .cpu_kernels import takes as cpu_kernels_take
from .triton_refinement import autocast_input, can_refine
from .triton_refinement import ops as triton_refinement_ops


class RefinementParameters(NamedTuple):
    """
    The trainable parameters of a refinement and its `adapt_bn`, shaped as the fused training ops take them
    (C = heads * expansion; the expansion's are `None` when there is none).
    """

    w_expand: torch.Tensor | None  # (C, heads)
    expand_weight: torch.Tensor | None  # (C,), the expansion's BatchNorm
    expand_bias: torch.Tensor | None
    w_depthwise: torch.Tensor  # (C, k, k)
    depthwise_weight: torch.Tensor
    depthwise_bias: torch.Tensor
    w_project: torch.Tensor  # (heads, C)
    project_weight: torch.Tensor
    project_bias: torch.Tensor
    adapt_weight: torch.Tensor  # (heads,)
    adapt_bias: torch.Tensor


def update_running_statistics(bn: nn.BatchNorm2d, mean: torch.Tensor, var: torch.Tensor, count: int) -> None:
    """What `nn.BatchNorm2d` does to its running statistics in a training forward, given the batch statistics."""
    if not bn.track_running_stats or bn.running_mean is None:
        return
    with torch.no_grad():
        bn.num_batches_tracked.add_(1)
        factor = 1.0 / float(bn.num_batches_tracked) if bn.momentum is None else bn.momentum
        unbiased = var * (count / max(count - 1, 1))
        bn.running_mean.lerp_(mean.to(bn.running_mean.dtype), factor)
        bn.running_var.lerp_(unbiased.to(bn.running_var.dtype), factor)


def refine_train_fused(
    attention_map: torch.Tensor,
    parameters: RefinementParameters,
    norms: Sequence[nn.BatchNorm2d | None],
    scale: float,
    padding: int,
) -> torch.Tensor | None:
    """
    `adapt_bn(refiner(attention_map)) * scale` in training mode as one fused op that keeps only `attention_map` for
    its backward, with the running statistics of `norms` (expansion, depthwise, projection and adapt BatchNorms)
    updated once; `None` where no kernel takes these maps. `padding` is the zero rows and columns before the map.
    """
    heads, channels, kernel_size = (
        attention_map.shape[1],
        parameters.w_depthwise.shape[0],
        parameters.w_depthwise.shape[-1],
    )
    if can_refine(attention_map, heads, channels, kernel_size):
        ops, x = triton_refinement_ops(), autocast_input(attention_map)
    elif cpu_kernels_take(attention_map):
        ops, x = torch.ops.refiner_hf, attention_map
    else:
        return None
    eps = [1e-5 if bn is None else float(bn.eps) for bn in norms]
    output, *stats = ops.refine_train(x.contiguous(), *parameters, eps, float(scale), padding)
    count = attention_map.numel() // heads
    for bn, mean_var in zip(norms, stats):
        if bn is not None:
            update_running_statistics(bn, mean_var[0], mean_var[1], count)
    return output
