// CPU kernels of freq_batch_norm (docs/design.md §3.2): per-segment BatchNorm with parameter row
// p_s, optional residual and ReLU.
#include "cpu/batch_norm_common.h"
#include "ops/freq_batch_norm.h"

namespace ffn_kernels {
namespace cpu {
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
        bn_apply<scalar_t>(x, y, residual.has_value() ? residual->data_ptr<scalar_t>() : nullptr,
                           relu, g, L, weight, bias, st, [](auto&&...) {});
      });
  return {y, st.mean, st.invstd, st.new_rm, st.new_rv};
}

std::tuple<Tensor, Tensor, Tensor, Tensor> freq_batch_norm_bwd(
    const Tensor& dy, const Tensor& x, const Tensor& y, int64_t clips, at::IntArrayRef frames,
    at::IntArrayRef rows, const Tensor& weight, const Tensor& mean, const Tensor& invstd,
    bool training, bool relu, bool has_residual) {
  const Geom g = make_geom(x, 0);
  check_activation(dy, x, g, "dy");
  if (relu) check_activation(y, x, g, "y");
  check_param(weight, x, "weight");
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

}  // namespace

FFN_REGISTER_KERNELS(freq_batch_norm, CPU, freq_batch_norm_fwd, freq_batch_norm_bwd)

}  // namespace cpu
}  // namespace ffn_kernels
