// freq_layer_norm's contract (docs/design.md §3.7): the signatures of its forward and backward.
// The schemas are in csrc/ops/freq_layer_norm.cpp; the kernels are csrc/cpu/freq_layer_norm.cpp,
// csrc/cuda/freq_layer_norm.cu, ffn_kernels/triton/freq_layer_norm.py and ffn_kernels/reference.py.
// x is [F, ..., C]: dim 0 holds the layout's frames, the last dim the normalised channels, and
// every other element of a frame is one more token of it (R = numel / C tokens in all).
#pragma once

#include "ops/contract.h"

namespace ffn_kernels {
namespace freq_layer_norm {

// (y, s = x + residual (empty without a residual), mean[R], rstd[R])
using FwdOut = std::tuple<Tensor, Tensor, Tensor, Tensor>;
using Fwd = FwdOut(const Tensor& x, SymInt clips, SymIntArrayRef frames, IntArrayRef rows,
                   const Tensor& weight, const Tensor& bias, double eps,
                   const OptTensor& residual);
// (ds, dweight[P, C], dbias[P, C]): ds is the gradient of x and of the residual; `dsum` is the
// gradient reaching the returned sum s (when it was used), `s` the normalised input (x + residual,
// or x)
using BwdOut = std::tuple<Tensor, Tensor, Tensor>;
using Bwd = BwdOut(const Tensor& dy, const OptTensor& dsum, const Tensor& s, SymInt clips,
                   SymIntArrayRef frames, IntArrayRef rows, const Tensor& weight,
                   const Tensor& mean, const Tensor& rstd);

}  // namespace freq_layer_norm
}  // namespace ffn_kernels
