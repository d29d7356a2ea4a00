// freq_layer_norm (docs/design.md §3.7): frequency-indexed LayerNorm over the last dim (+ residual,
// whose sum it returns). Its schemas, its public op and backward for CPU, CUDA and Meta tensors,
// and its autograd formula.
#include "ops/freq_layer_norm.h"

#include "ops/dispatch.h"

namespace ffn_kernels {
namespace ops {
namespace {

using namespace ::ffn_kernels::freq_layer_norm;
using torch::autograd::AutogradContext;
using torch::autograd::variable_list;

struct Op : OpFunction<Op, freq_layer_norm::Fwd, freq_layer_norm::Bwd> {
  static constexpr const char* kName = "freq_layer_norm";

  static variable_list forward(AutogradContext* ctx, const Tensor& x, SymInt clips,
                               SymIntArrayRef frames, IntArrayRef rows, const Tensor& weight,
                               const Tensor& bias, double eps, const OptTensor& residual) {
    FwdOut out;
    {
      at::AutoDispatchBelowADInplaceOrView guard;
      out = handle<Op, false, false>().call(x, clips, frames, rows, weight, bias, eps, residual);
    }
    auto& [y, s, mean, rstd] = out;
    ctx->mark_non_differentiable({mean, rstd});
    ctx->set_materialize_grads(false);
    ctx->saved_data["clips"] = clips;
    ctx->saved_data["frames"] = frames.vec();
    ctx->saved_data["rows"] = rows;
    ctx->saved_data["has_residual"] = residual.has_value();
    // the normalised input: the sum with a residual, x itself without
    ctx->save_for_backward({residual ? s : x, weight, bias, mean, rstd});
    return {y, s, mean, rstd};
  }

  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    const auto saved = ctx->get_saved_variables();
    const Tensor& s = saved[0];
    const Tensor dy = grads[0].defined() ? grads[0] : at::zeros_like(s);
    const bool has_residual = ctx->saved_data["has_residual"].toBool();
    // without a residual the sum output is an empty stand-in: a tangent for it (AOT autograd
    // materialises one) is ignored
    const OptTensor dsum = has_residual && grads[1].defined() ? OptTensor(grads[1]) : std::nullopt;
    auto [ds, dw, db] = handle<Op, false, true>().call(
        dy, dsum, s, ctx->saved_data["clips"].toSymInt(),
        ctx->saved_data["frames"].toSymIntVector(), ctx->saved_data["rows"].toIntVector(),
        saved[1], saved[3], saved[4]);
    // one gradient per input of Fwd: x, weight, bias and residual have one (the sum's gradient
    // reaches x and the residual alike)
    return {ds,       Tensor(), Tensor(), Tensor(), grad_as(dw, saved[1]), grad_as(db, saved[2]),
            Tensor(), has_residual ? ds : Tensor()};
  }
};

// x [F, ..., C] as the 4-D channels_last activation [F, C, tokens per frame, 1] it is in memory
// (x contiguous): what the layout and parameter checks, and the per-channel reductions, read.
Tensor as_channels(const Tensor& x) {
  return x.reshape_symint({x.sym_size(0), -1, x.sym_size(-1)}).permute({0, 2, 1}).unsqueeze(3);
}

template <bool kMeta>
FwdOut forward(const Tensor& x, SymInt clips, SymIntArrayRef frames, IntArrayRef rows,
               const Tensor& weight, const Tensor& bias, double eps, const OptTensor& residual) {
  TORCH_CHECK_VALUE(x.dim() >= 2, "x must have at least 2 dims [frames, ..., C], got shape ",
                    x.sym_sizes());
  const Tensor xc = x.contiguous();
  const Tensor v = as_channels(xc);
  check_input("x", v, clips, frames, rows);
  check_param("weight", weight, v, rows);
  check_param("bias", bias, v, rows);
  check_like("residual", residual, x, "x");
  TORCH_CHECK_VALUE(eps > 0, "eps must be > 0, got ", eps);
  if constexpr (kMeta) {
    const Tensor mean = at::empty_symint({x.sym_numel() / x.sym_size(-1)},
                                         x.options().dtype(acc_type(x)));
    return {at::empty_like(xc), residual ? at::empty_like(xc) : unused_activation(x), mean,
            at::empty_like(mean)};
  } else {
    return handle<Op, true, false>().call(
        xc, clips, frames, rows, param(weight, x), param(bias, x), eps,
        residual ? OptTensor(residual->contiguous()) : std::nullopt);
  }
}

template <bool kMeta>
BwdOut backward(const Tensor& dy, const OptTensor& dsum, const Tensor& s, SymInt clips,
                SymIntArrayRef frames, IntArrayRef rows, const Tensor& weight, const Tensor& mean,
                const Tensor& rstd) {
  if constexpr (kMeta) {
    return {at::empty_like(s), acc_like(s, weight), acc_like(s, weight)};
  } else {
    return handle<Op, true, true>().call(
        dy.contiguous(), dsum ? OptTensor(dsum->contiguous()) : std::nullopt, s.contiguous(),
        clips, frames, rows, param(weight, s), mean, rstd);
  }
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(ffn_kernels, m) {
  define_op(m, "freq_layer_norm",
            "(Tensor x, SymInt clips, SymInt[] frames, int[] rows, Tensor weight, Tensor bias, "
            "float eps, Tensor? residual) -> (Tensor, Tensor, Tensor, Tensor)",
            "(Tensor dy, Tensor? dsum, Tensor s, SymInt clips, SymInt[] frames, int[] rows, "
            "Tensor weight, Tensor mean, Tensor rstd) -> (Tensor, Tensor, Tensor)");
}

FFN_REGISTER_OP(freq_layer_norm)

}  // namespace ops
}  // namespace ffn_kernels
