// freq_batch_norm's contract (docs/design.md §3.2): the signatures of its forward and backward.
// The schemas are in csrc/ops/freq_batch_norm.cpp; the kernels are csrc/cpu/freq_batch_norm.cpp,
// csrc/cuda/freq_batch_norm.cu, ffn_kernels/triton/freq_batch_norm.py and ffn_kernels/reference.py.
#pragma once

#include "ops/contract.h"

namespace ffn_kernels {
namespace freq_batch_norm {

// (y, mean[S, C], invstd[S, C], new_running_mean[P, C], new_running_var[P, C])
using FwdOut = std::tuple<Tensor, Tensor, Tensor, Tensor, Tensor>;
using Fwd = FwdOut(const Tensor& x, SymInt clips, SymIntArrayRef frames, IntArrayRef rows,
                   const Tensor& weight, const Tensor& bias, const OptTensor& running_mean,
                   const OptTensor& running_var, bool training, Floats momentum, double eps,
                   bool relu, const OptTensor& residual);
// (dx, dweight[P, C], dbias[P, C], dresidual). The ReLU mask is y > 0, or, given bias (no
// residual), recomputed from x as the forward computed y (x * scale + shift > 0, scale and shift
// from mean, invstd, weight and bias), so y is not read: 2 of the training backward's 7
// activation transfers (docs/design.md §3.2).
using BwdOut = std::tuple<Tensor, Tensor, Tensor, Tensor>;
using Bwd = BwdOut(const Tensor& dy, const Tensor& x, const Tensor& y, SymInt clips,
                   SymIntArrayRef frames, IntArrayRef rows, const Tensor& weight,
                   const Tensor& mean, const Tensor& invstd, bool training, bool relu,
                   bool has_residual, const OptTensor& bias);

}  // namespace freq_batch_norm
}  // namespace ffn_kernels
