// CPU kernels of shift_alter (docs/design.md §3.1): y[f, c] = (1 + alter[p_s, c]) * x[src(f, c)].
#include "cpu/common.h"
#include "ops/shift_alter.h"

namespace ffn_kernels {
namespace cpu {
inline namespace FFN_CPU_ISA {
namespace {

Tensor shift_alter_fwd(const Tensor& x, int64_t clips, at::IntArrayRef frames,
                       at::IntArrayRef rows, const c10::optional<Tensor>& alter, int64_t fold_div) {
  TORCH_CHECK(fold_div >= 2, "fold_div must be >= 2, got ", fold_div);
  const Geom g = make_geom(x, fold_div);
  if (alter.has_value()) check_param(*alter, x, "alter");
  const FrameLayout L =
      make_frame_layout(g.F, clips, frames, rows, alter.has_value() ? alter->size(0) : INT64_MAX);
  Tensor y = empty_activation(x, g);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "shift_alter_fwd", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    const std::vector<acc_t> factor = alter_factors<scalar_t>(L, alter, g.C);
    const scalar_t* xp = x.data_ptr<scalar_t>();
    const RunOut<scalar_t> yw = run_out<scalar_t>(y, Reader::kNextOp);
    map_runs(
        g, L, [&](auto channels_last, const FrameInfo& fi, int64_t off, int64_t len, int64_t c0) {
          constexpr bool kChannelsLast = decltype(channels_last)::value;
          const int d = ffn::shift_source_delta(static_cast<int>(c0), g.fold, fi.t, fi.T, false);
          if (d == ffn::kNoSource) {
            yw.run(off, len, [&](scalar_t* yo) { std::fill_n(yo, len, scalar_t(0)); });
            return;
          }
          const scalar_t* __restrict__ xs = xp + off + d * g.chw;
          const acc_t* __restrict__ k = factor.data() + fi.s * g.C + c0;
          prefetch_shifted(g, xs, len, c0);
          yw.run(off, len, [&](scalar_t* __restrict__ yo) {
            FFN_IVDEP
            for (int64_t i = 0; i < len; ++i)
              yo[i] = static_cast<scalar_t>(static_cast<acc_t>(xs[i]) * k[ch<kChannelsLast>(i)]);
          });
        });
  });
  return y;
}

// dx[f] = (1 + a) * dy[f + reverse delta]; dalter pairs the same two frames the other way round:
// sum_f dy[f] * x[src(f)] = sum_f x[f] * dy[f + reverse delta], so one pass reads dy once.
std::tuple<Tensor, Tensor> shift_alter_bwd(const Tensor& dy, const Tensor& x, int64_t clips,
                                           at::IntArrayRef frames, at::IntArrayRef rows,
                                           const c10::optional<Tensor>& alter, int64_t fold_div,
                                           bool alter_grad) {
  TORCH_CHECK(fold_div >= 2, "fold_div must be >= 2, got ", fold_div);
  TORCH_CHECK(!alter_grad || alter.has_value(), "shift_alter_bwd: alter_grad needs alter");
  const Geom g = make_geom(dy, fold_div);
  if (alter_grad) check_activation(x, dy, g, "x");
  if (alter.has_value()) check_param(*alter, dy, "alter");
  const int64_t P = alter.has_value() ? alter->size(0) : INT64_MAX;
  const FrameLayout L = make_frame_layout(g.F, clips, frames, rows, P);
  Tensor dx = empty_activation(dy, g);
  Tensor dalter = alter_grad ? at::zeros({P, g.C}, alter->options()) : unused_acc(dy);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, dy.scalar_type(), "shift_alter_bwd", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    const std::vector<acc_t> factor = alter_factors<scalar_t>(L, alter, g.C);
    const scalar_t* dyp = dy.data_ptr<scalar_t>();
    const scalar_t* xp = alter_grad ? x.data_ptr<scalar_t>() : nullptr;
    const RunOut<scalar_t> dxw = run_out<scalar_t>(dx, Reader::kNextOp);
    // Writes dx for the run; with kGrad also adds x * dy_src to acc[i].
    auto run = [&](auto channels_last, auto grad, const FrameInfo& fi, int64_t off, int64_t len,
                   int64_t c0, acc_t* __restrict__ acc) {
      constexpr bool kChannelsLast = decltype(channels_last)::value;
      const int d = ffn::shift_source_delta(static_cast<int>(c0), g.fold, fi.t, fi.T, true);
      if (d == ffn::kNoSource) {
        dxw.run(off, len, [&](scalar_t* dxo) { std::fill_n(dxo, len, scalar_t(0)); });
        return;
      }
      const scalar_t* __restrict__ ds = dyp + off + d * g.chw;
      const acc_t* __restrict__ k = factor.data() + fi.s * g.C + c0;
      prefetch_shifted(g, ds, len, c0);
      dxw.run(off, len, [&](scalar_t* __restrict__ dxo) {
        FFN_IVDEP
        for (int64_t i = 0; i < len; ++i) {
          const acc_t v = static_cast<acc_t>(ds[i]);
          dxo[i] = static_cast<scalar_t>(v * k[ch<kChannelsLast>(i)]);
          if constexpr (decltype(grad)::value) acc[i] += static_cast<acc_t>(xp[off + i]) * v;
        }
      });
    };
    if (!alter_grad) {
      map_runs(g, L,
               [&](auto channels_last, const FrameInfo& fi, int64_t off, int64_t len, int64_t c0) {
                 run(channels_last, std::false_type{}, fi, off, len, c0, nullptr);
               });
      return;
    }
    const std::vector<acc_t> sums = segment_sums<1, acc_t>(
        g, L,
        [&](auto channels_last, const FrameInfo& fi, int64_t off, int64_t len, int64_t c0,
            acc_t* acc, int64_t) { run(channels_last, std::true_type{}, fi, off, len, c0, acc); });
    acc_t* da = dalter.data_ptr<acc_t>();
    // segments sharing a row add up (autograd semantics), in segment order
    for (int64_t s = 0; s < L.S; ++s)
      for (int64_t c = 0; c < g.C; ++c) da[L.rows[s] * g.C + c] += sums[s * g.C + c];
  });
  return {dx, dalter};
}

}  // namespace

FFN_CPU_KERNELS(shift_alter, shift_alter_fwd, shift_alter_bwd)

}  // namespace FFN_CPU_ISA
}  // namespace cpu
}  // namespace ffn_kernels
