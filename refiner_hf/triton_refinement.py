"""
The attention-map refinement as Triton kernels (`triton_refinement_kernels`), for CUDA tensors, registered as
`torch.ops.refiner_hf_triton.*` custom ops with the signatures of the C++ CPU ops (`cpu_kernels`), fake
implementations (so that `torch.compile` traces through them) and an autograd formula for the training op:

- `refine_eval`: the refinement with its BatchNorms, `adapt_bn` and the scale folded into the convolutions (by
  `RefinerViTRefiner.fold`), one pass over the maps;
- `refine_train`: the training forward with batch statistics, in four passes over the input, each recomputing what
  it needs from x without writing the expanded maps:
    1. statistics of y1 = W_e x (skipped without expansion); bn1 is then folded into W_e;
    2. statistics of y2 = dw(t1); bn2 folded into the depthwise weights;
    3. statistics of y3 = W_p t2, of x and their covariance; z = bn3(y3) + x has mean beta3 + mean(x) and variance
       a3^2 var(y3) + var(x) + 2 a3 cov(y3, x) (a3 = gamma3 / std3), which gives `adapt_bn`'s statistics;
    4. the output, every BatchNorm folded (the `refine_eval` kernel).
  It returns the output and each BatchNorm's batch mean and biased variance; the caller updates the running
  statistics from them exactly as `nn.BatchNorm2d` does (`memory_lean_training`). Only x is kept for the backward;
- `refine_train_backward`: the gradients, in four passes recomputing the forward from x and the saved statistics:
    B1. sums over the output gradient g and the normalised zhat, yhat3, which the BatchNorm backward of `adapt_bn`
        and bn3 needs;
    B2. gz = d loss / dz (also the residual's share of the input gradient), gy3, the projection's weight gradient,
        and gbn2 (the gradient at bn2's input side after ReLU6), written together with yhat2 to two transient
        expanded buffers, since the transposed depthwise convolution needs them at shifted positions;
    B3. gy2 from gbn2 and yhat2, the depthwise weight gradient and gt1 = dw^T(gy2); with expansion gbn1 (a third
        transient buffer), without it gt1 is added to the input gradient;
    B4. (with expansion) gy1, the expansion's weight gradient and the rest of the input gradient.
  The transients live only during the backward call: the memory kept between forward and backward is x.

Reductions (statistics, weight gradients) are computed per program over its tiles and combined on the host in
float64 in a fixed order, so results do not depend on scheduling. bfloat16 maps are computed with bfloat16
products and float32 accumulation (like autocast's convolutions, without rounding the intermediates); float32 maps
with exact float32 products. Under autocast the callers pass the map cast to bfloat16 (`autocast_input`), as the
reference's convolutions would.
"""

import contextlib
import math
from collections.abc import Iterator
from typing import NamedTuple

import torch

from .refinement_ops import (
    fake_refine_eval,
    fake_refine_train,
    fake_refine_train_backward,
    register_refine_train_autograd,
)
from .triton_support import (
    OpRegistration,
    interpreting,
    kernel_module,
    multiprocessor_count,
    next_power_of_2,
    runs_on,
)


NAMESPACE = "refiner_hf_triton"
KERNELS = "triton_refinement_kernels"
_OPS = ("refine_eval", "refine_train", "refine_train_backward")
BLOCK_C = 16  # expanded channels per chunk (the smallest tensor-core product side)
MAX_HEADS = 64
MAX_CHANNELS = 256
MAX_KERNEL = 9

_tiles: dict[str, tuple[int, int] | None] = {"shape": None}


# ---------------------------------------------------------------------------------------------------------------------
# When the Triton refinement runs.


def can_refine(attention_map: torch.Tensor, heads: int, channels: int, kernel_size: int) -> bool:
    """Whether the Triton refinement takes these maps (see `triton_support.runs_on`) and this shape of refinement."""
    if attention_map.ndim != 4 or not runs_on(attention_map):
        return False
    if not (heads <= MAX_HEADS and channels <= MAX_CHANNELS and 1 <= kernel_size <= MAX_KERNEL):
        return False
    return _registration.ensure()


