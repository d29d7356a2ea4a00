// temporal_conv_fwd / temporal_conv_bwd: TEA's 3-tap temporal depthwise conv (docs/design.md §3.6).
// A frame's neighbours are the same in-frame offset one frame (chw elements) away in both memory
// formats, so the forward and dx are frame maps with two extra (vector) loads, and d weight is a
// split reduction that writes dx on the way.
#include "common.cuh"
#include "ops/temporal_conv.h"

namespace ffn_kernels {
namespace cuda {
namespace {

// out[f] = w[center]*in[f] + w[before]*in[f-1] + w[after]*in[f+1] (neighbours inside the clip):
// the forward on x with taps (1, 0, 2), or dx on dy with the taps reversed, (1, 2, 0).
template <typename scalar_t>
struct StencilOp {
  using acc_t = at::opmath_type<scalar_t>;
  const scalar_t* in;
  scalar_t* out;
  const acc_t* w;  // [C, 3]
  int center, before, after;

  template <int V>
  __device__ __forceinline__ void apply(const FrameLayout&, const Geom& g, const FramePos& fp,
                                        int64_t off, const int (&c)[V]) const {
    acc_t v[V], n[V];
    load_vec<V>(in + off, v);
#pragma unroll
    for (int k = 0; k < V; ++k) v[k] *= w[3 * c[k] + center];
    if (fp.t > 0) {
      load_vec<V>(in + off - g.chw, n);
#pragma unroll
      for (int k = 0; k < V; ++k) v[k] += w[3 * c[k] + before] * n[k];
    }
    if (fp.t < fp.T - 1) {
      load_vec<V>(in + off + g.chw, n);
#pragma unroll
      for (int k = 0; k < V; ++k) v[k] += w[3 * c[k] + after] * n[k];
    }
    store_vec<V>(out + off, v);
  }
};

// Backward with d weight: writes dx (the reversed stencil on dy) and sums, per channel,
// x[f]*dy[f+1], x[f]*dy[f], x[f]*dy[f-1]: the gradients of taps 0, 1, 2 (each pairs the frames
// the forward's tap pairs, counted from the other frame).
template <typename scalar_t>
struct StencilBwdVisitor {
  using acc_t = at::opmath_type<scalar_t>;
  using Acc = SumAcc<acc_t, 3>;
  struct Local {
    acc_t w0, w1, w2;
    bool before, after;  // frame f-1 / f+1 is in f's clip
  };
  const scalar_t* dy;
  const scalar_t* x;
  scalar_t* dx;
  const acc_t* w;
  int chw;

