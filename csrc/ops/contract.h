// What every op's contract header (csrc/ops/<op>.h) builds on (docs/design.md §4.1): the C++ types
// of the schemas, the kernel type derived from an entry's signature, and the registration of a
// backend's kernels, which fails to compile when a kernel's signature differs from its contract.
//
// An op's contract header declares, once, the signature of each of its two entries, `Fwd` and
// `Bwd`, with SymInt where the schema has SymInt: that is the type of the public op and of its
// Meta and Autograd kernels. A backend's kernel takes plain integers instead (Kernel<Sig>): the
// compiled kernels only ever see concrete sizes, and the dispatcher converts them.
#pragma once

#include <ATen/core/Tensor.h>
#include <c10/core/SymInt.h>
#include <torch/library.h>

#include <cstdint>
#include <optional>
#include <tuple>
#include <type_traits>

namespace ffn_kernels {

using at::IntArrayRef;
using at::Tensor;
using c10::SymInt;
using c10::SymIntArrayRef;
using Floats = at::ArrayRef<double>;
using OptTensor = std::optional<Tensor>;

namespace contract_detail {
template <class T>
struct Concrete {
  using type = T;
};
template <>
struct Concrete<SymInt> {
  using type = int64_t;
};
template <>
struct Concrete<SymIntArrayRef> {
  using type = IntArrayRef;
};
template <class Sig>
struct KernelOf;
template <class R, class... A>
struct KernelOf<R(A...)> {
  using type = R(typename Concrete<A>::type...);
};
}  // namespace contract_detail

// The type of a backend kernel of the entry with signature Sig: SymInt -> int64_t,
// SymInt[] -> int[].
template <class Sig>
using Kernel = typename contract_detail::KernelOf<Sig>::type;

// `fn` if it has exactly the kernel type of Sig; a compile error otherwise.
template <class Sig, class F>
constexpr F* checked_kernel(F* fn) {
  static_assert(std::is_same_v<F, Kernel<Sig>>,
                "this kernel's signature differs from its op's contract (csrc/ops/<op>.h)");
  return fn;
}

}  // namespace ffn_kernels

// Registers one backend's kernels of op `op` (the raw ops ffn_kernels::<op>_fwd and <op>_bwd) for
// dispatch key `key`. `fwd` and `bwd` must have the types Kernel<op::Fwd> and Kernel<op::Bwd>.
#define FFN_REGISTER_KERNELS(op, key, fwd, bwd)                                        \
  TORCH_LIBRARY_IMPL(ffn_kernels, key, m) {                                            \
    m.impl(#op "_fwd", ::ffn_kernels::checked_kernel<::ffn_kernels::op::Fwd>(&fwd));   \
    m.impl(#op "_bwd", ::ffn_kernels::checked_kernel<::ffn_kernels::op::Bwd>(&bwd));   \
  }