def autocast_input(attention_map: torch.Tensor) -> torch.Tensor:
    """The map in the precision autocast would run the refinement's convolutions in (bfloat16 under bf16 autocast)."""
    device = attention_map.device.type
    if (
        attention_map.dtype == torch.float32
        and torch.is_autocast_enabled(device)
        and torch.get_autocast_dtype(device) == torch.bfloat16
    ):
        return attention_map.to(torch.bfloat16)
    return attention_map


def ops():
    """The `torch.ops.refiner_hf_triton` namespace (registered by `can_refine`)."""
    return getattr(torch.ops, NAMESPACE)


# ---------------------------------------------------------------------------------------------------------------------
# Launch geometry.


class _Geometry(NamedTuple):
    batch: int
    heads: int
    channels: int
    rows: int
    cols: int
    kernel: int
    padding: int
    has_expand: bool
    tiles: int
    programs: int
    meta: dict  # the kernels' compile-time arguments


def _geometry(x: torch.Tensor, channels: int, kernel: int, padding: int, has_expand: bool) -> _Geometry:
    batch, heads, rows, cols = x.shape
    if not has_expand and channels != heads:
        raise ValueError(
            f"Without expansion the depthwise convolution has one channel per head ({heads}), got {channels}."
        )
    if not 0 <= padding < kernel:
        raise ValueError(f"Padding {padding} does not fit a depthwise kernel of size {kernel}.")
    block_rows, block_cols = _tile_shape(rows, cols)
    tiles = batch * math.ceil(rows / block_rows) * math.ceil(cols / block_cols)
    programs = max(1, min(tiles, 4 * multiprocessor_count(x.device)))
    meta = {
        "K": kernel,
        "PAD": padding,
        "HAS_EXPAND": has_expand,
        "HP": max(16, next_power_of_2(heads)),
        "BLOCK_C": BLOCK_C,
        "BR": block_rows,
        "BC": block_cols,
        "LOW": x.dtype == torch.bfloat16,
        "EMULATE": interpreting(),
        # 8 warps: with 4, ptxas spills registers in most of these kernels (sm_90, 64-position tiles).
        "num_warps": 8,
    }
    return _Geometry(batch, heads, channels, rows, cols, kernel, padding, has_expand, tiles, programs, meta)


def _tile_shape(rows: int, cols: int) -> tuple[int, int]:
    if _tiles["shape"] is not None:
        return _tiles["shape"]
    if interpreting():
        # The interpreter's cost is per operation, not per element: one tile per map (up to 32 x 32) keeps it fast.
        block_cols = min(32, max(16, next_power_of_2(cols)))
        return min(32, next_power_of_2(rows)), block_cols
    # 64 positions: the smallest tensor-core product side times the 16-channel chunks keeps registers for the taps.
    block_cols = 32 if cols > 16 else 16
    return 64 // block_cols, block_cols


@contextlib.contextmanager
def tiling(rows: int, cols: int) -> Iterator[None]:
    """
    Uses tiles of `rows` x `cols` positions (powers of two; at least 16 positions on a GPU) inside the block, instead
    of the default (2 x 32 on a GPU): for tuning, and for tests that need maps split over several tiles.
    """
    if rows < 1 or cols < 1 or rows & (rows - 1) or cols & (cols - 1):
        raise ValueError(f"Tile sides must be powers of two, got {rows} x {cols}.")
    previous = _tiles["shape"]
    _tiles["shape"] = (rows, cols)
    try:
        yield
    finally:
        _tiles["shape"] = previous


def _with(meta: dict, *names: str, **extra) -> dict:
    """The compile-time arguments a kernel takes: those named, plus extra ones."""
    return {**{name: meta[name] for name in names}, **extra}


_TILE_META = ("HP", "BLOCK_C", "BR", "BC", "LOW", "EMULATE", "num_warps")
_CONV_META = ("K", "PAD", "HAS_EXPAND") + _TILE_META


