// The dispatch layer of the public ops (docs/design.md §4.1): argument checks whose errors name
// the argument, memory-format/dtype normalisation, the Meta outputs, and the generic parts of the
// Autograd kernels. Each op's own part is in csrc/ops/<op>.cpp, its signatures in csrc/ops/<op>.h.
//
// Route: a public op's CPU/CUDA kernel checks and normalises its arguments, then calls the raw op
// ffn_kernels::<op>_fwd / _bwd through the dispatcher. The dispatcher picks that op's kernel: the
// compiled kernels (csrc/cpu, csrc/cuda) or, where ffn_kernels/backend.py registered it for the
// chosen backend, the Python one (Triton, reference). No route flag lives in C++.
#pragma once

#include <ATen/ATen.h>
#include <ATen/core/dispatch/Dispatcher.h>
#include <torch/autograd.h>
#include <torch/library.h>

#include <optional>
#include <string>
#include <utility>
#include <vector>

#include "conventions.h"
#include "ops/contract.h"

namespace ffn_kernels {
namespace ops {

// The dispatcher handle of op `name` ("namespace::op"), to be kept in a function-local static.
template <typename Sig>
c10::TypedOperatorHandle<Sig> op_handle(const char* name) {
  return c10::Dispatcher::singleton().findSchemaOrThrow(name, "").template typed<Sig>();
}

// An activation in `fmt` (no copy when it already is).
inline Tensor like(const Tensor& t, at::MemoryFormat fmt) { return t.contiguous(fmt); }
inline OptTensor like(const OptTensor& t, at::MemoryFormat fmt) {
  return t ? OptTensor(t->contiguous(fmt)) : std::nullopt;
}

// A per-branch parameter in x's acc dtype, contiguous.
inline Tensor param(const Tensor& p, const Tensor& x) { return p.to(acc_type(x)).contiguous(); }
inline OptTensor param(const OptTensor& p, const Tensor& x) {
  return p ? OptTensor(param(*p, x)) : std::nullopt;
}

// ---- Meta (fake) outputs: what the raw kernels return, as shapes only -------------------------

// A per-row [P, C] tensor in x's acc dtype shaped like `like`, or the empty tensor the kernels
// return in its place when there is none.
inline Tensor acc_like(const Tensor& x, const OptTensor& like) {
  return like ? at::empty_symint(like->sym_sizes(), x.options().dtype(acc_type(x))) : unused_acc(x);
}

// An activation-sized output in x's memory format.
inline Tensor activation_like(const Tensor& x) {
  return at::empty_like(x, x.options(), format_of(x));
}

// The statistics outputs of a BatchNorm op: mean and invstd [S, C] and the updated running
// statistics (empty without them).
inline std::tuple<Tensor, Tensor, Tensor, Tensor> norm_stats_meta(const Tensor& x,
                                                                  size_t segments,
                                                                  const OptTensor& running_mean,
                                                                  const OptTensor& running_var) {
  const Tensor mean = at::empty_symint({c10::SymInt(static_cast<int64_t>(segments)), x.sym_size(1)},
                                       x.options().dtype(acc_type(x)));
  return {mean, at::empty_like(mean), acc_like(x, running_mean), acc_like(x, running_var)};
}

// A parameter gradient (computed in the acc dtype) in the parameter's own dtype.
inline Tensor grad_as(const Tensor& g, const Tensor& p) {
  return g.scalar_type() == p.scalar_type() ? g : g.to(p.scalar_type());
}

// The backward ops are not differentiable: a graph through them (create_graph=True, double
// backward) must fail, not give silent zeros.
void refuse_double_backward(const char* op, at::ArrayRef<Tensor> inputs);
// The ops' autograd formula is reverse mode through torch.autograd only: torch.func transforms
// (grad, vjp, jvp, vmap under a transform) and forward-mode AD (dual tensors) must fail naming the
// op, not give zero tangents or a message about C++ autograd functions.
void refuse_transforms(const char* op, at::ArrayRef<Tensor> inputs);

// ---- an op's entries ------------------------------------------------------------------------
//
// Each op file (csrc/ops/<op>.cpp) defines, in its anonymous namespace:
//   - `Op`, its autograd Function (an OpFunction of the contract's `Fwd` and `Bwd`), with
//     `kName` and the autograd formula (what forward saves, what backward returns);
//   - `forward<kMeta>` and `backward<kMeta>`: the argument checks, then for kMeta the output
//     shapes (FakeTensor, torch.compile), else the normalised call of the raw op (CPU, CUDA);
// and registers them with FFN_REGISTER_OP. The Autograd kernels below are generic.

// The base of an op's autograd Function `Op`: the contract's signatures of its two entries.
template <class Self, class FwdSig, class BwdSig>
struct OpFunction : torch::autograd::Function<Self> {
  using Fwd = FwdSig;
  using Bwd = BwdSig;
};

// Defines op `name`: the public op and its backward, and the raw ops <name>_fwd and <name>_bwd,
// which take the same arguments (`fwd` and `bwd`: "(arguments) -> results").
void define_op(torch::Library& m, const std::string& name, const char* fwd, const char* bwd);

// The dispatcher handle of op Fn's public (kRaw = false) or raw entry, forward or backward.
template <class Fn, bool kRaw, bool kBackward>
const auto& handle() {
  using Sig = std::conditional_t<kBackward, typename Fn::Bwd, typename Fn::Fwd>;
  static const auto op = op_handle<Sig>(
      (std::string("ffn_kernels::") + Fn::kName +
       (kRaw ? (kBackward ? "_bwd" : "_fwd") : (kBackward ? "_backward" : "")))
          .c_str());
  return op;
}

namespace detail {
inline void collect(std::vector<Tensor>& out, const Tensor& t) { out.push_back(t); }
inline void collect(std::vector<Tensor>& out, const OptTensor& t) {
  if (t) out.push_back(*t);
}
template <class T>
void collect(std::vector<Tensor>&, const T&) {}

template <class R, size_t... I>
R unpack(const std::vector<Tensor>& v, std::index_sequence<I...>) {
  return R{v[I]...};
}
template <class R>
R unpack(const std::vector<Tensor>& v) {
  if constexpr (std::is_same_v<R, Tensor>)
    return v[0];
  else
    return unpack<R>(v, std::make_index_sequence<std::tuple_size_v<R>>{});
}

template <class Fn, class Sig>
struct Autograd;
template <class Fn, class R, class... A>
struct Autograd<Fn, R(A...)> {
  // the public op: reverse-mode autograd only (the transforms are refused, naming the op)
  static R forward(A... args) {
    std::vector<Tensor> tensors;
    (collect(tensors, args), ...);
    refuse_transforms(Fn::kName, tensors);
    return unpack<R>(Fn::apply(args...));
  }
  // the backward op: no graph through it
  static R backward(A... args) {
    std::vector<Tensor> tensors;
    (collect(tensors, args), ...);
    refuse_double_backward(Fn::kName, tensors);
    at::AutoDispatchBelowADInplaceOrView guard;
    return handle<Fn, false, true>().call(args...);
  }
};
}  // namespace detail

#define FFN_REGISTER_OP(op)                                                                    \
  TORCH_LIBRARY_IMPL(ffn_kernels, CPU, m) {                                                    \
    m.impl(#op, &forward<false>);                                                              \
    m.impl(#op "_backward", &backward<false>);                                                 \
  }                                                                                            \
  TORCH_LIBRARY_IMPL(ffn_kernels, CUDA, m) {                                                   \
    m.impl(#op, &forward<false>);                                                              \
    m.impl(#op "_backward", &backward<false>);                                                 \
  }                                                                                            \
  TORCH_LIBRARY_IMPL(ffn_kernels, Meta, m) {                                                   \
    m.impl(#op, &forward<true>);                                                               \
    m.impl(#op "_backward", &backward<true>);                                                  \
  }                                                                                            \
  TORCH_LIBRARY_IMPL(ffn_kernels, Autograd, m) {                                               \
    m.impl(#op, &detail::Autograd<Op, Op::Fwd>::forward);                                      \
    m.impl(#op "_backward", &detail::Autograd<Op, Op::Bwd>::backward);                         \
  }

// ---- argument checks (ValueError / TypeError naming the argument) ----------------------------

// The packed layout (clips, frames, rows) and the activation `name` that it must describe.
void check_input(const char* name, const Tensor& x, const c10::SymInt& clips,
                 c10::SymIntArrayRef frames, at::IntArrayRef rows);
// A [P, C] per-branch parameter or buffer for x whose rows cover the layout.
void check_param(const char* name, const OptTensor& p, const Tensor& x, at::IntArrayRef rows);
// `t` has x's shape, dtype and device.
void check_like(const char* name, const OptTensor& t, const Tensor& x, const char* x_name);
// fold_div in [2, C] (C // fold_div channels shift each way).
void check_fold_div(int64_t fold_div, const Tensor& x);
// The BatchNorm arguments of freq_batch_norm and bn_add_relu_shift_alter (input `name`).
void check_norm(const char* name, const Tensor& x, const c10::SymInt& clips,
                c10::SymIntArrayRef frames, at::IntArrayRef rows, const Tensor& weight,
                const Tensor& bias, const OptTensor& running_mean, const OptTensor& running_var,
                bool training, at::ArrayRef<double> momentum, double eps);

}  // namespace ops
}  // namespace ffn_kernels
