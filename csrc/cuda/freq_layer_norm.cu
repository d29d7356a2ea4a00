// freq_layer_norm_fwd / freq_layer_norm_bwd: frequency-indexed LayerNorm over the last dim
// (docs/design.md §3.7). One warp per token for the normalisation and ds; the parameter sums are
// the split per-(segment, channel) reduction of common.cuh over the tokens viewed as the
// channels_last activation [F, C, tokens, 1] they are in memory.
#include "common.cuh"
#include "ops/freq_layer_norm.h"

namespace ffn_kernels {
namespace cuda {
namespace {

using namespace ::ffn_kernels::freq_layer_norm;

template <typename acc_t>
__device__ __forceinline__ acc_t warp_sum(acc_t v) {
#pragma unroll
  for (int off = 16; off > 0; off >>= 1) v += __shfl_xor_sync(0xffffffffu, v, off);
  return v;
}

// Token r's warp and its lane; the loop over tokens is grid-strided, a warp at a time.
#define FFN_FOR_EACH_TOKEN(r, R)                                                        \
  for (int64_t r = (static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x) >> 5; \
       r < (R); r += (static_cast<int64_t>(gridDim.x) * blockDim.x) >> 5)

template <typename scalar_t, typename acc_t = at::opmath_type<scalar_t>>
__global__ void __launch_bounds__(kThreads)
    ln_fwd_kernel(const scalar_t* __restrict__ x, const scalar_t* __restrict__ res,
                  scalar_t* __restrict__ s, scalar_t* __restrict__ y, const acc_t* __restrict__ w,
                  const acc_t* __restrict__ b, acc_t* __restrict__ mean,
                  acc_t* __restrict__ rstd, const FrameLayout seg, int64_t R, int64_t M, int C,
                  acc_t eps) {
  const int lane = threadIdx.x & 31;
  FFN_FOR_EACH_TOKEN(r, R) {
    const int64_t base = r * C;
    const scalar_t* in = x + base;
    if (res != nullptr) {  // the sum is stored, and normalised, rounded to the storage dtype
      for (int c = lane; c < C; c += 32)
        s[base + c] = static_cast<scalar_t>(static_cast<acc_t>(x[base + c]) +
                                            static_cast<acc_t>(res[base + c]));
      in = s + base;  // each lane reads back only what it wrote
    }
    acc_t sum = 0;
    for (int c = lane; c < C; c += 32) sum += static_cast<acc_t>(in[c]);
    const acc_t mu = warp_sum(sum) / acc_t(C);
    acc_t m2 = 0;
    for (int c = lane; c < C; c += 32) {
      const acc_t d = static_cast<acc_t>(in[c]) - mu;
      m2 += d * d;
    }
    const acc_t rs = acc_t(1) / ::sqrt(warp_sum(m2) / acc_t(C) + eps);
    const int64_t prow = static_cast<int64_t>(frame_pos(seg, r / M).row) * C;
    for (int c = lane; c < C; c += 32)
      y[base + c] = static_cast<scalar_t>((static_cast<acc_t>(in[c]) - mu) * rs * w[prow + c] +
                                          b[prow + c]);
    if (lane == 0) {
      mean[r] = mu;
      rstd[r] = rs;
    }
  }
}

template <typename scalar_t, typename acc_t = at::opmath_type<scalar_t>>
__global__ void __launch_bounds__(kThreads)
    ln_bwd_kernel(const scalar_t* __restrict__ dy, const scalar_t* __restrict__ dsum,
                  const scalar_t* __restrict__ s, scalar_t* __restrict__ ds,
                  const acc_t* __restrict__ w, const acc_t* __restrict__ mean,
                  const acc_t* __restrict__ rstd, const FrameLayout seg, int64_t R, int64_t M,
                  int C) {
  const int lane = threadIdx.x & 31;
  FFN_FOR_EACH_TOKEN(r, R) {
    const int64_t base = r * C;
    const acc_t mu = mean[r], rs = rstd[r];
    const int64_t prow = static_cast<int64_t>(frame_pos(seg, r / M).row) * C;
    acc_t sum_g = 0, sum_gx = 0;
    for (int c = lane; c < C; c += 32) {
      const acc_t g = static_cast<acc_t>(dy[base + c]) * w[prow + c];
      sum_g += g;
      sum_gx += g * (static_cast<acc_t>(s[base + c]) - mu) * rs;
    }
    const acc_t mean_g = warp_sum(sum_g) / acc_t(C), mean_gx = warp_sum(sum_gx) / acc_t(C);
    for (int c = lane; c < C; c += 32) {
      const acc_t xhat = (static_cast<acc_t>(s[base + c]) - mu) * rs;
      acc_t v = rs * (static_cast<acc_t>(dy[base + c]) * w[prow + c] - mean_g - xhat * mean_gx);
      if (dsum != nullptr) v += static_cast<acc_t>(dsum[base + c]);
      ds[base + c] = static_cast<scalar_t>(v);
    }
  }
}

#undef FFN_FOR_EACH_TOKEN

// Σ dy·x̂ and Σ dy per (segment, channel): element `off` belongs to token off / C.
template <typename scalar_t>
struct ParamSumVisitor {
  using acc_t = at::opmath_type<scalar_t>;
  using Acc = SumAcc<acc_t, 2>;
  struct Local {};
  const scalar_t* dy;
  const scalar_t* s;
  const acc_t* mean;
  const acc_t* rstd;
  int C;

