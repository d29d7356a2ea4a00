// Registers the CPU kernels of the best instruction set this CPU runs (docs/design.md §4.4):
// AVX2 + FMA where the CPU has both (csrc/cpu/isa_avx2.cpp), else the baseline build. The choice
// is made once, when the extension loads; FFN_KERNELS_CPU_ISA=baseline forces the baseline, as
// FFN_KERNELS_CPU_STREAM=never turns the streaming stores off (the Python package checks both
// variables' values before it loads the extension).
#include <cstdlib>
#include <string>

#include "cpu/isa.h"
#include "ops/bn_add_relu_shift_alter.h"
#include "ops/freq_batch_norm.h"
#include "ops/freq_layer_norm.h"
#include "ops/shift_alter.h"
#include "ops/temporal_conv.h"

#define FFN_CPU_OPS(X)   \
  X(shift_alter)             \
  X(freq_batch_norm)         \
  X(bn_add_relu_shift_alter) \
  X(temporal_conv)           \
  X(freq_layer_norm)

namespace ffn_kernels {
namespace cpu {

#define FFN_DECLARE_TABLE(op) \
  extern const KernelPair<::ffn_kernels::op::Fwd, ::ffn_kernels::op::Bwd> op##_kernels;
namespace baseline {
FFN_CPU_OPS(FFN_DECLARE_TABLE)
}
#if FFN_CPU_HAS_AVX2_BUILD
namespace avx2 {
FFN_CPU_OPS(FFN_DECLARE_TABLE)
}
#endif

namespace {

bool cpu_has_avx2() {
#if FFN_CPU_HAS_AVX2_BUILD
  __builtin_cpu_init();  // (runs before libgcc's own initialiser may have)
  return __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma");
#else
  return false;
#endif
}

// "avx2" or "baseline": the best the CPU runs, unless FFN_KERNELS_CPU_ISA=baseline.
const std::string& chosen_isa() {
  static const std::string isa = [] {
    const char* env = std::getenv("FFN_KERNELS_CPU_ISA");
    const bool forced_baseline = env != nullptr && std::string(env) == "baseline";
    return std::string(cpu_has_avx2() && !forced_baseline ? "avx2" : "baseline");
  }();
  return isa;
}

std::string cpu_isa() { return chosen_isa(); }

}  // namespace

bool streaming_stores() {
  static const bool on = [] {
    const char* env = std::getenv("FFN_KERNELS_CPU_STREAM");
    return env == nullptr || std::string(env) != "never";
  }();
  return on;
}

namespace {

template <class Fwd, class Bwd>
void register_op(torch::Library& m, const char* fwd_name, const char* bwd_name,
                 const KernelPair<Fwd, Bwd>& baseline_kernels,
                 const KernelPair<Fwd, Bwd>* avx2_kernels) {
  const KernelPair<Fwd, Bwd>& k =
      chosen_isa() == "avx2" && avx2_kernels != nullptr ? *avx2_kernels : baseline_kernels;
  m.impl(fwd_name, k.fwd);
  m.impl(bwd_name, k.bwd);
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(ffn_kernels, m) { m.def("cpu_isa() -> str", &cpu_isa); }

TORCH_LIBRARY_IMPL(ffn_kernels, CPU, m) {
#if FFN_CPU_HAS_AVX2_BUILD
#define FFN_REGISTER_CPU_OP(op) \
  register_op(m, #op "_fwd", #op "_bwd", baseline::op##_kernels, &avx2::op##_kernels);
#else
#define FFN_REGISTER_CPU_OP(op) \
  register_op(m, #op "_fwd", #op "_bwd", baseline::op##_kernels, nullptr);
#endif
  FFN_CPU_OPS(FFN_REGISTER_CPU_OP)
#undef FFN_REGISTER_CPU_OP
}

}  // namespace cpu
}  // namespace ffn_kernels
