// Fused CPU kernels of Refiner-ViT's attention-map refinement.
//
// The refinement treats a (B, H, M, W) stack of attention maps as an H-channel image and computes
//
//     t1 = relu6(bn1(W_e x))        (C = H * E channels; skipped, t1 = x, when E = 1)
//     t2 = relu6(bn2(dw(t1)))       (k x k depthwise, zero padding `pad` rows/columns before)
//     y  = bn3(W_p t2) + x
//
// followed by the attention's own BatchNorm and a scale. Done op by op, each step reads and writes maps E times
// larger than the input. These kernels instead stream over the rows of each map, keeping the k rows of t1 that a
// depthwise output row needs in a small ring buffer, so that only x and the output go through main memory.
//
// Three ops are registered in the `refiner_hf` namespace:
//  - refine_eval: inference with BatchNorms folded into the convolutions (done by the caller);
//  - refine_train: training forward with batch statistics; returns the output and each BatchNorm's batch mean
//    and (biased) variance, and keeps nothing else: the backward recomputes what it needs;
//  - refine_train_backward: gradients of the input, the convolution weights and the BatchNorm affine parameters.
//
// Data layout inside the kernels: a "row set" holds one image row of several channels as float rows of
// `stride` floats each, with column 0 at `offset` and zeros around the valid columns, so that the depthwise
// convolution reads its padding without bounds checks. Every row set a kernel computes has its tail (the columns
// past `cols` up to a whole number of vectors) zeroed, so that sums and dot products over rows need no masks.
//
// The batch statistics are accumulated about a per-task shift and combined in double (see `Moments`), and every
// reduction is summed in a fixed order, so results do not depend on the thread schedule.

#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <c10/util/BFloat16.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <limits>
#include <tuple>
#include <type_traits>
#include <vector>

#include "vector.h"

namespace refiner_hf {
namespace {

using at::Tensor;

struct Layout {
  int64_t heads = 0;     // H: channels of the input and output maps
  int64_t channels = 0;  // C = H * E: channels after the expansion (H without one)
  int64_t rows = 0;      // M
  int64_t cols = 0;      // W
  int64_t kernel = 0;    // k
  int64_t pad = 0;       // zero rows/columns before the map (the rest, k - 1 - pad, after)
  int64_t chunks = 0;    // vectors per row
  int64_t offset = 0;    // column 0's index in a buffered row
  int64_t stride = 0;    // floats per buffered row

