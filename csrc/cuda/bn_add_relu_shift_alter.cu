// CUDA kernels of bn_add_relu_shift_alter (docs/design.md §3.3): the shared BatchNorm with the
// shift of its output for the next block.
#include "batch_norm_common.cuh"
#include "ops/bn_add_relu_shift_alter.h"

namespace ffn_kernels {
namespace cuda {
namespace {

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor>
bn_add_relu_shift_alter_fwd(const at::Tensor& z, const at::Tensor& identity, int64_t clips,
                            at::IntArrayRef frames, at::IntArrayRef rows, const at::Tensor& weight,
                            const at::Tensor& bias, const OptTensor& running_mean,
                            const OptTensor& running_var, bool training,
                            at::ArrayRef<double> momentum, double eps, const OptTensor& alter_next,
                            int64_t fold_div) {
  return bn_forward<true>(z, identity, clips, frames, rows, weight, bias, running_mean, running_var,
                          training, momentum, eps, /*relu=*/true, alter_next, fold_div);
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> bn_add_relu_shift_alter_bwd(
    const at::Tensor& dout, const at::Tensor& dnext, const at::Tensor& z, const at::Tensor& out,
    int64_t clips, at::IntArrayRef frames, at::IntArrayRef rows, const at::Tensor& weight,
    const at::Tensor& mean, const at::Tensor& invstd, bool training, const OptTensor& alter_next,
    int64_t fold_div) {
  auto [dz, didentity, dweight, dbias, dalter] =
      bn_backward<true>(dout, dnext, z, out, clips, frames, rows, weight, mean, invstd, training,
                        /*relu=*/true, /*has_residual=*/true, alter_next, fold_div);
  return {dz, didentity, dweight, dbias, dalter};
}

}  // namespace

FFN_REGISTER_KERNELS(bn_add_relu_shift_alter, CUDA, bn_add_relu_shift_alter_fwd,
                     bn_add_relu_shift_alter_bwd)

}  // namespace cuda
}  // namespace ffn_kernels
