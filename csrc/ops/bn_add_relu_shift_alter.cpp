// bn_add_relu_shift_alter (docs/design.md §3.3): the residual-block boundary,
// out = relu(BN(z) + identity) and next_in = shift_alter(out) in one pass. Its schemas, its
// public op and backward for CPU, CUDA and Meta tensors, and its autograd formula. Functional in
// the running statistics, like freq_batch_norm.
#include "ops/bn_add_relu_shift_alter.h"

#include "ops/dispatch.h"

namespace ffn_kernels {
namespace ops {
namespace {

using namespace ::ffn_kernels::bn_add_relu_shift_alter;
using torch::autograd::AutogradContext;
using torch::autograd::variable_list;

struct Op : OpFunction<Op, bn_add_relu_shift_alter::Fwd, bn_add_relu_shift_alter::Bwd> {
  static constexpr const char* kName = "bn_add_relu_shift_alter";

  static variable_list forward(AutogradContext* ctx, const Tensor& z, const Tensor& identity,
                               SymInt clips, SymIntArrayRef frames, IntArrayRef rows,
                               const Tensor& weight, const Tensor& bias,
                               const OptTensor& running_mean, const OptTensor& running_var,
                               bool training, Floats momentum, double eps,
                               const OptTensor& alter_next, int64_t fold_div) {
    FwdOut outputs;
    {
      at::AutoDispatchBelowADInplaceOrView guard;
      outputs = handle<Op, false, false>().call(z, identity, clips, frames, rows, weight, bias,
                                                running_mean, running_var, training, momentum,
                                                eps, alter_next, fold_div);
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
    auto [dz, didentity, dw, db, dalter] = handle<Op, false, true>().call(
        dout, dnext, z, out, ctx->saved_data["clips"].toSymInt(),
        ctx->saved_data["frames"].toSymIntVector(), ctx->saved_data["rows"].toIntVector(), weight,
        saved[3], saved[4], ctx->saved_data["training"].toBool(), alter_next,
        ctx->saved_data["fold_div"].toInt());
    // one gradient per input of Fwd: only z, identity, weight, bias and alter_next have one
    return {dz,       didentity, Tensor(), Tensor(), Tensor(),
            grad_as(dw, weight), grad_as(db, weight), Tensor(), Tensor(), Tensor(),
            Tensor(), Tensor(),  alter_next ? grad_as(dalter, *alter_next) : Tensor(), Tensor()};
  }
};

template <bool kMeta>
FwdOut forward(const Tensor& z, const Tensor& identity, SymInt clips, SymIntArrayRef frames,
               IntArrayRef rows, const Tensor& weight, const Tensor& bias,
               const OptTensor& running_mean, const OptTensor& running_var, bool training,
               Floats momentum, double eps, const OptTensor& alter_next, int64_t fold_div) {
  check_norm("z", z, clips, frames, rows, weight, bias, running_mean, running_var, training,
             momentum, eps);
  check_like("identity", identity, z, "z");
  check_param("alter_next", alter_next, z, rows);
  check_fold_div(fold_div, z);
  if constexpr (kMeta) {
    auto [mean, invstd, new_rm, new_rv] =
        norm_stats_meta(z, frames.size(), running_mean, running_var);
    return {activation_like(z), activation_like(z), mean, invstd, new_rm, new_rv};
  } else {
    const auto fmt = format_of(z);
    return handle<Op, true, false>().call(
        like(z, fmt), like(identity, fmt), clips, frames, rows, param(weight, z), param(bias, z),
        param(running_mean, z), param(running_var, z), training, momentum, eps,
        param(alter_next, z), fold_div);
  }
}

template <bool kMeta>
BwdOut backward(const Tensor& dout, const Tensor& dnext, const Tensor& z, const Tensor& out,
                SymInt clips, SymIntArrayRef frames, IntArrayRef rows, const Tensor& weight,
                const Tensor& mean, const Tensor& invstd, bool training,
                const OptTensor& alter_next, int64_t fold_div) {
  if constexpr (kMeta) {
    return {activation_like(z), activation_like(z), acc_like(z, weight), acc_like(z, weight),
            acc_like(z, alter_next)};
  } else {
    const auto fmt = format_of(z);
    return handle<Op, true, true>().call(like(dout, fmt), like(dnext, fmt), like(z, fmt),
                                         like(out, fmt), clips, frames, rows, param(weight, z),
                                         mean, invstd, training, param(alter_next, z), fold_div);
  }
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(ffn_kernels, m) {
  define_op(m, "bn_add_relu_shift_alter",
            "(Tensor z, Tensor identity, SymInt clips, SymInt[] frames, int[] rows, Tensor "
            "weight, Tensor bias, Tensor? running_mean, Tensor? running_var, bool training, "
            "float[] momentum, float eps, Tensor? alter_next, int fold_div) -> (Tensor, Tensor, "
            "Tensor, Tensor, Tensor, Tensor)",
            "(Tensor dout, Tensor dnext, Tensor z, Tensor out, SymInt clips, SymInt[] frames, "
            "int[] rows, Tensor weight, Tensor mean, Tensor invstd, bool training, Tensor? "
            "alter_next, int fold_div) -> (Tensor, Tensor, Tensor, Tensor, Tensor)");
}

FFN_REGISTER_OP(bn_add_relu_shift_alter)

}  // namespace ops
}  // namespace ffn_kernels
