// The tensor conventions of the ops (docs/design.md §3.4), for every C++ layer: the dispatch layer
// (csrc/ops), the CPU kernels and the CUDA kernels. Their Python twin, for the reference and the
// Triton kernels, is ffn_kernels/validation.py; the two must say the same.
#pragma once

#include <ATen/ATen.h>

namespace ffn_kernels {

// The memory format of an activation: channels_last if x is stored that way and not also plain
// contiguous, else NCHW (a tensor that is both, C == 1 or 1x1 frames, counts as NCHW).
inline at::MemoryFormat format_of(const at::Tensor& x) {
  return x.dim() == 4 && !x.is_contiguous() && x.is_contiguous(at::MemoryFormat::ChannelsLast)
             ? at::MemoryFormat::ChannelsLast
             : at::MemoryFormat::Contiguous;
}

// The accumulation dtype of input x: statistics, reductions, per-branch parameters inside the
// kernels and their gradients (float64 for float64 input, float32 otherwise).
inline at::ScalarType acc_type(const at::Tensor& x) {
  return x.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
}

// An output a call does not produce (d alter without alter_grad or alter, dresidual without a
// residual, the running statistics without them) is an empty tensor of the dtype it has when it
// is produced: per-row and per-segment outputs in x's acc dtype, activations in x's dtype.
inline at::Tensor unused_acc(const at::Tensor& x) {
  return at::empty({0}, x.options().dtype(acc_type(x)).memory_format(at::MemoryFormat::Contiguous));
}
inline at::Tensor unused_activation(const at::Tensor& x) {
  return at::empty({0}, x.options().memory_format(at::MemoryFormat::Contiguous));
}

}  // namespace ffn_kernels