  int64_t plane() const { return rows * cols; }
  int64_t row_set(int64_t nch) const { return nch * stride; }
};

Layout make_layout(const Tensor& x, int64_t channels, int64_t kernel, int64_t pad) {
  Layout L;
  L.heads = x.size(1);
  L.channels = channels;
  L.rows = x.size(2);
  L.cols = x.size(3);
  L.kernel = kernel;
  L.pad = pad;
  L.chunks = (L.cols + kLanes - 1) / kLanes;
  L.offset = kLanes;  // room for up to kLanes columns of left padding
  L.stride = L.offset + L.chunks * kLanes + kLanes;
  return L;
}

// ----------------------------------------------------------------------------------------------------------------
// Row-set operations. Pointers are row-set bases; channel c's column j is at base[c * stride + offset + j].

void zero_tail(float* p, int64_t nch, const Layout& L) {
  const int64_t begin = L.offset + L.cols;
  const int64_t end = L.offset + L.chunks * kLanes;
  for (int64_t c = 0; c < nch; ++c) std::fill(p + c * L.stride + begin, p + c * L.stride + end, 0.f);
}

void zero_rows(float* p, int64_t nch, const Layout& L) { std::fill(p, p + L.row_set(nch), 0.f); }

template <typename T>
void load_row(const T* image, int64_t r, int64_t nch, float* dst, const Layout& L) {
  if (r < 0 || r >= L.rows) {
    zero_rows(dst, nch, L);
    return;
  }
  for (int64_t c = 0; c < nch; ++c) {
    const T* src = image + (c * L.rows + r) * L.cols;
    float* d = dst + c * L.stride + L.offset;
    if constexpr (std::is_same_v<T, float>) {
      std::memcpy(d, src, L.cols * sizeof(float));
    } else {
      for (int64_t j = 0; j < L.cols; ++j) d[j] = static_cast<float>(src[j]);
    }
  }
  zero_tail(dst, nch, L);
}

template <typename T>
void store_row(const float* src, int64_t nch, T* image, int64_t r, const Layout& L) {
  for (int64_t c = 0; c < nch; ++c) {
    const float* s = src + c * L.stride + L.offset;
    T* d = image + (c * L.rows + r) * L.cols;
    for (int64_t j = 0; j < L.cols; ++j) d[j] = static_cast<T>(s[j]);
  }
}

// What a 1x1 convolution does to its result before storing it.
enum class Epilogue {
  kNone,
  kClamp6,    // relu6
  kResidual,  // + residual_scale[o] * residual[o] (the refinement's skip connection)
};

template <int NB, int NQ, Epilogue E>
inline void affine_tile(const float* in, int64_t k_in, const float* w, const float* bias, float* out,
                        const float* residual, const float* residual_scale, int64_t column, const Layout& L) {
  Vec acc[NB][NQ];
  for (int b = 0; b < NB; ++b) {
    const Vec init = splat(bias ? bias[b] : 0.f);
    for (int j = 0; j < NQ; ++j) acc[b][j] = init;
  }
  const float* src = in + L.offset + column;
  for (int64_t i = 0; i < k_in; ++i) {
    Vec v[NQ];
    for (int j = 0; j < NQ; ++j) v[j] = load(src + i * L.stride + j * kLanes);
    for (int b = 0; b < NB; ++b) {
      const float wb = w[b * k_in + i];
      for (int j = 0; j < NQ; ++j) acc[b][j] += wb * v[j];
    }
  }
  for (int b = 0; b < NB; ++b) {
    for (int j = 0; j < NQ; ++j) {
      const int64_t at = b * L.stride + L.offset + column + j * kLanes;
      Vec r = acc[b][j];
      if (E == Epilogue::kClamp6) r = clamp6(r);
      if (E == Epilogue::kResidual) r += residual_scale[b] * load(residual + at);
      store(out + at, r);
    }
  }
}

template <int NB, Epilogue E>
inline void affine_rows(const float* in, int64_t k_in, const float* w, const float* bias, float* out,
                        const float* residual, const float* residual_scale, const Layout& L) {
  int64_t q = 0;
  for (; q + kChunkBlock <= L.chunks; q += kChunkBlock) {
    affine_tile<NB, kChunkBlock, E>(in, k_in, w, bias, out, residual, residual_scale, q * kLanes, L);
  }
  for (; q < L.chunks; ++q) affine_tile<NB, 1, E>(in, k_in, w, bias, out, residual, residual_scale, q * kLanes, L);
}

// out[o] = epilogue(bias[o] + sum_i weight[o, i] * in[i]) for o < n_out: a 1x1 convolution of one row.
template <Epilogue E = Epilogue::kNone>
void affine(const float* in, int64_t k_in, const float* weight, const float* bias, float* out, int64_t n_out,
            const Layout& L, const float* residual = nullptr, const float* residual_scale = nullptr) {
  int64_t o = 0;
  const auto block = [&](auto nb) {
    constexpr int NB = decltype(nb)::value;
    for (; o + NB <= n_out; o += NB) {
      affine_rows<NB, E>(in, k_in, weight + o * k_in, bias ? bias + o : nullptr, out + o * L.stride,
                         residual ? residual + o * L.stride : nullptr, residual_scale ? residual_scale + o : nullptr,
                         L);
    }
  };
  block(std::integral_constant<int, kOutBlock>{});
  block(std::integral_constant<int, 2>{});
  block(std::integral_constant<int, 1>{});
}

// One row of a depthwise convolution (Transposed = false): out[c][col] = bias[c] + sum_{dy,dx} w[c, dy, dx] *
// rows[dy][c][col + dx - pad], rows[dy] being input row (r - pad + dy); or of its transpose, the gradient with
// respect to the input (Transposed = true): out[c][col] = sum_{dy,dx} w[c, dy, dx] * rows[dy][c][col + pad - dx],
// rows[dy] being output-gradient row (r + pad - dy). K > 0 fixes the kernel size at compile time (weights held in
// registers); K = 0 reads it from the layout.
template <int K, int NQ, bool Transposed, bool Clamp>
inline void depthwise_tile(const float* const* src, const Vec* taps, const float* wc, int64_t k, const Vec& init,
                           float* out) {
  // NQ vectors of columns at once: independent accumulation chains instead of one chain of k * k dependent FMAs.
  Vec acc[NQ];
  for (int j = 0; j < NQ; ++j) acc[j] = init;
  for (int64_t dy = 0; dy < k; ++dy) {
    for (int64_t dx = 0; dx < k; ++dx) {
      const Vec tap = K > 0 ? taps[dy * K + dx] : splat(wc[dy * k + dx]);
      const float* p = src[dy] + (Transposed ? -dx : dx);
      for (int j = 0; j < NQ; ++j) acc[j] += tap * load(p + j * kLanes);
    }
  }
  for (int j = 0; j < NQ; ++j) store(out + j * kLanes, Clamp ? clamp6(acc[j]) : acc[j]);
}

// One row of a depthwise convolution (Transposed = false): out[c][col] = bias[c] + sum_{dy,dx} w[c, dy, dx] *
// rows[dy][c][col + dx - pad], rows[dy] being input row (r - pad + dy); or of its transpose, the gradient with
// respect to the input (Transposed = true): out[c][col] = sum_{dy,dx} w[c, dy, dx] * rows[dy][c][col + pad - dx],
// rows[dy] being output-gradient row (r + pad - dy). K > 0 fixes the kernel size at compile time (weights held in
// registers); K = 0 reads it from the layout.
template <int K, bool Transposed, bool Clamp>
void depthwise_rows(const float* const* rows, const float* w, const float* bias, float* out, int64_t nch,
                    const Layout& L) {
  constexpr int kMaxTaps = K > 0 ? K * K : 1;
  constexpr int kMaxRows = K > 0 ? K : 32;
  const int64_t k = K > 0 ? K : L.kernel;
  for (int64_t c = 0; c < nch; ++c) {
    const float* wc = w + c * k * k;
    Vec taps[kMaxTaps];
    if (K > 0) {
      for (int t = 0; t < kMaxTaps; ++t) taps[t] = splat(wc[t]);
    }
    const float* src[kMaxRows];
    for (int64_t dy = 0; dy < k; ++dy) {
      src[dy] = rows[dy] + c * L.stride + L.offset + (Transposed ? L.pad : -L.pad);
    }
    const Vec init = splat(bias ? bias[c] : 0.f);
    float* dst = out + c * L.stride + L.offset;
    int64_t q = 0;
    for (; q + 4 <= L.chunks; q += 4) {
      const float* at[kMaxRows];
      for (int64_t dy = 0; dy < k; ++dy) at[dy] = src[dy] + q * kLanes;
      depthwise_tile<K, 4, Transposed, Clamp>(at, taps, wc, k, init, dst + q * kLanes);
    }
    for (; q < L.chunks; ++q) {
      const float* at[kMaxRows];
      for (int64_t dy = 0; dy < k; ++dy) at[dy] = src[dy] + q * kLanes;
      depthwise_tile<K, 1, Transposed, Clamp>(at, taps, wc, k, init, dst + q * kLanes);
    }
  }
}

template <bool Transposed, bool Clamp>
void depthwise_dispatch(const float* const* rows, const float* w, const float* bias, float* out, int64_t nch,
                        const Layout& L) {
  if (L.kernel == 3) {
    depthwise_rows<3, Transposed, Clamp>(rows, w, bias, out, nch, L);
  } else {
    depthwise_rows<0, Transposed, Clamp>(rows, w, bias, out, nch, L);
  }
}

void depthwise(const float* const* rows, const float* w, const float* bias, float* out, int64_t nch,
               const Layout& L) {
  depthwise_dispatch<false, false>(rows, w, bias, out, nch, L);
}

void depthwise_clamp6(const float* const* rows, const float* w, const float* bias, float* out, int64_t nch,
                      const Layout& L) {
  depthwise_dispatch<false, true>(rows, w, bias, out, nch, L);
}

void depthwise_transposed(const float* const* rows, const float* w, float* out, int64_t nch, const Layout& L) {
  depthwise_dispatch<true, false>(rows, w, nullptr, out, nch, L);
}

inline float row_sum(const float* p, const Layout& L) {
  Vec acc{};
  for (int64_t q = 0; q < L.chunks; ++q) acc += load(p + L.offset + q * kLanes);
  return hsum(acc);
}

inline float row_dot(const float* a, const float* b, const Layout& L) {
  Vec acc{};
  for (int64_t q = 0; q < L.chunks; ++q) acc += load(a + L.offset + q * kLanes) * load(b + L.offset + q * kLanes);
  return hsum(acc);
}

template <int NI, int NJ>
inline void outer_tile(const float* a, const float* b, const Layout& L, double* acc, int64_t nb) {
  Vec s[NI][NJ];
  for (int i = 0; i < NI; ++i) {
    for (int j = 0; j < NJ; ++j) s[i][j] = Vec{};
  }
  for (int64_t q = 0; q < L.chunks; ++q) {
    Vec bv[NJ];
    for (int j = 0; j < NJ; ++j) bv[j] = load(b + j * L.stride + L.offset + q * kLanes);
    for (int i = 0; i < NI; ++i) {
      const Vec av = load(a + i * L.stride + L.offset + q * kLanes);
      for (int j = 0; j < NJ; ++j) s[i][j] += av * bv[j];
    }
  }
  for (int i = 0; i < NI; ++i) {
    for (int j = 0; j < NJ; ++j) acc[i * nb + j] += hsum(s[i][j]);
  }
}

// acc[i, j] += sum over the row of a[i] * b[j] (a weight gradient of a 1x1 convolution), in 4 x 3 register tiles.
void outer_accumulate(const float* a, int64_t na, const float* b, int64_t nb, const Layout& L, double* acc) {
  int64_t i = 0;
  for (; i + 4 <= na; i += 4) {
    int64_t j = 0;
    for (; j + 3 <= nb; j += 3) outer_tile<4, 3>(a + i * L.stride, b + j * L.stride, L, acc + i * nb + j, nb);
    for (; j < nb; ++j) outer_tile<4, 1>(a + i * L.stride, b + j * L.stride, L, acc + i * nb + j, nb);
  }
  for (; i < na; ++i) {
    for (int64_t j = 0; j < nb; ++j) outer_tile<1, 1>(a + i * L.stride, b + j * L.stride, L, acc + i * nb + j, nb);
  }
}

// acc[c, dy, dx] += sum over the row of grad[c][col] * rows[dy][c][col + dx - pad] (the depthwise weight gradient);
// each gradient vector is loaded once for the k shifts of a kernel row.
void depthwise_weight_accumulate(const float* grad, const float* const* rows, int64_t nch, const Layout& L,
                                 double* acc) {
  constexpr int64_t kMaxKernel = 32;
  const int64_t k = L.kernel;
  for (int64_t c = 0; c < nch; ++c) {
    const float* g = grad + c * L.stride + L.offset;
    for (int64_t dy = 0; dy < k; ++dy) {
      const float* src = rows[dy] + c * L.stride + L.offset - L.pad;
      Vec s[kMaxKernel];
      for (int64_t dx = 0; dx < k; ++dx) s[dx] = Vec{};
      for (int64_t q = 0; q < L.chunks; ++q) {
        const Vec gv = load(g + q * kLanes);
        for (int64_t dx = 0; dx < k; ++dx) s[dx] += gv * load(src + dx + q * kLanes);
      }
      for (int64_t dx = 0; dx < k; ++dx) acc[(c * k + dy) * k + dx] += hsum(s[dx]);
    }
  }
}

// ----------------------------------------------------------------------------------------------------------------
// Batch statistics. E[y^2] - E[y]^2 in float loses the variance when |mean| >> std, so each task sums deviations
// from a shift (its first row's mean) and the tasks are combined about the overall mean in double (Chan et al.).

struct Moments {  // of one channel over one task's rows
  double shift = 0.0, sum = 0.0, sum_sq = 0.0, count = 0.0;  // sums of (y - shift)
  double cross = 0.0;  // sum of (y - shift)(x - x.shift) with a paired channel x, when one is tracked
};

inline Vec tail_mask(const Layout& L) {
  Vec mask{};
  const int64_t valid = L.cols - (L.chunks - 1) * kLanes;
  for (int64_t i = 0; i < valid; ++i) mask[i] = 1.f;
  return mask;
}

// Adds one row (row-set channel pointer `y`) to `m`; with `x` (and its moments `mx`, already updated for this
// row), also the cross sum.
inline float masked_mean(const float* y, const Layout& L, const Vec& mask) {
  Vec acc{};
  for (int64_t q = 0; q + 1 < L.chunks; ++q) acc += load(y + L.offset + q * kLanes);
  acc += load(y + L.offset + (L.chunks - 1) * kLanes) * mask;
  return hsum(acc) / static_cast<float>(L.cols);
}

inline void accumulate(Moments& m, const float* y, const Layout& L, const Vec& mask, const float* x = nullptr,
                       const Moments* mx = nullptr) {
  if (m.count == 0.0) m.shift = masked_mean(y, L, mask);
  const Vec shift = splat(static_cast<float>(m.shift));
  const Vec x_shift = splat(mx ? static_cast<float>(mx->shift) : 0.f);
  Vec sum{}, sum_sq{}, cross{};
  for (int64_t q = 0; q < L.chunks; ++q) {
    Vec d = load(y + L.offset + q * kLanes) - shift;
    if (q + 1 == L.chunks) d *= mask;
    sum += d;
    sum_sq += d * d;
    if (x) cross += d * (load(x + L.offset + q * kLanes) - x_shift);
  }
  m.sum += hsum(sum);
  m.sum_sq += hsum(sum_sq);
  m.cross += hsum(cross);
  m.count += static_cast<double>(L.cols);
}

// Mean and (biased) variance of each channel from per-task moments laid out [task][channel].
void combine(const std::vector<Moments>& parts, int64_t tasks, int64_t channels, std::vector<double>* mean,
             std::vector<double>* var) {
  mean->assign(channels, 0.0);
  var->assign(channels, 0.0);
  for (int64_t c = 0; c < channels; ++c) {
    double count = 0.0, total = 0.0;
    for (int64_t t = 0; t < tasks; ++t) {
      const Moments& m = parts[t * channels + c];
      count += m.count;
      total += m.count * m.shift + m.sum;
    }
    const double mu = total / count;
    double m2 = 0.0;
    for (int64_t t = 0; t < tasks; ++t) {
      const Moments& m = parts[t * channels + c];
      if (m.count == 0.0) continue;
      const double task_mean = m.shift + m.sum / m.count;
      m2 += (m.sum_sq - m.sum * m.sum / m.count) + m.count * (task_mean - mu) * (task_mean - mu);
    }
    (*mean)[c] = mu;
    (*var)[c] = m2 / count;
  }
}

// Covariance of each channel of `ys` with the same channel of `xs` (cross sums kept in `ys`).
std::vector<double> covariance(const std::vector<Moments>& ys, const std::vector<Moments>& xs, int64_t tasks,
                               int64_t channels) {
  std::vector<double> mean_y, var_y, mean_x, var_x, cov(channels, 0.0);
  combine(ys, tasks, channels, &mean_y, &var_y);
  combine(xs, tasks, channels, &mean_x, &var_x);
  for (int64_t c = 0; c < channels; ++c) {
    double count = 0.0, c2 = 0.0;
    for (int64_t t = 0; t < tasks; ++t) {
      const Moments& y = ys[t * channels + c];
      const Moments& x = xs[t * channels + c];
      if (y.count == 0.0) continue;
      count += y.count;
      c2 += (y.cross - y.sum * x.sum / y.count) +
            y.count * (y.shift + y.sum / y.count - mean_y[c]) * (x.shift + x.sum / x.count - mean_x[c]);
    }
    cov[c] = c2 / count;
  }
  return cov;
}

// ----------------------------------------------------------------------------------------------------------------
// Work split and per-task buffers.

// A task's share of the work: rows [first, end) of one image of the batch.
struct RowSpan {
  int64_t image, first, end;
};

struct Tasks {
  int64_t batch = 0, blocks = 0, block_rows = 0, rows = 0;
  int64_t count() const { return batch * blocks; }
  RowSpan span(int64_t task) const {
    const int64_t first = (task % blocks) * block_rows;
    return {task / blocks, first, std::min(rows, first + block_rows)};
  }
};

// Blocks of rows per image, so that a batch of one still keeps every thread busy; each block recomputes a halo of
// k - 1 rows, so blocks are kept to at least 16 rows.
Tasks make_tasks(int64_t batch, int64_t rows) {
  const int64_t threads = at::get_num_threads();
  int64_t blocks = std::max<int64_t>(1, (4 * threads + batch - 1) / batch);
  blocks = std::min(blocks, std::max<int64_t>(1, rows / 16));
  Tasks t;
  t.batch = batch;
  t.rows = rows;
  t.block_rows = (rows + blocks - 1) / blocks;
  t.blocks = (rows + t.block_rows - 1) / t.block_rows;
  return t;
}

// A ring of row sets keyed by image row: a sliding window of rows is computed once per task.
class RowRing {
 public:
  RowRing(int64_t depth, int64_t size) : depth_(depth), size_(size), data_(depth * size, 0.f), keys_(depth) {
    reset();
  }
  void reset() { std::fill(keys_.begin(), keys_.end(), std::numeric_limits<int64_t>::min()); }
  template <typename Fill>
  float* get(int64_t row, const Fill& fill) {
    const int64_t slot = ((row % depth_) + depth_) % depth_;
    float* p = data_.data() + slot * size_;
    if (keys_[slot] != row) {
      fill(row, p);
      keys_[slot] = row;
    }
    return p;
  }

