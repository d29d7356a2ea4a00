// Scalar math shared by the CPU (csrc/cpu) and CUDA (csrc/cuda) kernels: the TSM source frame,
// Welford/Chan statistics, running-stat updates and the BatchNorm forward/backward formulas.
// Plain C++17 without torch headers, so every function compiles for host and device.
#pragma once

#include <cmath>
#include <cstdint>
#include <cstring>
#include <type_traits>

#if defined(__CUDACC__) || defined(__HIPCC__)
#define FFN_HOST_DEVICE __host__ __device__
#else
#define FFN_HOST_DEVICE
#endif

namespace ffn {

// ---------------------------------------------------------------------------------------------
// Temporal shift (TSM): channels [0, fold) of frame t read frame t+1, [fold, 2*fold) read t-1,
// the rest read t; fold = C / fold_div. The reverse (adjoint) shift negates the offsets.
// ---------------------------------------------------------------------------------------------

// Returned by shift_source_delta when the source frame lies outside the clip (the value is zero).
constexpr int kNoSource = -(1 << 30);

// Frame offset (source - t) of channel c at local frame t of a T-frame clip, or kNoSource. Kernels
// address the source as `offset + delta * frame_stride`, so offsets matter more than indices.
FFN_HOST_DEVICE inline int shift_source_delta(int c, int fold, int t, int T, bool reverse) {
  int d = c < fold ? 1 : (c < 2 * fold ? -1 : 0);
  if (reverse) d = -d;
  const int src = t + d;
  return (src < 0 || src >= T) ? kNoSource : d;
}

// ---------------------------------------------------------------------------------------------
// Statistics. Partials are (count, mean, M2 = sum of squared deviations); Chan's pairwise merge
// combines them without the cancellation of E[x^2] - E[x]^2. The count is an integer: a float
// count stops growing at 2^24 (a segment of 2^24 + k values per channel would be normalised as if
// it had 2^24), and T only needs the relative precision of mean and M2.
// ---------------------------------------------------------------------------------------------

template <typename T>
struct Welford {  // an aggregate (no initialisers) so it may live in CUDA shared memory
  int64_t n;
  T mean, m2;
};

template <typename T>
FFN_HOST_DEVICE inline void welford_add(Welford<T>& w, T x) {
  ++w.n;
  const T d = x - w.mean;
  w.mean += d / static_cast<T>(w.n);
  w.m2 += d * (x - w.mean);
}

template <typename T>
FFN_HOST_DEVICE inline Welford<T> welford_merge(const Welford<T>& a, const Welford<T>& b) {
  if (b.n == 0) return a;
  if (a.n == 0) return b;
  const int64_t n = a.n + b.n;
  const T d = b.mean - a.mean;
  const T wb = static_cast<T>(b.n) / static_cast<T>(n);
  return {n, a.mean + d * wb, a.m2 + b.m2 + d * d * static_cast<T>(a.n) * wb};
}

// Biased (population) variance, what BatchNorm normalises with.
template <typename T>
FFN_HOST_DEVICE inline T welford_var(const Welford<T>& w) {
  return w.m2 / static_cast<T>(w.n);
}

// Unbiased variance from the biased one over n elements, what the running variance tracks.
template <typename T, typename N>
FFN_HOST_DEVICE inline T unbiased_var(T var, N n) {
  return var * (T(n) / T(n - 1));
}

// nn.BatchNorm2d's running-stat update: (1 - m) * running + m * batch.
template <typename T>
FFN_HOST_DEVICE inline T running_update(T running, T batch, T momentum) {
  return momentum * batch + (T(1) - momentum) * running;
}

// 1 / sqrt(var + eps) in double, as ATen's CPU BatchNorm computes it: an eps below float's range
// (1e-50) rounds to 0 in float, and a constant channel would get invstd = inf (NaN outputs).
template <typename T>
FFN_HOST_DEVICE inline T inv_std(T var, double eps) {
  const double v = static_cast<double>(var) + eps;
#ifdef __CUDA_ARCH__
  return static_cast<T>(rsqrt(v));
#else
  return static_cast<T>(1.0 / std::sqrt(v));
#endif
}

// ---------------------------------------------------------------------------------------------
// BatchNorm. Forward y = x * scale + shift (scale = w * invstd, shift = b - mean * scale), the
// form ATen's CPU kernel uses.
// ---------------------------------------------------------------------------------------------

template <typename T>
struct BnAffine {
  T scale, shift;
};

template <typename T>
FFN_HOST_DEVICE inline BnAffine<T> bn_affine(T mean, T invstd, T weight, T bias) {
  const T scale = weight * invstd;
  return {scale, bias - mean * scale};
}

template <typename T>
FFN_HOST_DEVICE inline T bn_normalize(T x, T mean, T invstd, T weight, T bias) {
  const BnAffine<T> a = bn_affine(mean, invstd, weight, bias);
  return x * a.scale + a.shift;
}

// Backward from g = dL/dy (after any ReLU mask) over the n elements of a (segment, channel), with
// sum_g = sum(g) and sum_gxmu = sum(g * (x - mean)), i.e. sum(g * xhat) = invstd * sum_gxmu:
//   training: dx = w * invstd * (g - sum_g / n - xhat * sum(g * xhat) / n)
//   eval:     dx = w * invstd * g            (mean and invstd are constants)
// written as dx = scale * (g - mean_g - (x - mean) * proj) with per-channel coefficients.
template <typename T>
struct BnBackwardCoef {
  T scale, mean_g, proj;
};

template <typename T>
FFN_HOST_DEVICE inline BnBackwardCoef<T> bn_backward_coef(T invstd, T weight, T sum_g, T sum_gxmu,
                                                          T n, bool training) {
  if (!training) return {weight * invstd, T(0), T(0)};
  return {weight * invstd, sum_g / n, invstd * invstd * sum_gxmu / n};
}

template <typename T>
FFN_HOST_DEVICE inline T bn_backward_dx(T g, T xmu, const BnBackwardCoef<T>& k) {
  return (g - k.mean_g - xmu * k.proj) * k.scale;
}

template <typename T>
FFN_HOST_DEVICE inline T bn_backward_dx(T g, T xmu, T invstd, T weight, T sum_g, T sum_gxmu, T n,
                                        bool training) {
  return bn_backward_dx(g, xmu, bn_backward_coef(invstd, weight, sum_g, sum_gxmu, n, training));
}

// ReLU derivative at output y as T(0) or T(1). Callers multiply (g * relu_mask(y)) rather than
// select, so a NaN/inf gradient stays NaN where y <= 0 as in eager PyTorch. On the host the mask is
// built with integer ops: GCC turns `g * T(y > 0)` into a branch, and with -ftrapping-math the
// branch's `g * 0` then blocks if-conversion and vectorization of the whole loop.
template <typename T>
FFN_HOST_DEVICE inline T relu_mask(T y) {
#ifdef __CUDA_ARCH__
  return static_cast<T>(y > T(0));
#else
  static_assert(sizeof(T) == 4 || sizeof(T) == 8, "relu_mask: float or double");
  using U = typename std::conditional<sizeof(T) == 8, uint64_t, uint32_t>::type;
  const T one = T(1);
  U bits;
  std::memcpy(&bits, &one, sizeof(T));
  bits &= static_cast<U>(-static_cast<U>(y > T(0)));
  T mask;
  std::memcpy(&mask, &bits, sizeof(T));
  return mask;
#endif
}

// Gradient reaching BN(z) in the residual-block boundary out = relu(BN(z) + identity),
// next_in = shift_alter(out): g = (dout + reverse_shift((1 + a) * dnext)) * (out > 0), with
// `dnext_src` the reverse-shifted dnext (0 outside the clip) and `factor` = 1 + a. The two sums
// are rounded to the storage type scalar_t as the eager reference computes them.
template <typename scalar_t, typename T>
FFN_HOST_DEVICE inline T block_grad(T dout, T dnext_src, T factor, T out) {
  const scalar_t shifted = static_cast<scalar_t>(factor * dnext_src);
  const scalar_t total = static_cast<scalar_t>(static_cast<T>(shifted) + dout);
  return static_cast<T>(total) * relu_mask(out);
}

}  // namespace ffn
