// temporal_conv's contract (docs/design.md §3.6): the signatures of its forward and backward. The
// schemas are in csrc/ops/temporal_conv.cpp; the kernels are csrc/cpu/temporal_conv.cpp,
// csrc/cuda/temporal_conv.cu, ffn_kernels/triton/temporal_conv.py and ffn_kernels/reference.py.
// The taps are shared by all branches, so the layout has no rows here.
#pragma once

#include "ops/contract.h"

namespace ffn_kernels {
namespace temporal_conv {

// y
using Fwd = Tensor(const Tensor& x, SymInt clips, SymIntArrayRef frames, const Tensor& weight);
// (dx, dweight[C, 3])
using Bwd = std::tuple<Tensor, Tensor>(const Tensor& dy, const Tensor& x, SymInt clips,
                                       SymIntArrayRef frames, const Tensor& weight,
                                       bool weight_grad);

}  // namespace temporal_conv
}  // namespace ffn_kernels
