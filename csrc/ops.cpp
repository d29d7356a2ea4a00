// Schema of the raw kernels every compiled backend implements (see ffn_kernels/reference.py for
// their meaning). The public, differentiable ops `ffn_kernels::*` are defined in Python
// (ffn_kernels/ops.py) and call these per backend; CPU and CUDA implementations register against
// this one schema from csrc/cpu/ and csrc/cuda/.
#include <Python.h>
#include <torch/library.h>

extern "C" {
// Importing `ffn_kernels._C` from Python runs the static TORCH_LIBRARY registrations below.
PyObject* PyInit__C(void) {
  static struct PyModuleDef module_def = {PyModuleDef_HEAD_INIT, "_C", nullptr, -1, nullptr};
  return PyModule_Create(&module_def);
}
}

TORCH_LIBRARY(ffn_kernels_C, m) {
  m.def(
      "shift_alter_fwd(Tensor x, int clips, int[] frames, int[] rows, Tensor? alter, "
      "int fold_div) -> Tensor");
  m.def(
      "shift_alter_bwd(Tensor dy, Tensor x, int clips, int[] frames, int[] rows, Tensor? alter, "
      "int fold_div, bool alter_grad) -> (Tensor, Tensor)");
  m.def(
      "bn_fwd(Tensor x, int clips, int[] frames, int[] rows, Tensor weight, Tensor bias, "
      "Tensor? running_mean, Tensor? running_var, bool training, float[] momentum, float eps, "
      "bool relu, Tensor? residual) -> (Tensor, Tensor, Tensor, Tensor, Tensor)");
  m.def(
      "bn_bwd(Tensor dy, Tensor x, Tensor y, int clips, int[] frames, int[] rows, Tensor weight, "
      "Tensor mean, Tensor invstd, bool training, bool relu, bool has_residual) "
      "-> (Tensor, Tensor, Tensor, Tensor)");
  m.def(
      "bnrs_fwd(Tensor z, Tensor identity, int clips, int[] frames, int[] rows, Tensor weight, "
      "Tensor bias, Tensor? running_mean, Tensor? running_var, bool training, float[] momentum, "
      "float eps, Tensor? alter_next, int fold_div) "
      "-> (Tensor, Tensor, Tensor, Tensor, Tensor, Tensor)");
  m.def(
      "bnrs_bwd(Tensor dout, Tensor dnext, Tensor z, Tensor out, int clips, int[] frames, "
      "int[] rows, Tensor weight, Tensor mean, Tensor invstd, bool training, Tensor? alter_next, "
      "int fold_div) -> (Tensor, Tensor, Tensor, Tensor, Tensor)");
}
