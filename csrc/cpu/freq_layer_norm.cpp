// CPU kernels of freq_layer_norm (docs/design.md §3.7): per token (C contiguous channels),
// y = (s - mean) * rstd * weight[p] + bias[p], s = x (+ residual). The backward walks x as the
// channels_last activation [F, C, tokens, 1] it is in memory, so one token is one run of the
// per-(segment, channel) reductions (csrc/cpu/common.h): ds and the parameter sums in one pass.
#include "cpu/common.h"
#include "ops/freq_layer_norm.h"

namespace ffn_kernels {
namespace cpu {
inline namespace FFN_CPU_ISA {
namespace {

using namespace ::ffn_kernels::freq_layer_norm;

// Sum of term(c) over a token's channels [0, C) in kTokenLanes independent lanes, added in lane
// order: a fixed order (results do not depend on anything but C), and a loop that vectorizes,
// where one accumulator is a chain of dependent adds (the roofline section measured that form at
// 0.62 of a copy's bandwidth forward, 0.49 backward).
constexpr int kTokenLanes = 16;

template <typename acc_t, typename Term>
inline acc_t token_sum(int64_t C, Term&& term) {
  acc_t lane[kTokenLanes] = {};
  int64_t c = 0;
  for (; c + kTokenLanes <= C; c += kTokenLanes)
    for (int l = 0; l < kTokenLanes; ++l) lane[l] += term(c + l);
  for (int l = 0; c < C; ++c, ++l) lane[l] += term(c);
  return sum_lanes(lane, kTokenLanes);
}

// x [F, ..., C] (contiguous) as [F, C, M, 1] channels_last: M tokens per frame.
Tensor as_channels(const Tensor& x) {
  TORCH_CHECK(x.dim() >= 2 && x.is_contiguous(), "expected a contiguous [frames, ..., C] tensor");
  return x.reshape({x.size(0), -1, x.size(-1)}).permute({0, 2, 1}).unsqueeze(3);
}

FwdOut freq_layer_norm_fwd(const Tensor& x, int64_t clips, at::IntArrayRef frames,
                           at::IntArrayRef rows, const Tensor& weight, const Tensor& bias,
                           double eps, const c10::optional<Tensor>& residual) {
  const Tensor v = as_channels(x);
  const Geom g = make_geom(v, 0);
  check_param(weight, v, "weight");
  check_param(bias, v, "bias");
  if (residual.has_value()) check_activation(as_channels(*residual), v, g, "residual");
  const FrameLayout L = make_frame_layout(g.F, clips, frames, rows, weight.size(0));
  const int64_t C = g.C, M = g.HW, R = g.F * M;
  Tensor y = at::empty_like(x);
  Tensor s = residual.has_value() ? at::empty_like(x) : unused_activation(x);
  Tensor mean = at::empty({R}, x.options().dtype(acc_type(x)));
  Tensor rstd = at::empty_like(mean);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "freq_layer_norm_fwd", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    const scalar_t* xp = x.data_ptr<scalar_t>();
    const scalar_t* rp = residual.has_value() ? residual->data_ptr<scalar_t>() : nullptr;
    scalar_t* sp = residual.has_value() ? s.data_ptr<scalar_t>() : nullptr;
    scalar_t* yp = y.data_ptr<scalar_t>();
    const acc_t *w = weight.data_ptr<acc_t>(), *b = bias.data_ptr<acc_t>();
    acc_t *mp = mean.data_ptr<acc_t>(), *rsp = rstd.data_ptr<acc_t>();
    at::parallel_for(0, R, std::max<int64_t>(1, (int64_t(1) << 14) / C), [&](int64_t r0, int64_t r1) {
      for (int64_t r = r0; r < r1; ++r) {
        const scalar_t* in = xp + r * C;
        if (rp) {  // the sum is rounded to the storage dtype, as x + residual would be
          scalar_t* out = sp + r * C;
          for (int64_t c = 0; c < C; ++c)
            out[c] = static_cast<scalar_t>(static_cast<acc_t>(in[c]) + static_cast<acc_t>(rp[r * C + c]));
          in = out;
        }
        const acc_t mu =
            token_sum<acc_t>(C, [in](int64_t c) { return static_cast<acc_t>(in[c]); }) / acc_t(C);
        const acc_t m2 = token_sum<acc_t>(C, [in, mu](int64_t c) {
          const acc_t d = static_cast<acc_t>(in[c]) - mu;
          return d * d;
        });
        const acc_t rs = acc_t(1) / std::sqrt(m2 / acc_t(C) + static_cast<acc_t>(eps));
        const acc_t *wr = w + L.frame[r / M].row * C, *br = b + L.frame[r / M].row * C;
        for (int64_t c = 0; c < C; ++c)
          yp[r * C + c] = static_cast<scalar_t>((static_cast<acc_t>(in[c]) - mu) * rs * wr[c] + br[c]);
        mp[r] = mu;
        rsp[r] = rs;
      }
    });
  });
  return {y, s, mean, rstd};
}

// ds = rstd * (g - mean(g) - xhat * mean(g * xhat)) + dsum, g = dy * weight[p], per token; the
// parameter sums (dy * xhat, dy) per segment and channel, in the same pass.
BwdOut freq_layer_norm_bwd(const Tensor& dy, const c10::optional<Tensor>& dsum, const Tensor& s,
                           int64_t clips, at::IntArrayRef frames, at::IntArrayRef rows,
                           const Tensor& weight, const Tensor& mean, const Tensor& rstd) {
  const Tensor v = as_channels(s);
  const Geom g = make_geom(v, 0);
  check_activation(as_channels(dy), v, g, "dy");
  if (dsum.has_value()) check_activation(as_channels(*dsum), v, g, "dsum");
  check_param(weight, v, "weight");
  const FrameLayout L = make_frame_layout(g.F, clips, frames, rows, weight.size(0));
  const int64_t C = g.C, P = weight.size(0);
  Tensor ds = at::empty_like(s);
  Tensor dweight = at::zeros({P, C}, weight.options());
  Tensor dbias = at::zeros({P, C}, weight.options());
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, s.scalar_type(), "freq_layer_norm_bwd", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    const scalar_t *dyp = dy.data_ptr<scalar_t>(), *sp = s.data_ptr<scalar_t>();
    const scalar_t* dsp = dsum.has_value() ? dsum->data_ptr<scalar_t>() : nullptr;
    scalar_t* out = ds.data_ptr<scalar_t>();
    const acc_t *w = weight.data_ptr<acc_t>(), *mp = mean.data_ptr<acc_t>(),
                *rsp = rstd.data_ptr<acc_t>();
    // with or without dsum as a compile-time branch: a load under a runtime condition keeps the
    // ds loop from vectorizing
    const std::vector<acc_t> sums = dispatch_bool(dsp != nullptr, [&](auto has_dsum) {
      return segment_sums<2, acc_t>(
          g, L,
          [&](auto, const FrameInfo& fi, int64_t off, int64_t len, int64_t c0, acc_t* acc,
              int64_t stride) {
            // a run is one whole token: channels [0, C) at element offset off
            const int64_t r = off / C;
            const acc_t mu = mp[r], rs = rsp[r];
            const acc_t* wr = w + fi.row * C + c0;
            const scalar_t *d0 = dyp + off, *s0 = sp + off;
            const acc_t sum_g = token_sum<acc_t>(
                len, [=](int64_t i) { return static_cast<acc_t>(d0[i]) * wr[i]; });
            const acc_t sum_gx = token_sum<acc_t>(len, [=](int64_t i) {
              return static_cast<acc_t>(d0[i]) * wr[i] * ((static_cast<acc_t>(s0[i]) - mu) * rs);
            });
            const acc_t mean_g = sum_g / acc_t(C), mean_gx = sum_gx / acc_t(C);
            FFN_IVDEP
            for (int64_t i = 0; i < len; ++i) {
              const acc_t d = static_cast<acc_t>(dyp[off + i]);
              const acc_t xhat = (static_cast<acc_t>(sp[off + i]) - mu) * rs;
              acc_t v = rs * (d * wr[i] - mean_g - xhat * mean_gx);
              if constexpr (decltype(has_dsum)::value) v += static_cast<acc_t>(dsp[off + i]);
              out[off + i] = static_cast<scalar_t>(v);
              acc[i] += d * xhat;
              acc[stride + i] += d;
            }
          });
    });
    acc_t *dw = dweight.data_ptr<acc_t>(), *db = dbias.data_ptr<acc_t>();
    // segments sharing a row add up (autograd semantics), in segment order
    for (int64_t sg = 0; sg < L.S; ++sg)
      for (int64_t c = 0; c < C; ++c) {
        dw[L.rows[sg] * C + c] += sums[sg * C + c];
        db[L.rows[sg] * C + c] += sums[(L.S + sg) * C + c];
      }
  });
  return {ds, dweight, dbias};
}

}  // namespace

FFN_CPU_KERNELS(freq_layer_norm, freq_layer_norm_fwd, freq_layer_norm_bwd)

}  // namespace FFN_CPU_ISA
}  // namespace cpu
}  // namespace ffn_kernels
