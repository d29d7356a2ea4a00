// shift_alter (docs/design.md §3.1): temporal shift + Weight Alteration. Its schemas, its public
// op and backward for CPU, CUDA and Meta tensors, and its autograd formula.
#include "ops/shift_alter.h"

#include "ops/dispatch.h"

namespace ffn_kernels {
namespace ops {
namespace {

using torch::autograd::AutogradContext;
using torch::autograd::variable_list;

struct Op : OpFunction<Op, shift_alter::Fwd, shift_alter::Bwd> {
  static constexpr const char* kName = "shift_alter";

  static variable_list forward(AutogradContext* ctx, const Tensor& x, SymInt clips,
                               SymIntArrayRef frames, IntArrayRef rows, const OptTensor& alter,
                               int64_t fold_div) {
    const bool alter_grad = alter && alter->requires_grad();
    ctx->saved_data["clips"] = clips;
    ctx->saved_data["frames"] = frames.vec();
    ctx->saved_data["rows"] = rows;
    ctx->saved_data["fold_div"] = fold_div;
    ctx->saved_data["alter_grad"] = alter_grad;
    // a pure shift (or a frozen alter) needs only dy to go backward: keep x only for d alter
    ctx->save_for_backward({alter_grad ? x : Tensor(), alter.value_or(Tensor())});
    at::AutoDispatchBelowADInplaceOrView guard;
    return {handle<Op, false, false>().call(x, clips, frames, rows, alter, fold_div)};
  }

  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    const auto saved = ctx->get_saved_variables();
    const Tensor& x = saved[0];
    const OptTensor alter = saved[1].defined() ? OptTensor(saved[1]) : std::nullopt;
    const bool alter_grad = ctx->saved_data["alter_grad"].toBool();
    auto [dx, dalter] = handle<Op, false, true>().call(
        grads[0], x.defined() ? x : grads[0], ctx->saved_data["clips"].toSymInt(),
        ctx->saved_data["frames"].toSymIntVector(), ctx->saved_data["rows"].toIntVector(), alter,
        ctx->saved_data["fold_div"].toInt(), alter_grad);
    // one gradient per input of Fwd: only x and alter have one
    return {dx, Tensor(), Tensor(), Tensor(), alter_grad ? grad_as(dalter, *alter) : Tensor(),
            Tensor()};
  }
};

template <bool kMeta>
Tensor forward(const Tensor& x, SymInt clips, SymIntArrayRef frames, IntArrayRef rows,
               const OptTensor& alter, int64_t fold_div) {
  check_input("x", x, clips, frames, rows);
  check_param("alter", alter, x, rows);
  check_fold_div(fold_div, x);
  if constexpr (kMeta)
    return activation_like(x);
  else
    return handle<Op, true, false>().call(like(x, format_of(x)), clips, frames, rows,
                                          param(alter, x), fold_div);
}

template <bool kMeta>
std::tuple<Tensor, Tensor> backward(const Tensor& dy, const Tensor& x, SymInt clips,
                                    SymIntArrayRef frames, IntArrayRef rows,
                                    const OptTensor& alter, int64_t fold_div, bool alter_grad) {
  if constexpr (kMeta) {
    return {activation_like(x), acc_like(x, alter_grad ? alter : std::nullopt)};
  } else {
    const auto fmt = format_of(x);
    return handle<Op, true, true>().call(like(dy, fmt), like(x, fmt), clips, frames, rows,
                                         param(alter, x), fold_div, alter_grad);
  }
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(ffn_kernels, m) {
  define_op(m, "shift_alter",
            "(Tensor x, SymInt clips, SymInt[] frames, int[] rows, Tensor? alter, int fold_div) "
            "-> Tensor",
            "(Tensor dy, Tensor x, SymInt clips, SymInt[] frames, int[] rows, Tensor? alter, int "
            "fold_div, bool alter_grad) -> (Tensor, Tensor)");
}

FFN_REGISTER_OP(shift_alter)

}  // namespace ops
}  // namespace ffn_kernels
