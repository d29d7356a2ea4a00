// The dispatch-facing layer of the public ops (docs/design.md §4.1): argument checks whose errors name the
// argument, memory-format/dtype normalisation, and the route from a public op to the raw kernels of
// the chosen backend.
//
// Routes: the raw ops `ffn_kernels_C::<raw>` hold the compiled kernels (csrc/cpu, csrc/cuda);
// `ffn_kernels_py::<raw>` (same schemas, defined by ffn_kernels/backend.py) run the Python
// backends (Triton, reference). ffn_kernels.backend.set_backend tells this layer, per device type,
// which one to call (set_python_route below); nothing on the hot path goes through Python unless a
// Python backend is chosen.
#pragma once

#include <ATen/ATen.h>
#include <ATen/core/dispatch/Dispatcher.h>
#include <torch/library.h>

#include <mutex>
#include <optional>
#include <string>

namespace ffn_kernels {
namespace ops {

using at::Tensor;
using OptTensor = std::optional<Tensor>;

// Whether ops on `device` go to the Python backends (every device type but CPU and CUDA does).
bool python_route(const at::Device& device);
void set_python_route(bool cpu, bool cuda);

// The dispatcher handle of op `name` ("namespace::op"), to be kept in a function-local static.
template <typename Sig>
c10::TypedOperatorHandle<Sig> op_handle(const char* name) {
  return c10::Dispatcher::singleton().findSchemaOrThrow(name, "").template typed<Sig>();
}

// A raw op of both routes, looked up once (the Python one on first use: it is defined after the
// extension loads).
template <typename Sig>
class RawOp {
 public:
  explicit RawOp(const char* name) : name_(name) {}

  const c10::TypedOperatorHandle<Sig>& operator()(const at::Device& device) const {
    const int py = python_route(device) ? 1 : 0;
    std::call_once(once_[py], [&] {
      const std::string full = std::string(py ? "ffn_kernels_py::" : "ffn_kernels_C::") + name_;
      handle_[py] = op_handle<Sig>(full.c_str());
    });
    return *handle_[py];
  }

 private:
  const char* name_;
  mutable std::once_flag once_[2];
  mutable std::optional<c10::TypedOperatorHandle<Sig>> handle_[2];
};

// channels_last if x is stored that way (and not also plain contiguous), else NCHW; a tensor that
// is both (C == 1, 1x1 frames) counts as NCHW, as in the kernels.
inline at::MemoryFormat format_of(const Tensor& x) {
  return x.dim() == 4 && !x.is_contiguous() && x.is_contiguous(at::MemoryFormat::ChannelsLast)
             ? at::MemoryFormat::ChannelsLast
             : at::MemoryFormat::Contiguous;
}

inline at::ScalarType acc_type(const Tensor& x) {
  return x.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
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
  const auto acc = x.options().dtype(acc_type(x));
  return like ? at::empty_symint(like->sym_sizes(), acc) : at::empty({0}, acc);
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

// Registers an op's implementations, written in its file's anonymous namespace as `forward` /
// `backward` (CPU and CUDA: checks, formats, route to the backend), `forward_meta` /
// `backward_meta` (checks and output shapes, for FakeTensor and torch.compile) and
// `forward_autograd` / `backward_autograd` (the autograd formula; the backward op refuses a graph).
#define FFN_REGISTER_OP(op)                               \
  TORCH_LIBRARY_IMPL(ffn_kernels, CPU, m) {               \
    m.impl(#op, &forward);                                \
    m.impl(#op "_backward", &backward);                   \
  }                                                       \
  TORCH_LIBRARY_IMPL(ffn_kernels, CUDA, m) {              \
    m.impl(#op, &forward);                                \
    m.impl(#op "_backward", &backward);                   \
  }                                                       \
  TORCH_LIBRARY_IMPL(ffn_kernels, Meta, m) {              \
    m.impl(#op, &forward_meta);                           \
    m.impl(#op "_backward", &backward_meta);              \
  }                                                       \
  TORCH_LIBRARY_IMPL(ffn_kernels, Autograd, m) {          \
    m.impl(#op, &forward_autograd);                       \
    m.impl(#op "_backward", &backward_autograd);          \
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
