// shift_alter_fwd / shift_alter_bwd: temporal shift + Weight Alteration (docs/design.md §3.1).
#include "common.cuh"
#include "ops/shift_alter.h"

namespace ffn_kernels {
namespace cuda {
namespace {

// out[f, c] = (1 + alter[p_s, c]) * in[shifted source of (f, c)]: the forward shift of x
// (shift_alter_fwd) or the reverse shift of dy (dx of shift_alter_bwd).
template <typename scalar_t>
struct ShiftOp {
  using acc_t = at::opmath_type<scalar_t>;
  const scalar_t* in;
  scalar_t* out;
  const acc_t* alter;  // [P, C] or nullptr (pure shift)
  bool reverse;

  template <int V>
  __device__ __forceinline__ void apply(const FrameLayout&, const Geom& g, const FramePos& fp,
                                        int64_t off, const int (&c)[V]) const {
    acc_t v[V];
    load_shifted<V>(in, off, g, fp, c, reverse, v);
#pragma unroll
    for (int k = 0; k < V; ++k) v[k] *= alter_factor<scalar_t>(alter, fp.row, g.C, c[k]);
    store_vec<V>(out + off, v);
  }
};

// Fused backward when d alter is wanted: one pass writes dx = (1+a) * dy[reverse source] and
// sums x * dy[reverse source], which over a segment equals the reference's sum of dy * x[source]
// (the forward and reverse shifts pair the same frames).
template <typename scalar_t>
struct ShiftBwdVisitor {
  using acc_t = at::opmath_type<scalar_t>;
  using Acc = SumAcc<acc_t, 1>;
  struct Local {
    int64_t delta;  // element offset of the reverse source, valid only if `valid`
    acc_t factor;
    bool valid;
  };
  const scalar_t* dy;
  const scalar_t* x;
  scalar_t* dx;
  const acc_t* alter;

  static __device__ __forceinline__ Acc identity() { return Acc{{acc_t(0)}}; }
  __device__ __forceinline__ Local local(const Geom& g, const FramePos& fp, int c) const {
    const int d = src_delta(g, fp, c, /*reverse=*/true);
    return {static_cast<int64_t>(d) * g.chw, alter_factor<scalar_t>(alter, fp.row, g.C, c),
            d != ffn::kNoSource};
  }
  __device__ __forceinline__ void visit(Acc& a, const Local& l, int64_t off) const {
    const acc_t ds = l.valid ? static_cast<acc_t>(dy[off + l.delta]) : acc_t(0);
    dx[off] = static_cast<scalar_t>(ds * l.factor);
    a.v[0] += static_cast<acc_t>(x[off]) * ds;
  }
};

at::Tensor shift_alter_fwd(const at::Tensor& x_, int64_t clips, at::IntArrayRef frames,
                           at::IntArrayRef rows, const c10::optional<at::Tensor>& alter,
                           int64_t fold_div) {
  const c10::cuda::OptionalCUDAGuard guard(x_.device());
  TORCH_CHECK(fold_div >= 1, "fold_div must be >= 1, got ", fold_div);
  const at::MemoryFormat fmt = format_of(x_);
  const at::Tensor x = x_.contiguous(fmt);
  const FrameLayout seg = make_frame_layout(x, clips, frames, rows);
  const Geom g = make_geom(x, fold_div);
  const at::Tensor a = param(alter, x, seg, "alter");
  at::Tensor y = at::empty(x.sizes(), x.options().memory_format(fmt));
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "ffn_shift_alter_fwd", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    const ShiftOp<scalar_t> op{x.data_ptr<scalar_t>(), y.data_ptr<scalar_t>(),
                               a.defined() ? a.data_ptr<acc_t>() : nullptr, /*reverse=*/false};
    launch_frame_map<scalar_t>(op, seg, g, can_vectorize<scalar_t>(g, {&x, &y}));
  });
  return y;
}

std::tuple<at::Tensor, at::Tensor> shift_alter_bwd(const at::Tensor& dy_, const at::Tensor& x_,
                                                   int64_t clips, at::IntArrayRef frames,
                                                   at::IntArrayRef rows,
                                                   const c10::optional<at::Tensor>& alter,
                                                   int64_t fold_div, bool alter_grad) {
  const c10::cuda::OptionalCUDAGuard guard(dy_.device());
  TORCH_CHECK(fold_div >= 1, "fold_div must be >= 1, got ", fold_div);
  TORCH_CHECK(!alter_grad || (alter.has_value() && alter->defined()),
              "shift_alter_bwd: alter_grad needs alter");
  const at::MemoryFormat fmt = format_of(dy_);
  const at::Tensor dy = dy_.contiguous(fmt);
  const FrameLayout seg = make_frame_layout(dy, clips, frames, rows);
  const Geom g = make_geom(dy, fold_div);
  const at::Tensor a = param(alter, dy, seg, "alter");
  at::Tensor dx = at::empty(dy.sizes(), dy.options().memory_format(fmt));
  if (!alter_grad) {  // x is not read (callers may pass a stand-in)
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, dy.scalar_type(), "ffn_shift_alter_bwd", [&] {
      using acc_t = at::opmath_type<scalar_t>;
      const ShiftOp<scalar_t> op{dy.data_ptr<scalar_t>(), dx.data_ptr<scalar_t>(),
                                 a.defined() ? a.data_ptr<acc_t>() : nullptr, /*reverse=*/true};
      launch_frame_map<scalar_t>(op, seg, g, can_vectorize<scalar_t>(g, {&dy, &dx}));
    });
    return {dx, unused_acc(dy)};
  }
  const at::Tensor x = in_format(x_, fmt, dy, "x");
  FrameLayout rseg = seg;
  const ReducePlan plan = plan_reduce(rseg, g);
  const auto acc_opts = dy.options().dtype(acc_type(dy)).memory_format(at::MemoryFormat::Contiguous);
  at::Tensor partials = at::empty({1, plan.num_chunks, g.C}, acc_opts);
  at::Tensor dalter = at::empty(a.sizes(), acc_opts);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, dy.scalar_type(), "ffn_shift_alter_bwd", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    if (g.HW > 0)
      launch_reduce(ShiftBwdVisitor<scalar_t>{dy.data_ptr<scalar_t>(), x.data_ptr<scalar_t>(),
                                              dx.data_ptr<scalar_t>(), a.data_ptr<acc_t>()},
                    rseg, g, plan, partials.data_ptr<acc_t>());
    else
      partials.zero_();
  });
  const at::Tensor sums = combine_sums(partials, rseg, g);
  row_grads(sums, rseg, g, at::Tensor(), {RowGrad{0, false, dalter}});
  return {dx, dalter};
}

}  // namespace

FFN_REGISTER_KERNELS(shift_alter, CUDA, shift_alter_fwd,
                     shift_alter_bwd)

}  // namespace cuda
}  // namespace ffn_kernels
