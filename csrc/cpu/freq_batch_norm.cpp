// CPU kernels of freq_batch_norm and bn_add_relu_shift_alter (docs/design.md §3.2-3.3): per-segment
// BatchNorm with parameter row p_s, optional residual and ReLU, and at the residual-block boundary
// the shift_alter of the block output written in the same pass.
#include <torch/library.h>

#include "cpu/common.h"

namespace ffn_kernels {
namespace cpu {
namespace {

using OptTensor = c10::optional<Tensor>;

// mean/invstd [S, C] (batch statistics, or the running ones in eval) and the updated copies of
// the running statistics (empty tensors when there are none).
struct BnStats {
  Tensor mean, invstd, new_rm, new_rv;
};

template <typename scalar_t>
BnStats bn_stats(const Tensor& x, const Geom& g, const Layout& L, const OptTensor& running_mean,
                 const OptTensor& running_var, bool training, at::ArrayRef<double> momentum,
                 double eps) {
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
  const acc_t e = static_cast<acc_t>(eps);
  if (!training && has_running) {
    const acc_t* rm = running_mean->data_ptr<acc_t>();
    const acc_t* rv = running_var->data_ptr<acc_t>();
    for (int64_t s = 0; s < L.S; ++s)
      for (int64_t c = 0; c < g.C; ++c) {
        mean[s * g.C + c] = rm[L.rows[s] * g.C + c];
        invstd[s * g.C + c] = ffn::inv_std(rv[L.rows[s] * g.C + c], e);
      }
    return r;
  }
  const auto stats = segment_stats<scalar_t>(g, L, x.data_ptr<scalar_t>());
  for (int64_t s = 0; s < L.S; ++s) {
    const acc_t m = static_cast<acc_t>(momentum[s]);
    for (int64_t c = 0; c < g.C; ++c) {
      const ffn::Welford<acc_t>& w = stats[s * g.C + c];
      const acc_t var = ffn::welford_var(w);
      mean[s * g.C + c] = w.mean;
      invstd[s * g.C + c] = ffn::inv_std(var, e);
      if (training && has_running) {
        const int64_t rc = L.rows[s] * g.C + c;
        acc_t* rm = r.new_rm.data_ptr<acc_t>();
        acc_t* rv = r.new_rv.data_ptr<acc_t>();
        rm[rc] = ffn::running_update(rm[rc], w.mean, m);
        rv[rc] = ffn::running_update(rv[rc], ffn::unbiased_var(var, w.n), m);
      }
    }
  }
  return r;
}

void check_norm_params(const Tensor& x, const Tensor& weight, const Tensor& bias,
                       const OptTensor& running_mean, const OptTensor& running_var) {
  check_param(weight, x, "weight");
  check_param(bias, x, "bias");
  if (running_mean.has_value()) check_param(*running_mean, x, "running_mean");
  if (running_var.has_value()) check_param(*running_var, x, "running_var");
}

// Forward of the BN part: y = act(x * scale + shift + residual) on every run; `then` (may be a
// no-op) post-processes each run after y is written (bnrs: the shifted copy, from cache).
template <typename scalar_t, typename Then>
void bn_apply(const Tensor& x, const Tensor& y, const scalar_t* residual, bool relu, const Geom& g,
              const Layout& L, const Tensor& weight, const Tensor& bias, const BnStats& st,
              Then&& then) {
  using acc_t = at::opmath_type<scalar_t>;
  std::vector<acc_t> scale(L.S * g.C), shift(L.S * g.C);
  const acc_t *w = weight.data_ptr<acc_t>(), *b = bias.data_ptr<acc_t>();
  const acc_t *mean = st.mean.data_ptr<acc_t>(), *invstd = st.invstd.data_ptr<acc_t>();
  for (int64_t s = 0; s < L.S; ++s)
    for (int64_t c = 0; c < g.C; ++c) {
      const int64_t sc = s * g.C + c, rc = L.rows[s] * g.C + c;
      const ffn::BnAffine<acc_t> a = ffn::bn_affine(mean[sc], invstd[sc], w[rc], b[rc]);
      scale[sc] = a.scale;
      shift[sc] = a.shift;
    }
  const scalar_t* xp = x.data_ptr<scalar_t>();
  scalar_t* yp = y.data_ptr<scalar_t>();
  dispatch_bool(relu, [&](auto relu_c) {
    dispatch_bool(residual != nullptr, [&](auto res_c) {
      map_runs(g, L, [&](auto cl, const FrameInfo& fi, int64_t off, int64_t len, int64_t c0) {
        constexpr bool CL = decltype(cl)::value;
        const scalar_t* __restrict__ xo = xp + off;
        const scalar_t* __restrict__ ro = res_c ? residual + off : nullptr;
        scalar_t* __restrict__ yo = yp + off;
        const acc_t* __restrict__ k = scale.data() + fi.s * g.C + c0;
        const acc_t* __restrict__ h = shift.data() + fi.s * g.C + c0;
        for (int64_t i = 0; i < len; ++i) {
          acc_t v = static_cast<acc_t>(xo[i]) * k[ch<CL>(i)] + h[ch<CL>(i)];
          if constexpr (decltype(res_c)::value) v += static_cast<acc_t>(ro[i]);
          if constexpr (decltype(relu_c)::value) v = v < acc_t(0) ? acc_t(0) : v;  // keeps NaN
          yo[i] = static_cast<scalar_t>(v);
        }
        then(cl, fi, off, len, c0);
      });
    });
  });
}

std::tuple<Tensor, Tensor, Tensor, Tensor, Tensor> bn_fwd(
    const Tensor& x, int64_t clips, at::IntArrayRef frames, at::IntArrayRef rows,
    const Tensor& weight, const Tensor& bias, const OptTensor& running_mean,
    const OptTensor& running_var, bool training, at::ArrayRef<double> momentum, double eps,
    bool relu, const OptTensor& residual) {
  const Geom g = make_geom(x, 0);
  check_norm_params(x, weight, bias, running_mean, running_var);
  if (residual.has_value()) check_activation(*residual, x, g, "residual");
  const Layout L = make_layout(g.F, clips, frames, rows, weight.size(0));
  Tensor y = empty_activation(x, g);
  BnStats st;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "bn_fwd", [&] {
    st = bn_stats<scalar_t>(x, g, L, running_mean, running_var, training, momentum, eps);
    bn_apply<scalar_t>(x, y, residual.has_value() ? residual->data_ptr<scalar_t>() : nullptr,
                       relu, g, L, weight, bias, st, [](auto&&...) {});
  });
  return {y, st.mean, st.invstd, st.new_rm, st.new_rv};
}

// out = relu(BN(z) + identity) and next_in = shift_alter(out), in one pass: each run of out is
// copied (times 1 + a) to the frame whose TSM source it is; next_in elements without a source
// are zero-filled by their own run. Every next_in element is written exactly once.
std::tuple<Tensor, Tensor, Tensor, Tensor, Tensor, Tensor> bnrs_fwd(
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
  const Layout L = make_layout(g.F, clips, frames, rows, weight.size(0));
  Tensor out = empty_activation(z, g), next = empty_activation(z, g);
  BnStats st;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, z.scalar_type(), "bnrs_fwd", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    st = bn_stats<scalar_t>(z, g, L, running_mean, running_var, training, momentum, eps);
    const std::vector<acc_t> factor = alter_factors<scalar_t>(L, alter_next, g.C);
    const scalar_t* op = out.data_ptr<scalar_t>();
    scalar_t* np = next.data_ptr<scalar_t>();
    auto scatter = [&](auto cl, const FrameInfo& fi, int64_t off, int64_t len, int64_t c0) {
      constexpr bool CL = decltype(cl)::value;
      const int c = static_cast<int>(c0);
      if (ffn::shift_source_delta(c, g.fold, fi.t, fi.T, false) == ffn::kNoSource)
        std::fill_n(np + off, len, scalar_t(0));
      const int d = ffn::shift_source_delta(c, g.fold, fi.t, fi.T, true);
      if (d == ffn::kNoSource) return;
      const scalar_t* __restrict__ oo = op + off;
      scalar_t* __restrict__ no = np + off + d * g.chw;
      const acc_t* __restrict__ k = factor.data() + fi.s * g.C + c0;
      for (int64_t i = 0; i < len; ++i)
        no[i] = static_cast<scalar_t>(static_cast<acc_t>(oo[i]) * k[ch<CL>(i)]);
    };
    bn_apply<scalar_t>(z, out, identity.data_ptr<scalar_t>(), true, g, L, weight, bias, st,
                       scatter);
  });
  return {out, next, st.mean, st.invstd, st.new_rm, st.new_rv};
}

