// Vector helpers shared by the fused CPU kernels of refiner_hf (GCC/Clang vector extensions; the width follows
// the instruction set the file is compiled for).

#pragma once

#include <cmath>
#include <cstdint>
#include <cstring>
#include <new>
#include <vector>

namespace refiner_hf {

// Floats per vector, and the register tile of the 1x1 convolutions: kOutBlock output channels x kChunkBlock
// vectors of columns (18 of the 32 AVX-512 registers; 12 of the 16 AVX2 ones).
#if defined(__AVX512F__)
constexpr int64_t kLanes = 16;
constexpr int kOutBlock = 6;
#else
constexpr int64_t kLanes = 8;
constexpr int kOutBlock = 4;
#endif
constexpr int kChunkBlock = 3;
typedef float Vec __attribute__((vector_size(kLanes * sizeof(float))));
typedef int32_t IVec __attribute__((vector_size(kLanes * sizeof(int32_t))));

inline Vec load(const float* p) {
  Vec v;
  std::memcpy(&v, p, sizeof(Vec));
  return v;
}
inline void store(float* p, const Vec& v) { std::memcpy(p, &v, sizeof(Vec)); }
inline Vec splat(float s) { return Vec{} + s; }
inline Vec vmax(const Vec& a, const Vec& b) { return a > b ? a : b; }
inline Vec vmin(const Vec& a, const Vec& b) { return a < b ? a : b; }
inline Vec clamp6(const Vec& v) { return vmin(vmax(v, Vec{}), splat(6.f)); }
inline float hsum(const Vec& v) {
  float s = 0.f;
  for (int64_t i = 0; i < kLanes; ++i) s += v[i];
  return s;
}
inline float hmax(const Vec& v) {
  float m = v[0];
  for (int64_t i = 1; i < kLanes; ++i) m = v[i] > m ? v[i] : m;
  return m;
}

// exp(x) for x <= 0 (softmax arguments): 2^n exp(r) with n = round(x / ln 2), |r| <= ln(2) / 2, exp(r) by the
// Cephes expf polynomial (about 1 ulp). Arguments below -86 give about 4e-38 instead of a smaller number.
inline Vec exp_nonpositive(Vec x) {
  x = vmax(x, splat(-86.f));
  const Vec shifter = splat(12582912.f);  // 1.5 * 2^23: adding it rounds to an integer
  const Vec n = (x * splat(1.44269504088896341f) + shifter) - shifter;
  const Vec r = (x - n * splat(0.693359375f)) - n * splat(-2.12194440e-4f);
  Vec p = splat(1.9875691500e-4f);
  p = p * r + splat(1.3981999507e-3f);
  p = p * r + splat(8.3334519073e-3f);
  p = p * r + splat(4.1665795894e-2f);
  p = p * r + splat(1.6666665459e-1f);
  p = p * r + splat(5.0000001201e-1f);
  p = p * (r * r) + r + splat(1.f);
  IVec bits;
  std::memcpy(&bits, &p, sizeof(bits));
  bits += __builtin_convertvector(n, IVec) << 23;
  std::memcpy(&p, &bits, sizeof(p));
  return p;
}

// Buffers aligned to a cache line, so that vectors at whole-vector offsets never straddle two lines.
template <typename T>
struct AlignedAllocator {
  using value_type = T;
  static constexpr std::size_t kAlignment = 64;
  AlignedAllocator() = default;
  template <typename U>
  AlignedAllocator(const AlignedAllocator<U>&) {}
  T* allocate(std::size_t n) { return static_cast<T*>(::operator new(n * sizeof(T), std::align_val_t(kAlignment))); }
  void deallocate(T* p, std::size_t) { ::operator delete(p, std::align_val_t(kAlignment)); }
  template <typename U>
  bool operator==(const AlignedAllocator<U>&) const { return true; }
  template <typename U>
  bool operator!=(const AlignedAllocator<U>&) const { return false; }
};
using Buffer = std::vector<float, AlignedAllocator<float>>;

}  // namespace refiner_hf
