// temporal_conv (docs/design.md §3.6): TEA's 3-tap temporal depthwise conv on the packed layout.
// Its schemas, its public op and backward for CPU, CUDA and Meta tensors, and its autograd formula.
#include "ops/temporal_conv.h"

#include "ops/dispatch.h"

namespace ffn_kernels {
namespace ops {
namespace {

using torch::autograd::AutogradContext;
using torch::autograd::variable_list;

struct Op : OpFunction<Op, temporal_conv::Fwd, temporal_conv::Bwd> {
  static constexpr const char* kName = "temporal_conv";

  static variable_list forward(AutogradContext* ctx, const Tensor& x, SymInt clips,
                               SymIntArrayRef frames, const Tensor& weight) {
    const bool weight_grad = weight.requires_grad();
    ctx->saved_data["clips"] = clips;
    ctx->saved_data["frames"] = frames.vec();
    ctx->saved_data["weight_grad"] = weight_grad;
    // dx needs only dy and the taps: keep x only for d weight
    ctx->save_for_backward({weight_grad ? x : Tensor(), weight});
    at::AutoDispatchBelowADInplaceOrView guard;
    return {handle<Op, false, false>().call(x, clips, frames, weight)};
  }

  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    const auto saved = ctx->get_saved_variables();
    const Tensor& x = saved[0];
    const Tensor& weight = saved[1];
    const bool weight_grad = ctx->saved_data["weight_grad"].toBool();
    auto [dx, dweight] = handle<Op, false, true>().call(
        grads[0], x.defined() ? x : grads[0], ctx->saved_data["clips"].toSymInt(),
        ctx->saved_data["frames"].toSymIntVector(), weight, weight_grad);
    // one gradient per input of Fwd: only x and weight have one
    return {dx, Tensor(), Tensor(), weight_grad ? grad_as(dweight, weight) : Tensor()};
  }
};

// The taps: [C, 3], floating point, on x's device.
void check_taps(const Tensor& weight, const Tensor& x) {
  TORCH_CHECK_VALUE(weight.dim() == 2 && weight.sym_size(1) == 3 &&
                        weight.sym_size(0) == x.sym_size(1),
                    "weight must have shape [C=", x.sym_size(1),
                    ", 3] (3 temporal taps per channel), got ", weight.sym_sizes());
  TORCH_CHECK_TYPE(at::isFloatingType(weight.scalar_type()),
                   "weight must be a floating-point tensor, got ", weight.scalar_type());
  TORCH_CHECK_VALUE(weight.device() == x.device(), "weight is on ", weight.device(),
                    " but x is on ", x.device(), " (mixed devices)");
}

template <bool kMeta>
Tensor forward(const Tensor& x, SymInt clips, SymIntArrayRef frames, const Tensor& weight) {
  check_input("x", x, clips, frames, std::vector<int64_t>(frames.size(), 0));
  check_taps(weight, x);
  if constexpr (kMeta)
    return activation_like(x);
  else
    return handle<Op, true, false>().call(like(x, format_of(x)), clips, frames, param(weight, x));
}

template <bool kMeta>
std::tuple<Tensor, Tensor> backward(const Tensor& dy, const Tensor& x, SymInt clips,
                                    SymIntArrayRef frames, const Tensor& weight,
                                    bool weight_grad) {
  if constexpr (kMeta) {
    return {activation_like(x), acc_like(x, weight_grad ? OptTensor(weight) : std::nullopt)};
  } else {
    const auto fmt = format_of(x);
    return handle<Op, true, true>().call(like(dy, fmt), like(x, fmt), clips, frames,
                                         param(weight, x), weight_grad);
  }
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(ffn_kernels, m) {
  define_op(m, "temporal_conv", "(Tensor x, SymInt clips, SymInt[] frames, Tensor weight) -> Tensor",
            "(Tensor dy, Tensor x, SymInt clips, SymInt[] frames, Tensor weight, bool weight_grad) "
            "-> (Tensor, Tensor)");
}

FFN_REGISTER_OP(temporal_conv)

}  // namespace ops
}  // namespace ffn_kernels
