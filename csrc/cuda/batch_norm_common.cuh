// The BatchNorm machinery shared by the CUDA kernels of freq_batch_norm (docs/design.md §3.2) and
// bn_add_relu_shift_alter (§3.3). The latter is the former plus the shift of its output, so both
// share one elementwise template and one reduction visitor (kShift) and one host-side forward and
// backward; each op's file instantiates its own kShift.
#pragma once

#include "common.cuh"

namespace ffn_kernels {
namespace cuda {

// Elements of one channel in segment s.
__device__ __forceinline__ int64_t seg_count(const FrameLayout& seg, const Geom& g, int s) {
  return (seg.start[s + 1] - seg.start[s]) * g.HW;
}

// y = act(BN(x) + residual). kShift (bn_add_relu_shift_alter_fwd): also next_in = shift_alter(y),
// written by scattering (1+a) * y to the frame whose shifted source this element is, plus zeros
// where an element's own source lies outside the clip; every next_in element is written exactly
// once.
template <typename scalar_t, bool kShift>
struct BnFwdOp {
  using acc_t = at::opmath_type<scalar_t>;
  const scalar_t* x;
  const scalar_t* res;  // or nullptr
  scalar_t* y;
  scalar_t* next;              // kShift only
  const acc_t *mean, *invstd;  // [S, C]
  const acc_t *weight, *bias;  // [P, C]
  const acc_t* alter;          // [P, C] or nullptr (kShift only)
  bool relu;

  template <int V>
  __device__ __forceinline__ void apply(const FrameLayout&, const Geom& g, const FramePos& fp,
                                        int64_t off, const int (&c)[V]) const {
    acc_t xv[V], rv[V], o[V];
    load_vec<V>(x + off, xv);
    if (res != nullptr) load_vec<V>(res + off, rv);
#pragma unroll
    for (int k = 0; k < V; ++k) {
      const int64_t sc = static_cast<int64_t>(fp.s) * g.C + c[k];
      const int64_t rc = static_cast<int64_t>(fp.row) * g.C + c[k];
      acc_t v = ffn::bn_normalize(xv[k], mean[sc], invstd[sc], weight[rc], bias[rc]);
      if (res != nullptr) v += rv[k];
      if (relu) v = v < acc_t(0) ? acc_t(0) : v;  // keeps NaN, like torch.relu
      o[k] = v;
    }
    store_vec<V>(y + off, o);
    if constexpr (kShift) {
#pragma unroll
      for (int k = 0; k < V; ++k)  // next_in is computed from the stored (rounded) output
        o[k] = static_cast<acc_t>(static_cast<scalar_t>(o[k])) *
               alter_factor<scalar_t>(alter, fp.row, g.C, c[k]);
      int d[V];  // next_in[reverse source of (f, c)] reads this element
      if (src_deltas<V>(g, fp, c, /*reverse=*/true, d)) {
        store_vec<V>(next + off + static_cast<int64_t>(d[0]) * g.chw, o);
      } else {
#pragma unroll
        for (int k = 0; k < V; ++k)
          if (d[k] != ffn::kNoSource)
            next[off + k + static_cast<int64_t>(d[k]) * g.chw] = static_cast<scalar_t>(o[k]);
      }
#pragma unroll
      for (int k = 0; k < V; ++k)
        if (src_delta(g, fp, c[k], /*reverse=*/false) == ffn::kNoSource)
          next[off + k] = static_cast<scalar_t>(0);
    }
  }
};

// Backward reduction per (segment, channel): sum g, sum g*(x - mean) and, with kShift, the WA
// gradient sum out * dnext[reverse source] (= the reference's sum dnext * out[source]).
// freq_batch_norm_bwd: g = dy * [y > 0] (y == nullptr: no ReLU, unless bias is set: the mask of the
// forward's y recomputed from x, which is then not read). bn_add_relu_shift_alter_bwd: dy =
// dout, x = z, y = out. kWriteDx (eval: running statistics, so dx = g * weight * invstd needs no
// reduction): the same pass also writes dx, so the activations are read once. When dres != nullptr
// the pass writes dres = g (in training for BnBwdOp to read back instead of recomputing g).
template <typename scalar_t, bool kShift, bool kWriteDx = false>
struct BnBwdVisitor {
  using acc_t = at::opmath_type<scalar_t>;
  using Acc = SumAcc<acc_t, kShift ? 3 : 2>;
  struct Local {
    acc_t mean, factor, scale;
    ffn::BnAffine<acc_t> fwd;  // the forward's x * scale + shift (bias set)
    int64_t delta;
    bool valid;
  };
  const scalar_t *dy, *dnext, *x, *y;
  const acc_t *mean, *alter;
  scalar_t *dx;                  // kWriteDx only
  scalar_t *dres;                // may be nullptr
  const acc_t *invstd, *weight;  // [S, C], [P, C]
  const acc_t* bias;             // [P, C]: the ReLU mask from x (!kShift); may be nullptr

