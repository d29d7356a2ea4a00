// freq_batch_norm (docs/design.md §3.2): frequency-indexed BatchNorm (+ residual, + ReLU). The public op
// and its backward for CPU, CUDA and Meta tensors, and its autograd formula. The op is functional:
// it returns updated copies of the running statistics, which the Python wrapper writes back.
#include <torch/autograd.h>
#include <torch/library.h>

#include "ops/dispatch.h"

namespace ffn_kernels {
namespace ops {
namespace {

using at::IntArrayRef;
using c10::SymIntArrayRef;
using torch::autograd::AutogradContext;
using torch::autograd::variable_list;

using Outputs = std::tuple<Tensor, Tensor, Tensor, Tensor, Tensor>;
using FwdSig = Outputs(const Tensor&, c10::SymInt, SymIntArrayRef, IntArrayRef, const Tensor&,
                       const Tensor&, const OptTensor&, const OptTensor&, bool,
                       at::ArrayRef<double>, double, bool, const OptTensor&);
using BwdOutputs = std::tuple<Tensor, Tensor, Tensor, Tensor>;
using BwdSig = BwdOutputs(const Tensor&, const Tensor&, const Tensor&, c10::SymInt, SymIntArrayRef,
                          IntArrayRef, const Tensor&, const Tensor&, const Tensor&, bool, bool,
                          bool);

void check(const Tensor& x, c10::SymInt clips, SymIntArrayRef frames, IntArrayRef rows,
           const Tensor& weight, const Tensor& bias, const OptTensor& running_mean,
           const OptTensor& running_var, bool training, at::ArrayRef<double> momentum, double eps,
           const OptTensor& residual) {
  check_norm("x", x, clips, frames, rows, weight, bias, running_mean, running_var, training,
             momentum, eps);
  check_like("residual", residual, x, "x");
}

Outputs forward(const Tensor& x, c10::SymInt clips, SymIntArrayRef frames, IntArrayRef rows,
                const Tensor& weight, const Tensor& bias, const OptTensor& running_mean,
                const OptTensor& running_var, bool training, at::ArrayRef<double> momentum,
                double eps, bool relu, const OptTensor& residual) {
  check(x, clips, frames, rows, weight, bias, running_mean, running_var, training, momentum, eps,
        residual);
  static const RawOp<FwdSig> raw("freq_batch_norm_fwd");
  const auto fmt = format_of(x);
  return raw(x.device()).call(like(x, fmt), clips, frames, rows, param(weight, x),
                              param(bias, x), param(running_mean, x), param(running_var, x),
                              training, momentum, eps, relu, like(residual, fmt));
}

Outputs forward_meta(const Tensor& x, c10::SymInt clips, SymIntArrayRef frames, IntArrayRef rows,
                     const Tensor& weight, const Tensor& bias, const OptTensor& running_mean,
                     const OptTensor& running_var, bool training, at::ArrayRef<double> momentum,
                     double eps, bool relu, const OptTensor& residual) {
  check(x, clips, frames, rows, weight, bias, running_mean, running_var, training, momentum, eps,
        residual);
  auto [mean, invstd, new_rm, new_rv] =
      norm_stats_meta(x, frames.size(), running_mean, running_var);
  return {activation_like(x), mean, invstd, new_rm, new_rv};
}

BwdOutputs backward(const Tensor& dy, const Tensor& x, const Tensor& y, c10::SymInt clips,
                    SymIntArrayRef frames, IntArrayRef rows, const Tensor& weight,
                    const Tensor& mean, const Tensor& invstd, bool training, bool relu,
                    bool has_residual) {
  static const RawOp<BwdSig> raw("freq_batch_norm_bwd");
  const auto fmt = format_of(x);
  return raw(x.device()).call(like(dy, fmt), like(x, fmt), like(y, fmt), clips, frames, rows,
                              param(weight, x), mean, invstd, training, relu, has_residual);
}

BwdOutputs backward_meta(const Tensor& dy, const Tensor& x, const Tensor& y, c10::SymInt clips,
                         SymIntArrayRef frames, IntArrayRef rows, const Tensor& weight,
                         const Tensor& mean, const Tensor& invstd, bool training, bool relu,
                         bool has_residual) {
  return {activation_like(x), acc_like(x, weight), acc_like(x, weight),
          has_residual ? activation_like(x) : at::empty({0}, x.options())};
}

const c10::TypedOperatorHandle<BwdSig>& backward_op() {
  static const auto op = op_handle<BwdSig>("ffn_kernels::freq_batch_norm_backward");
  return op;
}

struct FreqBatchNorm : torch::autograd::Function<FreqBatchNorm> {
  static variable_list forward(AutogradContext* ctx, const Tensor& x, c10::SymInt clips,
                               SymIntArrayRef frames, IntArrayRef rows, const Tensor& weight,
                               const Tensor& bias, const OptTensor& running_mean,
                               const OptTensor& running_var, bool training,
                               at::ArrayRef<double> momentum, double eps, bool relu,
                               const OptTensor& residual) {
    static const auto op = op_handle<FwdSig>("ffn_kernels::freq_batch_norm");
    Outputs out;
    {
      at::AutoDispatchBelowADInplaceOrView guard;
      out = op.call(x, clips, frames, rows, weight, bias, running_mean, running_var, training,
                    momentum, eps, relu, residual);
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
    // y is needed only for its ReLU mask
    ctx->save_for_backward({x, relu ? y : Tensor(), weight, mean, invstd});
    return {y, mean, invstd, new_rm, new_rv};
  }

  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    const auto saved = ctx->get_saved_variables();
    const Tensor &x = saved[0], &y = saved[1], &weight = saved[2];
    const bool has_residual = ctx->saved_data["has_residual"].toBool();
    const Tensor dy = grads[0].defined() ? grads[0] : at::zeros_like(x);
    auto [dx, dw, db, dres] = backward_op().call(
        dy, x, y.defined() ? y : x, ctx->saved_data["clips"].toSymInt(),
        ctx->saved_data["frames"].toSymIntVector(), ctx->saved_data["rows"].toIntVector(), weight,
        saved[3], saved[4], ctx->saved_data["training"].toBool(), ctx->saved_data["relu"].toBool(),
        has_residual);
    // inputs: x, clips, frames, rows, weight, bias, running_mean, running_var, training,
    // momentum, eps, relu, residual
    return {dx,       Tensor(), Tensor(), Tensor(), grad_as(dw, weight), grad_as(db, weight),
            Tensor(), Tensor(), Tensor(), Tensor(), Tensor(),            Tensor(),
            has_residual ? dres : Tensor()};
  }
};

BwdOutputs backward_autograd(const Tensor& dy, const Tensor& x, const Tensor& y, c10::SymInt clips,
                             SymIntArrayRef frames, IntArrayRef rows, const Tensor& weight,
                             const Tensor& mean, const Tensor& invstd, bool training, bool relu,
                             bool has_residual) {
  refuse_double_backward("freq_batch_norm", {dy, x, y, weight});
  at::AutoDispatchBelowADInplaceOrView guard;
  return backward_op().call(dy, x, y, clips, frames, rows, weight, mean, invstd, training, relu,
                            has_residual);
}

Outputs forward_autograd(const Tensor& x, c10::SymInt clips, SymIntArrayRef frames,
                         IntArrayRef rows, const Tensor& weight, const Tensor& bias,
                         const OptTensor& running_mean, const OptTensor& running_var, bool training,
                         at::ArrayRef<double> momentum, double eps, bool relu,
                         const OptTensor& residual) {
  refuse_transforms("freq_batch_norm", {x, weight, bias, residual.value_or(Tensor())});
  auto out = FreqBatchNorm::apply(x, clips, frames, rows, weight, bias, running_mean, running_var,
                                  training, momentum, eps, relu, residual);
  return {out[0], out[1], out[2], out[3], out[4]};
}

}  // namespace

FFN_REGISTER_OP(freq_batch_norm)

}  // namespace ops
}  // namespace ffn_kernels
