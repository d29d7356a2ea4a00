// The extension module ffn_kernels._C and its one operator library, ffn_kernels (docs/design.md
// §4.1). Each op defines its own part of the library in csrc/ops/<op>.cpp (schemas, dispatch,
// autograd; signatures in csrc/ops/<op>.h); each backend registers its kernels in
// csrc/cpu/<op>.cpp and csrc/cuda/<op>.cu, and ffn_kernels/backend.py the Python ones (Triton,
// reference). This file holds what is not an op's: the module's entry point and build_info.
#include <Python.h>
#include <torch/library.h>

#include <string>

extern "C" {
// Importing `ffn_kernels._C` from Python runs the static registrations of every file.
PyObject* PyInit__C(void) {
  static struct PyModuleDef module_def = {PyModuleDef_HEAD_INIT, "_C", nullptr, -1, nullptr};
  return PyModule_Create(&module_def);
}
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

TORCH_LIBRARY(ffn_kernels, m) { m.def("build_info() -> str", &build_info); }
