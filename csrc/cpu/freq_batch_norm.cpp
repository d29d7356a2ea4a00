// CPU kernels of freq_batch_norm (docs/design.md §3.2): per-segment BatchNorm with parameter row
// p_s, optional residual and ReLU.
#include "cpu/batch_norm_common.h"
#include "ops/freq_batch_norm.h"

namespace ffn_kernels {
namespace cpu {
inline namespace FFN_CPU_ISA {
namespace {

std::tuple<Tensor, Tensor, Tensor, Tensor, Tensor> freq_batch_norm_fwd(
    const Tensor& x, int64_t clips, at::IntArrayRef frames, at::IntArrayRef rows,
    const Tensor& weight, const Tensor& bias, const OptTensor& running_mean,
    const OptTensor& running_var, bool training, at::ArrayRef<double> momentum, double eps,
    bool relu, const OptTensor& residual) {
  const Geom g = make_geom(x, 0);
  check_norm_params(x, weight, bias, running_mean, running_var);
  if (residual.has_value()) check_activation(*residual, x, g, "residual");
  const FrameLayout L = make_frame_layout(g.F, clips, frames, rows, weight.size(0));
  Tensor y = empty_activation(x, g);
  BnStats st;
  AT_DISPATCH_FLOATING_TYPES_AND2(
      at::kHalf, at::kBFloat16, x.scalar_type(), "freq_batch_norm_fwd", [&] {
        st = bn_stats<scalar_t>(x, g, L, running_mean, running_var, training, momentum, eps);
        const scalar_t* res = residual.has_value() ? residual->data_ptr<scalar_t>() : nullptr;
        bn_apply<scalar_t>(x, y, Reader::kNextOp, res, relu, g, L, weight, bias, st,
                           [](auto&&...) {});
      });
  return {y, st.mean, st.invstd, st.new_rm, st.new_rv};
}

std::tuple<Tensor, Tensor, Tensor, Tensor> freq_batch_norm_bwd(
    const Tensor& dy, const Tensor& x, const Tensor& y, int64_t clips, at::IntArrayRef frames,
    at::IntArrayRef rows, const Tensor& weight, const Tensor& mean, const Tensor& invstd,
    bool training, bool relu, bool has_residual, const OptTensor& bias) {
  const Geom g = make_geom(x, 0);
  check_activation(dy, x, g, "dy");
  const bool mask_from_x = relu && bias.has_value();
  if (relu && !mask_from_x) check_activation(y, x, g, "y");
  check_param(weight, x, "weight");
  if (mask_from_x) check_param(*bias, x, "bias");
  const FrameLayout L = make_frame_layout(g.F, clips, frames, rows, weight.size(0));
  check_stat(mean, x, L.S, "mean");
  check_stat(invstd, x, L.S, "invstd");
  Tensor dx = empty_activation(x, g);
  Tensor dres = has_residual ? empty_activation(x, g) : unused_activation(x);
  Tensor dweight = at::zeros_like(weight), dbias = at::zeros_like(weight);
  AT_DISPATCH_FLOATING_TYPES_AND2(
      at::kHalf, at::kBFloat16, x.scalar_type(), "freq_batch_norm_bwd", [&] {
        using acc_t = at::opmath_type<scalar_t>;
        const scalar_t* dyp = dy.data_ptr<scalar_t>();
        const scalar_t* xp = x.data_ptr<scalar_t>();
        const scalar_t* yp = relu && !mask_from_x ? y.data_ptr<scalar_t>() : nullptr;
        // the forward's x * scale + shift per segment, for the mask recomputed from x
        const BnAffines<acc_t> affine = mask_from_x
                                            ? bn_affines<acc_t>(L, g.C, mean, invstd, weight, *bias)
                                            : BnAffines<acc_t>{};
        dispatch_bool(relu, [&](auto relu_c) {
          dispatch_bool(mask_from_x, [&](auto from_x_c) {
            auto grad = [&](auto channels_last, const FrameInfo& fi, int64_t off, int64_t c0) {
              constexpr bool kChannelsLast = decltype(channels_last)::value;
              constexpr bool kFromX = decltype(from_x_c)::value;
              const int64_t sc = fi.s * g.C + c0;
              const scalar_t* __restrict__ d = dyp + off;
              const scalar_t* __restrict__ yo = yp == nullptr ? nullptr : yp + off;
              const scalar_t* __restrict__ xo = xp + off;
              const acc_t* __restrict__ k = kFromX ? affine.scale.data() + sc : nullptr;
              const acc_t* __restrict__ h = kFromX ? affine.shift.data() + sc : nullptr;
              return [d, yo, xo, k, h](int64_t i) {
                const acc_t v = static_cast<acc_t>(d[i]);
                if constexpr (!decltype(relu_c)::value) return v;
                if constexpr (kFromX) {
                  // y as the forward stored it (rounded to scalar_t; ReLU keeps the sign)
                  const int64_t j = ch<kChannelsLast>(i);
                  const acc_t out = static_cast<acc_t>(
                      static_cast<scalar_t>(static_cast<acc_t>(xo[i]) * k[j] + h[j]));
                  return v * ffn::relu_mask(out);
                }
                return v * ffn::relu_mask(static_cast<acc_t>(yo[i]));
              };
            };
            bn_backward<0>(g, L, x, mean, invstd, weight, training, dx.data_ptr<scalar_t>(),
                           has_residual ? dres.data_ptr<scalar_t>() : nullptr, dweight, dbias,
                           grad, [](auto&&...) {});
          });
        });
      });
  return {dx, dweight, dbias, dres};
}

}  // namespace

FFN_CPU_KERNELS(freq_batch_norm, freq_batch_norm_fwd, freq_batch_norm_bwd)

}  // namespace FFN_CPU_ISA
}  // namespace cpu
}  // namespace ffn_kernels
