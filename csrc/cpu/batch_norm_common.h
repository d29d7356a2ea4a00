// The BatchNorm machinery shared by the CPU kernels of freq_batch_norm and bn_add_relu_shift_alter
// (docs/design.md §3.2-3.3): per-segment statistics, the normalise-and-activate pass and the
// two-pass backward, each parameterised by what the op does around them.
#pragma once

#include "cpu/common.h"

namespace ffn_kernels {
namespace cpu {
inline namespace FFN_CPU_ISA {

using OptTensor = c10::optional<Tensor>;

// mean/invstd [S, C] (batch statistics, or the running ones in eval) and the updated copies of
// the running statistics (empty tensors when there are none).
struct BnStats {
  Tensor mean, invstd, new_rm, new_rv;
};

template <typename scalar_t>
BnStats bn_stats(const Tensor& x, const Geom& g, const FrameLayout& L,
                 const OptTensor& running_mean, const OptTensor& running_var, bool training,
                 at::ArrayRef<double> momentum, double eps) {
  using acc_t = at::opmath_type<scalar_t>;
  TORCH_CHECK(running_mean.has_value() == running_var.has_value(),
              "running_mean and running_var must be given together");
  TORCH_CHECK(static_cast<int64_t>(momentum.size()) == L.S, "momentum has ", momentum.size(),
              " entries for ", L.S, " segments");
  const bool has_running = running_mean.has_value();
  const auto opts = x.options().dtype(acc_type(x));
  BnStats r{at::empty({L.S, g.C}, opts), at::empty({L.S, g.C}, opts),
            has_running ? running_mean->clone() : at::empty({0}, opts),
            has_running ? running_var->clone() : at::empty({0}, opts)};
  acc_t* mean = r.mean.data_ptr<acc_t>();
  acc_t* invstd = r.invstd.data_ptr<acc_t>();
  if (!training && has_running) {
    const acc_t* rm = running_mean->data_ptr<acc_t>();
    const acc_t* rv = running_var->data_ptr<acc_t>();
    for (int64_t s = 0; s < L.S; ++s)
      for (int64_t c = 0; c < g.C; ++c) {
        mean[s * g.C + c] = rm[L.rows[s] * g.C + c];
        invstd[s * g.C + c] = ffn::inv_std(rv[L.rows[s] * g.C + c], eps);
      }
    return r;
  }
  const auto stats = segment_stats<scalar_t>(g, L, x.data_ptr<scalar_t>());
  for (int64_t s = 0; s < L.S; ++s) {
    const acc_t m = static_cast<acc_t>(momentum[s]);
    for (int64_t c = 0; c < g.C; ++c) {
      const ffn::Welford<double>& w = stats[s * g.C + c];
      const double var = ffn::welford_var(w);
      mean[s * g.C + c] = static_cast<acc_t>(w.mean);
      invstd[s * g.C + c] = static_cast<acc_t>(ffn::inv_std(var, eps));
      if (training && has_running) {
        const int64_t rc = L.rows[s] * g.C + c;
        acc_t* rm = r.new_rm.data_ptr<acc_t>();
        acc_t* rv = r.new_rv.data_ptr<acc_t>();
        rm[rc] = ffn::running_update(rm[rc], static_cast<acc_t>(w.mean), m);
        rv[rc] = ffn::running_update(rv[rc], static_cast<acc_t>(ffn::unbiased_var(var, w.n)), m);
      }
    }
  }
  return r;
}

inline void check_norm_params(const Tensor& x, const Tensor& weight, const Tensor& bias,
                              const OptTensor& running_mean, const OptTensor& running_var) {
  check_param(weight, x, "weight");
  check_param(bias, x, "bias");
  if (running_mean.has_value()) check_param(*running_mean, x, "running_mean");
  if (running_var.has_value()) check_param(*running_var, x, "running_var");
}

// Per (segment, channel) the forward's y = x * scale + shift (before the residual and ReLU).
template <typename acc_t>
struct BnAffines {
  std::vector<acc_t> scale, shift;
};

template <typename acc_t>
BnAffines<acc_t> bn_affines(const FrameLayout& L, int64_t C, const Tensor& mean_,
                            const Tensor& invstd_, const Tensor& weight, const Tensor& bias) {
  BnAffines<acc_t> r{std::vector<acc_t>(L.S * C), std::vector<acc_t>(L.S * C)};
  const acc_t *w = weight.data_ptr<acc_t>(), *b = bias.data_ptr<acc_t>();
  const acc_t *mean = mean_.data_ptr<acc_t>(), *invstd = invstd_.data_ptr<acc_t>();
  for (int64_t s = 0; s < L.S; ++s)
    for (int64_t c = 0; c < C; ++c) {
      const int64_t sc = s * C + c, rc = L.rows[s] * C + c;
      const ffn::BnAffine<acc_t> a = ffn::bn_affine(mean[sc], invstd[sc], w[rc], b[rc]);
      r.scale[sc] = a.scale;
      r.shift[sc] = a.shift;
    }
  return r;
}

// Forward of the BN part: y = act(x * scale + shift + residual) on every run; `then` (may be a
// no-op) post-processes each run after it is computed, reading its values at `values` (L1:
// bn_add_relu_shift_alter's shifted copy).
template <typename scalar_t, typename Then>
void bn_apply(const Tensor& x, const Tensor& y, Reader reader, const scalar_t* residual, bool relu,
              const Geom& g, const FrameLayout& L, const Tensor& weight, const Tensor& bias,
              const BnStats& st, Then&& then) {
  using acc_t = at::opmath_type<scalar_t>;
  const BnAffines<acc_t> affine = bn_affines<acc_t>(L, g.C, st.mean, st.invstd, weight, bias);
  const std::vector<acc_t>&scale = affine.scale, &shift = affine.shift;
  const scalar_t* xp = x.data_ptr<scalar_t>();
  const RunOut<scalar_t> yw = run_out<scalar_t>(y, reader);
  dispatch_bool(relu, [&](auto relu_c) {
    dispatch_bool(residual != nullptr, [&](auto res_c) {
      map_runs(
          g, L, [&](auto channels_last, const FrameInfo& fi, int64_t off, int64_t len, int64_t c0) {
            constexpr bool kChannelsLast = decltype(channels_last)::value;
            const scalar_t* __restrict__ xo = xp + off;
            const scalar_t* __restrict__ ro = res_c ? residual + off : nullptr;
            const acc_t* __restrict__ k = scale.data() + fi.s * g.C + c0;
            const acc_t* __restrict__ h = shift.data() + fi.s * g.C + c0;
            yw.run(off, len, [&](scalar_t* __restrict__ yo) {
              FFN_IVDEP
              for (int64_t i = 0; i < len; ++i) {
                acc_t v =
                    static_cast<acc_t>(xo[i]) * k[ch<kChannelsLast>(i)] + h[ch<kChannelsLast>(i)];
                if constexpr (decltype(res_c)::value) v += static_cast<acc_t>(ro[i]);
                // keeps NaN
                if constexpr (decltype(relu_c)::value) v = v < acc_t(0) ? acc_t(0) : v;
                yo[i] = static_cast<scalar_t>(v);
              }
              then(channels_last, fi, off, len, c0, static_cast<const scalar_t*>(yo));
            });
          });
    });
  });
}

// BN backward shared by freq_batch_norm_bwd and bn_add_relu_shift_alter_bwd. grad(channels_last,
// fi, off, c0) returns the functor i -> g of element i of a run; with NX == 1, extra(...) returns
// i -> a third per-(segment, channel) sum term. Pass 1 reduces sum(g), sum(g * (x - mean)) (and the
// extra term) and, if dres is set, writes dres = g; pass 2 writes dx, reading g back from dres where
// there is one instead of recomputing it (one tensor read instead of the block op's dout, dnext and
// out: its backward moves 8 activations' bytes instead of 10, docs/design.md §3.3). In eval, whose
// dx needs no sum, pass 1 also writes dx and there is no pass 2. Adds to dweight/dbias rows (zeroed
// by the caller; segments sharing a row sum) and returns the [2 + NX, S, C] sums.
template <int NX, typename scalar_t, typename Grad, typename Extra>
std::vector<at::opmath_type<scalar_t>> bn_backward(const Geom& g, const FrameLayout& L,
                                                   const Tensor& x, const Tensor& mean,
                                                   const Tensor& invstd, const Tensor& weight,
                                                   bool training, scalar_t* dx, scalar_t* dres,
                                                   Tensor& dweight, Tensor& dbias, Grad&& grad,
                                                   Extra&& extra) {
  using acc_t = at::opmath_type<scalar_t>;
  const int64_t C = g.C;
  const scalar_t* xp = x.data_ptr<scalar_t>();
  const acc_t* mp = mean.data_ptr<acc_t>();
  const acc_t* is = invstd.data_ptr<acc_t>();
  const acc_t* wp = weight.data_ptr<acc_t>();
  const RunOut<scalar_t> dxw = run_out(dx, g.F * g.chw, Reader::kNextOp),
                         resw = run_out(dres, g.F * g.chw, Reader::kLater);
  // In eval, dx = g * weight * invstd does not wait for the sums: it is written in the pass that
  // sums, so g and x are read once (the roofline section measured the two-pass form at 0.64 of
  // copy bandwidth, docs/design.md §6)
  std::vector<acc_t> eval_scale(training ? 0 : L.S * C);
  for (int64_t s = 0; s < L.S && !training; ++s)
    for (int64_t c = 0; c < C; ++c)
      eval_scale[s * C + c] =
          ffn::bn_backward_coef(is[s * C + c], wp[L.rows[s] * C + c], acc_t(0), acc_t(0), acc_t(1),
                                false).scale;
  const std::vector<acc_t> sums = segment_sums<2 + NX, acc_t>(
      g, L,
      [&](auto channels_last, const FrameInfo& fi, int64_t off, int64_t len, int64_t c0,
          acc_t* __restrict__ acc, int64_t w) {
        constexpr bool kChannelsLast = decltype(channels_last)::value;
        const auto gi = grad(channels_last, fi, off, c0);
        const scalar_t* __restrict__ xo = xp + off;
        const acc_t* __restrict__ mu = mp + fi.s * C + c0;
        // whether dres is written is a compile-time branch: a store under a run-time condition
        // keeps the loop scalar
        dispatch_bool(dres != nullptr, [&](auto res_c) {
          constexpr bool kRes = decltype(res_c)::value;
          // body(dro): the run's loop, dro where its dres goes (nullptr without dres)
          const auto with_dres = [&](auto&& body) {
            if constexpr (kRes) resw.run(off, len, body);
            else body(nullptr);
          };
          if (training) {
            with_dres([&](scalar_t* __restrict__ dro) {
              FFN_IVDEP
              for (int64_t i = 0; i < len; ++i) {
                const acc_t gv = gi(i);
                acc[i] += gv;
                acc[w + i] += gv * (static_cast<acc_t>(xo[i]) - mu[ch<kChannelsLast>(i)]);
                if constexpr (kRes) dro[i] = static_cast<scalar_t>(gv);
              }
            });
            return;
          }
          const acc_t* __restrict__ k = eval_scale.data() + fi.s * C + c0;
          dxw.run(off, len, [&](scalar_t* __restrict__ dxo) {
            with_dres([&](scalar_t* __restrict__ dro) {
              FFN_IVDEP
              for (int64_t i = 0; i < len; ++i) {
                const int64_t j = ch<kChannelsLast>(i);
                const acc_t gv = gi(i), xmu = static_cast<acc_t>(xo[i]) - mu[j];
                acc[i] += gv;
                acc[w + i] += gv * xmu;
                dxo[i] =
                    static_cast<scalar_t>(ffn::bn_backward_dx(gv, xmu, {k[j], acc_t(0), acc_t(0)}));
                if constexpr (kRes) dro[i] = static_cast<scalar_t>(gv);
              }
            });
          });
        });
        if constexpr (NX == 1) {
          const auto ei = extra(channels_last, fi, off, c0);
          FFN_IVDEP
          for (int64_t i = 0; i < len; ++i) acc[2 * w + i] += ei(i);
        }
      });

  acc_t *dw = dweight.data_ptr<acc_t>(), *db = dbias.data_ptr<acc_t>();
  std::vector<acc_t> scale(L.S * C), mean_g(L.S * C), proj(L.S * C);
  for (int64_t s = 0; s < L.S; ++s) {
    const acc_t n = static_cast<acc_t>((L.start[s + 1] - L.start[s]) * g.HW);
    for (int64_t c = 0; c < C; ++c) {
      const int64_t sc = s * C + c, rc = L.rows[s] * C + c;
      const acc_t sum_g = sums[sc], sum_gxmu = sums[L.S * C + sc];
      const ffn::BnBackwardCoef<acc_t> k =
          ffn::bn_backward_coef(is[sc], wp[rc], sum_g, sum_gxmu, n, training);
      scale[sc] = k.scale;
      mean_g[sc] = k.mean_g;
      proj[sc] = k.proj;
      // segments sharing a row add up (autograd semantics), in segment order
      dw[rc] += sum_gxmu * is[sc];
      db[rc] += sum_g;
    }
  }
  if (!training) return sums;  // dx (and the residual's gradient) written with the sums

  dispatch_bool(dres != nullptr, [&](auto res_c) {
    map_runs(g, L, [&](auto channels_last, const FrameInfo& fi, int64_t off, int64_t len,
                       int64_t c0) {
      constexpr bool kChannelsLast = decltype(channels_last)::value;
      const int64_t sc = fi.s * C + c0;
      const scalar_t* __restrict__ xo = xp + off;
      const acc_t* __restrict__ mu = mp + sc;
      const acc_t *__restrict__ k = scale.data() + sc, *__restrict__ mg = mean_g.data() + sc,
                  *__restrict__ pj = proj.data() + sc;
      // g was stored as dres in pass 1 (it is dres): read once instead of recomputed from its inputs
      const auto gi = [&] {
        if constexpr (decltype(res_c)::value) {
          const scalar_t* __restrict__ go = dres + off;
          return [=](int64_t i) { return static_cast<acc_t>(go[i]); };
        } else {
          return grad(channels_last, fi, off, c0);
        }
      }();
      dxw.run(off, len, [&](scalar_t* __restrict__ dxo) {
        FFN_IVDEP
        for (int64_t i = 0; i < len; ++i) {
          const int64_t j = ch<kChannelsLast>(i);
          const acc_t gv = gi(i);
          const ffn::BnBackwardCoef<acc_t> kc{k[j], mg[j], pj[j]};
          dxo[i] = static_cast<scalar_t>(
              ffn::bn_backward_dx(gv, static_cast<acc_t>(xo[i]) - mu[j], kc));
        }
      });
    });
  });
  return sums;
}

inline void check_stat(const Tensor& t, const Tensor& x, int64_t S, const char* name) {
  TORCH_CHECK(t.dim() == 2 && t.size(0) == S && t.size(1) == x.size(1) && t.is_contiguous() &&
                  t.scalar_type() == acc_type(x),
              name, " must be a contiguous [S=", S, ", C=", x.size(1), "] ", acc_type(x),
              " tensor, got ", t.sizes(), " ", t.scalar_type());
}

}  // namespace FFN_CPU_ISA
}  // namespace cpu
}  // namespace ffn_kernels
