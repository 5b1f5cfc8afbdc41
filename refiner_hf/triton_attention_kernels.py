"""
Triton kernels of Refiner-ViT's explicit attention maps (launched by `triton_attention`; never imported directly).

Refiner-ViT needs every attention map as a tensor (later blocks add it, shared blocks refine it), so its attention
cannot use a fused scaled-dot-product kernel; but the map's computation itself fuses:

- `attention_probs_kernel`: P = softmax(scale * q k^T) + alpha * A (A: the previous block's map, optional),
  straight from the packed (batch, tokens, 3 * hidden) projection. Each program owns BM rows of one (image, head):
  a first sweep over the columns finds each row's maximum and normaliser (online), a second recomputes the scores
  (cheap: head_dim multiply-adds per score, on the tensor cores) and writes P once. Neither the scores nor the
  softmax output are ever written.
- `softmax_backward_kernel`: dS = S (dP - rowsum(dP S)) with S = P - alpha A recovered from the output and the
  previous map, which autograd keeps anyway (P for the refinement or P v, A for its own consumers), so the fused op
  saves no softmax output of its own.

As in `triton_refinement_kernels`, only builtins are called (`tl.reduce` with the standard combine functions), so
that Triton's CPU interpreter runs them when turned on after Triton was imported.
"""

import triton
import triton.language as tl


@triton.jit
def _sum(x, axis: tl.constexpr):
    return tl.reduce(x, axis, tl.standard._sum_combine)


@triton.jit
def _max(x, axis: tl.constexpr):
    return tl.reduce(x, axis, tl.standard._elementwise_max)


@triton.jit
def _scores(q, qkv_ptr, b, h, n0, N, D, HD, scale, BN: tl.constexpr, DP: tl.constexpr, LOW: tl.constexpr,
            EMULATE: tl.constexpr):  # fmt: skip
    """scale * q k^T for the key columns n0 .. n0 + BN - 1 (-inf past the last token)."""
    cols = n0 + tl.arange(0, BN)
    d = tl.arange(0, DP)
    offsets = (b * N + cols)[:, None].to(tl.int64) * (3 * D) + D + h * HD + d[None, :]
    k = tl.load(qkv_ptr + offsets, mask=(cols < N)[:, None] & (d < HD)[None, :], other=0.0)
    if LOW:
        if EMULATE:  # the interpreter multiplies bfloat16 bit patterns as integers
            s = tl.dot(q.to(tl.float32), tl.trans(k.to(tl.float32)), input_precision="ieee")
        else:
            s = tl.dot(q, tl.trans(k))
    else:
        s = tl.dot(q.to(tl.float32), tl.trans(k.to(tl.float32)), input_precision="ieee")
    return tl.where((cols < N)[None, :], s * scale, float("-inf")), cols


@triton.jit
def attention_probs_kernel(qkv_ptr, prev_ptr, out_ptr, H, N, D, HD, scale, alpha,
                           HAS_PREV: tl.constexpr, BM: tl.constexpr, BN: tl.constexpr, DP: tl.constexpr,
                           LOW: tl.constexpr, EMULATE: tl.constexpr):  # fmt: skip
    """Rows program_id(0) * BM.. of P = softmax(scale q k^T) + alpha A for (image, head) = divmod(program_id(1), H)."""
    bh = tl.program_id(1)
    b = bh // H
    h = bh % H
    rows = tl.program_id(0) * BM + tl.arange(0, BM)
    d = tl.arange(0, DP)
    q_offsets = (b * N + rows)[:, None].to(tl.int64) * (3 * D) + h * HD + d[None, :]
    q = tl.load(qkv_ptr + q_offsets, mask=(rows < N)[:, None] & (d < HD)[None, :], other=0.0)
    # Sweep 1: each row's maximum and the sum of exp(score - maximum), updated block by block.
    row_max = tl.full([BM], float("-inf"), tl.float32)
    row_sum = tl.full([BM], 0.0, tl.float32)
    for n0 in range(0, N, BN):
        s, _ = _scores(q, qkv_ptr, b, h, n0, N, D, HD, scale, BN, DP, LOW, EMULATE)
        new_max = tl.maximum(row_max, _max(s, 1))
        row_sum = row_sum * tl.exp(row_max - new_max) + _sum(tl.exp(s - new_max[:, None]), 1)
        row_max = new_max
    # Sweep 2: the probabilities, plus alpha times the previous map, written once.
    inverse = 1.0 / row_sum
    map_offsets = bh.to(tl.int64) * N * N + rows[:, None] * N
    for n0 in range(0, N, BN):
        s, cols = _scores(q, qkv_ptr, b, h, n0, N, D, HD, scale, BN, DP, LOW, EMULATE)
        p = tl.exp(s - row_max[:, None]) * inverse[:, None]
        mask = (rows < N)[:, None] & (cols < N)[None, :]
        if HAS_PREV:
            p += alpha * tl.load(prev_ptr + map_offsets + cols[None, :], mask=mask, other=0.0).to(tl.float32)
        tl.store(out_ptr + map_offsets + cols[None, :], p.to(out_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _softmax_and_grad(grad_ptr, probs_ptr, prev_ptr, base, rows, cols, N, alpha, HAS_PREV: tl.constexpr):
    """The softmax output S = P - alpha A and the gradient dP on a block of rows and columns (float32), and its mask."""
    mask = (rows < N)[:, None] & (cols < N)[None, :]
    s = tl.load(probs_ptr + base + cols[None, :], mask=mask, other=0.0).to(tl.float32)
    if HAS_PREV:
        s -= alpha * tl.load(prev_ptr + base + cols[None, :], mask=mask, other=0.0).to(tl.float32)
    g = tl.load(grad_ptr + base + cols[None, :], mask=mask, other=0.0).to(tl.float32)
    return s, g, mask


@triton.jit
def softmax_backward_kernel(grad_ptr, probs_ptr, prev_ptr, out_ptr, N, alpha,
                            HAS_PREV: tl.constexpr, BM: tl.constexpr, BN: tl.constexpr):  # fmt: skip
    """dS = S (dP - rowsum(dP S)), S = P - alpha A, for rows program_id(0) * BM.. of map program_id(1)."""
    rows = tl.program_id(0) * BM + tl.arange(0, BM)
    base = tl.program_id(1).to(tl.int64) * N * N + rows[:, None] * N
    dot = tl.full([BM], 0.0, tl.float32)
    for n0 in range(0, N, BN):
        cols = n0 + tl.arange(0, BN)
        s, g, mask = _softmax_and_grad(grad_ptr, probs_ptr, prev_ptr, base, rows, cols, N, alpha, HAS_PREV)
        dot += _sum(g * s, 1)
    for n0 in range(0, N, BN):
        cols = n0 + tl.arange(0, BN)
        s, g, mask = _softmax_and_grad(grad_ptr, probs_ptr, prev_ptr, base, rows, cols, N, alpha, HAS_PREV)
        tl.store(out_ptr + base + cols[None, :], (s * (g - dot[:, None])).to(out_ptr.dtype.element_ty), mask=mask)