def _float32(t: torch.Tensor, device: torch.device) -> torch.Tensor:
    return t.detach().to(device=device, dtype=torch.float32).contiguous()


def _combine(parts: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Mean and biased variance (float64) from per-program (count, mean, centred sum of squares), Chan et al."""
    count, mean, m2 = parts.double().unbind(1)
    total = count.sum(0)
    overall = (count * mean).sum(0) / total
    return overall, (m2.sum(0) + (count * (mean - overall) ** 2).sum(0)) / total


# ---------------------------------------------------------------------------------------------------------------------
# Inference.


def _refine_eval(x, w_expand, b_expand, w_depthwise, b_depthwise, w_project, b_project, residual_scale, padding):
    x = x.contiguous()
    device = x.device
    g = _geometry(x, w_depthwise.shape[0], w_depthwise.shape[-1], padding, w_expand is not None)
    out = torch.empty_like(x)
    _launch_folded(x, out, g, w_expand, b_expand, w_depthwise, b_depthwise, w_project, b_project, residual_scale,
                   device)  # fmt: skip
    return out


def _launch_folded(x, out, g, w_expand, b_expand, w_depthwise, b_depthwise, w_project, b_project, residual_scale,
                   device):  # fmt: skip
    wdw = _float32(w_depthwise, device)
    w1 = _float32(w_expand, device) if g.has_expand else wdw
    b1 = _float32(b_expand, device) if g.has_expand else wdw
    kernel_module(KERNELS).refine_folded_kernel[(g.tiles,)](
        x, out, w1, b1, wdw, _float32(b_depthwise, device), _float32(w_project, device), _float32(b_project, device),
        _float32(residual_scale, device), g.heads, g.channels, g.rows, g.cols, **_with(g.meta, *_CONV_META)
    )  # fmt: skip


# ---------------------------------------------------------------------------------------------------------------------
# Training forward.


def _invstd(var: torch.Tensor, eps: float) -> torch.Tensor:
    return torch.rsqrt(var.clamp_min(0.0) + eps)


def _stats_tensor(mean: torch.Tensor, var: torch.Tensor) -> torch.Tensor:
    return torch.stack((mean, var.clamp_min(0.0))).float()


def _refine_train(x, w_expand, bn1_weight, bn1_bias, w_depthwise, bn2_weight, bn2_bias, w_project, bn3_weight,
                  bn3_bias, bna_weight, bna_bias, eps, scale, padding):  # fmt: skip
    x = x.contiguous()
    device = x.device
    g = _geometry(x, w_depthwise.shape[0], w_depthwise.shape[-1], padding, w_expand is not None)
    kernels = kernel_module(KERNELS)
    H, C = g.heads, g.channels
    d64 = {"device": device, "dtype": torch.float64}
    wdw = w_depthwise.detach().to(**d64).reshape(C, -1)
    wp = w_project.detach().to(**d64)
    args = (H, C, g.rows, g.cols, g.tiles)

    # Pass 1: statistics of y1 = W_e x; bn1 folded into the expansion.
    w1f = b1f = _float32(wdw, device)  # placeholders without expansion
    stats1 = torch.empty(2, 0, device=device)
    if g.has_expand:
        we = w_expand.detach().to(**d64)
        parts = torch.empty(g.programs, 3, C, device=device)
        kernels.channel_stats_kernel[(g.programs,)](
            x, parts, _float32(we, device), w1f, w1f, *args, STAGE=1, **_with(g.meta, *_CONV_META)
        )
        mean1, var1 = _combine(parts)
        a1 = bn1_weight.detach().to(**d64) * _invstd(var1, eps[0])
        w1f = _float32(we * a1[:, None], device)
        b1f = _float32(bn1_bias.detach().to(**d64) - mean1 * a1, device)
        stats1 = _stats_tensor(mean1, var1)

    # Pass 2: statistics of y2 = dw(t1); bn2 folded into the depthwise convolution.
    parts = torch.empty(g.programs, 3, C, device=device)
    kernels.channel_stats_kernel[(g.programs,)](
        x, parts, w1f, b1f, _float32(wdw, device), *args, STAGE=2, **_with(g.meta, *_CONV_META)
    )
    mean2, var2 = _combine(parts)
    a2 = bn2_weight.detach().to(**d64) * _invstd(var2, eps[1])
    wdwf = _float32(wdw * a2[:, None], device)
    b2f = _float32(bn2_bias.detach().to(**d64) - mean2 * a2, device)

    # Pass 3: statistics of y3 = W_p t2 and of x, and their covariance, for bn3 and adapt_bn.
    parts = torch.empty(g.programs, 6, H, device=device)
    kernels.head_stats_kernel[(g.programs,)](
        x, parts, w1f, b1f, wdwf, b2f, _float32(wp, device), *args, **_with(g.meta, *_CONV_META)
    )
    mean3, var3 = _combine(parts[:, :3])
    mean_x, var_x = _combine(parts[:, [0, 3, 4]])
    count, my, _, mx, _, cxy = parts.double().unbind(1)
    cov = (cxy.sum(0) + (count * (my - mean3) * (mx - mean_x)).sum(0)) / count.sum(0)
    a3 = bn3_weight.detach().to(**d64) * _invstd(var3, eps[2])
    beta3 = bn3_bias.detach().to(**d64)
    mean_z = beta3 + mean_x
    var_z = (a3 * a3 * var3 + var_x + 2.0 * a3 * cov).clamp_min(0.0)
    ga = bna_weight.detach().to(**d64) * _invstd(var_z, eps[3])

    # Pass 4: out = scale * (ga * (a3 (W_p t2 - mean3) + beta3 + x - mean_z) + beta_a), every BatchNorm folded.
    out = torch.empty_like(x)
    _launch_folded(
        x, out, g, w1f if g.has_expand else None, b1f, wdwf, b2f, wp * (scale * ga * a3)[:, None],
        scale * (ga * (beta3 - a3 * mean3 - mean_z) + bna_bias.detach().to(**d64)), scale * ga, device,
    )  # fmt: skip
    return out, stats1, _stats_tensor(mean2, var2), _stats_tensor(mean3, var3), _stats_tensor(mean_z, var_z)


# ---------------------------------------------------------------------------------------------------------------------
# Training backward.


def _refine_train_backward(grad_out, x, w_expand, bn1_weight, bn1_bias, w_depthwise, bn2_weight, bn2_bias, w_project,
                           bn3_weight, bn3_bias, bna_weight, bna_bias, stats1, stats2, stats3, statsa, eps, scale,
                           padding):  # fmt: skip
    x = x.contiguous()
    grad_out = grad_out.to(x.dtype).contiguous()
    device = x.device
    g = _geometry(x, w_depthwise.shape[0], w_depthwise.shape[-1], padding, w_expand is not None)
    kernels = kernel_module(KERNELS)
    H, C, K = g.heads, g.channels, g.kernel
    n = float(g.batch * g.rows * g.cols)
    d64 = {"device": device, "dtype": torch.float64}
    wdw = w_depthwise.detach().to(**d64).reshape(C, -1)
    wp = w_project.detach().to(**d64)
    gamma2, beta2 = bn2_weight.detach().to(**d64), bn2_bias.detach().to(**d64)
    gamma3, beta3 = bn3_weight.detach().to(**d64), bn3_bias.detach().to(**d64)
    gamma_a = bna_weight.detach().to(**d64)
    mean2, var2 = stats2.to(**d64)
    mean3, var3 = stats3.to(**d64)
    mean_a, var_a = statsa.to(**d64)
    i2, i3, ia = _invstd(var2, eps[1]), _invstd(var3, eps[2]), _invstd(var_a, eps[3])
    args = (H, C, g.rows, g.cols, g.tiles)
    nprog = (g.programs,)

    # The forward's folded weights, for t1 and t2.
    w1f = b1f = n1 = nb1 = _float32(wdw, device)  # placeholders without expansion
    if g.has_expand:
        we = w_expand.detach().to(**d64)
        gamma1, beta1 = bn1_weight.detach().to(**d64), bn1_bias.detach().to(**d64)
        mean1, var1 = stats1.to(**d64)
        i1 = _invstd(var1, eps[0])
        w1f, b1f = _float32(we * (gamma1 * i1)[:, None], device), _float32(beta1 - mean1 * gamma1 * i1, device)
        n1, nb1 = _float32(we * i1[:, None], device), _float32(-mean1 * i1, device)
    a2 = gamma2 * i2
    wdwf, b2f = _float32(wdw * a2[:, None], device), _float32(beta2 - mean2 * a2, device)
    heads = _float32(torch.stack((mean3, i3, gamma3, beta3, mean_a, ia)), device)
    wp32 = _float32(wp, device)

    # B1: what adapt_bn's and bn3's backward need summed over the batch.
    sums = torch.empty(g.programs, 6, H, device=device)
    kernels.backward_sums_kernel[nprog](
        x, grad_out, sums, w1f, b1f, wdwf, b2f, wp32, heads, *args, **_with(g.meta, *_CONV_META)
    )
    s_g, s_gz, s_gy, s_zy, s_z, s_y = sums.double().sum(0)
    dbeta_a, dgamma_a = scale * s_g, scale * s_gz
    ka = gamma_a * ia
    dbeta3 = -ka * dgamma_a * s_z / n
    dgamma3 = ka * (scale * s_gy - dbeta_a * s_y / n - dgamma_a * s_zy / n)
    k3 = gamma3 * i3
    coef = _float32(
        torch.stack((ka * scale, ka * dbeta_a / n, ka * dgamma_a / n, k3, k3 * dbeta3 / n, k3 * dgamma3 / n)), device
    )

    # B2: gz (into grad_x), gy3, the projection's gradient, gbn2 and yhat2 (transient, expanded).
    grad_x = torch.empty(x.shape, device=device, dtype=torch.float32)
    yhat2 = torch.empty(g.batch, C, g.rows, g.cols, device=device, dtype=torch.float32)
    gbn2 = torch.empty_like(yhat2)
    sums2 = torch.empty(g.programs, 2, C, device=device)
    dwp = torch.empty(g.programs, H, C, device=device)
    kernels.backward_project_kernel[nprog](
        x, grad_out, grad_x, yhat2, gbn2, sums2, dwp, w1f, b1f, _float32(wdw * i2[:, None], device),
        _float32(-mean2 * i2, device), wp32, heads, coef, _float32(torch.stack((gamma2, beta2)), device), *args,
        **_with(g.meta, *_CONV_META, NCP=next_power_of_2(math.ceil(C / BLOCK_C))),
    )  # fmt: skip
    dbeta2, dgamma2 = sums2.double().sum(0)
    k2 = gamma2 * i2
    grad_wp = dwp.double().sum(0)

    # B3: the depthwise gradients; gbn1 (transient) or, without expansion, the rest of grad_x.
    gbn1 = torch.empty_like(yhat2) if g.has_expand else gbn2
    sums3 = torch.empty(g.programs, 2, C, device=device)
    dwdw = torch.empty(g.programs, C, K * K, device=device)
    chan3 = torch.stack((k2, k2 * dbeta2 / n, k2 * dgamma2 / n, *((gamma1, beta1) if g.has_expand else (k2, k2))))
    kernels.backward_depthwise_kernel[nprog](
        x, grad_x, yhat2, gbn2, gbn1, sums3, dwdw, w1f, b1f, _float32(wdw, device), n1, nb1,
        _float32(chan3, device), *args,
        **_with(g.meta, *_CONV_META, NCP=next_power_of_2(math.ceil(C / BLOCK_C)), KKP=next_power_of_2(K * K)),
    )  # fmt: skip
    del yhat2
    grad_wdw = dwdw.double().sum(0).reshape(C, K, K)

    # Distinct empty tensors without expansion: a custom op's outputs may not alias one another.
    grad_we, grad_gamma1, grad_beta1 = (torch.empty(0, device=device) for _ in range(3))
    if g.has_expand:
        # B4: the expansion's gradients and the rest of grad_x.
        dbeta1, dgamma1 = sums3.double().sum(0)
        k1 = gamma1 * i1
        dw1 = torch.empty(g.programs, C, H, device=device)
        kernels.backward_expand_kernel[nprog](
            x, grad_x, gbn1, dw1, _float32(we, device), n1, nb1,
            _float32(torch.stack((k1, k1 * dbeta1 / n, k1 * dgamma1 / n)), device), *args,
            **_with(g.meta, *_TILE_META, NCP=next_power_of_2(math.ceil(C / BLOCK_C))),
        )  # fmt: skip
        grad_we, grad_gamma1, grad_beta1 = dw1.double().sum(0).float(), dgamma1.float(), dbeta1.float()
    return [
        grad_x.to(x.dtype),
        grad_we,
        grad_gamma1,
        grad_beta1,
        grad_wdw.float(),
        dgamma2.float(),
        dbeta2.float(),
        grad_wp.float(),
        dgamma3.float(),
        dbeta3.float(),
        dgamma_a.float(),
        dbeta_a.float(),
    ]


# ---------------------------------------------------------------------------------------------------------------------
# Registration: custom ops, with the fake implementations and autograd formula shared with the C++ ops.


def _define_ops() -> None:
    Tensor, OptionalTensor = torch.Tensor, torch.Tensor | None

    def refine_eval(x: Tensor, w_expand: OptionalTensor, b_expand: OptionalTensor, w_depthwise: Tensor,
                    b_depthwise: Tensor, w_project: Tensor, b_project: Tensor, residual_scale: Tensor,
                    padding: int) -> Tensor:  # fmt: skip
        return _refine_eval(x, w_expand, b_expand, w_depthwise, b_depthwise, w_project, b_project, residual_scale,
                            padding)  # fmt: skip

    def refine_train(x: Tensor, w_expand: OptionalTensor, bn1_weight: OptionalTensor, bn1_bias: OptionalTensor,
                     w_depthwise: Tensor, bn2_weight: Tensor, bn2_bias: Tensor, w_project: Tensor,
                     bn3_weight: Tensor, bn3_bias: Tensor, bna_weight: Tensor, bna_bias: Tensor, eps: list[float],
                     scale: float, padding: int) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:  # fmt: skip
        return _refine_train(x, w_expand, bn1_weight, bn1_bias, w_depthwise, bn2_weight, bn2_bias, w_project,
                             bn3_weight, bn3_bias, bna_weight, bna_bias, eps, scale, padding)  # fmt: skip

    def refine_train_backward(grad_out: Tensor, x: Tensor, w_expand: OptionalTensor, bn1_weight: OptionalTensor,
                              bn1_bias: OptionalTensor, w_depthwise: Tensor, bn2_weight: Tensor, bn2_bias: Tensor,
                              w_project: Tensor, bn3_weight: Tensor, bn3_bias: Tensor, bna_weight: Tensor,
                              bna_bias: Tensor, stats1: Tensor, stats2: Tensor, stats3: Tensor, statsa: Tensor,
                              eps: list[float], scale: float, padding: int) -> list[Tensor]:  # fmt: skip
        return _refine_train_backward(grad_out, x, w_expand, bn1_weight, bn1_bias, w_depthwise, bn2_weight, bn2_bias,
                                      w_project, bn3_weight, bn3_bias, bna_weight, bna_bias, stats1, stats2, stats3,
                                      statsa, eps, scale, padding)  # fmt: skip

    fakes = {"refine_eval": fake_refine_eval, "refine_train": fake_refine_train,
             "refine_train_backward": fake_refine_train_backward}  # fmt: skip
    for fn in (refine_eval, refine_train, refine_train_backward):
        op = torch.library.custom_op(f"{NAMESPACE}::{fn.__name__}", fn, mutates_args=())
        op.register_fake(fakes[fn.__name__])
    register_refine_train_autograd(NAMESPACE)


_registration = OpRegistration(NAMESPACE, _OPS, KERNELS, _define_ops)