 private:
  int64_t depth_, size_;
  Buffer data_;
  std::vector<int64_t> keys_;
};

// Deterministic reduction of per-task partial sums (fixed order, whatever the thread schedule).
std::vector<double> reduce_tasks(const std::vector<double>& partial, int64_t tasks, int64_t size) {
  std::vector<double> total(size, 0.0);
  for (int64_t t = 0; t < tasks; ++t) {
    for (int64_t i = 0; i < size; ++i) total[i] += partial[t * size + i];
  }
  return total;
}

// ----------------------------------------------------------------------------------------------------------------
// Parameters.

std::vector<float> to_vector(const Tensor& t) {
  const Tensor c = t.detach().to(at::kFloat).contiguous();
  return std::vector<float>(c.data_ptr<float>(), c.data_ptr<float>() + c.numel());
}

std::vector<float> transpose(const std::vector<float>& w, int64_t rows, int64_t cols) {
  std::vector<float> t(w.size());
  for (int64_t i = 0; i < rows; ++i) {
    for (int64_t j = 0; j < cols; ++j) t[j * rows + i] = w[i * cols + j];
  }
  return t;
}

// The refinement with every BatchNorm folded: t1 = clamp6(w_expand x + b_expand) (or x), t2 = clamp6(dw(t1) +
// b_depthwise), out = w_project t2 + b_project + residual * x.
struct Folded {
  std::vector<float> w_expand, b_expand, w_depthwise, b_depthwise, w_project, b_project, residual;
  bool expand() const { return !w_expand.empty(); }
};

struct Normalization {  // one BatchNorm in training mode
  std::vector<float> mean, invstd, weight, bias;
};

Normalization normalization(const std::vector<double>& means, const std::vector<double>& vars, const Tensor& weight,
                            const Tensor& bias, double eps, std::vector<float>* var_out) {
  Normalization n;
  const int64_t size = static_cast<int64_t>(means.size());
  n.mean.resize(size);
  n.invstd.resize(size);
  var_out->resize(size);
  for (int64_t c = 0; c < size; ++c) {
    const double mean = means[c];
    const double var = std::max(vars[c], 0.0);
    n.mean[c] = static_cast<float>(mean);
    n.invstd[c] = static_cast<float>(1.0 / std::sqrt(var + eps));
    (*var_out)[c] = static_cast<float>(var);
  }
  n.weight = to_vector(weight);
  n.bias = to_vector(bias);
  return n;
}

Normalization normalization_from_stats(const Tensor& mean_var, const Tensor& weight, const Tensor& bias,
                                       double eps) {
  const std::vector<float> mv = to_vector(mean_var);
  const int64_t size = mean_var.size(1);
  Normalization n;
  n.mean.assign(mv.begin(), mv.begin() + size);
  n.invstd.resize(size);
  for (int64_t c = 0; c < size; ++c) n.invstd[c] = static_cast<float>(1.0 / std::sqrt(double(mv[size + c]) + eps));
  n.weight = to_vector(weight);
  n.bias = to_vector(bias);
  return n;
}

// Folds a BatchNorm into the convolution before it: weight rows scaled by gamma * invstd, bias beta - mean * that.
void fold(const Normalization& n, const std::vector<float>& w, int64_t per_channel, std::vector<float>* w_out,
          std::vector<float>* b_out) {
  const int64_t size = static_cast<int64_t>(n.mean.size());
  w_out->resize(w.size());
  b_out->resize(size);
  for (int64_t c = 0; c < size; ++c) {
    const float a = n.weight[c] * n.invstd[c];
    for (int64_t i = 0; i < per_channel; ++i) (*w_out)[c * per_channel + i] = a * w[c * per_channel + i];
    (*b_out)[c] = n.bias[c] - n.mean[c] * a;
  }
}

// yhat = (y - mean) * invstd and t = clamp6(weight * yhat + bias), over the valid columns of nch rows.
void normalize(const float* y, const Normalization& n, float* yhat, float* t, int64_t nch, const Layout& L) {
  for (int64_t c = 0; c < nch; ++c) {
    const Vec mean = splat(n.mean[c]), invstd = splat(n.invstd[c]);
    const Vec weight = splat(n.weight[c]), bias = splat(n.bias[c]);
    for (int64_t q = 0; q < L.chunks; ++q) {
      const int64_t i = c * L.stride + L.offset + q * kLanes;
      const Vec h = (load(y + i) - mean) * invstd;
      store(yhat + i, h);
      if (t) store(t + i, clamp6(weight * h + bias));
    }
  }
  zero_tail(yhat, nch, L);
  if (t) zero_tail(t, nch, L);
}

// g = g where 0 < weight * yhat + bias < 6 (the BatchNorm output feeding a relu6), else 0.
void relu6_backward(float* g, const float* yhat, const Normalization& n, int64_t nch, const Layout& L) {
  const Vec zero{}, six = splat(6.f);
  for (int64_t c = 0; c < nch; ++c) {
    const Vec weight = splat(n.weight[c]), bias = splat(n.bias[c]);
    for (int64_t q = 0; q < L.chunks; ++q) {
      const int64_t i = c * L.stride + L.offset + q * kLanes;
      const Vec pre = weight * load(yhat + i) + bias;
      store(g + i, (pre > zero) & (pre < six) ? load(g + i) : zero);
    }
  }
  zero_tail(g, nch, L);
}

// ----------------------------------------------------------------------------------------------------------------
// Inference (and the training forward's last pass).

template <typename T>
void run_folded(const T* x, T* out, int64_t batch, const Layout& L, const Folded& f) {
  const int64_t H = L.heads, C = L.channels, k = L.kernel;
  const Tasks tasks = make_tasks(batch, L.rows);
  // A ring slot holds one row of t1 (C channels) and, with an expansion, the input row after it (t1 is the input
  // row itself without one), so the skip connection reads the input from the ring too.
  const int64_t x_at = f.expand() ? L.row_set(C) : 0;
  at::parallel_for(0, tasks.count(), 1, [&](int64_t begin, int64_t end) {
    RowRing ring(k, x_at + L.row_set(H));
    Buffer t2(L.row_set(C), 0.f), acc(L.row_set(H), 0.f);
    std::vector<const float*> rows(k);
    for (int64_t task = begin; task < end; ++task) {
      const auto [b, r0, r1] = tasks.span(task);
      const T* image = x + b * H * L.plane();
      T* out_image = out + b * H * L.plane();
      ring.reset();
      const auto fill = [&](int64_t r, float* p) {
        load_row(image, r, H, p + x_at, L);
        if (!f.expand()) return;
        if (r < 0 || r >= L.rows) {
          zero_rows(p, C, L);
          return;
        }
        affine<Epilogue::kClamp6>(p + x_at, H, f.w_expand.data(), f.b_expand.data(), p, C, L);
        zero_tail(p, C, L);
      };
      for (int64_t i = r0; i < r1; ++i) {
        for (int64_t dy = 0; dy < k; ++dy) rows[dy] = ring.get(i - L.pad + dy, fill);
        depthwise_clamp6(rows.data(), f.w_depthwise.data(), f.b_depthwise.data(), t2.data(), C, L);
        const float* x_row = rows[L.pad] + x_at;
        affine<Epilogue::kResidual>(t2.data(), C, f.w_project.data(), f.b_project.data(), acc.data(), H, L, x_row,
                                    f.residual.data());
        store_row(acc.data(), H, out_image, i, L);
      }
    }
  });
}

void check_input(const Tensor& x, int64_t kernel, int64_t pad) {
  TORCH_CHECK(x.device().is_cpu(), "refiner_hf refinement kernels run on CPU tensors");
  TORCH_CHECK(x.dim() == 4, "expected attention maps of shape (batch, heads, rows, cols)");
  TORCH_CHECK(x.scalar_type() == at::kFloat || x.scalar_type() == at::kBFloat16,
              "refinement kernels support float32 and bfloat16 maps");
  TORCH_CHECK(kernel >= 1 && kernel <= 32 && pad >= 0 && pad < kernel && kernel - 1 - pad <= kLanes && pad <= kLanes,
              "unsupported depthwise kernel size / padding");
}

Tensor refine_eval(const Tensor& x_in, const std::optional<Tensor>& w_expand, const std::optional<Tensor>& b_expand,
                   const Tensor& w_depthwise, const Tensor& b_depthwise, const Tensor& w_project,
                   const Tensor& b_project, const Tensor& residual_scale, int64_t padding) {
  const int64_t kernel = w_depthwise.size(-1);
  check_input(x_in, kernel, padding);
  const Tensor x = x_in.contiguous();
  const bool expand = w_expand.has_value() && w_expand->defined();
  const int64_t channels = w_depthwise.size(0);
  const Layout L = make_layout(x, channels, kernel, padding);
  TORCH_CHECK(expand || channels == L.heads, "without expansion the depthwise convolution has one channel per head");
  Folded f;
  if (expand) {
    f.w_expand = to_vector(*w_expand);
    f.b_expand = to_vector(b_expand.value());
  }
  f.w_depthwise = to_vector(w_depthwise);
  f.b_depthwise = to_vector(b_depthwise);
  f.w_project = to_vector(w_project);
  f.b_project = to_vector(b_project);
  f.residual = to_vector(residual_scale);
  Tensor out = at::empty_like(x);
  if (x.scalar_type() == at::kFloat) {
    run_folded(x.data_ptr<float>(), out.data_ptr<float>(), x.size(0), L, f);
  } else {
    run_folded(x.data_ptr<at::BFloat16>(), out.data_ptr<at::BFloat16>(), x.size(0), L, f);
  }
  return out;
}

// ----------------------------------------------------------------------------------------------------------------
// Training. Raw (unfolded) parameters and the batch statistics of each pass.

struct TrainParams {
  bool expand = false;
  std::vector<float> w_expand, w_depthwise, w_project;  // [C][H], [C][k][k], [H][C]
  Tensor bn1_weight, bn1_bias, bn2_weight, bn2_bias, bn3_weight, bn3_bias, bna_weight, bna_bias;
  double eps1 = 1e-5, eps2 = 1e-5, eps3 = 1e-5, epsa = 1e-5, scale = 1.0;
};

TrainParams train_params(const std::optional<Tensor>& w_expand, const std::optional<Tensor>& bn1_weight,
                         const std::optional<Tensor>& bn1_bias, const Tensor& w_depthwise, const Tensor& bn2_weight,
                         const Tensor& bn2_bias, const Tensor& w_project, const Tensor& bn3_weight,
                         const Tensor& bn3_bias, const Tensor& bna_weight, const Tensor& bna_bias,
                         c10::ArrayRef<double> eps, double scale) {
  TORCH_CHECK(eps.size() == 4, "expected the epsilons of the four BatchNorms");
  TrainParams p;
  p.expand = w_expand.has_value() && w_expand->defined();
  if (p.expand) {
    p.w_expand = to_vector(*w_expand);
    p.bn1_weight = bn1_weight.value();
    p.bn1_bias = bn1_bias.value();
  }
  p.w_depthwise = to_vector(w_depthwise);
  p.w_project = to_vector(w_project);
  p.bn2_weight = bn2_weight;
  p.bn2_bias = bn2_bias;
  p.bn3_weight = bn3_weight;
  p.bn3_bias = bn3_bias;
  p.bna_weight = bna_weight;
  p.bna_bias = bna_bias;
  p.eps1 = eps[0];
  p.eps2 = eps[1];
  p.eps3 = eps[2];
  p.epsa = eps[3];
  p.scale = scale;
  return p;
}

// Statistics of the whole forward: the four BatchNorms' batch normalisations.
struct TrainStats {
  Normalization bn1, bn2, bn3, bna;
  std::vector<float> var1, var2, var3, vara;
};

// Everything a row needs from the expansion: t1 (folded, for the forward) and optionally yhat1.
template <typename T>
struct Expansion {
  const Layout& L;
  const TrainParams& p;
  const Folded& f;                   // w_expand / b_expand folded with bn1's batch statistics
  const Normalization* bn1;          // when set, yhat1 is also kept (after t1 in the row set)
  Buffer xrow, y;