// BN backward shared by bn_bwd and bnrs_bwd. grad(cl, fi, off, c0) returns the functor i -> g of
// element i of a run (g is recomputed in both passes, never stored); with NX == 1, extra(...)
// returns i -> a third per-(segment, channel) sum term. Pass 1 reduces sum(g), sum(g * (x - mean))
// (and the extra term); pass 2 writes dx and, if dres is set, dres = g. Adds to dweight/dbias rows
// (zeroed by the caller; segments sharing a row sum) and returns the [2 + NX, S, C] sums.
template <int NX, typename scalar_t, typename Grad, typename Extra>
std::vector<at::opmath_type<scalar_t>> bn_backward(
    const Geom& g, const Layout& L, const Tensor& x, const Tensor& mean, const Tensor& invstd,
    const Tensor& weight, bool training, scalar_t* dx, scalar_t* dres, Tensor& dweight,
    Tensor& dbias, Grad&& grad, Extra&& extra) {
  using acc_t = at::opmath_type<scalar_t>;
  const int64_t C = g.C;
  const scalar_t* xp = x.data_ptr<scalar_t>();
  const acc_t* mp = mean.data_ptr<acc_t>();
  const std::vector<acc_t> sums = segment_sums<2 + NX, acc_t>(
      g, L, [&](auto cl, const FrameInfo& fi, int64_t off, int64_t len, int64_t c0,
                acc_t* __restrict__ acc, int64_t w) {
        constexpr bool CL = decltype(cl)::value;
        const auto gi = grad(cl, fi, off, c0);
        const scalar_t* __restrict__ xo = xp + off;
        const acc_t* __restrict__ mu = mp + fi.s * C + c0;
        for (int64_t i = 0; i < len; ++i) {
          const acc_t gv = gi(i);
          acc[i] += gv;
          acc[w + i] += gv * (static_cast<acc_t>(xo[i]) - mu[ch<CL>(i)]);
        }
        if constexpr (NX == 1) {
          const auto ei = extra(cl, fi, off, c0);
          for (int64_t i = 0; i < len; ++i) acc[2 * w + i] += ei(i);
        }
      });

  const acc_t* is = invstd.data_ptr<acc_t>();
  const acc_t* wp = weight.data_ptr<acc_t>();
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

  dispatch_bool(dres != nullptr, [&](auto res_c) {
    map_runs(g, L, [&](auto cl, const FrameInfo& fi, int64_t off, int64_t len, int64_t c0) {
      constexpr bool CL = decltype(cl)::value;
      const auto gi = grad(cl, fi, off, c0);
      const int64_t sc = fi.s * C + c0;
      const scalar_t* __restrict__ xo = xp + off;
      const acc_t* __restrict__ mu = mp + sc;
      const acc_t *__restrict__ k = scale.data() + sc, *__restrict__ mg = mean_g.data() + sc,
                  *__restrict__ pj = proj.data() + sc;
      scalar_t* __restrict__ dxo = dx + off;
      scalar_t* __restrict__ dro = res_c ? dres + off : nullptr;
      for (int64_t i = 0; i < len; ++i) {
        const int64_t j = ch<CL>(i);
        const acc_t gv = gi(i);
        if constexpr (decltype(res_c)::value) dro[i] = static_cast<scalar_t>(gv);
        const ffn::BnBackwardCoef<acc_t> kc{k[j], mg[j], pj[j]};
        dxo[i] = static_cast<scalar_t>(
            ffn::bn_backward_dx(gv, static_cast<acc_t>(xo[i]) - mu[j], kc));
      }
    });
  });
  return sums;
}

