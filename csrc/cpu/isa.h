// The CPU kernels per instruction set (docs/design.md §4.4). Every csrc/cpu/<op>.cpp is compiled
// twice: as itself, for baseline x86-64 (or the machine's default elsewhere), and inside
// csrc/cpu/isa_avx2.cpp for AVX2 + FMA. Each copy lives in its own namespace,
// ffn_kernels::cpu::FFN_CPU_ISA (an inline namespace, so the code names nothing differently), so
// that the two builds of a template are two symbols; and each copy only publishes its kernels as
// a table (FFN_CPU_KERNELS). csrc/cpu/isa.cpp registers the table of the best instruction set the
// CPU has, once, when the extension loads.
#pragma once

#include "ops/contract.h"

#ifndef FFN_CPU_ISA
#define FFN_CPU_ISA baseline
#endif

// Whether this build has the AVX2 copy (isa_avx2.cpp compiles to nothing elsewhere).
#if defined(__x86_64__) && defined(__GNUC__)
#define FFN_CPU_HAS_AVX2_BUILD 1
#else
#define FFN_CPU_HAS_AVX2_BUILD 0
#endif

namespace ffn_kernels {
namespace cpu {

// Whether the kernels may stream their outputs (common.h, kStreamLaterBytes): unless
// FFN_KERNELS_CPU_STREAM=never, read once (isa.cpp).
bool streaming_stores();

// An op's two CPU kernels, with the types of its contract (csrc/ops/<op>.h).
template <class Fwd, class Bwd>
struct KernelPair {
  Kernel<Fwd>* fwd;
  Kernel<Bwd>* bwd;
};

}  // namespace cpu
}  // namespace ffn_kernels

// Publishes op `op`'s kernels of this instruction set as ffn_kernels::cpu::<isa>::<op>_kernels
// (constant-initialized: no code of a non-baseline build runs before the CPU was checked). Used
// inside namespace ffn_kernels::cpu::FFN_CPU_ISA; fails to compile if a signature differs from
// the contract.
#define FFN_CPU_KERNELS(op, fwd, bwd)                                                        \
  extern const ::ffn_kernels::cpu::KernelPair<::ffn_kernels::op::Fwd, ::ffn_kernels::op::Bwd> \
      op##_kernels;                                                                          \
  const ::ffn_kernels::cpu::KernelPair<::ffn_kernels::op::Fwd, ::ffn_kernels::op::Bwd>       \
      op##_kernels{::ffn_kernels::checked_kernel<::ffn_kernels::op::Fwd>(&fwd),              \
                   ::ffn_kernels::checked_kernel<::ffn_kernels::op::Bwd>(&bwd)};