  static __device__ __forceinline__ Acc identity() { return Acc{{acc_t(0), acc_t(0)}}; }
  __device__ __forceinline__ Local local(const Geom&, const FramePos&, int) const { return {}; }
  __device__ __forceinline__ void visit(Acc& a, const Local&, int64_t off) const {
    const int64_t r = off / C;
    const acc_t d = static_cast<acc_t>(dy[off]);
    a.v[0] += d * (static_cast<acc_t>(s[off]) - mean[r]) * rstd[r];
    a.v[1] += d;
  }
};

// x [F, ..., C] (contiguous) as the channels_last activation [F, C, M, 1].
at::Tensor as_channels(const at::Tensor& x) {
  TORCH_CHECK(x.dim() >= 2 && x.is_contiguous(), "expected a contiguous [frames, ..., C] tensor");
  return x.reshape({x.size(0), -1, x.size(-1)}).permute({0, 2, 1}).unsqueeze(3);
}

unsigned token_blocks(int64_t R) {
  return static_cast<unsigned>(std::min<int64_t>((R + kThreads / 32 - 1) / (kThreads / 32), 1 << 20));
}

FwdOut freq_layer_norm_fwd(const at::Tensor& x, int64_t clips, at::IntArrayRef frames,
                           at::IntArrayRef rows, const at::Tensor& weight, const at::Tensor& bias,
                           double eps, const c10::optional<at::Tensor>& residual) {
  const c10::cuda::OptionalCUDAGuard guard(x.device());
  const at::Tensor v = as_channels(x);
  const FrameLayout seg = make_frame_layout(v, clips, frames, rows);
  const Geom g = make_geom(v);
  const at::Tensor w = param(weight, v, seg, "weight"), b = param(bias, v, seg, "bias");
  const at::Tensor res = residual.has_value() ? in_format(*residual, at::MemoryFormat::Contiguous,
                                                          x, "residual")
                                              : at::Tensor();
  const int64_t R = static_cast<int64_t>(g.frames) * g.HW;
  at::Tensor y = at::empty_like(x);
  at::Tensor s = res.defined() ? at::empty_like(x) : unused_activation(x);
  at::Tensor mean = at::empty({R}, x.options().dtype(acc_type(x)));
  at::Tensor rstd = at::empty_like(mean);
  if (R == 0) return {y, s, mean, rstd};
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "ffn_freq_layer_norm_fwd", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    ln_fwd_kernel<scalar_t><<<token_blocks(R), kThreads, 0, at::cuda::getCurrentCUDAStream()>>>(
        x.data_ptr<scalar_t>(), res.defined() ? res.data_ptr<scalar_t>() : nullptr,
        res.defined() ? s.data_ptr<scalar_t>() : nullptr, y.data_ptr<scalar_t>(),
        w.data_ptr<acc_t>(), b.data_ptr<acc_t>(), mean.data_ptr<acc_t>(), rstd.data_ptr<acc_t>(),
        seg, R, g.HW, g.C, static_cast<acc_t>(eps));
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  return {y, s, mean, rstd};
}

BwdOut freq_layer_norm_bwd(const at::Tensor& dy_, const c10::optional<at::Tensor>& dsum,
                           const at::Tensor& s, int64_t clips, at::IntArrayRef frames,
                           at::IntArrayRef rows, const at::Tensor& weight, const at::Tensor& mean,
                           const at::Tensor& rstd) {
  const c10::cuda::OptionalCUDAGuard guard(s.device());
  const at::Tensor v = as_channels(s);
  FrameLayout seg = make_frame_layout(v, clips, frames, rows);
  const Geom g = make_geom(v);
  const at::Tensor w = param(weight, v, seg, "weight");
  const at::Tensor dy = in_format(dy_, at::MemoryFormat::Contiguous, s, "dy");
  const at::Tensor dsm = dsum.has_value() ? in_format(*dsum, at::MemoryFormat::Contiguous, s,
                                                      "dsum")
                                          : at::Tensor();
  const int64_t R = static_cast<int64_t>(g.frames) * g.HW;
  at::Tensor ds = at::empty_like(s);
  const auto acc_opts = s.options().dtype(acc_type(s)).memory_format(at::MemoryFormat::Contiguous);
  at::Tensor dweight = at::empty(w.sizes(), acc_opts), dbias = at::empty(w.sizes(), acc_opts);
  const ReducePlan plan = plan_reduce(seg, g);
  at::Tensor partials = at::empty({2, plan.num_chunks, g.C}, acc_opts);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, s.scalar_type(), "ffn_freq_layer_norm_bwd", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    if (R > 0) {
      ln_bwd_kernel<scalar_t><<<token_blocks(R), kThreads, 0, at::cuda::getCurrentCUDAStream()>>>(
          dy.data_ptr<scalar_t>(), dsm.defined() ? dsm.data_ptr<scalar_t>() : nullptr,
          s.data_ptr<scalar_t>(), ds.data_ptr<scalar_t>(), w.data_ptr<acc_t>(),
          mean.data_ptr<acc_t>(), rstd.data_ptr<acc_t>(), seg, R, g.HW, g.C);
      C10_CUDA_KERNEL_LAUNCH_CHECK();
      launch_reduce(ParamSumVisitor<scalar_t>{dy.data_ptr<scalar_t>(), s.data_ptr<scalar_t>(),
                                              mean.data_ptr<acc_t>(), rstd.data_ptr<acc_t>(), g.C},
                    seg, g, plan, partials.data_ptr<acc_t>());
    } else {
      partials.zero_();
    }
  });
  const at::Tensor sums = combine_sums(partials, seg, g);
  row_grads(sums, seg, g, at::Tensor(), {RowGrad{0, false, dweight}, RowGrad{1, false, dbias}});
  return {ds, dweight, dbias};
}

}  // namespace

FFN_REGISTER_KERNELS(freq_layer_norm, CUDA, freq_layer_norm_fwd, freq_layer_norm_bwd)

}  // namespace cuda
}  // namespace ffn_kernels
