// The schemas of the extension's two libraries (docs/design.md §4.1):
//   ffn_kernels::<op>, <op>_backward — the public, differentiable ops; their CPU/CUDA/Meta and
//     Autograd implementations are in csrc/ops/<op>.cpp, their Python wrappers in
//     ffn_kernels/ops.py;
//   ffn_kernels_C::<raw> — the raw kernels of the compiled backends (meaning:
//   ffn_kernels/reference.py),
//     implemented per backend in csrc/cpu/ and csrc/cuda/. The Python backends (Triton, reference)
//     implement the same schemas as ffn_kernels_py::<raw> (ffn_kernels/backend.py).
// clips and frames are SymInt: under torch.compile / torch.export they may be traced sizes, which
// the Meta and Autograd kernels carry symbolically; the compiled kernels receive plain int64.
#include <Python.h>
#include <torch/library.h>

#include "ops/dispatch.h"

extern "C" {
// Importing `ffn_kernels._C` from Python runs the static TORCH_LIBRARY registrations below.
PyObject* PyInit__C(void) {
  static struct PyModuleDef module_def = {PyModuleDef_HEAD_INIT, "_C", nullptr, -1, nullptr};
  return PyModule_Create(&module_def);
}
}

TORCH_LIBRARY(ffn_kernels, m) {
  m.def(
      "shift_alter(Tensor x, SymInt clips, SymInt[] frames, int[] rows, Tensor? alter, int "
      "fold_div) -> Tensor");
  m.def(
      "shift_alter_backward(Tensor dy, Tensor x, SymInt clips, SymInt[] frames, int[] rows, "
      "Tensor? alter, int fold_div, bool alter_grad) -> (Tensor, Tensor)");
  m.def(
      "freq_batch_norm(Tensor x, SymInt clips, SymInt[] frames, int[] rows, Tensor weight, "
      "Tensor bias, Tensor? running_mean, Tensor? running_var, bool training, float[] momentum, "
      "float eps, bool relu, Tensor? residual) -> (Tensor, Tensor, Tensor, Tensor, Tensor)");
  m.def(
      "freq_batch_norm_backward(Tensor dy, Tensor x, Tensor y, SymInt clips, SymInt[] frames, "
      "int[] rows, Tensor weight, Tensor mean, Tensor invstd, bool training, bool relu, bool "
      "has_residual) -> (Tensor, Tensor, Tensor, Tensor)");
  m.def(
      "bn_add_relu_shift_alter(Tensor z, Tensor identity, SymInt clips, SymInt[] frames, int[] "
      "rows, Tensor weight, Tensor bias, Tensor? running_mean, Tensor? running_var, bool "
      "training, float[] momentum, float eps, Tensor? alter_next, int fold_div) -> (Tensor, "
      "Tensor, Tensor, Tensor, Tensor, Tensor)");
  m.def(
      "bn_add_relu_shift_alter_backward(Tensor dout, Tensor dnext, Tensor z, Tensor out, SymInt "
      "clips, SymInt[] frames, int[] rows, Tensor weight, Tensor mean, Tensor invstd, bool "
      "training, Tensor? alter_next, int fold_div) -> (Tensor, Tensor, Tensor, Tensor, Tensor)");
}

#define FFN_STR2(x) #x
#define FFN_STR(x) FFN_STR2(x)

namespace {
// What this binary was built with (a mismatch with the running torch is a common install error).
std::string build_info() {
  std::string info = "torch " FFN_STR(FFN_TORCH_VERSION) ", C++ " FFN_STR(__cplusplus);
#if defined(__clang__)
  info += ", clang " __clang_version__;
#elif defined(__GNUC__)
  info += ", gcc " __VERSION__;
#endif
  return info;
}
}  // namespace

TORCH_LIBRARY(ffn_kernels_C, m) {
  m.def("build_info() -> str", &build_info);
  // which route the public ops take per device type (called by ffn_kernels.backend.set_backend)
  m.def("set_python_route(bool cpu, bool cuda) -> ()", &ffn_kernels::ops::set_python_route);
  m.def(
      "shift_alter_fwd(Tensor x, SymInt clips, SymInt[] frames, int[] rows, Tensor? alter, int "
      "fold_div) -> Tensor");
  m.def(
      "shift_alter_bwd(Tensor dy, Tensor x, SymInt clips, SymInt[] frames, int[] rows, Tensor? "
      "alter, int fold_div, bool alter_grad) -> (Tensor, Tensor)");
  m.def(
      "freq_batch_norm_fwd(Tensor x, SymInt clips, SymInt[] frames, int[] rows, Tensor weight, "
      "Tensor bias, Tensor? running_mean, Tensor? running_var, bool training, float[] momentum, "
      "float eps, bool relu, Tensor? residual) -> (Tensor, Tensor, Tensor, Tensor, Tensor)");
  m.def(
      "freq_batch_norm_bwd(Tensor dy, Tensor x, Tensor y, SymInt clips, SymInt[] frames, int[] "
      "rows, Tensor weight, Tensor mean, Tensor invstd, bool training, bool relu, bool "
      "has_residual) -> (Tensor, Tensor, Tensor, Tensor)");
  m.def(
      "bn_add_relu_shift_alter_fwd(Tensor z, Tensor identity, SymInt clips, SymInt[] frames, "
      "int[] rows, Tensor weight, Tensor bias, Tensor? running_mean, Tensor? running_var, bool "
      "training, float[] momentum, float eps, Tensor? alter_next, int fold_div) -> (Tensor, "
      "Tensor, Tensor, Tensor, Tensor, Tensor)");
  m.def(
      "bn_add_relu_shift_alter_bwd(Tensor dout, Tensor dnext, Tensor z, Tensor out, SymInt "
      "clips, SymInt[] frames, int[] rows, Tensor weight, Tensor mean, Tensor invstd, bool "
      "training, Tensor? alter_next, int fold_div) -> (Tensor, Tensor, Tensor, Tensor, Tensor)");
}