void check_stat(const Tensor& t, const Tensor& x, int64_t S, const char* name) {
  TORCH_CHECK(t.dim() == 2 && t.size(0) == S && t.size(1) == x.size(1) && t.is_contiguous() &&
                  t.scalar_type() == acc_type(x),
              name, " must be a contiguous [S=", S, ", C=", x.size(1), "] ", acc_type(x),
              " tensor, got ", t.sizes(), " ", t.scalar_type());
}

std::tuple<Tensor, Tensor, Tensor, Tensor> bn_bwd(
    const Tensor& dy, const Tensor& x, const Tensor& y, int64_t clips, at::IntArrayRef frames,
    at::IntArrayRef rows, const Tensor& weight, const Tensor& mean, const Tensor& invstd,
    bool training, bool relu, bool has_residual) {
  const Geom g = make_geom(x, 0);
  check_activation(dy, x, g, "dy");
  if (relu) check_activation(y, x, g, "y");
  check_param(weight, x, "weight");
  const Layout L = make_layout(g.F, clips, frames, rows, weight.size(0));
  check_stat(mean, x, L.S, "mean");
  check_stat(invstd, x, L.S, "invstd");
  Tensor dx = empty_activation(x, g);
  Tensor dres = has_residual ? empty_activation(x, g) : x.new_empty({0});
  Tensor dweight = at::zeros_like(weight), dbias = at::zeros_like(weight);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "bn_bwd", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    const scalar_t* dyp = dy.data_ptr<scalar_t>();
    const scalar_t* yp = relu ? y.data_ptr<scalar_t>() : nullptr;
    dispatch_bool(relu, [&](auto relu_c) {
      auto grad = [&](auto, const FrameInfo&, int64_t off, int64_t) {
        const scalar_t* __restrict__ d = dyp + off;
        const scalar_t* __restrict__ yo = relu_c ? yp + off : nullptr;
        return [d, yo](int64_t i) {
          const acc_t v = static_cast<acc_t>(d[i]);
          if constexpr (decltype(relu_c)::value)
            return v * ffn::relu_mask(static_cast<acc_t>(yo[i]));
          return v;
        };
      };
      bn_backward<0>(g, L, x, mean, invstd, weight, training, dx.data_ptr<scalar_t>(),
                     has_residual ? dres.data_ptr<scalar_t>() : nullptr, dweight, dbias, grad,
                     [](auto&&...) {});
    });
  });
  return {dx, dweight, dbias, dres};
}