  static __device__ __forceinline__ Acc identity() {
    Acc a;
#pragma unroll
    for (int i = 0; i < Acc::kFields; ++i) a.v[i] = acc_t(0);
    return a;
  }
  __device__ __forceinline__ Local local(const Geom& g, const FramePos& fp, int c) const {
    const int64_t sc = static_cast<int64_t>(fp.s) * g.C + c;
    const int64_t rc = static_cast<int64_t>(fp.row) * g.C + c;
    Local l{mean[sc], acc_t(1), acc_t(0), {acc_t(0), acc_t(0)}, 0, false};
    if constexpr (kWriteDx) l.scale = weight[rc] * invstd[sc];
    if constexpr (!kShift)
      if (bias != nullptr) l.fwd = ffn::bn_affine(l.mean, invstd[sc], weight[rc], bias[rc]);
    if constexpr (kShift) {
      const int d = src_delta(g, fp, c, /*reverse=*/true);
      l.factor = alter_factor<scalar_t>(alter, fp.row, g.C, c);
      l.delta = static_cast<int64_t>(d) * g.chw;
      l.valid = d != ffn::kNoSource;
    }
    return l;
  }
  __device__ __forceinline__ void visit(Acc& a, const Local& l, int64_t off) const {
    acc_t gv;
    if constexpr (kShift) {
      const acc_t ds = l.valid ? static_cast<acc_t>(dnext[off + l.delta]) : acc_t(0);
      const acc_t o = static_cast<acc_t>(y[off]);
      gv = ffn::block_grad<scalar_t>(static_cast<acc_t>(dy[off]), ds, l.factor, o);
      a.v[2] += o * ds;
    } else {
      gv = static_cast<acc_t>(dy[off]);
      if (y != nullptr) {
        gv *= ffn::relu_mask(static_cast<acc_t>(y[off]));
      } else if (bias != nullptr) {  // y as the forward stored it (rounded; ReLU keeps the sign)
        const acc_t v = static_cast<acc_t>(x[off]) * l.fwd.scale + l.fwd.shift;
        gv *= ffn::relu_mask(static_cast<acc_t>(static_cast<scalar_t>(v)));
      }
    }
    a.v[0] += gv;
    a.v[1] += gv * (static_cast<acc_t>(x[off]) - l.mean);
    // eval dx = w * invstd * g (ffn::bn_backward_coef, !training)
    if constexpr (kWriteDx) dx[off] = static_cast<scalar_t>(gv * l.scale);
    if (kShift || dres != nullptr) dres[off] = static_cast<scalar_t>(gv);  // the block op always has one
  }
};

// Training (batch statistics): dx from g and the per-segment sums, after the reduction. g is read
// back from dres where the reduction stored it (the block op's backward then moves 8 activations'
// bytes instead of 10, docs/design.md §3.3), else recomputed as in the visitor. (Eval writes dx in
// the reduction pass instead.)
template <typename scalar_t, bool kShift>
struct BnBwdOp {
  using acc_t = at::opmath_type<scalar_t>;
  const scalar_t *dy, *dnext, *x, *y;
  scalar_t* dx;
  const scalar_t* dres;  // g, stored by the reduction; may be nullptr
  const acc_t *mean, *invstd, *weight, *alter;
  const acc_t* sums;  // [fields, S, C]: sum g, sum g*(x - mean)
  const acc_t* bias;  // [P, C]: the ReLU mask from x (!kShift); may be nullptr