  static __device__ __forceinline__ Acc identity() { return Acc{{acc_t(0), acc_t(0), acc_t(0)}}; }
  __device__ __forceinline__ Local local(const Geom&, const FramePos& fp, int c) const {
    return {w[3 * c], w[3 * c + 1], w[3 * c + 2], fp.t > 0, fp.t < fp.T - 1};
  }
  __device__ __forceinline__ void visit(Acc& a, const Local& l, int64_t off) const {
    const acc_t d = static_cast<acc_t>(dy[off]);
    const acc_t before = l.before ? static_cast<acc_t>(dy[off - chw]) : acc_t(0);
    const acc_t after = l.after ? static_cast<acc_t>(dy[off + chw]) : acc_t(0);
    acc_t v = l.w1 * d;
    v += l.w2 * before;
    v += l.w0 * after;
    dx[off] = static_cast<scalar_t>(v);
    const acc_t xv = static_cast<acc_t>(x[off]);
    a.v[0] += xv * after;
    a.v[1] += xv * d;
    a.v[2] += xv * before;
  }
};

// The taps, [C, 3] in x's acc dtype; the layout with row 0 for every segment (shared taps).
at::Tensor taps(const at::Tensor& weight, const at::Tensor& x) {
  TORCH_CHECK(weight.dim() == 2 && weight.size(0) == x.size(1) && weight.size(1) == 3,
              "weight must be [C=", x.size(1), ", 3], got ", weight.sizes());
  TORCH_CHECK(weight.device() == x.device(), "weight is on ", weight.device(), " but x is on ",
              x.device());
  return weight.to(acc_type(x)).contiguous();
}

FrameLayout shared_layout(const at::Tensor& x, int64_t clips, at::IntArrayRef frames) {
  return make_frame_layout(x, clips, frames, std::vector<int64_t>(frames.size(), 0));
}

template <typename scalar_t>
void launch_stencil(const at::Tensor& in, at::Tensor& out, const at::Tensor& w,
                    const FrameLayout& seg, const Geom& g, bool reversed) {
  using acc_t = at::opmath_type<scalar_t>;
  const StencilOp<scalar_t> op{in.data_ptr<scalar_t>(), out.data_ptr<scalar_t>(),
                               w.data_ptr<acc_t>(), 1, reversed ? 2 : 0, reversed ? 0 : 2};
  launch_frame_map<scalar_t>(op, seg, g, can_vectorize<scalar_t>(g, {&in, &out}));
}

at::Tensor temporal_conv_fwd(const at::Tensor& x_, int64_t clips, at::IntArrayRef frames,
                             const at::Tensor& weight) {
  const c10::cuda::OptionalCUDAGuard guard(x_.device());
  const at::MemoryFormat fmt = format_of(x_);
  const at::Tensor x = x_.contiguous(fmt);
  const FrameLayout seg = shared_layout(x, clips, frames);
  const Geom g = make_geom(x);
  const at::Tensor w = taps(weight, x);
  at::Tensor y = at::empty(x.sizes(), x.options().memory_format(fmt));
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "ffn_temporal_conv_fwd", [&] {
    launch_stencil<scalar_t>(x, y, w, seg, g, /*reversed=*/false);
  });
  return y;
}

std::tuple<at::Tensor, at::Tensor> temporal_conv_bwd(const at::Tensor& dy_, const at::Tensor& x_,
                                                     int64_t clips, at::IntArrayRef frames,
                                                     const at::Tensor& weight, bool weight_grad) {
  const c10::cuda::OptionalCUDAGuard guard(dy_.device());
  const at::MemoryFormat fmt = format_of(dy_);
  const at::Tensor dy = dy_.contiguous(fmt);
  const FrameLayout seg = shared_layout(dy, clips, frames);
  const Geom g = make_geom(dy);
  const at::Tensor w = taps(weight, dy);
  at::Tensor dx = at::empty(dy.sizes(), dy.options().memory_format(fmt));
  if (!weight_grad) {  // x is not read (callers may pass a stand-in)
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, dy.scalar_type(), "ffn_temporal_conv_bwd", [&] {
      launch_stencil<scalar_t>(dy, dx, w, seg, g, /*reversed=*/true);
    });
    return {dx, unused_acc(dy)};
  }
  const at::Tensor x = in_format(x_, fmt, dy, "x");
  FrameLayout rseg = seg;
  const ReducePlan plan = plan_reduce(rseg, g);
  const auto acc_opts = dy.options().dtype(acc_type(dy)).memory_format(at::MemoryFormat::Contiguous);
  at::Tensor partials = at::empty({3, plan.num_chunks, g.C}, acc_opts);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, dy.scalar_type(), "ffn_temporal_conv_bwd", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    if (g.HW > 0)
      launch_reduce(StencilBwdVisitor<scalar_t>{dy.data_ptr<scalar_t>(), x.data_ptr<scalar_t>(),
                                                dx.data_ptr<scalar_t>(), w.data_ptr<acc_t>(),
                                                g.chw},
                    rseg, g, plan, partials.data_ptr<acc_t>());
    else
      partials.zero_();
  });
  // [3, S, C] segment sums, in chunk order; the taps are shared, so d weight adds the segments
  const at::Tensor sums = combine_sums(partials, rseg, g);
  return {dx, sums.sum(1).t().contiguous()};
}

}  // namespace

FFN_REGISTER_KERNELS(temporal_conv, CUDA, temporal_conv_fwd, temporal_conv_bwd)

}  // namespace cuda
}  // namespace ffn_kernels
