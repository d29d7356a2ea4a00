// shift_alter (docs/design.md §3.1): temporal shift + Weight Alteration. The public op and its backward
// for CPU, CUDA and Meta tensors, and its autograd formula.
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

using FwdSig = Tensor(const Tensor&, c10::SymInt, SymIntArrayRef, IntArrayRef, const OptTensor&,
                      int64_t);
using BwdSig = std::tuple<Tensor, Tensor>(const Tensor&, const Tensor&, c10::SymInt, SymIntArrayRef,
                                          IntArrayRef, const OptTensor&, int64_t, bool);

void check(const Tensor& x, c10::SymInt clips, SymIntArrayRef frames, IntArrayRef rows,
           const OptTensor& alter, int64_t fold_div) {
  check_input("x", x, clips, frames, rows);
  check_param("alter", alter, x, rows);
  check_fold_div(fold_div, x);
}

Tensor forward(const Tensor& x, c10::SymInt clips, SymIntArrayRef frames, IntArrayRef rows,
               const OptTensor& alter, int64_t fold_div) {
  check(x, clips, frames, rows, alter, fold_div);
  static const RawOp<FwdSig> raw("shift_alter_fwd");
  return raw(x.device()).call(like(x, format_of(x)), clips, frames, rows, param(alter, x),
                              fold_div);
}

Tensor forward_meta(const Tensor& x, c10::SymInt clips, SymIntArrayRef frames, IntArrayRef rows,
                    const OptTensor& alter, int64_t fold_div) {
  check(x, clips, frames, rows, alter, fold_div);
  return activation_like(x);
}

std::tuple<Tensor, Tensor> backward(const Tensor& dy, const Tensor& x, c10::SymInt clips,
                                    SymIntArrayRef frames, IntArrayRef rows, const OptTensor& alter,
                                    int64_t fold_div, bool alter_grad) {
  static const RawOp<BwdSig> raw("shift_alter_bwd");
  const auto fmt = format_of(x);
  return raw(x.device()).call(like(dy, fmt), like(x, fmt), clips, frames, rows, param(alter, x),
                              fold_div, alter_grad);
}

std::tuple<Tensor, Tensor> backward_meta(const Tensor& dy, const Tensor& x, c10::SymInt clips,
                                         SymIntArrayRef frames, IntArrayRef rows,
                                         const OptTensor& alter, int64_t fold_div,
                                         bool alter_grad) {
  return {activation_like(x), acc_like(x, alter_grad ? alter : std::nullopt)};
}

const c10::TypedOperatorHandle<BwdSig>& backward_op() {
  static const auto op = op_handle<BwdSig>("ffn_kernels::shift_alter_backward");
  return op;
}

struct ShiftAlter : torch::autograd::Function<ShiftAlter> {
  static Tensor forward(AutogradContext* ctx, const Tensor& x, c10::SymInt clips,
                        SymIntArrayRef frames, IntArrayRef rows, const OptTensor& alter,
                        int64_t fold_div) {
    static const auto op = op_handle<FwdSig>("ffn_kernels::shift_alter");
    const bool alter_grad = alter && alter->requires_grad();
    ctx->saved_data["clips"] = clips;
    ctx->saved_data["frames"] = frames.vec();
    ctx->saved_data["rows"] = rows;
    ctx->saved_data["fold_div"] = fold_div;
    ctx->saved_data["alter_grad"] = alter_grad;
    // a pure shift (or a frozen alter) needs only dy to go backward: keep x only for d alter
    ctx->save_for_backward({alter_grad ? x : Tensor(), alter.value_or(Tensor())});
    at::AutoDispatchBelowADInplaceOrView guard;
    return op.call(x, clips, frames, rows, alter, fold_div);
  }

  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    const auto saved = ctx->get_saved_variables();
    const Tensor& x = saved[0];
    const OptTensor alter = saved[1].defined() ? OptTensor(saved[1]) : std::nullopt;
    const bool alter_grad = ctx->saved_data["alter_grad"].toBool();
    auto [dx, dalter] = backward_op().call(
        grads[0], x.defined() ? x : grads[0], ctx->saved_data["clips"].toSymInt(),
        ctx->saved_data["frames"].toSymIntVector(), ctx->saved_data["rows"].toIntVector(), alter,
        ctx->saved_data["fold_div"].toInt(), alter_grad);
    return {dx, Tensor(), Tensor(), Tensor(), alter_grad ? grad_as(dalter, *alter) : Tensor(),
            Tensor()};
  }
};

std::tuple<Tensor, Tensor> backward_autograd(const Tensor& dy, const Tensor& x, c10::SymInt clips,
                                             SymIntArrayRef frames, IntArrayRef rows,
                                             const OptTensor& alter, int64_t fold_div,
                                             bool alter_grad) {
  refuse_double_backward("shift_alter", {dy, x, alter.value_or(Tensor())});
  at::AutoDispatchBelowADInplaceOrView guard;
  return backward_op().call(dy, x, clips, frames, rows, alter, fold_div, alter_grad);
}

Tensor forward_autograd(const Tensor& x, c10::SymInt clips, SymIntArrayRef frames, IntArrayRef rows,
                        const OptTensor& alter, int64_t fold_div) {
  refuse_transforms("shift_alter", {x, alter.value_or(Tensor())});
  return ShiftAlter::apply(x, clips, frames, rows, alter, fold_div);
}

}  // namespace

FFN_REGISTER_OP(shift_alter)

}  // namespace ops
}  // namespace ffn_kernels
