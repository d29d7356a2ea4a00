// Registers the CUDA kernels of the raw ops (schema in csrc/ops.cpp) for CUDA tensors.
#include <torch/library.h>

#include "ops.cuh"

TORCH_LIBRARY_IMPL(ffn_kernels_C, CUDA, m) {
  namespace k = ffn_kernels::cuda;
  m.impl("shift_alter_fwd", &k::shift_alter_fwd);
  m.impl("shift_alter_bwd", &k::shift_alter_bwd);
  m.impl("bn_fwd", &k::bn_fwd);
  m.impl("bn_bwd", &k::bn_bwd);
  m.impl("bnrs_fwd", &k::bnrs_fwd);
  m.impl("bnrs_bwd", &k::bnrs_bwd);
}
