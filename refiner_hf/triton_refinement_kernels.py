"""
Triton kernels of Refiner-ViT's attention-map refinement (launched by `triton_refinement`; never imported directly,
so that nothing needs Triton where it is not installed).

The refinement treats a (B, H, M, W) stack of attention maps as an H-channel image:

    t1 = relu6(bn1(W_e x))     (C = H * E channels; t1 = x when E = 1)
    t2 = relu6(bn2(dw(t1)))    (k x k depthwise, PAD zero rows/columns before the map, k - 1 - PAD after)
    out = scale * bna(bn3(W_p t2) + x)

Every kernel works on tiles of BR x BC positions of one map and on all its channels, the expanded ones in chunks
of BLOCK_C. The depthwise convolution needs t1 at k * k shifted positions; rather than exchanging a halo between
threads, each tap reloads the (cached) input at the shifted positions and recomputes the expansion there: a
(positions x H) @ (H x BLOCK_C) product on the tensor cores, cheap next to the memory traffic it saves. So the
expanded maps t1, t2 (and their pre-activations) never leave registers; only x, the output and a few per-channel
numbers go through memory.

Kernels, with the BatchNorms folded by the caller into the weights they follow:

- `refine_folded_kernel`: one pass writing the output (inference, and the training forward's last pass);
- `channel_stats_kernel`, `head_stats_kernel`: the training forward's statistics passes (1: y1 = W_e x; 2: y2 =
  dw(t1); 3: y3 = W_p t2, x and their covariance, from which the caller gets bna's statistics without another
  pass). Each program folds its tiles' mean and centred sum of squares into running ones (Chan et al.'s pairwise
  update), so the variance keeps its precision when |mean| >> std, and writes them once; the caller combines the
  programs' results in float64, in a fixed order;
- `backward_sums_kernel`, `backward_project_kernel`, `backward_depthwise_kernel`, `backward_expand_kernel`: the
  backward passes B1-B4 (see `triton_refinement`), recomputing the forward from x.

Only Triton's builtins and the kernels' own helpers are called (`tl.reduce` with the standard combine function,
not `tl.sum`; `tl.full`, not `tl.zeros`): the standard library's helpers are JIT functions decorated when Triton is
imported, which its CPU interpreter cannot call unless it was on then, and the tests turn it on per test.

Products: `_mm` multiplies in bfloat16 with float32 accumulation when LOW (bfloat16 maps), else in exact float32.
Under Triton's CPU interpreter (EMULATE) the bfloat16 operands are rounded and multiplied in float32, which gives
the same products (the interpreter multiplies bfloat16 bit patterns as integers).
"""

import triton
import triton.language as tl


@triton.jit
def _sum(x, axis: tl.constexpr):
    return tl.reduce(x, axis, tl.standard._sum_combine)


@triton.jit
def _relu6(x):
    return tl.minimum(tl.maximum(x, 0.0), 6.0)


@triton.jit
def _mm(a, b, LOW: tl.constexpr, EMULATE: tl.constexpr):
    if LOW:
        if EMULATE:
            out = tl.dot(a.to(tl.bfloat16).to(tl.float32), b.to(tl.bfloat16).to(tl.float32), input_precision="ieee")
        else:
            out = tl.dot(a.to(tl.bfloat16), b.to(tl.bfloat16))
    else:
        out = tl.dot(a.to(tl.float32), b.to(tl.float32), input_precision="ieee")
    return out