  template <int V>
  __device__ __forceinline__ void apply(const FrameLayout& seg, const Geom& g, const FramePos& fp,
                                        int64_t off, const int (&c)[V]) const {
    acc_t gv[V], xv[V], out[V];
    load_vec<V>(x + off, xv);
    if (dres != nullptr) {
      load_vec<V>(dres + off, gv);
    } else {
      load_vec<V>(dy + off, gv);
      if (y != nullptr) {
        acc_t yv[V];
        load_vec<V>(y + off, yv);
        if constexpr (kShift) {
          acc_t ds[V];
          load_shifted<V>(dnext, off, g, fp, c, /*reverse=*/true, ds);
#pragma unroll
          for (int k = 0; k < V; ++k)
            gv[k] = ffn::block_grad<scalar_t>(
                gv[k], ds[k], alter_factor<scalar_t>(alter, fp.row, g.C, c[k]), yv[k]);
        } else {
#pragma unroll
          for (int k = 0; k < V; ++k) gv[k] *= ffn::relu_mask(yv[k]);
        }
      } else if constexpr (!kShift) {
        if (bias != nullptr) {
#pragma unroll
          for (int k = 0; k < V; ++k) {
            const int64_t sc = static_cast<int64_t>(fp.s) * g.C + c[k];
            const int64_t rc = static_cast<int64_t>(fp.row) * g.C + c[k];
            const ffn::BnAffine<acc_t> a =
                ffn::bn_affine(mean[sc], invstd[sc], weight[rc], bias[rc]);
            const acc_t v = xv[k] * a.scale + a.shift;
            gv[k] *= ffn::relu_mask(static_cast<acc_t>(static_cast<scalar_t>(v)));
          }
        }
      }
    }
    const acc_t n = static_cast<acc_t>(seg_count(seg, g, fp.s));
    const int64_t plane = static_cast<int64_t>(seg.n) * g.C;
#pragma unroll
    for (int k = 0; k < V; ++k) {
      const int64_t sc = static_cast<int64_t>(fp.s) * g.C + c[k];
      const int64_t rc = static_cast<int64_t>(fp.row) * g.C + c[k];
      out[k] = ffn::bn_backward_dx(gv[k], xv[k] - mean[sc], invstd[sc], weight[rc], sums[sc],
                                   sums[plane + sc], n, /*training=*/true);
    }
    store_vec<V>(dx + off, out);
  }
};

template <typename T>
const T* ptr_or_null(const at::Tensor& t) {
  return t.defined() && t.numel() > 0 ? t.data_ptr<T>() : nullptr;
}

// [S, C] statistics in acc dtype.
inline at::Tensor seg_stat(const at::Tensor& t, const at::Tensor& x, const FrameLayout& seg,
                           const char* name) {
  TORCH_CHECK(t.device() == x.device(), name, " is on ", t.device(), " but x is on ", x.device());
  TORCH_CHECK(t.dim() == 2 && t.size(0) == seg.n && t.size(1) == x.size(1), name,
              " must be [S=", seg.n, ", C=", x.size(1), "], got ", t.sizes());
  return t.to(acc_type(x)).contiguous();
}

// Shared forward of freq_batch_norm_fwd (kShift = false) and bn_add_relu_shift_alter_fwd (kShift =
// true).
template <bool kShift>
std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> bn_forward(
    const at::Tensor& x_, const OptTensor& residual, int64_t clips, at::IntArrayRef frames,
    at::IntArrayRef rows, const at::Tensor& weight, const at::Tensor& bias,
    const OptTensor& running_mean, const OptTensor& running_var, bool training,
    at::ArrayRef<double> momentum, double eps, bool relu, const OptTensor& alter,
    int64_t fold_div) {
  const c10::cuda::OptionalCUDAGuard guard(x_.device());
  const at::MemoryFormat fmt = format_of(x_);
  const at::Tensor x = x_.contiguous(fmt);
  FrameLayout seg = make_frame_layout(x, clips, frames, rows);
  if (kShift) TORCH_CHECK(fold_div >= 1, "fold_div must be >= 1, got ", fold_div);
  const Geom g = make_geom(x, kShift ? fold_div : 0);
  const at::Tensor res = residual.has_value() && residual->defined()
                             ? in_format(*residual, fmt, x, kShift ? "identity" : "residual")
                             : at::Tensor();
  const at::Tensor w = param(weight, x, seg, "weight");
  const at::Tensor b = param(bias, x, seg, "bias");
  const at::Tensor a = param(alter, x, seg, "alter_next");
  at::Tensor mean, invstd, new_rm, new_rv;  // (lambdas can't capture structured bindings in C++17)
  std::tie(mean, invstd, new_rm, new_rv) =
      batch_norm_stats(x, seg, g, running_mean, running_var, training, momentum, eps);
  at::Tensor y = at::empty(x.sizes(), x.options().memory_format(fmt));
  at::Tensor next = kShift ? at::empty(x.sizes(), x.options().memory_format(fmt)) : at::Tensor();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "ffn_bn_fwd", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    const BnFwdOp<scalar_t, kShift> op{
        x.data_ptr<scalar_t>(), res.defined() ? res.data_ptr<scalar_t>() : nullptr,
        y.data_ptr<scalar_t>(), kShift ? next.data_ptr<scalar_t>() : nullptr,
        mean.data_ptr<acc_t>(), invstd.data_ptr<acc_t>(),
        w.data_ptr<acc_t>(),    b.data_ptr<acc_t>(),
        ptr_or_null<acc_t>(a),  relu};
    launch_frame_map<scalar_t>(op, seg, g, can_vectorize<scalar_t>(g, {&x, &res, &y, &next}));
  });
  return {y, next, mean, invstd, new_rm, new_rv};
}