// g = (dout + reverse_shift((1 + a) * dnext)) * (out > 0) is recomputed per element in both
// passes. dalter pairs each out element with the dnext element it was copied to: sum_f dnext[f] *
// out[src(f)] = sum_f out[f] * dnext[f + reverse delta], the dnext value g already reads.
std::tuple<Tensor, Tensor, Tensor, Tensor, Tensor> bnrs_bwd(
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
  const Layout L = make_layout(g.F, clips, frames, rows, weight.size(0));
  check_stat(mean, z, L.S, "mean");
  check_stat(invstd, z, L.S, "invstd");
  Tensor dz = empty_activation(z, g), didentity = empty_activation(z, g);
  Tensor dweight = at::zeros_like(weight), dbias = at::zeros_like(weight);
  Tensor dalter = alter_next.has_value() ? at::zeros_like(weight) : weight.new_empty({0});
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, z.scalar_type(), "bnrs_bwd", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    const std::vector<acc_t> factor = alter_factors<scalar_t>(L, alter_next, g.C);
    const scalar_t *dop = dout.data_ptr<scalar_t>(), *dnp = dnext.data_ptr<scalar_t>(),
                   *op = out.data_ptr<scalar_t>();
    // dnext at the reverse-shifted source of the run, or nullptr outside the clip.
    auto dnext_src = [&](const FrameInfo& fi, int64_t off, int64_t c0) -> const scalar_t* {
      const int d = ffn::shift_source_delta(static_cast<int>(c0), g.fold, fi.t, fi.T, true);
      return d == ffn::kNoSource ? nullptr : dnp + off + d * g.chw;
    };
    auto grad = [&](auto cl, const FrameInfo& fi, int64_t off, int64_t c0) {
      constexpr bool CL = decltype(cl)::value;
      const scalar_t* __restrict__ dn = dnext_src(fi, off, c0);
      const scalar_t *__restrict__ dd = dop + off, *__restrict__ oo = op + off;
      const acc_t* __restrict__ k = factor.data() + fi.s * g.C + c0;
      return [=](int64_t i) {
        return ffn::block_grad<scalar_t>(static_cast<acc_t>(dd[i]),
                                         dn ? static_cast<acc_t>(dn[i]) : acc_t(0), k[ch<CL>(i)],
                                         static_cast<acc_t>(oo[i]));
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
      return bn_backward<decltype(nx)::value>(g, L, z, mean, invstd, weight, training,
                                              dz.data_ptr<scalar_t>(),
                                              didentity.data_ptr<scalar_t>(), dweight, dbias, grad,
                                              extra);
    };
    if (!alter_next.has_value()) {
      run(std::integral_constant<int, 0>{});
      return;
    }
    const std::vector<acc_t> sums = run(std::integral_constant<int, 1>{});
    acc_t* da = dalter.data_ptr<acc_t>();
    // segments sharing a row add up, in segment order
    for (int64_t s = 0; s < L.S; ++s)
      for (int64_t c = 0; c < g.C; ++c) da[L.rows[s] * g.C + c] += sums[(2 * L.S + s) * g.C + c];
  });
  return {dz, didentity, dweight, dbias, dalter};
}

}  // namespace

TORCH_LIBRARY_IMPL(ffn_kernels_C, CPU, m) {
  m.impl("bn_fwd", &bn_fwd);
  m.impl("bn_bwd", &bn_bwd);
  m.impl("bnrs_fwd", &bnrs_fwd);
  m.impl("bnrs_bwd", &bnrs_bwd);
}

}  // namespace cpu
}  // namespace ffn_kernels
