// shift_alter's contract (docs/design.md §3.1): the signatures of its forward and backward. The
// schemas are in csrc/ops/shift_alter.cpp; the kernels are csrc/cpu/shift_alter.cpp,
// csrc/cuda/shift_alter.cu, ffn_kernels/triton/shift_alter.py and ffn_kernels/reference.py.
#pragma once

#include "ops/contract.h"

namespace ffn_kernels {
namespace shift_alter {

// y
using Fwd = Tensor(const Tensor& x, SymInt clips, SymIntArrayRef frames, IntArrayRef rows,
                   const OptTensor& alter, int64_t fold_div);
// (dx, dalter[P, C])
using Bwd = std::tuple<Tensor, Tensor>(const Tensor& dy, const Tensor& x, SymInt clips,
                                       SymIntArrayRef frames, IntArrayRef rows,
                                       const OptTensor& alter, int64_t fold_div, bool alter_grad);

}  // namespace shift_alter
}  // namespace ffn_kernels