  Expansion(const Layout& layout, const TrainParams& params, const Folded& folded, const Normalization* n)
      : L(layout), p(params), f(folded), bn1(n), xrow(layout.row_set(layout.heads), 0.f),
        y(layout.row_set(layout.channels), 0.f) {}

  int64_t size() const { return L.row_set(L.channels) * (bn1 ? 2 : 1); }

  void fill(const T* image, int64_t r, float* dst) {
    const int64_t H = L.heads, C = L.channels;
    if (!p.expand) {
      load_row(image, r, H, dst, L);
      return;
    }
    if (r < 0 || r >= L.rows) {
      zero_rows(dst, bn1 ? 2 * C : C, L);
      return;
    }
    load_row(image, r, H, xrow.data(), L);
    if (bn1) {
      affine(xrow.data(), H, p.w_expand.data(), nullptr, y.data(), C, L);
      normalize(y.data(), *bn1, dst + L.row_set(C), dst, C, L);
    } else {
      affine<Epilogue::kClamp6>(xrow.data(), H, f.w_expand.data(), f.b_expand.data(), dst, C, L);
      zero_tail(dst, C, L);
    }
  }
};

template <typename T>
void train_forward(const T* x, T* out, int64_t batch, const Layout& L, const TrainParams& p, TrainStats* s) {
  const int64_t H = L.heads, C = L.channels, k = L.kernel;
  const Tasks tasks = make_tasks(batch, L.rows);
  const Vec mask = tail_mask(L);
  Folded f;

  // Pass 1: statistics of y1 = W_e x.
  if (p.expand) {
    std::vector<Moments> parts(tasks.count() * C);
    at::parallel_for(0, tasks.count(), 1, [&](int64_t begin, int64_t end) {
      Buffer xrow(L.row_set(H), 0.f), y(L.row_set(C), 0.f);
      for (int64_t task = begin; task < end; ++task) {
        const auto [b, r0, r1] = tasks.span(task);
        Moments* m = parts.data() + task * C;
        for (int64_t i = r0; i < r1; ++i) {
          load_row(x + b * H * L.plane(), i, H, xrow.data(), L);
          affine(xrow.data(), H, p.w_expand.data(), nullptr, y.data(), C, L);
          for (int64_t c = 0; c < C; ++c) accumulate(m[c], y.data() + c * L.stride, L, mask);
        }
      }
    });
    std::vector<double> mean, var;
    combine(parts, tasks.count(), C, &mean, &var);
    s->bn1 = normalization(mean, var, p.bn1_weight, p.bn1_bias, p.eps1, &s->var1);
    fold(s->bn1, p.w_expand, H, &f.w_expand, &f.b_expand);
  }

  // Pass 2: statistics of y2 = dw(t1).
  {
    std::vector<Moments> parts(tasks.count() * C);
    at::parallel_for(0, tasks.count(), 1, [&](int64_t begin, int64_t end) {
      Expansion<T> expansion(L, p, f, nullptr);
      RowRing ring(k, expansion.size());
      Buffer y(L.row_set(C), 0.f);
      std::vector<const float*> rows(k);
      for (int64_t task = begin; task < end; ++task) {
        const auto [b, r0, r1] = tasks.span(task);
        const T* image = x + b * H * L.plane();
        const auto fill = [&](int64_t r, float* dst) { expansion.fill(image, r, dst); };
        Moments* m = parts.data() + task * C;
        ring.reset();
        for (int64_t i = r0; i < r1; ++i) {
          for (int64_t dy = 0; dy < k; ++dy) rows[dy] = ring.get(i - L.pad + dy, fill);
          depthwise(rows.data(), p.w_depthwise.data(), nullptr, y.data(), C, L);
          for (int64_t c = 0; c < C; ++c) accumulate(m[c], y.data() + c * L.stride, L, mask);
        }
      }
    });
    std::vector<double> mean, var;
    combine(parts, tasks.count(), C, &mean, &var);
    s->bn2 = normalization(mean, var, p.bn2_weight, p.bn2_bias, p.eps2, &s->var2);
    fold(s->bn2, p.w_depthwise, k * k, &f.w_depthwise, &f.b_depthwise);
  }

  // Pass 3: statistics of y3 = W_p t2, and those of z = bn3(y3) + x from those of x and the covariance.
  {
    std::vector<Moments> parts_y(tasks.count() * H), parts_x(tasks.count() * H);
    at::parallel_for(0, tasks.count(), 1, [&](int64_t begin, int64_t end) {
      Expansion<T> expansion(L, p, f, nullptr);
      RowRing ring(k, expansion.size());
      Buffer t2(L.row_set(C), 0.f), y(L.row_set(H), 0.f), xrow(L.row_set(H), 0.f);
      std::vector<const float*> rows(k);
      for (int64_t task = begin; task < end; ++task) {
        const auto [b, r0, r1] = tasks.span(task);
        const T* image = x + b * H * L.plane();
        const auto fill = [&](int64_t r, float* dst) { expansion.fill(image, r, dst); };
        Moments* my = parts_y.data() + task * H;
        Moments* mx = parts_x.data() + task * H;
        ring.reset();
        for (int64_t i = r0; i < r1; ++i) {
          for (int64_t dy = 0; dy < k; ++dy) rows[dy] = ring.get(i - L.pad + dy, fill);
          depthwise_clamp6(rows.data(), f.w_depthwise.data(), f.b_depthwise.data(), t2.data(), C, L);
          affine(t2.data(), C, p.w_project.data(), nullptr, y.data(), H, L);
          load_row(image, i, H, xrow.data(), L);
          for (int64_t h = 0; h < H; ++h) {
            const float* xr = xrow.data() + h * L.stride;
            // x's shift is needed by the cross sum before x's own first accumulation sets it.
            if (mx[h].count == 0.0) mx[h].shift = masked_mean(xr, L, mask);
            accumulate(my[h], y.data() + h * L.stride, L, mask, xr, &mx[h]);
            accumulate(mx[h], xr, L, mask);
          }
        }
      }
    });
    std::vector<double> mean3, var3, mean_x, var_x;
    combine(parts_y, tasks.count(), H, &mean3, &var3);
    combine(parts_x, tasks.count(), H, &mean_x, &var_x);
    const std::vector<double> cov = covariance(parts_y, parts_x, tasks.count(), H);
    s->bn3 = normalization(mean3, var3, p.bn3_weight, p.bn3_bias, p.eps3, &s->var3);
    // z = a3 (y3 - mean3) + beta3 + x: mean beta3 + mean(x), variance a3^2 var3 + var(x) + 2 a3 cov(y3, x).
    std::vector<double> mean_z(H), var_z(H);
    for (int64_t h = 0; h < H; ++h) {
      const double a3 = double(s->bn3.weight[h]) * s->bn3.invstd[h];
      mean_z[h] = double(s->bn3.bias[h]) + mean_x[h];
      var_z[h] = a3 * a3 * var3[h] + var_x[h] + 2.0 * a3 * cov[h];
    }
    s->bna = normalization(mean_z, var_z, p.bna_weight, p.bna_bias, p.epsa, &s->vara);
  }

  // Pass 4: the output, with every BatchNorm folded with its batch statistics:
  // out = scale * (ga * (a3 (W_p t2 - mean3) + beta3 + x - mean_z) + beta_a).
  f.w_project.resize(H * C);
  f.b_project.resize(H);
  f.residual.resize(H);
  for (int64_t h = 0; h < H; ++h) {
    const float ga = s->bna.weight[h] * s->bna.invstd[h];
    const float a3 = s->bn3.weight[h] * s->bn3.invstd[h];
    const float sa = static_cast<float>(p.scale) * ga;
    for (int64_t c = 0; c < C; ++c) f.w_project[h * C + c] = sa * a3 * p.w_project[h * C + c];
    f.b_project[h] = static_cast<float>(p.scale) *
                     (ga * (s->bn3.bias[h] - a3 * s->bn3.mean[h] - s->bna.mean[h]) + s->bna.bias[h]);
    f.residual[h] = sa;
  }
  run_folded(x, out, batch, L, f);
}

Tensor pack_stats(const Normalization& n, const std::vector<float>& var) {
  const int64_t size = static_cast<int64_t>(n.mean.size());
  Tensor t = at::empty({2, size}, at::kFloat);
  float* d = t.data_ptr<float>();
  std::copy(n.mean.begin(), n.mean.end(), d);
  std::copy(var.begin(), var.end(), d + size);
  return t;
}

std::tuple<Tensor, Tensor, Tensor, Tensor, Tensor> refine_train(
    const Tensor& x_in, const std::optional<Tensor>& w_expand, const std::optional<Tensor>& bn1_weight,
    const std::optional<Tensor>& bn1_bias, const Tensor& w_depthwise, const Tensor& bn2_weight,
    const Tensor& bn2_bias, const Tensor& w_project, const Tensor& bn3_weight, const Tensor& bn3_bias,
    const Tensor& bna_weight, const Tensor& bna_bias, c10::ArrayRef<double> eps, double scale, int64_t padding) {
  const int64_t kernel = w_depthwise.size(-1);
  check_input(x_in, kernel, padding);
  const Tensor x = x_in.contiguous();
  const TrainParams p = train_params(w_expand, bn1_weight, bn1_bias, w_depthwise, bn2_weight, bn2_bias, w_project,
                                     bn3_weight, bn3_bias, bna_weight, bna_bias, eps, scale);
  const Layout L = make_layout(x, w_depthwise.size(0), kernel, padding);
  TORCH_CHECK(p.expand || L.channels == L.heads, "without expansion the depthwise convolution has one channel per head");
  TrainStats s;
  Tensor out = at::empty_like(x);
  if (x.scalar_type() == at::kFloat) {
    train_forward(x.data_ptr<float>(), out.data_ptr<float>(), x.size(0), L, p, &s);
  } else {
    train_forward(x.data_ptr<at::BFloat16>(), out.data_ptr<at::BFloat16>(), x.size(0), L, p, &s);
  }
  const Tensor stats1 = p.expand ? pack_stats(s.bn1, s.var1) : at::empty({2, 0}, at::kFloat);
  return {out, stats1, pack_stats(s.bn2, s.var2), pack_stats(s.bn3, s.var3), pack_stats(s.bna, s.vara)};
}

// ----------------------------------------------------------------------------------------------------------------
// Training backward. With g the output gradient and n the number of positions per channel:
//   ga = scale * g;  dbeta_a = sum ga;  dgamma_a = sum ga zhat
//   gz = ka (ga - dbeta_a / n - zhat dgamma_a / n),  ka = gamma_a invstd_a       (also the residual's gradient)
//   gy3 = k3 (gz - dbeta3 / n - yhat3 dgamma3 / n),  dbeta3 = sum gz, dgamma3 = sum gz yhat3
//   dW_p = sum gy3 t2^T;  gbn2 = (W_p^T gy3) [0 < bn2 < 6];  and so on down to gx = W_e^T gy1 + gz.
// Four passes over the rows, each a function below: B1 reduces what gz needs, B2 computes gz (into grad_x), gy3
// (stored) and the projection's gradients, B3 the depthwise gradients and gbn1 (stored), B4 the expansion's gradients
// and the rest of grad_x.

// Where each parameter's gradient goes in the flat vector the backward fills.
struct GradSlots {
  int64_t gamma_a, beta_a, gamma3, beta3, w_project, gamma2, beta2, w_depthwise, w_expand, gamma1, beta1, size;
  GradSlots(int64_t H, int64_t C, int64_t k) {
    gamma_a = 0;
    beta_a = H;
    gamma3 = 2 * H;
    beta3 = 3 * H;
    w_project = 4 * H;
    gamma2 = w_project + H * C;
    beta2 = gamma2 + C;
    w_depthwise = beta2 + C;
    w_expand = w_depthwise + C * k * k;
    gamma1 = w_expand + C * H;
    beta1 = gamma1 + C;
    size = beta1 + C;
  }
};

// What every pass of the backward reads: the inputs, the saved statistics, the folded forward weights and the work
// split. `out` is the flat gradient vector (see GradSlots).
template <typename T>
struct Backward {
  const T* x;
  const T* grad_out;
  float* grad_x;
  int64_t batch;
  const Layout& L;
  const TrainParams& p;
  const TrainStats& s;
  std::vector<double>& out;
  int64_t H, C, k;
  double count;  // positions per channel
  Tasks tasks;
  float scale;
  GradSlots slot;
  Folded f;  // t1 and t2 from x, with the saved batch statistics
  std::vector<float> w_project_t;

