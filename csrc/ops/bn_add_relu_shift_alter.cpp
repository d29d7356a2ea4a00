// bn_add_relu_shift_alter (docs/design.md §3.3): the residual-block boundary, out = relu(BN(z) + identity)
// and next_in = shift_alter(out) in one pass. The public op and its backward for CPU, CUDA and
// Meta tensors, and its autograd formula. Functional in the running statistics, like
// freq_batch_norm.
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

using Outputs = std::tuple<Tensor, Tensor, Tensor, Tensor, Tensor, Tensor>;
using FwdSig = Outputs(const Tensor&, const Tensor&, c10::SymInt, SymIntArrayRef, IntArrayRef,
                       const Tensor&, const Tensor&, const OptTensor&, const OptTensor&, bool,
                       at::ArrayRef<double>, double, const OptTensor&, int64_t);
using BwdOutputs = std::tuple<Tensor, Tensor, Tensor, Tensor, Tensor>;
using BwdSig = BwdOutputs(const Tensor&, const Tensor&, const Tensor&, const Tensor&, c10::SymInt,
                          SymIntArrayRef, IntArrayRef, const Tensor&, const Tensor&, const Tensor&,
                          bool, const OptTensor&, int64_t);

void check(const Tensor& z, const Tensor& identity, c10::SymInt clips, SymIntArrayRef frames,
           IntArrayRef rows, const Tensor& weight, const Tensor& bias,
           const OptTensor& running_mean, const OptTensor& running_var, bool training,
           at::ArrayRef<double> momentum, double eps, const OptTensor& alter_next,
           int64_t fold_div) {
  check_norm("z", z, clips, frames, rows, weight, bias, running_mean, running_var, training,
             momentum, eps);
  check_like("identity", identity, z, "z");
  check_param("alter_next", alter_next, z, rows);
  check_fold_div(fold_div, z);
}

Outputs forward(const Tensor& z, const Tensor& identity, c10::SymInt clips, SymIntArrayRef frames,
                IntArrayRef rows, const Tensor& weight, const Tensor& bias,
                const OptTensor& running_mean, const OptTensor& running_var, bool training,
                at::ArrayRef<double> momentum, double eps, const OptTensor& alter_next,
                int64_t fold_div) {
  check(z, identity, clips, frames, rows, weight, bias, running_mean, running_var, training,
        momentum, eps, alter_next, fold_div);
  static const RawOp<FwdSig> raw("bn_add_relu_shift_alter_fwd");
  const auto fmt = format_of(z);
  return raw(z.device()).call(like(z, fmt), like(identity, fmt), clips, frames, rows,
                              param(weight, z), param(bias, z), param(running_mean, z),
                              param(running_var, z), training, momentum, eps,
                              param(alter_next, z), fold_div);
}

Outputs forward_meta(const Tensor& z, const Tensor& identity, c10::SymInt clips,
                     SymIntArrayRef frames, IntArrayRef rows, const Tensor& weight,
                     const Tensor& bias, const OptTensor& running_mean,
                     const OptTensor& running_var, bool training, at::ArrayRef<double> momentum,
                     double eps, const OptTensor& alter_next, int64_t fold_div) {
  check(z, identity, clips, frames, rows, weight, bias, running_mean, running_var, training,
        momentum, eps, alter_next, fold_div);
  auto [mean, invstd, new_rm, new_rv] =
      norm_stats_meta(z, frames.size(), running_mean, running_var);
  return {activation_like(z), activation_like(z), mean, invstd, new_rm, new_rv};
}

BwdOutputs backward(const Tensor& dout, const Tensor& dnext, const Tensor& z, const Tensor& out,
                    c10::SymInt clips, SymIntArrayRef frames, IntArrayRef rows,
                    const Tensor& weight, const Tensor& mean, const Tensor& invstd, bool training,
                    const OptTensor& alter_next, int64_t fold_div) {
  static const RawOp<BwdSig> raw("bn_add_relu_shift_alter_bwd");
  const auto fmt = format_of(z);
  return raw(z.device()).call(like(dout, fmt), like(dnext, fmt), like(z, fmt), like(out, fmt),
                              clips, frames, rows, param(weight, z), mean, invstd, training,
                              param(alter_next, z), fold_div);
}

BwdOutputs backward_meta(const Tensor& dout, const Tensor& dnext, const Tensor& z,
                         const Tensor& out, c10::SymInt clips, SymIntArrayRef frames,
                         IntArrayRef rows, const Tensor& weight, const Tensor& mean,
                         const Tensor& invstd, bool training, const OptTensor& alter_next,
                         int64_t fold_div) {
  return {activation_like(z), activation_like(z), acc_like(z, weight), acc_like(z, weight),
          acc_like(z, alter_next)};
}

