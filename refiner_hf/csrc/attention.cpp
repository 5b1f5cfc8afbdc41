// Fused CPU kernels of Refiner-ViT's explicit attention (inference only).
//
// Refiner-ViT needs its attention maps themselves (later blocks add them, shared blocks refine them), so the
// attention cannot go through a fused scaled-dot-product kernel. Done with PyTorch ops, each plain block copies
// q, k and v out of the packed projection, writes the scores, reads and writes them for the softmax and again for
// the addition of the previous map, and copies the context back to token layout. These two kernels work per
// (image, head) straight on the packed projection and token layout:
//
//  - attention_probs: P = softmax(scale * q k^T) + alpha * A  (A: the previous block's map, optional), each row
//    of scores computed, normalised and written once;
//  - attention_context: context[b, i, h * d + t] = sum_j P[b, h, i, j] v[b, j, h * d + t], written in token layout.

#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <c10/util/BFloat16.h>
#include <torch/library.h>

#include <algorithm>
#include <cstdint>
#include <cstring>
#include <limits>
#include <optional>
#include <type_traits>

#include "vector.h"

namespace refiner_hf {
namespace {

using at::Tensor;

int64_t round_up(int64_t n, int64_t m) { return (n + m - 1) / m * m; }

// Rows per register tile: (rows x 3 vectors) accumulators for the scores, (rows x 2 vectors) for the context; 24 of
// the 32 AVX-512 registers, 12 of the 16 AVX2 ones.
constexpr int kScoreRows = kLanes == 16 ? 8 : 4;
constexpr int kContextRows = kLanes == 16 ? 12 : 6;

// Rows [row0, row0 + R) of s * (Q K^T), Q: (N, d) packed rows, Kt: (d, n_pad) packed columns; out: R x n_pad.
template <int R, int NQ>
inline void scores_tile(const float* q, int64_t d, const float* kt, int64_t n_pad, int64_t col, float* out) {
  Vec acc[R][NQ];
  for (int r = 0; r < R; ++r) {
    for (int j = 0; j < NQ; ++j) acc[r][j] = Vec{};
  }
  for (int64_t t = 0; t < d; ++t) {
    Vec k[NQ];
    for (int j = 0; j < NQ; ++j) k[j] = load(kt + t * n_pad + col + j * kLanes);
    for (int r = 0; r < R; ++r) {
      const float qv = q[r * d + t];
      for (int j = 0; j < NQ; ++j) acc[r][j] += qv * k[j];
    }
  }
  for (int r = 0; r < R; ++r) {
    for (int j = 0; j < NQ; ++j) store(out + r * n_pad + col + j * kLanes, acc[r][j]);
  }
}

template <int R>
void scores_rows(const float* q, int64_t d, const float* kt, int64_t n_pad, float* out) {
  const int64_t chunks = n_pad / kLanes;
  int64_t q0 = 0;
  for (; q0 + 3 <= chunks; q0 += 3) scores_tile<R, 3>(q, d, kt, n_pad, q0 * kLanes, out);
  for (; q0 < chunks; ++q0) scores_tile<R, 1>(q, d, kt, n_pad, q0 * kLanes, out);
}

// One row: out = softmax(s) + alpha * previous over the n valid columns. `s` holds n_pad = whole vectors and is
// overwritten; its padding columns are set to -inf, so that every step runs on whole vectors (their exp, about
// 4e-38 each, is added to the sum: far below float resolution).
template <typename T>
void softmax_row(float* s, int64_t n, int64_t n_pad, float alpha, const T* previous, T* out) {
  std::fill(s + n, s + n_pad, -std::numeric_limits<float>::infinity());
  Vec max_even = load(s), max_odd = max_even;  // two chains: the maximum's latency, not its throughput, bounds it
  int64_t j = kLanes;
  for (; j + kLanes < n_pad; j += 2 * kLanes) {
    max_even = vmax(max_even, load(s + j));
    max_odd = vmax(max_odd, load(s + j + kLanes));
  }
  if (j < n_pad) max_even = vmax(max_even, load(s + j));
  const Vec m = splat(hmax(vmax(max_even, max_odd)));
  Vec vsum{};
  for (j = 0; j < n_pad; j += kLanes) {
    const Vec e = exp_nonpositive(load(s + j) - m);
    store(s + j, e);
    vsum += e;
  }
  const Vec inv = splat(1.f / hsum(vsum));
  if constexpr (std::is_same_v<T, float>) {
    const int64_t full = n / kLanes * kLanes;
    const Vec va = splat(alpha);
    for (int64_t j = 0; j < full; j += kLanes) {
      Vec p = load(s + j) * inv;
      if (previous) p += va * load(previous + j);
      store(out + j, p);
    }
    for (int64_t j = full; j < n; ++j) out[j] = s[j] * inv[0] + (previous ? alpha * previous[j] : 0.f);
  } else {
    for (int64_t j = 0; j < n; ++j) {
      out[j] = static_cast<T>(s[j] * inv[0] + (previous ? alpha * static_cast<float>(previous[j]) : 0.f));
    }
  }
}

template <typename T>
void attention_probs_kernel(const T* qkv, const T* previous, T* probs, int64_t batch, int64_t n, int64_t heads,
                            int64_t d, float scale, float alpha) {
  const int64_t width = 3 * heads * d;  // row stride of the packed projection
  const int64_t n_pad = round_up(n, kLanes);
  at::parallel_for(0, batch * heads, 1, [&](int64_t begin, int64_t end) {
    Buffer q(n * d), kt(d * n_pad, 0.f), scores(kScoreRows * n_pad);
    for (int64_t task = begin; task < end; ++task) {
      const int64_t b = task / heads, h = task % heads;
      const T* base = qkv + b * n * width + h * d;
      for (int64_t i = 0; i < n; ++i) {
        for (int64_t t = 0; t < d; ++t) {
          q[i * d + t] = scale * static_cast<float>(base[i * width + t]);
          kt[t * n_pad + i] = static_cast<float>(base[i * width + heads * d + t]);
        }
      }
      const int64_t plane = (b * heads + h) * n * n;
      int64_t i = 0;
      const auto finish = [&](int64_t rows) {
        for (int64_t r = 0; r < rows; ++r) {
          softmax_row(scores.data() + r * n_pad, n, n_pad, alpha,
                      previous ? previous + plane + (i + r) * n : nullptr, probs + plane + (i + r) * n);
        }
      };
      for (; i + kScoreRows <= n; i += kScoreRows) {
        scores_rows<kScoreRows>(q.data() + i * d, d, kt.data(), n_pad, scores.data());
        finish(kScoreRows);
      }
      for (; i < n; ++i) {
        scores_rows<1>(q.data() + i * d, d, kt.data(), n_pad, scores.data());
        finish(1);
      }
    }
  });
}

Tensor attention_probs(const Tensor& qkv_in, const std::optional<Tensor>& previous_in, int64_t heads, double scale,
                       double alpha) {
  TORCH_CHECK(qkv_in.device().is_cpu() && qkv_in.dim() == 3, "expected a (batch, tokens, 3 * hidden) CPU tensor");
  TORCH_CHECK(qkv_in.scalar_type() == at::kFloat || qkv_in.scalar_type() == at::kBFloat16,
              "attention kernels support float32 and bfloat16");
  TORCH_CHECK(qkv_in.size(2) % (3 * heads) == 0, "the projection width must be 3 * heads * head_dim");
  const Tensor qkv = qkv_in.contiguous();
  const int64_t batch = qkv.size(0), n = qkv.size(1), d = qkv.size(2) / (3 * heads);
  Tensor previous;
  if (previous_in.has_value() && previous_in->defined()) {
    previous = previous_in->to(qkv.scalar_type()).contiguous();
    TORCH_CHECK(previous.sizes() == at::IntArrayRef({batch, heads, n, n}), "the previous map must be (B, heads, N, N)");
  }
  Tensor probs = at::empty({batch, heads, n, n}, qkv.options());
  if (qkv.scalar_type() == at::kFloat) {
    attention_probs_kernel(qkv.data_ptr<float>(), previous.defined() ? previous.data_ptr<float>() : nullptr,
                           probs.data_ptr<float>(), batch, n, heads, d, static_cast<float>(scale),
                           static_cast<float>(alpha));
  } else {
    attention_probs_kernel(qkv.data_ptr<at::BFloat16>(),
                           previous.defined() ? previous.data_ptr<at::BFloat16>() : nullptr,
                           probs.data_ptr<at::BFloat16>(), batch, n, heads, d, static_cast<float>(scale),
                           static_cast<float>(alpha));
  }
  return probs;
}

// Rows [i, i + R) of P V for one head: P rows of length n (stride n), V packed (n, d_pad); out: R x d_pad.
template <int R, int NV>
inline void context_tile(const float* p, int64_t n, const float* v, int64_t d_pad, int64_t col, float* out) {
  Vec acc[R][NV];
  for (int r = 0; r < R; ++r) {
    for (int c = 0; c < NV; ++c) acc[r][c] = Vec{};
  }
  for (int64_t j = 0; j < n; ++j) {
    Vec vv[NV];
    for (int c = 0; c < NV; ++c) vv[c] = load(v + j * d_pad + col + c * kLanes);
    for (int r = 0; r < R; ++r) {
      const float pv = p[r * n + j];
      for (int c = 0; c < NV; ++c) acc[r][c] += pv * vv[c];
    }
  }
  for (int r = 0; r < R; ++r) {
    for (int c = 0; c < NV; ++c) store(out + r * d_pad + col + c * kLanes, acc[r][c]);
  }
}

template <int R>
void context_rows(const float* p, int64_t n, const float* v, int64_t d_pad, float* out) {
  const int64_t vectors = d_pad / kLanes;
  int64_t c = 0;
  for (; c + 2 <= vectors; c += 2) context_tile<R, 2>(p, n, v, d_pad, c * kLanes, out);
  for (; c < vectors; ++c) context_tile<R, 1>(p, n, v, d_pad, c * kLanes, out);
}

template <typename T>
void attention_context_kernel(const T* probs, const T* values, int64_t value_stride, T* context, int64_t batch,
                              int64_t n, int64_t heads, int64_t d) {
  const int64_t d_pad = round_up(d, kLanes);
  constexpr int kRows = kContextRows;
  at::parallel_for(0, batch * heads, 1, [&](int64_t begin, int64_t end) {
    Buffer v(n * d_pad, 0.f), p(kRows * n), out(kRows * d_pad);
    for (int64_t task = begin; task < end; ++task) {
      const int64_t b = task / heads, h = task % heads;
      for (int64_t j = 0; j < n; ++j) {
        const T* src = values + (b * n + j) * value_stride + h * d;
        for (int64_t t = 0; t < d; ++t) v[j * d_pad + t] = static_cast<float>(src[t]);
      }
      const T* plane = probs + (b * heads + h) * n * n;
      const auto run = [&](int64_t i, auto rows) {
        constexpr int R = decltype(rows)::value;
        const float* prow;
        if constexpr (std::is_same_v<T, float>) {
          prow = plane + i * n;
        } else {
          for (int64_t e = 0; e < R * n; ++e) p[e] = static_cast<float>(plane[i * n + e]);
          prow = p.data();
        }
        context_rows<R>(prow, n, v.data(), d_pad, out.data());
        for (int r = 0; r < R; ++r) {
          T* dst = context + (b * n + i + r) * heads * d + h * d;
          for (int64_t t = 0; t < d; ++t) dst[t] = static_cast<T>(out[r * d_pad + t]);
        }
      };
      int64_t i = 0;
      for (; i + kRows <= n; i += kRows) run(i, std::integral_constant<int, kRows>{});
      for (; i < n; ++i) run(i, std::integral_constant<int, 1>{});
    }
  });
}

Tensor attention_context(const Tensor& probs_in, const Tensor& values_in, int64_t value_offset) {
  TORCH_CHECK(probs_in.device().is_cpu() && probs_in.dim() == 4, "expected (batch, heads, N, N) probabilities");
  TORCH_CHECK(values_in.dim() == 3 && values_in.size(0) == probs_in.size(0) && values_in.size(1) == probs_in.size(2),
              "expected (batch, N, width) values");
  const Tensor probs = probs_in.contiguous();
  const Tensor values = values_in.to(probs.scalar_type()).contiguous();
  const int64_t batch = probs.size(0), heads = probs.size(1), n = probs.size(2);
  const int64_t width = values.size(2);
  TORCH_CHECK(value_offset >= 0 && (width - value_offset) % heads == 0 && width - value_offset > 0,
              "the values must fill the columns after value_offset");
  // The values of head h are columns value_offset + h * d ... of each token row.
  const int64_t d = (width - value_offset) / heads;
  Tensor context = at::empty({batch, n, heads * d}, probs.options());
  if (probs.scalar_type() == at::kFloat) {
    attention_context_kernel(probs.data_ptr<float>(), values.data_ptr<float>() + value_offset, width,
                             context.data_ptr<float>(), batch, n, heads, d);
  } else if (probs.scalar_type() == at::kBFloat16) {
    attention_context_kernel(probs.data_ptr<at::BFloat16>(), values.data_ptr<at::BFloat16>() + value_offset, width,
                             context.data_ptr<at::BFloat16>(), batch, n, heads, d);
  } else {
    TORCH_CHECK(false, "attention kernels support float32 and bfloat16");
  }
  return context;
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(refiner_hf, m) {
  m.def("attention_probs(Tensor qkv, Tensor? previous, int heads, float scale, float alpha) -> Tensor");
  m.def("attention_context(Tensor probs, Tensor values, int value_offset) -> Tensor");
}

TORCH_LIBRARY_IMPL(refiner_hf, CPU, m) {
  m.impl("attention_probs", &attention_probs);
  m.impl("attention_context", &attention_context);
}

}  // namespace refiner_hf
