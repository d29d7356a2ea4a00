// CUDA kernels of freq_batch_norm (docs/design.md §3.2): the shared BatchNorm without the shift.
#include "batch_norm_common.cuh"
#include "ops/freq_batch_norm.h"

namespace ffn_kernels {
namespace cuda {
namespace {

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> freq_batch_norm_fwd(
    const at::Tensor& x, int64_t clips, at::IntArrayRef frames, at::IntArrayRef rows,
    const at::Tensor& weight, const at::Tensor& bias, const OptTensor& running_mean,
    const OptTensor& running_var, bool training, at::ArrayRef<double> momentum, double eps,
    bool relu, const OptTensor& residual) {
  auto [y, next, mean, invstd, new_rm, new_rv] =
      bn_forward<false>(x, residual, clips, frames, rows, weight, bias, running_mean, running_var,
                        training, momentum, eps, relu, c10::nullopt, 0);
  return {y, mean, invstd, new_rm, new_rv};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> freq_batch_norm_bwd(
    const at::Tensor& dy, const at::Tensor& x, const at::Tensor& y, int64_t clips,
    at::IntArrayRef frames, at::IntArrayRef rows, const at::Tensor& weight, const at::Tensor& mean,
    const at::Tensor& invstd, bool training, bool relu, bool has_residual, const OptTensor& bias) {
  auto [dx, dres, dweight, dbias, dalter] =
      bn_backward<false>(dy, at::Tensor(), x, y, clips, frames, rows, weight, mean, invstd,
                         training, relu, has_residual, c10::nullopt, 0, bias);
  return {dx, dweight, dbias, dres};
}

}  // namespace

FFN_REGISTER_KERNELS(freq_batch_norm, CUDA, freq_batch_norm_fwd,
                     freq_batch_norm_bwd)

}  // namespace cuda
}  // namespace ffn_kernels