@triton.jit
def _tile(t, M, W, BR: tl.constexpr, BC: tl.constexpr):
    """Image, rows, columns and in-map flags of the BR x BC positions of tile t (tiles numbered image by image)."""
    tiles_c = (W + BC - 1) // BC
    per_image = (M + BR - 1) // BR * tiles_c
    b = t // per_image
    rest = t % per_image
    p = tl.arange(0, BR * BC)
    rows = (rest // tiles_c) * BR + p // BC
    cols = (rest % tiles_c) * BC + p % BC
    return b, rows, cols, (rows < M) & (cols < W)


@triton.jit
def _offsets(b, first, channels, rows, cols, M, W, WIDTH: tl.constexpr):
    """Element offsets of channels first .. first + WIDTH - 1 at (rows, cols) of image b in a (B, channels, M, W)
    tensor: (positions, WIDTH), in int64 (expanded buffers of large batches pass 2**31 elements)."""
    ch = first + tl.arange(0, WIDTH)
    return (b * channels + ch[None, :]).to(tl.int64) * (M * W) + (rows * W + cols)[:, None]


@triton.jit
def _load_maps(ptr, b, first, count, channels, rows, cols, M, W, WIDTH: tl.constexpr):
    """(positions, WIDTH) float32 values of channels first.. (those < count) at (rows, cols), zero outside the map,
    and which positions are inside it."""
    ch = first + tl.arange(0, WIDTH)
    valid = (rows >= 0) & (rows < M) & (cols >= 0) & (cols < W)
    mask = valid[:, None] & (ch < count)[None, :]
    values = tl.load(ptr + _offsets(b, first, channels, rows, cols, M, W, WIDTH), mask=mask, other=0.0)
    return values.to(tl.float32), valid


@triton.jit
def _store_maps(ptr, values, b, first, count, channels, rows, cols, inside, M, W, WIDTH: tl.constexpr):
    ch = first + tl.arange(0, WIDTH)
    mask = inside[:, None] & (ch < count)[None, :]
    tl.store(ptr + _offsets(b, first, channels, rows, cols, M, W, WIDTH), values.to(ptr.dtype.element_ty), mask=mask)


@triton.jit
def _vector(ptr, first, count, WIDTH: tl.constexpr):
    i = first + tl.arange(0, WIDTH)
    return tl.load(ptr + i, mask=i < count, other=0.0).to(tl.float32)


@triton.jit
def _matrix(ptr, row0, rows, col0, cols, row_stride, R: tl.constexpr, S: tl.constexpr):
    """The (R, S) block [row0:, col0:] of a row-major matrix, zero outside its (rows, cols)."""
    r = row0 + tl.arange(0, R)
    s = col0 + tl.arange(0, S)
    mask = (r < rows)[:, None] & (s < cols)[None, :]
    return tl.load(ptr + r[:, None] * row_stride + s[None, :], mask=mask, other=0.0).to(tl.float32)


@triton.jit
def _matrix_t(ptr, row0, rows, col0, cols, row_stride, R: tl.constexpr, S: tl.constexpr):
    """The transpose of the (S, R) block [col0:, row0:] of a row-major matrix with `row_stride` columns: (R, S)."""
    r = row0 + tl.arange(0, R)
    s = col0 + tl.arange(0, S)
    mask = (r < rows)[:, None] & (s < cols)[None, :]
    return tl.load(ptr + s[None, :] * row_stride + r[:, None], mask=mask, other=0.0).to(tl.float32)


@triton.jit
def _t1(x_ptr, w1t, b1, b, rows, cols, c0, H, C, M, W,
        HAS_EXPAND: tl.constexpr, HP: tl.constexpr, BLOCK_C: tl.constexpr, LOW: tl.constexpr,
        EMULATE: tl.constexpr):  # fmt: skip
    """t1 = relu6(w1t^T x + b1) for channels c0.. at (rows, cols) (x itself without expansion), zero outside."""
    if HAS_EXPAND:
        xs, valid = _load_maps(x_ptr, b, 0, H, H, rows, cols, M, W, HP)
        t = tl.where(valid[:, None], _relu6(_mm(xs, w1t, LOW, EMULATE) + b1[None, :]), 0.0)
    else:
        t, valid = _load_maps(x_ptr, b, c0, C, H, rows, cols, M, W, BLOCK_C)
    return t


@triton.jit
def _depthwise(x_ptr, w1t, b1, wdw_ptr, b, rows, cols, c0, H, C, M, W,
               K: tl.constexpr, PAD: tl.constexpr, HAS_EXPAND: tl.constexpr, HP: tl.constexpr,
               BLOCK_C: tl.constexpr, BP: tl.constexpr, LOW: tl.constexpr, EMULATE: tl.constexpr):  # fmt: skip
    """sum over the k x k taps of wdw[c, dy, dx] * t1(row + dy - PAD, col + dx - PAD), channels c0.. (no bias)."""
    ch = c0 + tl.arange(0, BLOCK_C)
    acc = tl.full([BP, BLOCK_C], 0.0, tl.float32)
    for dy in tl.static_range(K):
        for dx in tl.static_range(K):
            t = _t1(x_ptr, w1t, b1, b, rows + (dy - PAD), cols + (dx - PAD), c0, H, C, M, W, HAS_EXPAND, HP, BLOCK_C,
                    LOW, EMULATE)  # fmt: skip
            w = tl.load(wdw_ptr + ch * (K * K) + (dy * K + dx), mask=ch < C, other=0.0)
            acc += t * w[None, :]
    return acc


@triton.jit
def _expansion(w1_ptr, b1_ptr, c0, H, C, HAS_EXPAND: tl.constexpr, HP: tl.constexpr, BLOCK_C: tl.constexpr):
    """The expansion's transposed weights (HP, BLOCK_C) and bias for channels c0.. (zeros without expansion)."""
    if HAS_EXPAND:
        w1t = _matrix_t(w1_ptr, 0, H, c0, C, H, HP, BLOCK_C)
        b1 = _vector(b1_ptr, c0, C, BLOCK_C)
    else:
        w1t = tl.full([HP, BLOCK_C], 0.0, tl.float32)
        b1 = tl.full([BLOCK_C], 0.0, tl.float32)
    return w1t, b1


@triton.jit
def _merge(n, mean, m2, y, inside):
    """Chan et al.'s update of running (count, mean, centred sum of squares) per column with the inside rows of y."""
    tile_n = _sum(inside.to(tl.float32), 0)
    tile_mean = _sum(tl.where(inside[:, None], y, 0.0), 0) / tl.maximum(tile_n, 1.0)
    d = tl.where(inside[:, None], y - tile_mean[None, :], 0.0)
    total = n + tile_n
    share = tile_n / tl.maximum(total, 1.0)
    delta = tile_mean - mean
    return total, mean + delta * share, m2 + _sum(d * d, 0) + delta * delta * n * share


@triton.jit
def _merge_pair(n, my, m2y, mx, m2x, cxy, y, x, inside):
    """`_merge` of y and x together, with their centred sum of cross products."""
    tile_n = _sum(inside.to(tl.float32), 0)
    tile_my = _sum(tl.where(inside[:, None], y, 0.0), 0) / tl.maximum(tile_n, 1.0)
    tile_mx = _sum(tl.where(inside[:, None], x, 0.0), 0) / tl.maximum(tile_n, 1.0)
    dy = tl.where(inside[:, None], y - tile_my[None, :], 0.0)
    dx = tl.where(inside[:, None], x - tile_mx[None, :], 0.0)
    total = n + tile_n
    share = tile_n / tl.maximum(total, 1.0)
    ey = tile_my - my
    ex = tile_mx - mx
    m2y = m2y + _sum(dy * dy, 0) + ey * ey * n * share
    m2x = m2x + _sum(dx * dx, 0) + ex * ex * n * share
    cxy = cxy + _sum(dy * dx, 0) + ey * ex * n * share
    return total, my + ey * share, m2y, mx + ex * share, m2x, cxy


@triton.jit
def _store_head_rows(out_ptr, H, HP: tl.constexpr, r0, r1, r2, r3, r4, r5):
    """Six per-head vectors as consecutive rows of H floats (a program's partial statistics or sums)."""
    h = tl.arange(0, HP)
    mask = h < H
    tl.store(out_ptr + h, r0, mask=mask)
    tl.store(out_ptr + H + h, r1, mask=mask)
    tl.store(out_ptr + 2 * H + h, r2, mask=mask)
    tl.store(out_ptr + 3 * H + h, r3, mask=mask)
    tl.store(out_ptr + 4 * H + h, r4, mask=mask)
    tl.store(out_ptr + 5 * H + h, r5, mask=mask)


@triton.jit
def _projection(x_ptr, w1_ptr, b1_ptr, wdw_ptr, bdw_ptr, wp_ptr, b, rows, cols, H, C, M, W,
                K: tl.constexpr, PAD: tl.constexpr, HAS_EXPAND: tl.constexpr, HP: tl.constexpr,
                BLOCK_C: tl.constexpr, BP: tl.constexpr, LOW: tl.constexpr, EMULATE: tl.constexpr):  # fmt: skip
    """wp relu6(dw(t1) + bdw) for a tile's BP positions (t1 = relu6(w1 x + b1)), over the channels in chunks: the
    projection every pass that needs it recomputes from x."""
    acc = tl.full([BP, HP], 0.0, tl.float32)
    for c0 in range(0, C, BLOCK_C):
        w1t, b1 = _expansion(w1_ptr, b1_ptr, c0, H, C, HAS_EXPAND, HP, BLOCK_C)
        y2 = _depthwise(x_ptr, w1t, b1, wdw_ptr, b, rows, cols, c0, H, C, M, W, K, PAD, HAS_EXPAND, HP, BLOCK_C,
                        BP, LOW, EMULATE)  # fmt: skip
        t2 = _relu6(y2 + _vector(bdw_ptr, c0, C, BLOCK_C)[None, :])
        acc += _mm(t2, _matrix_t(wp_ptr, c0, C, 0, H, C, BLOCK_C, HP), LOW, EMULATE)
    return acc


# ---------------------------------------------------------------------------------------------------------------------
# Forward.


@triton.jit
def refine_folded_kernel(x_ptr, out_ptr, w1_ptr, b1_ptr, wdw_ptr, bdw_ptr, wp_ptr, bp_ptr, rs_ptr, H, C, M, W,
                         K: tl.constexpr, PAD: tl.constexpr, HAS_EXPAND: tl.constexpr, HP: tl.constexpr,
                         BLOCK_C: tl.constexpr, BR: tl.constexpr, BC: tl.constexpr, LOW: tl.constexpr,
                         EMULATE: tl.constexpr):  # fmt: skip
    """out = wp relu6(dw(t1) + bdw) + bp + rs * x with t1 = relu6(w1 x + b1): one tile per program."""
    b, rows, cols, inside = _tile(tl.program_id(0), M, W, BR, BC)
    acc = _projection(x_ptr, w1_ptr, b1_ptr, wdw_ptr, bdw_ptr, wp_ptr, b, rows, cols, H, C, M, W, K, PAD, HAS_EXPAND,
                      HP, BLOCK_C, BR * BC, LOW, EMULATE)  # fmt: skip
    xc, _ = _load_maps(x_ptr, b, 0, H, H, rows, cols, M, W, HP)
    out = acc + _vector(bp_ptr, 0, H, HP)[None, :] + _vector(rs_ptr, 0, H, HP)[None, :] * xc
    _store_maps(out_ptr, out, b, 0, H, H, rows, cols, inside, M, W, HP)


@triton.jit
def channel_stats_kernel(x_ptr, stats_ptr, w1_ptr, b1_ptr, wdw_ptr, H, C, M, W, num_tiles,
                         STAGE: tl.constexpr, K: tl.constexpr, PAD: tl.constexpr, HAS_EXPAND: tl.constexpr,
                         HP: tl.constexpr, BLOCK_C: tl.constexpr, BR: tl.constexpr, BC: tl.constexpr,
                         LOW: tl.constexpr, EMULATE: tl.constexpr):  # fmt: skip
    """
    Per-program (count, mean, centred sum of squares) of each expanded channel, over the program's tiles, into
    stats[program, 0:3, C]. STAGE 1: y1 = w1 x (the raw expansion; w1_ptr only). STAGE 2: y2 = dw(t1) with the raw
    depthwise weights and t1 = relu6(w1 x + b1) (w1, b1 folded with bn1's batch statistics).
    """
    pid = tl.program_id(0)
    programs = tl.num_programs(0)
    for c0 in range(0, C, BLOCK_C):
        ch = c0 + tl.arange(0, BLOCK_C)
        w1t, b1 = _expansion(w1_ptr, b1_ptr, c0, H, C, HAS_EXPAND, HP, BLOCK_C)
        n = tl.full([BLOCK_C], 0.0, tl.float32)
        mean = tl.full([BLOCK_C], 0.0, tl.float32)
        m2 = tl.full([BLOCK_C], 0.0, tl.float32)
        for t in range(pid, num_tiles, programs):
            b, rows, cols, inside = _tile(t, M, W, BR, BC)
            if STAGE == 1:
                xs, _ = _load_maps(x_ptr, b, 0, H, H, rows, cols, M, W, HP)
                y = _mm(xs, w1t, LOW, EMULATE)
            else:
                y = _depthwise(x_ptr, w1t, b1, wdw_ptr, b, rows, cols, c0, H, C, M, W, K, PAD, HAS_EXPAND, HP,
                               BLOCK_C, BR * BC, LOW, EMULATE)  # fmt: skip
            n, mean, m2 = _merge(n, mean, m2, y, inside)
        out = stats_ptr + pid * 3 * C + ch
        tl.store(out, n, mask=ch < C)
        tl.store(out + C, mean, mask=ch < C)
        tl.store(out + 2 * C, m2, mask=ch < C)


@triton.jit
def head_stats_kernel(x_ptr, stats_ptr, w1_ptr, b1_ptr, wdw_ptr, bdw_ptr, wp_ptr, H, C, M, W, num_tiles,
                      K: tl.constexpr, PAD: tl.constexpr, HAS_EXPAND: tl.constexpr, HP: tl.constexpr,
                      BLOCK_C: tl.constexpr, BR: tl.constexpr, BC: tl.constexpr, LOW: tl.constexpr,
                      EMULATE: tl.constexpr):  # fmt: skip
    """
    STAGE 3: per-program count, mean and centred sum of squares of y3 = wp t2 (raw projection; t2 = relu6(dw(t1) +
    bdw) folded with bn1 and bn2) and of x, per head, and their centred cross sum, into stats[program, 0:6, H].
    """
    pid = tl.program_id(0)
    programs = tl.num_programs(0)
    n = tl.full([HP], 0.0, tl.float32)
    my = tl.full([HP], 0.0, tl.float32)
    m2y = tl.full([HP], 0.0, tl.float32)
    mx = tl.full([HP], 0.0, tl.float32)
    m2x = tl.full([HP], 0.0, tl.float32)
    cxy = tl.full([HP], 0.0, tl.float32)
    for t in range(pid, num_tiles, programs):
        b, rows, cols, inside = _tile(t, M, W, BR, BC)
        y3 = _projection(x_ptr, w1_ptr, b1_ptr, wdw_ptr, bdw_ptr, wp_ptr, b, rows, cols, H, C, M, W, K, PAD,
                         HAS_EXPAND, HP, BLOCK_C, BR * BC, LOW, EMULATE)  # fmt: skip
        xc, _ = _load_maps(x_ptr, b, 0, H, H, rows, cols, M, W, HP)
        n, my, m2y, mx, m2x, cxy = _merge_pair(n, my, m2y, mx, m2x, cxy, y3, xc, inside)
    _store_head_rows(stats_ptr + pid * 6 * H, H, HP, n, my, m2y, mx, m2x, cxy)


# ---------------------------------------------------------------------------------------------------------------------
# Backward. Per-head constants (rows of H floats): `heads` = mean3, invstd3, gamma3, beta3, mean_a, invstd_a;
# `coef` = A, B, C, D, E, F with gz = A g - B - C zhat and gy3 = D gz - E - F yhat3. Per-channel ones: `chan` (rows of
# C floats) as each kernel says.


@triton.jit
def _head_normals(y3, xc, heads_ptr, H, HP: tl.constexpr):
    """yhat3 = (y3 - mean3) invstd3 and zhat = (gamma3 yhat3 + beta3 + x - mean_a) invstd_a."""
    yhat3 = (y3 - _vector(heads_ptr, 0, H, HP)[None, :]) * _vector(heads_ptr + H, 0, H, HP)[None, :]
    z = yhat3 * _vector(heads_ptr + 2 * H, 0, H, HP)[None, :] + _vector(heads_ptr + 3 * H, 0, H, HP)[None, :] + xc
    zhat = (z - _vector(heads_ptr + 4 * H, 0, H, HP)[None, :]) * _vector(heads_ptr + 5 * H, 0, H, HP)[None, :]
    return yhat3, zhat


@triton.jit
def backward_sums_kernel(x_ptr, g_ptr, sums_ptr, w1_ptr, b1_ptr, wdw_ptr, bdw_ptr, wp_ptr, heads_ptr,
                         H, C, M, W, num_tiles,
                         K: tl.constexpr, PAD: tl.constexpr, HAS_EXPAND: tl.constexpr, HP: tl.constexpr,
                         BLOCK_C: tl.constexpr, BR: tl.constexpr, BC: tl.constexpr, LOW: tl.constexpr,
                         EMULATE: tl.constexpr):  # fmt: skip
    """B1: per-program sums of g, g zhat, g yhat3, zhat yhat3, zhat and yhat3 per head into sums[program, 0:6, H]
    (w1, b1, wdw, bdw folded with the batch statistics; wp raw)."""
    pid = tl.program_id(0)
    programs = tl.num_programs(0)
    s_g = tl.full([HP], 0.0, tl.float32)
    s_gz = tl.full([HP], 0.0, tl.float32)
    s_gy = tl.full([HP], 0.0, tl.float32)
    s_zy = tl.full([HP], 0.0, tl.float32)
    s_z = tl.full([HP], 0.0, tl.float32)
    s_y = tl.full([HP], 0.0, tl.float32)
    for t in range(pid, num_tiles, programs):
        b, rows, cols, inside = _tile(t, M, W, BR, BC)
        y3 = _projection(x_ptr, w1_ptr, b1_ptr, wdw_ptr, bdw_ptr, wp_ptr, b, rows, cols, H, C, M, W, K, PAD,
                         HAS_EXPAND, HP, BLOCK_C, BR * BC, LOW, EMULATE)  # fmt: skip
        xc, _ = _load_maps(x_ptr, b, 0, H, H, rows, cols, M, W, HP)
        g, _ = _load_maps(g_ptr, b, 0, H, H, rows, cols, M, W, HP)
        yhat3, zhat = _head_normals(y3, xc, heads_ptr, H, HP)
        keep = inside[:, None]
        yhat3 = tl.where(keep, yhat3, 0.0)
        zhat = tl.where(keep, zhat, 0.0)
        g = tl.where(keep, g, 0.0)
        s_g += _sum(g, 0)
        s_gz += _sum(g * zhat, 0)
        s_gy += _sum(g * yhat3, 0)
        s_zy += _sum(zhat * yhat3, 0)
        s_z += _sum(zhat, 0)
        s_y += _sum(yhat3, 0)
    _store_head_rows(sums_ptr + pid * 6 * H, H, HP, s_g, s_gz, s_gy, s_zy, s_z, s_y)


@triton.jit
def backward_project_kernel(x_ptr, g_ptr, gx_ptr, yhat2_ptr, gbn2_ptr, sums_ptr, dwp_ptr,
                            w1_ptr, b1_ptr, wdw_ptr, bdw_ptr, wp_ptr, heads_ptr, coef_ptr, chan_ptr,
                            H, C, M, W, num_tiles,
                            K: tl.constexpr, PAD: tl.constexpr, HAS_EXPAND: tl.constexpr, HP: tl.constexpr,
                            BLOCK_C: tl.constexpr, NCP: tl.constexpr, BR: tl.constexpr, BC: tl.constexpr,
                            LOW: tl.constexpr, EMULATE: tl.constexpr):  # fmt: skip
    """
    B2: writes gx = gz (the residual's share of the input gradient), yhat2 and gbn2 = (wp^T gy3) [0 < pre2 < 6]; per
    program, sums of gbn2 and gbn2 yhat2 into sums[program, 0:2, C] and the projection's weight gradient sum gy3 t2^T
    into dwp[program, H, C]. Here wdw, bdw are the depthwise weights normalised by bn2's batch statistics (wdw invstd2,
    -mean2 invstd2: dw gives yhat2 directly) and chan = gamma2, beta2.
    """
    pid = tl.program_id(0)
    programs = tl.num_programs(0)
    BP: tl.constexpr = BR * BC
    chunk = tl.arange(0, NCP)
    acc_s = tl.full([NCP, BLOCK_C], 0.0, tl.float32)
    acc_sy = tl.full([NCP, BLOCK_C], 0.0, tl.float32)
    acc_w = tl.full([NCP, HP, BLOCK_C], 0.0, tl.float32)
    for t in range(pid, num_tiles, programs):
        b, rows, cols, inside = _tile(t, M, W, BR, BC)
        # (a) yhat2 of every chunk, kept for (c) and for B3, and y3.
        y3 = tl.full([BP, HP], 0.0, tl.float32)
        for c0 in range(0, C, BLOCK_C):
            w1t, b1 = _expansion(w1_ptr, b1_ptr, c0, H, C, HAS_EXPAND, HP, BLOCK_C)
            yhat2 = _depthwise(x_ptr, w1t, b1, wdw_ptr, b, rows, cols, c0, H, C, M, W, K, PAD, HAS_EXPAND, HP,
                               BLOCK_C, BP, LOW, EMULATE)  # fmt: skip
            yhat2 += _vector(bdw_ptr, c0, C, BLOCK_C)[None, :]
            _store_maps(yhat2_ptr, yhat2, b, c0, C, C, rows, cols, inside, M, W, BLOCK_C)
            t2 = _relu6(
                yhat2 * _vector(chan_ptr, c0, C, BLOCK_C)[None, :] + _vector(chan_ptr + C, c0, C, BLOCK_C)[None, :]
            )
            y3 += _mm(t2, _matrix_t(wp_ptr, c0, C, 0, H, C, BLOCK_C, HP), LOW, EMULATE)
        # (b) gz (into gx) and gy3.
        xc, _ = _load_maps(x_ptr, b, 0, H, H, rows, cols, M, W, HP)
        g, _ = _load_maps(g_ptr, b, 0, H, H, rows, cols, M, W, HP)
        yhat3, zhat = _head_normals(y3, xc, heads_ptr, H, HP)
        gz = (_vector(coef_ptr, 0, H, HP)[None, :] * g - _vector(coef_ptr + H, 0, H, HP)[None, :]
              - _vector(coef_ptr + 2 * H, 0, H, HP)[None, :] * zhat)  # fmt: skip
        _store_maps(gx_ptr, gz, b, 0, H, H, rows, cols, inside, M, W, HP)
        gy3 = (_vector(coef_ptr + 3 * H, 0, H, HP)[None, :] * gz - _vector(coef_ptr + 4 * H, 0, H, HP)[None, :]
               - _vector(coef_ptr + 5 * H, 0, H, HP)[None, :] * yhat3)  # fmt: skip
        gy3 = tl.where(inside[:, None], gy3, 0.0)
        # (c) Back through the projection, with the yhat2 this program has just written.
        tl.debug_barrier()
        for c0 in range(0, C, BLOCK_C):
            yhat2, _ = _load_maps(yhat2_ptr, b, c0, C, C, rows, cols, M, W, BLOCK_C)
            pre = yhat2 * _vector(chan_ptr, c0, C, BLOCK_C)[None, :] + _vector(chan_ptr + C, c0, C, BLOCK_C)[None, :]
            gt2 = _mm(gy3, _matrix(wp_ptr, 0, H, c0, C, C, HP, BLOCK_C), LOW, EMULATE)
            gbn2 = tl.where(inside[:, None] & (pre > 0.0) & (pre < 6.0), gt2, 0.0)
            _store_maps(gbn2_ptr, gbn2, b, c0, C, C, rows, cols, inside, M, W, BLOCK_C)
            here = (chunk == c0 // BLOCK_C)[:, None]
            acc_s += tl.where(here, _sum(gbn2, 0)[None, :], 0.0)
            acc_sy += tl.where(here, _sum(gbn2 * yhat2, 0)[None, :], 0.0)
            dwp = _mm(tl.trans(gy3), _relu6(pre), LOW, EMULATE)
            acc_w += tl.where(here[:, :, None], dwp[None, :, :], 0.0)
    ch = chunk[:, None] * BLOCK_C + tl.arange(0, BLOCK_C)[None, :]
    out = sums_ptr + pid * 2 * C + ch
    tl.store(out, acc_s, mask=ch < C)
    tl.store(out + C, acc_sy, mask=ch < C)
    h = tl.arange(0, HP)
    mask = (h < H)[None, :, None] & (ch < C)[:, None, :]
    tl.store(dwp_ptr + pid * H * C + h[None, :, None] * C + ch[:, None, :], acc_w, mask=mask)


@triton.jit
def backward_depthwise_kernel(x_ptr, gx_ptr, yhat2_ptr, gbn2_ptr, gbn1_ptr, sums_ptr, dwdw_ptr,
                              w1_ptr, b1_ptr, wdw_ptr, n1_ptr, nb1_ptr, chan_ptr, H, C, M, W, num_tiles,
                              K: tl.constexpr, PAD: tl.constexpr, HAS_EXPAND: tl.constexpr, HP: tl.constexpr,
                              BLOCK_C: tl.constexpr, NCP: tl.constexpr, KKP: tl.constexpr, BR: tl.constexpr,
                              BC: tl.constexpr, LOW: tl.constexpr, EMULATE: tl.constexpr):  # fmt: skip
    """
    B3: gy2 = k2 gbn2 - k2 m2 - k2 m22 yhat2; gt1 = dw^T(gy2) (raw wdw); the depthwise weight gradient sum gy2(p)
    t1(p + tap) into dwdw[program, C, K * K]. With expansion: gbn1 = gt1 [0 < pre1 < 6] written, sums of gbn1 and
    gbn1 yhat1 into sums[program, 0:2, C] (yhat1 = n1 x + nb1: bn1-normalised expansion); without: gx += gt1.
    chan = k2, k2 m2, k2 m22, gamma1, beta1.
    """
    pid = tl.program_id(0)
    programs = tl.num_programs(0)
    BP: tl.constexpr = BR * BC
    chunk = tl.arange(0, NCP)
    tap = tl.arange(0, KKP)
    acc_s = tl.full([NCP, BLOCK_C], 0.0, tl.float32)
    acc_sy = tl.full([NCP, BLOCK_C], 0.0, tl.float32)
    acc_w = tl.full([NCP, KKP, BLOCK_C], 0.0, tl.float32)
    for t in range(pid, num_tiles, programs):
        b, rows, cols, inside = _tile(t, M, W, BR, BC)
        if HAS_EXPAND:
            xc, _ = _load_maps(x_ptr, b, 0, H, H, rows, cols, M, W, HP)
        for c0 in range(0, C, BLOCK_C):
            ch = c0 + tl.arange(0, BLOCK_C)
            k2 = _vector(chan_ptr, c0, C, BLOCK_C)[None, :]
            k2m2 = _vector(chan_ptr + C, c0, C, BLOCK_C)[None, :]
            k2m22 = _vector(chan_ptr + 2 * C, c0, C, BLOCK_C)[None, :]
            w1t, b1 = _expansion(w1_ptr, b1_ptr, c0, H, C, HAS_EXPAND, HP, BLOCK_C)
            gbn2, _ = _load_maps(gbn2_ptr, b, c0, C, C, rows, cols, M, W, BLOCK_C)
            yhat2, _ = _load_maps(yhat2_ptr, b, c0, C, C, rows, cols, M, W, BLOCK_C)
            gy2 = tl.where(inside[:, None], k2 * gbn2 - k2m2 - k2m22 * yhat2, 0.0)
            gt1 = tl.full([BP, BLOCK_C], 0.0, tl.float32)
            dw = tl.full([KKP, BLOCK_C], 0.0, tl.float32)
            for dy in tl.static_range(K):
                for dx in tl.static_range(K):
                    w = tl.load(wdw_ptr + ch * (K * K) + (dy * K + dx), mask=ch < C, other=0.0)
                    # gt1(p) gets w * gy2(p - tap): the transposed convolution.
                    r = rows - (dy - PAD)
                    c = cols - (dx - PAD)
                    gbn2_s, valid = _load_maps(gbn2_ptr, b, c0, C, C, r, c, M, W, BLOCK_C)
                    yhat2_s, _ = _load_maps(yhat2_ptr, b, c0, C, C, r, c, M, W, BLOCK_C)
                    gt1 += w[None, :] * tl.where(valid[:, None], k2 * gbn2_s - k2m2 - k2m22 * yhat2_s, 0.0)
                    t1 = _t1(x_ptr, w1t, b1, b, rows + (dy - PAD), cols + (dx - PAD), c0, H, C, M, W, HAS_EXPAND,
                             HP, BLOCK_C, LOW, EMULATE)  # fmt: skip
                    dw += tl.where((tap == dy * K + dx)[:, None], _sum(gy2 * t1, 0)[None, :], 0.0)
            here = chunk == c0 // BLOCK_C
            acc_w += tl.where(here[:, None, None], dw[None, :, :], 0.0)
            if HAS_EXPAND:
                yhat1 = _mm(xc, _matrix_t(n1_ptr, 0, H, c0, C, H, HP, BLOCK_C), LOW, EMULATE)
                yhat1 += _vector(nb1_ptr, c0, C, BLOCK_C)[None, :]
                pre = yhat1 * _vector(chan_ptr + 3 * C, c0, C, BLOCK_C)[None, :]
                pre += _vector(chan_ptr + 4 * C, c0, C, BLOCK_C)[None, :]
                gbn1 = tl.where(inside[:, None] & (pre > 0.0) & (pre < 6.0), gt1, 0.0)
                _store_maps(gbn1_ptr, gbn1, b, c0, C, C, rows, cols, inside, M, W, BLOCK_C)
                acc_s += tl.where(here[:, None], _sum(gbn1, 0)[None, :], 0.0)
                acc_sy += tl.where(here[:, None], _sum(gbn1 * yhat1, 0)[None, :], 0.0)
            else:
                gx, _ = _load_maps(gx_ptr, b, c0, C, H, rows, cols, M, W, BLOCK_C)
                _store_maps(gx_ptr, gx + gt1, b, c0, C, H, rows, cols, inside, M, W, BLOCK_C)
    ch = chunk[:, None] * BLOCK_C + tl.arange(0, BLOCK_C)[None, :]
    out = sums_ptr + pid * 2 * C + ch
    tl.store(out, acc_s, mask=ch < C)
    tl.store(out + C, acc_sy, mask=ch < C)
    mask = (tap < K * K)[None, :, None] & (ch < C)[:, None, :]
    tl.store(dwdw_ptr + pid * C * K * K + ch[:, None, :] * (K * K) + tap[None, :, None], acc_w, mask=mask)


@triton.jit
def backward_expand_kernel(x_ptr, gx_ptr, gbn1_ptr, dw1_ptr, w1_ptr, n1_ptr, nb1_ptr, chan_ptr,
                           H, C, M, W, num_tiles,
                           HP: tl.constexpr, BLOCK_C: tl.constexpr, NCP: tl.constexpr, BR: tl.constexpr,
                           BC: tl.constexpr, LOW: tl.constexpr, EMULATE: tl.constexpr):  # fmt: skip
    """
    B4 (with expansion): gy1 = k1 gbn1 - k1 m1 - k1 m21 yhat1; gx += w1^T gy1 (raw w1); the expansion's weight
    gradient sum gy1 x^T into dw1[program, C, H]. chan = k1, k1 m1, k1 m21.
    """
    pid = tl.program_id(0)
    programs = tl.num_programs(0)
    chunk = tl.arange(0, NCP)
    acc_w = tl.full([NCP, BLOCK_C, HP], 0.0, tl.float32)
    for t in range(pid, num_tiles, programs):
        b, rows, cols, inside = _tile(t, M, W, BR, BC)
        xc, _ = _load_maps(x_ptr, b, 0, H, H, rows, cols, M, W, HP)
        gx = tl.full([BR * BC, HP], 0.0, tl.float32)
        for c0 in range(0, C, BLOCK_C):
            yhat1 = _mm(xc, _matrix_t(n1_ptr, 0, H, c0, C, H, HP, BLOCK_C), LOW, EMULATE)
            yhat1 += _vector(nb1_ptr, c0, C, BLOCK_C)[None, :]
            gbn1, _ = _load_maps(gbn1_ptr, b, c0, C, C, rows, cols, M, W, BLOCK_C)
            gy1 = (_vector(chan_ptr, c0, C, BLOCK_C)[None, :] * gbn1 - _vector(chan_ptr + C, c0, C, BLOCK_C)[None, :]
                   - _vector(chan_ptr + 2 * C, c0, C, BLOCK_C)[None, :] * yhat1)  # fmt: skip
            gy1 = tl.where(inside[:, None], gy1, 0.0)
            gx += _mm(gy1, _matrix(w1_ptr, c0, C, 0, H, H, BLOCK_C, HP), LOW, EMULATE)
            here = chunk == c0 // BLOCK_C
            acc_w += tl.where(here[:, None, None], _mm(tl.trans(gy1), xc, LOW, EMULATE)[None, :, :], 0.0)
        previous, _ = _load_maps(gx_ptr, b, 0, H, H, rows, cols, M, W, HP)
        _store_maps(gx_ptr, previous + gx, b, 0, H, H, rows, cols, inside, M, W, HP)
    ch = chunk[:, None] * BLOCK_C + tl.arange(0, BLOCK_C)[None, :]
    h = tl.arange(0, HP)
    mask = (ch < C)[:, :, None] & (h < H)[None, None, :]
    tl.store(dw1_ptr + pid * C * H + ch[:, :, None] * H + h[None, None, :], acc_w, mask=mask)
