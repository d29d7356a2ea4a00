// The CPU kernels compiled for AVX2 + FMA (docs/design.md §4.4): every csrc/cpu/<op>.cpp again,
// in namespace ffn_kernels::cpu::avx2. csrc/cpu/isa.cpp registers them when the CPU has both.
//
// Everything from outside csrc/cpu is included first, for the baseline: a header's inline
// functions and templates keep one compiled form across the library (an AVX2 copy the linker
// could pick for baseline callers would fault on a CPU without AVX2). Baseline functions still
// inline into the AVX2 code, whose element loops are the ones GCC vectorizes 8 wide.
#define FFN_CPU_ISA avx2
#include "cpu/isa.h"

#if FFN_CPU_HAS_AVX2_BUILD
#include <ATen/ATen.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <memory>
#include <type_traits>
#include <utility>
#include <vector>

#include <emmintrin.h>

#include "conventions.h"
#include "ffn_math.h"
#include "ops/bn_add_relu_shift_alter.h"
#include "ops/freq_batch_norm.h"
#include "ops/freq_layer_norm.h"
#include "ops/shift_alter.h"
#include "ops/temporal_conv.h"

#pragma GCC target("avx2,fma")
#include "cpu/bn_add_relu_shift_alter.cpp"
#include "cpu/freq_batch_norm.cpp"
#include "cpu/freq_layer_norm.cpp"
#include "cpu/shift_alter.cpp"
#include "cpu/temporal_conv.cpp"
#endif