const c10::TypedOperatorHandle<BwdSig>& backward_op() {
  static const auto op = op_handle<BwdSig>("ffn_kernels::bn_add_relu_shift_alter_backward");
  return op;
}

struct BnAddReluShiftAlter : torch::autograd::Function<BnAddReluShiftAlter> {
  static variable_list forward(AutogradContext* ctx, const Tensor& z, const Tensor& identity,
                               c10::SymInt clips, SymIntArrayRef frames, IntArrayRef rows,
                               const Tensor& weight, const Tensor& bias,
                               const OptTensor& running_mean, const OptTensor& running_var,
                               bool training, at::ArrayRef<double> momentum, double eps,
                               const OptTensor& alter_next, int64_t fold_div) {
    static const auto op = op_handle<FwdSig>("ffn_kernels::bn_add_relu_shift_alter");
    Outputs outputs;
    {
      at::AutoDispatchBelowADInplaceOrView guard;
      outputs = op.call(z, identity, clips, frames, rows, weight, bias, running_mean, running_var,
                        training, momentum, eps, alter_next, fold_div);
    }
    auto& [out, next_in, mean, invstd, new_rm, new_rv] = outputs;
    ctx->mark_non_differentiable({mean, invstd, new_rm, new_rv});
    ctx->set_materialize_grads(false);
    ctx->saved_data["clips"] = clips;
    ctx->saved_data["frames"] = frames.vec();
    ctx->saved_data["rows"] = rows;
    ctx->saved_data["training"] = training;
    ctx->saved_data["fold_div"] = fold_div;
    ctx->save_for_backward({z, out, weight, mean, invstd, alter_next.value_or(Tensor())});
    return {out, next_in, mean, invstd, new_rm, new_rv};
  }

  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    const auto saved = ctx->get_saved_variables();
    const Tensor &z = saved[0], &out = saved[1], &weight = saved[2];
    const OptTensor alter_next = saved[5].defined() ? OptTensor(saved[5]) : std::nullopt;
    // an unused output gets a zero gradient (the kernel reads both)
    const Tensor dout = grads[0].defined() ? grads[0] : at::zeros_like(z);
    const Tensor dnext = grads[1].defined() ? grads[1] : at::zeros_like(z);
    auto [dz, didentity, dw, db, dalter] = backward_op().call(
        dout, dnext, z, out, ctx->saved_data["clips"].toSymInt(),
        ctx->saved_data["frames"].toSymIntVector(), ctx->saved_data["rows"].toIntVector(), weight,
        saved[3], saved[4], ctx->saved_data["training"].toBool(), alter_next,
        ctx->saved_data["fold_div"].toInt());
    // inputs: z, identity, clips, frames, rows, weight, bias, running_mean, running_var,
    // training, momentum, eps, alter_next, fold_div
    return {dz,       didentity, Tensor(), Tensor(), Tensor(),
            grad_as(dw, weight), grad_as(db, weight), Tensor(), Tensor(), Tensor(),
            Tensor(), Tensor(),  alter_next ? grad_as(dalter, *alter_next) : Tensor(), Tensor()};
  }
};

BwdOutputs backward_autograd(const Tensor& dout, const Tensor& dnext, const Tensor& z,
                             const Tensor& out, c10::SymInt clips, SymIntArrayRef frames,
                             IntArrayRef rows, const Tensor& weight, const Tensor& mean,
                             const Tensor& invstd, bool training, const OptTensor& alter_next,
                             int64_t fold_div) {
  refuse_double_backward("bn_add_relu_shift_alter",
                         {dout, dnext, z, out, weight, alter_next.value_or(Tensor())});
  at::AutoDispatchBelowADInplaceOrView guard;
  return backward_op().call(dout, dnext, z, out, clips, frames, rows, weight, mean, invstd,
                            training, alter_next, fold_div);
}

Outputs forward_autograd(const Tensor& z, const Tensor& identity, c10::SymInt clips,
                         SymIntArrayRef frames, IntArrayRef rows, const Tensor& weight,
                         const Tensor& bias, const OptTensor& running_mean,
                         const OptTensor& running_var, bool training, at::ArrayRef<double> momentum,
                         double eps, const OptTensor& alter_next, int64_t fold_div) {
  refuse_transforms("bn_add_relu_shift_alter",
                    {z, identity, weight, bias, alter_next.value_or(Tensor())});
  auto o = BnAddReluShiftAlter::apply(z, identity, clips, frames, rows, weight, bias,
                                      running_mean, running_var, training, momentum, eps,
                                      alter_next, fold_div);
  return {o[0], o[1], o[2], o[3], o[4], o[5]};
}

}  // namespace

FFN_REGISTER_OP(bn_add_relu_shift_alter)

}  // namespace ops
}  // namespace ffn_kernels