// Shared backward of freq_batch_norm_bwd (kShift = false) and bn_add_relu_shift_alter_bwd (kShift =
// true): reduce, combine, parameter gradients, then one elementwise pass. Returns (dx, dres,
// dweight, dbias, dalter).
template <bool kShift>
std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> bn_backward(
    const at::Tensor& dy_, const at::Tensor& dnext_, const at::Tensor& x_, const at::Tensor& y_,
    int64_t clips, at::IntArrayRef frames, at::IntArrayRef rows, const at::Tensor& weight,
    const at::Tensor& mean_, const at::Tensor& invstd_, bool training, bool relu, bool has_residual,
    const OptTensor& alter, int64_t fold_div, const OptTensor& bias = c10::nullopt) {
  const c10::cuda::OptionalCUDAGuard guard(x_.device());
  const at::MemoryFormat fmt = format_of(x_);
  const at::Tensor x = x_.contiguous(fmt);
  FrameLayout seg = make_frame_layout(x, clips, frames, rows);
  if (kShift) TORCH_CHECK(fold_div >= 1, "fold_div must be >= 1, got ", fold_div);
  const Geom g = make_geom(x, kShift ? fold_div : 0);
  const at::Tensor dy = in_format(dy_, fmt, x, kShift ? "dout" : "dy");
  const at::Tensor dnext = kShift ? in_format(dnext_, fmt, x, "dnext") : at::Tensor();
  const at::Tensor b = relu && bias ? param(*bias, x, seg, "bias") : at::Tensor();
  const at::Tensor y =
      relu && !b.defined() ? in_format(y_, fmt, x, kShift ? "out" : "y") : at::Tensor();
  const at::Tensor w = param(weight, x, seg, "weight");
  const at::Tensor a = param(alter, x, seg, "alter_next");
  const at::Tensor mean = seg_stat(mean_, x, seg, "mean");
  const at::Tensor invstd = seg_stat(invstd_, x, seg, "invstd");
  const auto acc_opts = x.options().dtype(acc_type(x)).memory_format(at::MemoryFormat::Contiguous);

  at::Tensor dx = at::empty(x.sizes(), x.options().memory_format(fmt));
  at::Tensor dres = has_residual ? at::empty(x.sizes(), x.options().memory_format(fmt))
                                 : unused_activation(x);
  at::Tensor dweight = at::empty(w.sizes(), acc_opts);
  at::Tensor dbias = at::empty(w.sizes(), acc_opts);
  at::Tensor dalter = kShift && a.defined() ? at::empty(a.sizes(), acc_opts) : unused_acc(x);
  const int fields = kShift ? 3 : 2;
  const ReducePlan plan = plan_reduce(seg, g);
  at::Tensor partials = at::empty({fields, plan.num_chunks, g.C}, acc_opts);
  AT_DISPATCH_FLOATING_TYPES_AND2(
      at::kHalf, at::kBFloat16, x.scalar_type(), "ffn_bn_bwd_reduce", [&] {
        using acc_t = at::opmath_type<scalar_t>;
        const scalar_t* dnext_p = kShift ? dnext.data_ptr<scalar_t>() : nullptr;
        const scalar_t* y_p = y.defined() ? y.data_ptr<scalar_t>() : nullptr;
        if (g.HW == 0) {
          partials.zero_();  // no elements: dx / dres are empty too
        } else if (training) {
          const BnBwdVisitor<scalar_t, kShift> vis{dy.data_ptr<scalar_t>(),
                                                   dnext_p,
                                                   x.data_ptr<scalar_t>(),
                                                   y_p,
                                                   mean.data_ptr<acc_t>(),
                                                   ptr_or_null<acc_t>(a),
                                                   nullptr,
                                                   has_residual ? dres.data_ptr<scalar_t>()
                                                                : nullptr,
                                                   invstd.data_ptr<acc_t>(),
                                                   w.data_ptr<acc_t>(),
                                                   ptr_or_null<acc_t>(b)};
          launch_reduce(vis, seg, g, plan, partials.data_ptr<acc_t>());
        } else {  // one pass: sums and dx / dres together
          const BnBwdVisitor<scalar_t, kShift, true> vis{
              dy.data_ptr<scalar_t>(),  dnext_p,
              x.data_ptr<scalar_t>(),   y_p,
              mean.data_ptr<acc_t>(),   ptr_or_null<acc_t>(a),
              dx.data_ptr<scalar_t>(),  has_residual ? dres.data_ptr<scalar_t>() : nullptr,
              invstd.data_ptr<acc_t>(), w.data_ptr<acc_t>(),
              ptr_or_null<acc_t>(b)};
          launch_reduce(vis, seg, g, plan, partials.data_ptr<acc_t>());
        }
      });
  const at::Tensor sums = combine_sums(partials, seg, g);
  std::vector<RowGrad> grads{{1, true, dweight}, {0, false, dbias}};
  if (kShift && a.defined()) grads.push_back({2, false, dalter});
  row_grads(sums, seg, g, invstd, grads);
  if (!training) return {dx, dres, dweight, dbias, dalter};
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "ffn_bn_bwd", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    const BnBwdOp<scalar_t, kShift> op{
        dy.data_ptr<scalar_t>(), kShift ? dnext.data_ptr<scalar_t>() : nullptr,
        x.data_ptr<scalar_t>(),  y.defined() ? y.data_ptr<scalar_t>() : nullptr,
        dx.data_ptr<scalar_t>(), has_residual ? dres.data_ptr<scalar_t>() : nullptr,
        mean.data_ptr<acc_t>(),  invstd.data_ptr<acc_t>(),
        w.data_ptr<acc_t>(),     ptr_or_null<acc_t>(a),
        sums.data_ptr<acc_t>(),  ptr_or_null<acc_t>(b)};
    launch_frame_map<scalar_t>(op, seg, g,
                               can_vectorize<scalar_t>(g, {&dy, &dnext, &x, &y, &dx, &dres}));
  });
  return {dx, dres, dweight, dbias, dalter};
}

}  // namespace cuda
}  // namespace ffn_kernels
