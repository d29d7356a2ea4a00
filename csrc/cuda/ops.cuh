// The six raw ops of the CUDA backend (semantics: ffn_kernels/reference.py, schema: csrc/ops.cpp).
#pragma once

#include "common.cuh"

namespace ffn_kernels {
namespace cuda {

using OptTensor = c10::optional<at::Tensor>;

at::Tensor shift_alter_fwd(const at::Tensor& x, int64_t clips, at::IntArrayRef frames,
                           at::IntArrayRef rows, const OptTensor& alter, int64_t fold_div);

std::tuple<at::Tensor, at::Tensor> shift_alter_bwd(const at::Tensor& dy, const at::Tensor& x,
                                                   int64_t clips, at::IntArrayRef frames,
                                                   at::IntArrayRef rows, const OptTensor& alter,
                                                   int64_t fold_div, bool alter_grad);

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> bn_fwd(
    const at::Tensor& x, int64_t clips, at::IntArrayRef frames, at::IntArrayRef rows,
    const at::Tensor& weight, const at::Tensor& bias, const OptTensor& running_mean,
    const OptTensor& running_var, bool training, at::ArrayRef<double> momentum, double eps,
    bool relu, const OptTensor& residual);

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> bn_bwd(
    const at::Tensor& dy, const at::Tensor& x, const at::Tensor& y, int64_t clips,
    at::IntArrayRef frames, at::IntArrayRef rows, const at::Tensor& weight,
    const at::Tensor& mean, const at::Tensor& invstd, bool training, bool relu,
    bool has_residual);

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> bnrs_fwd(
    const at::Tensor& z, const at::Tensor& identity, int64_t clips, at::IntArrayRef frames,
    at::IntArrayRef rows, const at::Tensor& weight, const at::Tensor& bias,
    const OptTensor& running_mean, const OptTensor& running_var, bool training,
    at::ArrayRef<double> momentum, double eps, const OptTensor& alter_next, int64_t fold_div);

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> bnrs_bwd(
    const at::Tensor& dout, const at::Tensor& dnext, const at::Tensor& z, const at::Tensor& out,
    int64_t clips, at::IntArrayRef frames, at::IntArrayRef rows, const at::Tensor& weight,
    const at::Tensor& mean, const at::Tensor& invstd, bool training,
    const OptTensor& alter_next, int64_t fold_div);

}  // namespace cuda
}  // namespace ffn_kernels
