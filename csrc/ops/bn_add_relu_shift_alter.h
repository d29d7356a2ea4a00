// bn_add_relu_shift_alter's contract (docs/design.md §3.3): the signatures of its forward and
// backward. The schemas are in csrc/ops/bn_add_relu_shift_alter.cpp; the kernels are
// csrc/cpu/bn_add_relu_shift_alter.cpp, csrc/cuda/bn_add_relu_shift_alter.cu,
// ffn_kernels/triton/bn_add_relu_shift_alter.py and ffn_kernels/reference.py.
#pragma once

#include "ops/contract.h"

namespace ffn_kernels {
namespace bn_add_relu_shift_alter {

// (out, next_in, mean[S, C], invstd[S, C], new_running_mean[P, C], new_running_var[P, C])
using FwdOut = std::tuple<Tensor, Tensor, Tensor, Tensor, Tensor, Tensor>;
using Fwd = FwdOut(const Tensor& z, const Tensor& identity, SymInt clips, SymIntArrayRef frames,
                   IntArrayRef rows, const Tensor& weight, const Tensor& bias,
                   const OptTensor& running_mean, const OptTensor& running_var, bool training,
                   Floats momentum, double eps, const OptTensor& alter_next, int64_t fold_div);
// (dz, didentity, dweight[P, C], dbias[P, C], dalter[P, C])
using BwdOut = std::tuple<Tensor, Tensor, Tensor, Tensor, Tensor>;
using Bwd = BwdOut(const Tensor& dout, const Tensor& dnext, const Tensor& z, const Tensor& out,
                   SymInt clips, SymIntArrayRef frames, IntArrayRef rows, const Tensor& weight,
                   const Tensor& mean, const Tensor& invstd, bool training,
                   const OptTensor& alter_next, int64_t fold_div);

}  // namespace bn_add_relu_shift_alter
}  // namespace ffn_kernels
