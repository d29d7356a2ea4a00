// freq_batch_norm (docs/design.md §3.2): frequency-indexed BatchNorm (+ residual, + ReLU). Its
// schemas, its public op and backward for CPU, CUDA and Meta tensors, and its autograd formula.
// The op is functional: it returns updated copies of the running statistics, which the Python
// wrapper writes back.
#include "ops/freq_batch_norm.h"

#include "ops/dispatch.h"

namespace ffn_kernels {
namespace ops {
namespace {

using namespace ::ffn_kernels::freq_batch_norm;
using torch::autograd::AutogradContext;
using torch::autograd::variable_list;

struct Op : OpFunction<Op, freq_batch_norm::Fwd, freq_batch_norm::Bwd> {
  static constexpr const char* kName = "freq_batch_norm";

  static variable_list forward(AutogradContext* ctx, const Tensor& x, SymInt clips,
                               SymIntArrayRef frames, IntArrayRef rows, const Tensor& weight,
                               const Tensor& bias, const OptTensor& running_mean,
                               const OptTensor& running_var, bool training, Floats momentum,
                               double eps, bool relu, const OptTensor& residual) {
    FwdOut out;
    {
      at::AutoDispatchBelowADInplaceOrView guard;
      out = handle<Op, false, false>().call(x, clips, frames, rows, weight, bias, running_mean,
                                            running_var, training, momentum, eps, relu, residual);
    }
    auto& [y, mean, invstd, new_rm, new_rv] = out;
    ctx->mark_non_differentiable({mean, invstd, new_rm, new_rv});
    ctx->set_materialize_grads(false);
    ctx->saved_data["clips"] = clips;
    ctx->saved_data["frames"] = frames.vec();
    ctx->saved_data["rows"] = rows;
    ctx->saved_data["training"] = training;
    ctx->saved_data["relu"] = relu;
    ctx->saved_data["has_residual"] = residual.has_value();
    // the ReLU mask: without a residual, recomputed from x with bias (y, which the next op keeps
    // anyway, is then not read again); with one, y
    const bool mask_from_x = relu && !residual.has_value();
    ctx->save_for_backward({x, relu && !mask_from_x ? y : Tensor(), weight, mean, invstd,
                            mask_from_x ? bias : Tensor()});
    return {y, mean, invstd, new_rm, new_rv};
  }

  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    const auto saved = ctx->get_saved_variables();
    const Tensor &x = saved[0], &y = saved[1], &weight = saved[2], &bias = saved[5];
    const bool has_residual = ctx->saved_data["has_residual"].toBool();
    const Tensor dy = grads[0].defined() ? grads[0] : at::zeros_like(x);
    auto [dx, dw, db, dres] = handle<Op, false, true>().call(
        dy, x, y.defined() ? y : x, ctx->saved_data["clips"].toSymInt(),
        ctx->saved_data["frames"].toSymIntVector(), ctx->saved_data["rows"].toIntVector(), weight,
        saved[3], saved[4], ctx->saved_data["training"].toBool(), ctx->saved_data["relu"].toBool(),
        has_residual, bias.defined() ? OptTensor(bias) : OptTensor());
    // one gradient per input of Fwd: only x, weight, bias and residual have one
    return {dx,       Tensor(), Tensor(), Tensor(), grad_as(dw, weight), grad_as(db, weight),
            Tensor(), Tensor(), Tensor(), Tensor(), Tensor(),            Tensor(),
            has_residual ? dres : Tensor()};
  }
};

template <bool kMeta>
FwdOut forward(const Tensor& x, SymInt clips, SymIntArrayRef frames, IntArrayRef rows,
               const Tensor& weight, const Tensor& bias, const OptTensor& running_mean,
               const OptTensor& running_var, bool training, Floats momentum, double eps, bool relu,
               const OptTensor& residual) {
  check_norm("x", x, clips, frames, rows, weight, bias, running_mean, running_var, training,
             momentum, eps);
  check_like("residual", residual, x, "x");
  if constexpr (kMeta) {
    auto [mean, invstd, new_rm, new_rv] =
        norm_stats_meta(x, frames.size(), running_mean, running_var);
    return {activation_like(x), mean, invstd, new_rm, new_rv};
  } else {
    const auto fmt = format_of(x);
    return handle<Op, true, false>().call(
        like(x, fmt), clips, frames, rows, param(weight, x), param(bias, x),
        param(running_mean, x), param(running_var, x), training, momentum, eps, relu,
        like(residual, fmt));
  }
}

template <bool kMeta>
BwdOut backward(const Tensor& dy, const Tensor& x, const Tensor& y, SymInt clips,
                SymIntArrayRef frames, IntArrayRef rows, const Tensor& weight, const Tensor& mean,
                const Tensor& invstd, bool training, bool relu, bool has_residual,
                const OptTensor& bias) {
  TORCH_CHECK_VALUE(!bias.has_value() || (relu && !has_residual),
                    "freq_batch_norm backward: bias (the ReLU mask recomputed from x) is for "
                    "relu=True without a residual");
  if constexpr (kMeta) {
    return {activation_like(x), acc_like(x, weight), acc_like(x, weight),
            has_residual ? activation_like(x) : unused_activation(x)};
  } else {
    const auto fmt = format_of(x);
    return handle<Op, true, true>().call(like(dy, fmt), like(x, fmt), like(y, fmt), clips, frames,
                                         rows, param(weight, x), mean, invstd, training, relu,
                                         has_residual, param(bias, x));
  }
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(ffn_kernels, m) {
  define_op(m, "freq_batch_norm",
            "(Tensor x, SymInt clips, SymInt[] frames, int[] rows, Tensor weight, Tensor bias, "
            "Tensor? running_mean, Tensor? running_var, bool training, float[] momentum, float "
            "eps, bool relu, Tensor? residual) -> (Tensor, Tensor, Tensor, Tensor, Tensor)",
            "(Tensor dy, Tensor x, Tensor y, SymInt clips, SymInt[] frames, int[] rows, Tensor "
            "weight, Tensor mean, Tensor invstd, bool training, bool relu, bool has_residual, "
            "Tensor? bias=None) -> "
            "(Tensor, Tensor, Tensor, Tensor)");
}

FFN_REGISTER_OP(freq_batch_norm)

}  // namespace ops
}  // namespace ffn_kernels
