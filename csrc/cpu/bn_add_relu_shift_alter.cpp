// CPU kernels of bn_add_relu_shift_alter (docs/design.md §3.3): at the residual-block boundary,
// out = relu(BN(z) + identity) and the shift_alter of out for the next block, in one pass.
#include "cpu/batch_norm_common.h"
#include "ops/bn_add_relu_shift_alter.h"

namespace ffn_kernels {
namespace cpu {
inline namespace FFN_CPU_ISA {
namespace {

// out = relu(BN(z) + identity) and next_in = shift_alter(out), in one pass: each run of out is
// copied (times 1 + a) to the frame whose TSM source it is; next_in elements without a source
// are zero-filled by their own run. Every next_in element is written exactly once.
std::tuple<Tensor, Tensor, Tensor, Tensor, Tensor, Tensor> bn_add_relu_shift_alter_fwd(
    const Tensor& z, const Tensor& identity, int64_t clips, at::IntArrayRef frames,
    at::IntArrayRef rows, const Tensor& weight, const Tensor& bias, const OptTensor& running_mean,
    const OptTensor& running_var, bool training, at::ArrayRef<double> momentum, double eps,
    const OptTensor& alter_next, int64_t fold_div) {
  TORCH_CHECK(fold_div >= 2, "fold_div must be >= 2, got ", fold_div);
  const Geom g = make_geom(z, fold_div);
  check_norm_params(z, weight, bias, running_mean, running_var);
  check_activation(identity, z, g, "identity");
  if (alter_next.has_value()) {
    check_param(*alter_next, z, "alter_next");
    TORCH_CHECK(alter_next->size(0) == weight.size(0), "alter_next has ", alter_next->size(0),
                " rows, weight has ", weight.size(0));
  }
  const FrameLayout L = make_frame_layout(g.F, clips, frames, rows, weight.size(0));
  Tensor out = empty_activation(z, g), next = empty_activation(z, g);
  BnStats st;
  AT_DISPATCH_FLOATING_TYPES_AND2(
      at::kHalf, at::kBFloat16, z.scalar_type(), "bn_add_relu_shift_alter_fwd", [&] {
        using acc_t = at::opmath_type<scalar_t>;
        st = bn_stats<scalar_t>(z, g, L, running_mean, running_var, training, momentum, eps);
        const std::vector<acc_t> factor = alter_factors<scalar_t>(L, alter_next, g.C);
        const RunOut<scalar_t> nw = run_out<scalar_t>(next, Reader::kNextOp);
        // the run's out values `oo` (in L1), scaled into the next_in run they are the source of
        auto scatter = [&](auto channels_last, const FrameInfo& fi, int64_t off, int64_t len,
                           int64_t c0, const scalar_t* __restrict__ oo) {
          constexpr bool kChannelsLast = decltype(channels_last)::value;
          const int c = static_cast<int>(c0);
          if (ffn::shift_source_delta(c, g.fold, fi.t, fi.T, false) == ffn::kNoSource)
            nw.run(off, len, [&](scalar_t* no) { std::fill_n(no, len, scalar_t(0)); });
          const int d = ffn::shift_source_delta(c, g.fold, fi.t, fi.T, true);
          if (d == ffn::kNoSource) return;
          const acc_t* __restrict__ k = factor.data() + fi.s * g.C + c0;
          nw.run(off + d * g.chw, len, [&](scalar_t* __restrict__ no) {
            FFN_IVDEP
            for (int64_t i = 0; i < len; ++i)
              no[i] = static_cast<scalar_t>(static_cast<acc_t>(oo[i]) * k[ch<kChannelsLast>(i)]);
          });
        };
        bn_apply<scalar_t>(z, out, Reader::kLater, identity.data_ptr<scalar_t>(), true, g, L,
                           weight, bias, st, scatter);
      });
  return {out, next, st.mean, st.invstd, st.new_rm, st.new_rv};
}

// g = (dout + reverse_shift((1 + a) * dnext)) * (out > 0) is recomputed per element in both
// passes. dalter pairs each out element with the dnext element it was copied to: sum_f dnext[f] *
// out[src(f)] = sum_f out[f] * dnext[f + reverse delta], the dnext value g already reads.
std::tuple<Tensor, Tensor, Tensor, Tensor, Tensor> bn_add_relu_shift_alter_bwd(
    const Tensor& dout, const Tensor& dnext, const Tensor& z, const Tensor& out, int64_t clips,
    at::IntArrayRef frames, at::IntArrayRef rows, const Tensor& weight, const Tensor& mean,
    const Tensor& invstd, bool training, const OptTensor& alter_next, int64_t fold_div) {
  TORCH_CHECK(fold_div >= 2, "fold_div must be >= 2, got ", fold_div);
  const Geom g = make_geom(z, fold_div);
  check_activation(dout, z, g, "dout");
  check_activation(dnext, z, g, "dnext");
  check_activation(out, z, g, "out");
  check_param(weight, z, "weight");
  if (alter_next.has_value()) {
    check_param(*alter_next, z, "alter_next");
    TORCH_CHECK(alter_next->size(0) == weight.size(0), "alter_next has ", alter_next->size(0),
                " rows, weight has ", weight.size(0));
  }
  const FrameLayout L = make_frame_layout(g.F, clips, frames, rows, weight.size(0));
  check_stat(mean, z, L.S, "mean");
  check_stat(invstd, z, L.S, "invstd");
  Tensor dz = empty_activation(z, g), didentity = empty_activation(z, g);
  Tensor dweight = at::zeros_like(weight), dbias = at::zeros_like(weight);
  Tensor dalter = alter_next.has_value() ? at::zeros_like(weight) : unused_acc(z);
  AT_DISPATCH_FLOATING_TYPES_AND2(
      at::kHalf, at::kBFloat16, z.scalar_type(), "bn_add_relu_shift_alter_bwd", [&] {
        using acc_t = at::opmath_type<scalar_t>;
        const std::vector<acc_t> factor = alter_factors<scalar_t>(L, alter_next, g.C);
        const scalar_t *dop = dout.data_ptr<scalar_t>(), *dnp = dnext.data_ptr<scalar_t>(),
                       *op = out.data_ptr<scalar_t>();
        // dnext at the reverse-shifted source of the run, or nullptr outside the clip.
        auto dnext_src = [&](const FrameInfo& fi, int64_t off, int64_t c0) -> const scalar_t* {
          const int d = ffn::shift_source_delta(static_cast<int>(c0), g.fold, fi.t, fi.T, true);
          return d == ffn::kNoSource ? nullptr : dnp + off + d * g.chw;
        };
        auto grad = [&](auto channels_last, const FrameInfo& fi, int64_t off, int64_t c0) {
          constexpr bool kChannelsLast = decltype(channels_last)::value;
          const scalar_t* __restrict__ dn = dnext_src(fi, off, c0);
          const scalar_t* __restrict__ dd = dop + off, * __restrict__ oo = op + off;
          const acc_t* __restrict__ k = factor.data() + fi.s * g.C + c0;
          if (dn != nullptr) prefetch_shifted(g, dn, g.fold, c0);
          return [=](int64_t i) {
            return ffn::block_grad<scalar_t>(static_cast<acc_t>(dd[i]),
                                             dn ? static_cast<acc_t>(dn[i]) : acc_t(0),
                                             k[ch<kChannelsLast>(i)], static_cast<acc_t>(oo[i]));
          };
        };
        auto extra = [&](auto, const FrameInfo& fi, int64_t off, int64_t c0) {
          const scalar_t* __restrict__ dn = dnext_src(fi, off, c0);
          const scalar_t* __restrict__ oo = op + off;
          return [=](int64_t i) {
            return dn ? static_cast<acc_t>(oo[i]) * static_cast<acc_t>(dn[i]) : acc_t(0);
          };
        };
        auto run = [&](auto nx) {
          return bn_backward<decltype(nx)::value>(
              g, L, z, mean, invstd, weight, training, dz.data_ptr<scalar_t>(),
              didentity.data_ptr<scalar_t>(), dweight, dbias, grad, extra);
        };
        if (!alter_next.has_value()) {
          run(std::integral_constant<int, 0>{});
          return;
        }
        const std::vector<acc_t> sums = run(std::integral_constant<int, 1>{});
        acc_t* da = dalter.data_ptr<acc_t>();
        // segments sharing a row add up, in segment order
        for (int64_t s = 0; s < L.S; ++s)
          for (int64_t c = 0; c < g.C; ++c)
            da[L.rows[s] * g.C + c] += sums[(2 * L.S + s) * g.C + c];
      });
  return {dz, didentity, dweight, dbias, dalter};
}

}  // namespace

FFN_CPU_KERNELS(bn_add_relu_shift_alter, bn_add_relu_shift_alter_fwd,
                bn_add_relu_shift_alter_bwd)

}  // namespace FFN_CPU_ISA
}  // namespace cpu
}  // namespace ffn_kernels