  Backward(const T* x_, const T* grad_out_, float* grad_x_, int64_t batch_, const Layout& L_, const TrainParams& p_,
           const TrainStats& s_, std::vector<double>* out_)
      : x(x_), grad_out(grad_out_), grad_x(grad_x_), batch(batch_), L(L_), p(p_), s(s_), out(*out_),
        H(L_.heads), C(L_.channels), k(L_.kernel), count(static_cast<double>(batch_) * L_.plane()),
        tasks(make_tasks(batch_, L_.rows)), scale(static_cast<float>(p_.scale)),
        slot(L_.heads, L_.channels, L_.kernel), w_project_t(transpose(p_.w_project, L_.heads, L_.channels)) {
    if (p.expand) fold(s.bn1, p.w_expand, H, &f.w_expand, &f.b_expand);
    fold(s.bn2, p.w_depthwise, k * k, &f.w_depthwise, &f.b_depthwise);
  }

  const T* image(int64_t b) const { return x + b * H * L.plane(); }

  // From t2 and the input row: y3, yhat3 and zhat (the normalised input of the last BatchNorm).
  void head_normals(const float* t2, const float* xrow, float* y3, float* yhat3, float* zhat) const {
    affine(t2, C, p.w_project.data(), nullptr, y3, H, L);
    normalize(y3, s.bn3, yhat3, nullptr, H, L);
    for (int64_t h = 0; h < H; ++h) {
      const Vec w3 = splat(s.bn3.weight[h]), b3 = splat(s.bn3.bias[h]);
      const Vec mean = splat(s.bna.mean[h]), invstd = splat(s.bna.invstd[h]);
      for (int64_t q = 0; q < L.chunks; ++q) {
        const int64_t i = h * L.stride + L.offset + q * kLanes;
        store(zhat + i, (w3 * load(yhat3 + i) + b3 + load(xrow + i) - mean) * invstd);
      }
    }
    zero_tail(zhat, H, L);
  }
};

// Per head: gz = ka (scale g - ma - zhat m2a) and gy3 = k3 (gz - m3 - yhat3 m23).
struct HeadCoefficients {
  std::vector<float> ka, ma, m2a, k3, m3, m23;
};

// Per channel of the depthwise convolution: gy2 = k2 (gbn2 - m2 - yhat2 m22).
struct DepthwiseCoefficients {
  std::vector<float> k2, m2, m22;
};

// B1: the sums over g, g zhat, g yhat3, zhat yhat3, zhat and yhat3 that give both per-head BatchNorms' gradients.
template <typename T>
HeadCoefficients backward_head_sums(const Backward<T>& bw) {
  const Layout& L = bw.L;
  const int64_t H = bw.H, C = bw.C, k = bw.k;
  constexpr int64_t kSums = 6;
  std::vector<double> partial(bw.tasks.count() * kSums * H, 0.0);
  at::parallel_for(0, bw.tasks.count(), 1, [&](int64_t begin, int64_t end) {
    Expansion<T> expansion(L, bw.p, bw.f, nullptr);
    RowRing ring(k, expansion.size());
    Buffer t2(L.row_set(C), 0.f), y3(L.row_set(H), 0.f), yhat3(L.row_set(H), 0.f),
        zhat(L.row_set(H), 0.f), xrow(L.row_set(H), 0.f), grow(L.row_set(H), 0.f);
    std::vector<const float*> rows(k);
    for (int64_t task = begin; task < end; ++task) {
      const auto [b, r0, r1] = bw.tasks.span(task);
      const T* image = bw.image(b);
      const auto fill = [&](int64_t r, float* dst) { expansion.fill(image, r, dst); };
      double* acc = partial.data() + task * kSums * H;
      ring.reset();
      for (int64_t i = r0; i < r1; ++i) {
        for (int64_t dy = 0; dy < k; ++dy) rows[dy] = ring.get(i - L.pad + dy, fill);
        depthwise_clamp6(rows.data(), bw.f.w_depthwise.data(), bw.f.b_depthwise.data(), t2.data(), C, L);
        load_row(image, i, H, xrow.data(), L);
        bw.head_normals(t2.data(), xrow.data(), y3.data(), yhat3.data(), zhat.data());
        load_row(bw.grad_out + b * H * L.plane(), i, H, grow.data(), L);
        for (int64_t h = 0; h < H; ++h) {
          const float* g = grow.data() + h * L.stride;
          const float* z = zhat.data() + h * L.stride;
          const float* y = yhat3.data() + h * L.stride;
          acc[h] += row_sum(g, L);
          acc[H + h] += row_dot(g, z, L);
          acc[2 * H + h] += row_dot(g, y, L);
          acc[3 * H + h] += row_dot(z, y, L);
          acc[4 * H + h] += row_sum(z, L);
          acc[5 * H + h] += row_sum(y, L);
        }
      }
    }
  });
  const std::vector<double> sums = reduce_tasks(partial, bw.tasks.count(), kSums * H);
  HeadCoefficients c{std::vector<float>(H), std::vector<float>(H), std::vector<float>(H),
                     std::vector<float>(H), std::vector<float>(H), std::vector<float>(H)};
  const double count = bw.count;
  for (int64_t h = 0; h < H; ++h) {
    const double dbeta_a = bw.p.scale * sums[h], dgamma_a = bw.p.scale * sums[H + h];
    const double k_a = double(bw.s.bna.weight[h]) * bw.s.bna.invstd[h];
    const double dbeta3 = k_a * (dbeta_a - dbeta_a - dgamma_a * sums[4 * H + h] / count);
    const double dgamma3 =
        k_a * (bw.p.scale * sums[2 * H + h] - dbeta_a * sums[5 * H + h] / count - dgamma_a * sums[3 * H + h] / count);
    c.ka[h] = static_cast<float>(k_a);
    c.ma[h] = static_cast<float>(dbeta_a / count);
    c.m2a[h] = static_cast<float>(dgamma_a / count);
    c.k3[h] = bw.s.bn3.weight[h] * bw.s.bn3.invstd[h];
    c.m3[h] = static_cast<float>(dbeta3 / count);
    c.m23[h] = static_cast<float>(dgamma3 / count);
    bw.out[bw.slot.gamma_a + h] = dgamma_a;
    bw.out[bw.slot.beta_a + h] = dbeta_a;
    bw.out[bw.slot.gamma3 + h] = dgamma3;
    bw.out[bw.slot.beta3 + h] = dbeta3;
  }
  return c;
}

// B2: gz into grad_x, gy3 into `gy3_all` (H channels, where gbn2 would need C), the projection's weight gradient,
// and the sums of gbn2 that give the depthwise BatchNorm's gradients.
template <typename T>
DepthwiseCoefficients backward_projection(const Backward<T>& bw, const HeadCoefficients& c, float* gy3_all) {
  const Layout& L = bw.L;
  const int64_t H = bw.H, C = bw.C, k = bw.k;
  const int64_t kSums = 2 * C + H * C;  // sum gbn2, sum gbn2 yhat2, dW_p
  std::vector<double> partial(bw.tasks.count() * kSums, 0.0);
  at::parallel_for(0, bw.tasks.count(), 1, [&](int64_t begin, int64_t end) {
    Expansion<T> expansion(L, bw.p, bw.f, nullptr);
    RowRing ring(k, expansion.size());
    Buffer y2(L.row_set(C), 0.f), yhat2(L.row_set(C), 0.f), t2(L.row_set(C), 0.f),
        gt2(L.row_set(C), 0.f), y3(L.row_set(H), 0.f), yhat3(L.row_set(H), 0.f), zhat(L.row_set(H), 0.f),
        xrow(L.row_set(H), 0.f), grow(L.row_set(H), 0.f), gy3(L.row_set(H), 0.f);
    std::vector<const float*> rows(k);
    for (int64_t task = begin; task < end; ++task) {
      const auto [b, r0, r1] = bw.tasks.span(task);
      const T* image = bw.image(b);
      const auto fill = [&](int64_t r, float* dst) { expansion.fill(image, r, dst); };
      double* acc = partial.data() + task * kSums;
      ring.reset();
      for (int64_t i = r0; i < r1; ++i) {
        for (int64_t dy = 0; dy < k; ++dy) rows[dy] = ring.get(i - L.pad + dy, fill);
        depthwise(rows.data(), bw.p.w_depthwise.data(), nullptr, y2.data(), C, L);
        normalize(y2.data(), bw.s.bn2, yhat2.data(), t2.data(), C, L);
        load_row(image, i, H, xrow.data(), L);
        bw.head_normals(t2.data(), xrow.data(), y3.data(), yhat3.data(), zhat.data());
        load_row(bw.grad_out + b * H * L.plane(), i, H, grow.data(), L);
        for (int64_t h = 0; h < H; ++h) {
          const Vec vka = splat(c.ka[h]), vma = splat(c.ma[h]), vm2a = splat(c.m2a[h]), vs = splat(bw.scale);
          const Vec vk3 = splat(c.k3[h]), vm3 = splat(c.m3[h]), vm23 = splat(c.m23[h]);
          float* gz = bw.grad_x + (b * H + h) * L.plane() + i * L.cols;
          for (int64_t q = 0; q < L.chunks; ++q) {
            const int64_t j = h * L.stride + L.offset + q * kLanes;
            const Vec vgz = vka * (vs * load(grow.data() + j) - vma - load(zhat.data() + j) * vm2a);
            store(gy3.data() + j, vk3 * (vgz - vm3 - load(yhat3.data() + j) * vm23));
            // grad_x rows are not padded: write the valid columns only.
            const int64_t valid = std::min<int64_t>(kLanes, L.cols - q * kLanes);
            for (int64_t e = 0; e < valid; ++e) gz[q * kLanes + e] = vgz[e];
          }
        }
        zero_tail(gy3.data(), H, L);
        store_row(gy3.data(), H, gy3_all + b * H * L.plane(), i, L);
        outer_accumulate(gy3.data(), H, t2.data(), C, L, acc + 2 * C);
        affine(gy3.data(), H, bw.w_project_t.data(), nullptr, gt2.data(), C, L);
        relu6_backward(gt2.data(), yhat2.data(), bw.s.bn2, C, L);
        for (int64_t ch = 0; ch < C; ++ch) {
          const float* g = gt2.data() + ch * L.stride;
          acc[ch] += row_sum(g, L);
          acc[C + ch] += row_dot(g, yhat2.data() + ch * L.stride, L);
        }
      }
    }
  });
  const std::vector<double> sums = reduce_tasks(partial, bw.tasks.count(), kSums);
  DepthwiseCoefficients d{std::vector<float>(C), std::vector<float>(C), std::vector<float>(C)};
  for (int64_t ch = 0; ch < C; ++ch) {
    d.k2[ch] = bw.s.bn2.weight[ch] * bw.s.bn2.invstd[ch];
    d.m2[ch] = static_cast<float>(sums[ch] / bw.count);
    d.m22[ch] = static_cast<float>(sums[C + ch] / bw.count);
    bw.out[bw.slot.gamma2 + ch] = sums[C + ch];
    bw.out[bw.slot.beta2 + ch] = sums[ch];
  }
  for (int64_t i = 0; i < H * C; ++i) bw.out[bw.slot.w_project + i] = sums[2 * C + i];
  return d;
}

// B3: gy2 over the block and a halo (gbn2 again from the stored gy3), the depthwise weight gradient, gt1 =
// dw^T(gy2), and either the rest of grad_x (no expansion: t1 = x) or gbn1 into `gbn1_all` with its sums. Returns
// the sums of gbn1 and gbn1 yhat1 per channel (empty without expansion).
template <typename T>
std::vector<double> backward_depthwise(const Backward<T>& bw, const DepthwiseCoefficients& d, const float* gy3_all,
                                       float* gbn1_all) {
  const Layout& L = bw.L;
  const int64_t H = bw.H, C = bw.C, k = bw.k;
  const bool expand = bw.p.expand;
  const int64_t kSums = C * k * k + 2 * C;  // dW_dw, sum gbn1, sum gbn1 yhat1
  std::vector<double> partial(bw.tasks.count() * kSums, 0.0);
  const Normalization* bn1 = expand ? &bw.s.bn1 : nullptr;
  at::parallel_for(0, bw.tasks.count(), 1, [&](int64_t begin, int64_t end) {
    Expansion<T> expansion(L, bw.p, bw.f, bn1);
    RowRing t1_ring(k, expansion.size());
    RowRing gy2_ring(k, L.row_set(C));
    Buffer y2(L.row_set(C), 0.f), yhat2(L.row_set(C), 0.f), gt1(L.row_set(C), 0.f), gy3(L.row_set(H), 0.f);
    std::vector<const float*> rows(k), grows(k);
    for (int64_t task = begin; task < end; ++task) {
      // Named variables, not a structured binding: C++17 lambdas (fill_gy2) cannot capture bindings.
      const RowSpan span = bw.tasks.span(task);
      const int64_t b = span.image, r0 = span.first, r1 = span.end;
      const T* image = bw.image(b);
      const auto fill = [&](int64_t r, float* dst) { expansion.fill(image, r, dst); };
      double* acc = partial.data() + task * kSums;
      t1_ring.reset();
      gy2_ring.reset();
      // gy2 of row r (zero outside the map); rows in the block also add to dW_dw.
      const auto fill_gy2 = [&](int64_t r, float* dst) {
        if (r < 0 || r >= L.rows) {
          zero_rows(dst, C, L);
          return;
        }
        for (int64_t dy = 0; dy < k; ++dy) rows[dy] = t1_ring.get(r - L.pad + dy, fill);
        depthwise(rows.data(), bw.p.w_depthwise.data(), nullptr, y2.data(), C, L);
        normalize(y2.data(), bw.s.bn2, yhat2.data(), nullptr, C, L);
        load_row(gy3_all + b * H * L.plane(), r, H, gy3.data(), L);
        affine(gy3.data(), H, bw.w_project_t.data(), nullptr, dst, C, L);
        relu6_backward(dst, yhat2.data(), bw.s.bn2, C, L);
        for (int64_t ch = 0; ch < C; ++ch) {
          float* g = dst + ch * L.stride + L.offset;
          const Vec vk = splat(d.k2[ch]), vm = splat(d.m2[ch]), vm2 = splat(d.m22[ch]);
          const float* yh = yhat2.data() + ch * L.stride + L.offset;
          for (int64_t q = 0; q < L.chunks; ++q) {
            store(g + q * kLanes, vk * (load(g + q * kLanes) - vm - load(yh + q * kLanes) * vm2));
          }
        }
        zero_tail(dst, C, L);
        if (r >= r0 && r < r1) depthwise_weight_accumulate(dst, rows.data(), C, L, acc);
      };
      // gt1 row i needs gy2 rows i - (k - 1 - pad) .. i + pad.
      for (int64_t i = r0; i < r1; ++i) {
        // Increasing rows, so that the rings slide rather than refill.
        for (int64_t dy = k - 1; dy >= 0; --dy) grows[dy] = gy2_ring.get(i + L.pad - dy, fill_gy2);
        depthwise_transposed(grows.data(), bw.p.w_depthwise.data(), gt1.data(), C, L);
        zero_tail(gt1.data(), C, L);
        if (!expand) {
          // t1 = x: the gradient goes straight to grad_x.
          for (int64_t ch = 0; ch < C; ++ch) {
            float* gx = bw.grad_x + (b * H + ch) * L.plane() + i * L.cols;
            const float* g = gt1.data() + ch * L.stride + L.offset;
            for (int64_t j = 0; j < L.cols; ++j) gx[j] += g[j];
          }
          continue;
        }
        // Row i of t1 and yhat1 is still in the ring (the fills above only reached rows up to i + k - 1 - pad).
        const float* t1 = t1_ring.get(i, fill);
        const float* yhat1 = t1 + L.row_set(C);
        for (int64_t ch = 0; ch < C; ++ch) {
          float* g = gt1.data() + ch * L.stride + L.offset;
          const float* t = t1 + ch * L.stride + L.offset;
          const Vec zero{}, six = splat(6.f);
          for (int64_t q = 0; q < L.chunks; ++q) {
            const Vec tv = load(t + q * kLanes);
            store(g + q * kLanes, (tv > zero) & (tv < six) ? load(g + q * kLanes) : zero);
          }
          acc[C * k * k + ch] += row_sum(gt1.data() + ch * L.stride, L);
          acc[C * k * k + C + ch] += row_dot(gt1.data() + ch * L.stride, yhat1 + ch * L.stride, L);
          std::memcpy(gbn1_all + ((b * C + ch) * L.rows + i) * L.cols, g, L.cols * sizeof(float));
        }
      }
    }
  });
  const std::vector<double> sums = reduce_tasks(partial, bw.tasks.count(), kSums);
  for (int64_t i = 0; i < C * k * k; ++i) bw.out[bw.slot.w_depthwise + i] = sums[i];
  if (!expand) return {};
  return std::vector<double>(sums.begin() + C * k * k, sums.end());
}

// B4: gy1 = k1 (gbn1 - m1 - yhat1 m21), the expansion's weight gradient dW_e = sum gy1 x^T, its BatchNorm's
// gradients, and grad_x += W_e^T gy1.
template <typename T>
void backward_expansion(const Backward<T>& bw, const std::vector<double>& bn1_sums, const float* gbn1_all) {
  const Layout& L = bw.L;
  const int64_t H = bw.H, C = bw.C;
  std::vector<float> k1(C), m1(C), m21(C);
  for (int64_t c = 0; c < C; ++c) {
    const double dbeta1 = bn1_sums[c], dgamma1 = bn1_sums[C + c];
    k1[c] = bw.s.bn1.weight[c] * bw.s.bn1.invstd[c];
    m1[c] = static_cast<float>(dbeta1 / bw.count);
    m21[c] = static_cast<float>(dgamma1 / bw.count);
    bw.out[bw.slot.gamma1 + c] = dgamma1;
    bw.out[bw.slot.beta1 + c] = dbeta1;
  }
  const std::vector<float> w_expand_t = transpose(bw.p.w_expand, C, H);
  std::vector<double> partial(bw.tasks.count() * C * H, 0.0);
  at::parallel_for(0, bw.tasks.count(), 1, [&](int64_t begin, int64_t end) {
    Buffer xrow(L.row_set(H), 0.f), y1(L.row_set(C), 0.f), yhat1(L.row_set(C), 0.f),
        gy1(L.row_set(C), 0.f), gx(L.row_set(H), 0.f);
    for (int64_t task = begin; task < end; ++task) {
      const auto [b, r0, r1] = bw.tasks.span(task);
      double* acc = partial.data() + task * C * H;
      for (int64_t i = r0; i < r1; ++i) {
        load_row(bw.image(b), i, H, xrow.data(), L);
        affine(xrow.data(), H, bw.p.w_expand.data(), nullptr, y1.data(), C, L);
        normalize(y1.data(), bw.s.bn1, yhat1.data(), nullptr, C, L);
        for (int64_t c = 0; c < C; ++c) {
          float* d = gy1.data() + c * L.stride + L.offset;
          std::memcpy(d, gbn1_all + ((b * C + c) * L.rows + i) * L.cols, L.cols * sizeof(float));
          const Vec vk = splat(k1[c]), vm = splat(m1[c]), vm2 = splat(m21[c]);
          const float* yh = yhat1.data() + c * L.stride + L.offset;
          for (int64_t q = 0; q < L.chunks; ++q) {
            store(d + q * kLanes, vk * (load(d + q * kLanes) - vm - load(yh + q * kLanes) * vm2));
          }
        }
        zero_tail(gy1.data(), C, L);
        outer_accumulate(gy1.data(), C, xrow.data(), H, L, acc);
        affine(gy1.data(), C, w_expand_t.data(), nullptr, gx.data(), H, L);
        for (int64_t h = 0; h < H; ++h) {
          float* dst = bw.grad_x + (b * H + h) * L.plane() + i * L.cols;
          const float* g = gx.data() + h * L.stride + L.offset;
          for (int64_t j = 0; j < L.cols; ++j) dst[j] += g[j];
        }
      }
    }
  });
  const std::vector<double> sums = reduce_tasks(partial, bw.tasks.count(), C * H);
  for (int64_t i = 0; i < C * H; ++i) bw.out[bw.slot.w_expand + i] = sums[i];
}

template <typename T>
void train_backward(const T* x, const T* grad_out, float* grad_x, int64_t batch, const Layout& L,
                    const TrainParams& p, const TrainStats& s, std::vector<double>* grads) {
  const Backward<T> bw(x, grad_out, grad_x, batch, L, p, s, grads);
  const HeadCoefficients heads = backward_head_sums(bw);
  Tensor gy3 = at::empty({batch, L.heads, L.rows, L.cols}, at::kFloat);
  const DepthwiseCoefficients depthwise = backward_projection(bw, heads, gy3.data_ptr<float>());
  Tensor gbn1;
  if (p.expand) gbn1 = at::empty({batch, L.channels, L.rows, L.cols}, at::kFloat);
  const std::vector<double> bn1_sums =
      backward_depthwise(bw, depthwise, gy3.data_ptr<float>(), p.expand ? gbn1.data_ptr<float>() : nullptr);
  if (p.expand) backward_expansion(bw, bn1_sums, gbn1.data_ptr<float>());
}

Tensor from_doubles(const std::vector<double>& v, int64_t begin, at::IntArrayRef shape) {
  Tensor t = at::empty(shape, at::kFloat);
  float* d = t.data_ptr<float>();
  for (int64_t i = 0; i < t.numel(); ++i) d[i] = static_cast<float>(v[begin + i]);
  return t;
}

std::vector<Tensor> refine_train_backward(
    const Tensor& grad_out_in, const Tensor& x_in, const std::optional<Tensor>& w_expand,
    const std::optional<Tensor>& bn1_weight, const std::optional<Tensor>& bn1_bias, const Tensor& w_depthwise,
    const Tensor& bn2_weight, const Tensor& bn2_bias, const Tensor& w_project, const Tensor& bn3_weight,
    const Tensor& bn3_bias, const Tensor& bna_weight, const Tensor& bna_bias, const Tensor& stats1,
    const Tensor& stats2, const Tensor& stats3, const Tensor& statsa, c10::ArrayRef<double> eps, double scale,
    int64_t padding) {
  const int64_t kernel = w_depthwise.size(-1);
  check_input(x_in, kernel, padding);
  const Tensor x = x_in.contiguous();
  const Tensor grad_out = grad_out_in.to(x.scalar_type()).contiguous();
  TORCH_CHECK(grad_out.sizes() == x.sizes(), "the output gradient must have the input's shape");
  const TrainParams p = train_params(w_expand, bn1_weight, bn1_bias, w_depthwise, bn2_weight, bn2_bias, w_project,
                                     bn3_weight, bn3_bias, bna_weight, bna_bias, eps, scale);
  const Layout L = make_layout(x, w_depthwise.size(0), kernel, padding);
  const int64_t H = L.heads, C = L.channels, k = kernel;
  TrainStats s;
  if (p.expand) s.bn1 = normalization_from_stats(stats1, p.bn1_weight, p.bn1_bias, p.eps1);
  s.bn2 = normalization_from_stats(stats2, p.bn2_weight, p.bn2_bias, p.eps2);
  s.bn3 = normalization_from_stats(stats3, p.bn3_weight, p.bn3_bias, p.eps3);
  s.bna = normalization_from_stats(statsa, p.bna_weight, p.bna_bias, p.epsa);

  const GradSlots slot(H, C, k);
  std::vector<double> grads(slot.size, 0.0);
  Tensor grad_x = at::empty(x.sizes(), at::kFloat);
  if (x.scalar_type() == at::kFloat) {
    train_backward(x.data_ptr<float>(), grad_out.data_ptr<float>(), grad_x.data_ptr<float>(), x.size(0), L, p, s,
                   &grads);
  } else {
    train_backward(x.data_ptr<at::BFloat16>(), grad_out.data_ptr<at::BFloat16>(), grad_x.data_ptr<float>(),
                   x.size(0), L, p, s, &grads);
  }
  const Tensor empty = at::empty({0}, at::kFloat);
  return {
      grad_x.to(x.scalar_type()),
      p.expand ? from_doubles(grads, slot.w_expand, {C, H}) : empty,
      p.expand ? from_doubles(grads, slot.gamma1, {C}) : empty,
      p.expand ? from_doubles(grads, slot.beta1, {C}) : empty,
      from_doubles(grads, slot.w_depthwise, {C, k, k}),
      from_doubles(grads, slot.gamma2, {C}),
      from_doubles(grads, slot.beta2, {C}),
      from_doubles(grads, slot.w_project, {H, C}),
      from_doubles(grads, slot.gamma3, {H}),
      from_doubles(grads, slot.beta3, {H}),
      from_doubles(grads, slot.gamma_a, {H}),
      from_doubles(grads, slot.beta_a, {H}),
  };
}

}  // namespace

TORCH_LIBRARY(refiner_hf, m) {
  m.def(
      "refine_eval(Tensor x, Tensor? w_expand, Tensor? b_expand, Tensor w_depthwise, Tensor b_depthwise, "
      "Tensor w_project, Tensor b_project, Tensor residual_scale, int padding) -> Tensor");
  m.def(
      "refine_train(Tensor x, Tensor? w_expand, Tensor? bn1_weight, Tensor? bn1_bias, Tensor w_depthwise, "
      "Tensor bn2_weight, Tensor bn2_bias, Tensor w_project, Tensor bn3_weight, Tensor bn3_bias, "
      "Tensor bna_weight, Tensor bna_bias, float[] eps, float scale, int padding) "
      "-> (Tensor, Tensor, Tensor, Tensor, Tensor)");
  m.def(
      "refine_train_backward(Tensor grad_out, Tensor x, Tensor? w_expand, Tensor? bn1_weight, Tensor? bn1_bias, "
      "Tensor w_depthwise, Tensor bn2_weight, Tensor bn2_bias, Tensor w_project, Tensor bn3_weight, "
      "Tensor bn3_bias, Tensor bna_weight, Tensor bna_bias, Tensor stats1, Tensor stats2, Tensor stats3, "
      "Tensor statsa, float[] eps, float scale, int padding) -> Tensor[]");
}

TORCH_LIBRARY_IMPL(refiner_hf, CPU, m) {
  m.impl("refine_eval", &refine_eval);
  m.impl("refine_train", &refine_train);
  m.impl("refine_train_backward", &refine_train_backward);
}

}  // namespace refiner_hf
