// Shared pieces of the CUDA kernels: the segment table passed by value to every kernel, the
// per-frame elementwise driver, the per-channel split reduction (Welford or plain sums) with its
// partials buffer, and small vector load/store helpers.
//
// Index scheme used everywhere: a 4-D activation [F, C, H, W] is F frames of `chw = C*H*W`
// contiguous elements in both memory formats (NCHW: offset c*HW + p inside the frame; channels_last:
// p*C + c). Frame offsets are int64 (f * chw); offsets inside one frame are int32 (checked on the
// host), so tensors of any numel are addressed correctly without 64-bit divisions per element.
#pragma once

#include <ATen/ATen.h>
#include <ATen/OpMathType.h>
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>

#include <cstdint>
#include <vector>

#include "conventions.h"
#include "ffn_math.h"

namespace ffn_kernels {
namespace cuda {

using OptTensor = c10::optional<at::Tensor>;

constexpr int kMaxSegments = 64;
constexpr int kThreads = 256;  // every kernel here runs 256-thread blocks

// The packed layout (docs/design.md §2) as kernel arguments: a few hundred bytes, passed by value.
struct FrameLayout {
  int n;                                // number of segments S
  int frames_per_chunk;                 // reduction chunk size in frames (split reductions)
  int64_t start[kMaxSegments + 1];      // first frame of segment s; start[n] = F
  int frames[kMaxSegments];             // frames per clip T_s
  int row[kMaxSegments];                // parameter row p_s
  int chunk_start[kMaxSegments + 1];    // first reduction chunk of segment s
  double momentum[kMaxSegments];        // running-stat momentum of segment s
};

// Frame geometry of one activation tensor.
struct Geom {
  int64_t frames;      // F
  int C;
  int HW;
  int chw;             // elements per frame (<= INT32_MAX, checked)
  int fold;            // C / fold_div (shift ops only)
  bool channels_last;
};

// Where frame f sits: its segment, parameter row, position t in its clip of T frames.
struct FramePos {
  int s, row, t, T;
};

__device__ __forceinline__ FramePos frame_pos(const FrameLayout& seg, int64_t f) {
  int s = 0;
  while (s + 1 < seg.n && f >= seg.start[s + 1]) ++s;
  const int T = seg.frames[s];
  return {s, seg.row[s], static_cast<int>((f - seg.start[s]) % T), T};
}

// Frame delta of the shifted source of channel c (see ffn_math.h), or kNoSource (zero fill).
__device__ __forceinline__ int src_delta(const Geom& g, const FramePos& fp, int c, bool reverse) {
  return ffn::shift_source_delta(c, g.fold, fp.t, fp.T, reverse);
}

// ---------------------------------------------------------------------------------------------
// Vector access: V elements of scalar_t, 16-byte aligned when V*sizeof(scalar_t) == 16.
// ---------------------------------------------------------------------------------------------

template <typename scalar_t, int V>
struct alignas(sizeof(scalar_t) * V) Vec {
  scalar_t v[V];
};

template <int V, typename scalar_t, typename acc_t>
__device__ __forceinline__ void load_vec(const scalar_t* p, acc_t (&out)[V]) {
  const Vec<scalar_t, V> r = *reinterpret_cast<const Vec<scalar_t, V>*>(p);
#pragma unroll
  for (int k = 0; k < V; ++k) out[k] = static_cast<acc_t>(r.v[k]);
}

template <int V, typename scalar_t, typename acc_t>
__device__ __forceinline__ void store_vec(scalar_t* p, const acc_t (&in)[V]) {
  Vec<scalar_t, V> r;
#pragma unroll
  for (int k = 0; k < V; ++k) r.v[k] = static_cast<scalar_t>(in[k]);
  *reinterpret_cast<Vec<scalar_t, V>*>(p) = r;
}

// Channel of each of the V elements starting at in-frame offset j (they may span channels).
template <int V>
__device__ __forceinline__ void channels_of(const Geom& g, int j, int (&c)[V]) {
  if (g.channels_last) {
    int ch = j % g.C;
#pragma unroll
    for (int k = 0; k < V; ++k) {
      c[k] = ch;
      if (++ch == g.C) ch = 0;
    }
  } else {
    int ch = j / g.HW, p = j - ch * g.HW;
#pragma unroll
    for (int k = 0; k < V; ++k) {
      c[k] = ch;
      if (++p == g.HW) p = 0, ++ch;
    }
  }
}

// Frame deltas of the shifted sources of V elements; true when they are all the same valid delta
// (then one vector access at off + d*chw serves all of them).
template <int V>
__device__ __forceinline__ bool src_deltas(const Geom& g, const FramePos& fp, const int (&c)[V],
                                           bool reverse, int (&d)[V]) {
  bool uniform = true;
#pragma unroll
  for (int k = 0; k < V; ++k) {
    d[k] = src_delta(g, fp, c[k], reverse);
    uniform = uniform && d[k] == d[0];
  }
  return uniform && d[0] != ffn::kNoSource;
}

// Loads the V shifted-source values of the elements at frame offset `off` (zero where the source
// frame is outside the clip).
template <int V, typename scalar_t, typename acc_t>
__device__ __forceinline__ void load_shifted(const scalar_t* base, int64_t off, const Geom& g,
                                             const FramePos& fp, const int (&c)[V], bool reverse,
                                             acc_t (&out)[V]) {
  int d[V];
  if (src_deltas<V>(g, fp, c, reverse, d)) {
    load_vec<V>(base + off + static_cast<int64_t>(d[0]) * g.chw, out);
    return;
  }
#pragma unroll
  for (int k = 0; k < V; ++k)
    out[k] = d[k] == ffn::kNoSource
                 ? acc_t(0)
                 : static_cast<acc_t>(base[off + k + static_cast<int64_t>(d[k]) * g.chw]);
}

// (1 + alter[row, c]) rounded to the storage dtype, as the reference multiplies in that dtype.
template <typename scalar_t, typename acc_t>
__device__ __forceinline__ acc_t alter_factor(const acc_t* alter, int row, int C, int c) {
  if (alter == nullptr) return acc_t(1);
  return static_cast<acc_t>(static_cast<scalar_t>(acc_t(1) + alter[static_cast<int64_t>(row) * C + c]));
}

// ---------------------------------------------------------------------------------------------
// Elementwise driver: blockIdx.y walks frames (one segment lookup per frame), blockIdx.x/threads
// walk the frame's chw elements V at a time; `op.template apply<V>(seg, g, fp, off, c)` handles
// the V elements at offset `off` whose channels are c[0..V).
// ---------------------------------------------------------------------------------------------

template <int V, typename Op>
__global__ void __launch_bounds__(kThreads)
    frame_map_kernel(const Op op, const FrameLayout seg, const Geom g) {
  for (int64_t f = blockIdx.y; f < g.frames; f += gridDim.y) {
    const FramePos fp = frame_pos(seg, f);
    const int64_t base = f * g.chw;
    for (int64_t j = (static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x) * V; j < g.chw;
         j += static_cast<int64_t>(gridDim.x) * blockDim.x * V) {
      int c[V];
      channels_of<V>(g, static_cast<int>(j), c);
      op.template apply<V>(seg, g, fp, base + j, c);
    }
  }
}

// Whether 16-byte vectors fit: every frame a multiple of V elements, every pointer aligned.
template <typename scalar_t>
inline bool can_vectorize(const Geom& g, std::initializer_list<const at::Tensor*> tensors) {
  constexpr int V = 16 / sizeof(scalar_t);
  if (g.chw % V != 0) return false;
  for (const at::Tensor* t : tensors)
    if (t->defined() && t->numel() > 0 &&
        reinterpret_cast<uintptr_t>(t->data_ptr()) % 16 != 0)
      return false;
  return true;
}

template <typename scalar_t, typename Op>
void launch_frame_map(const Op& op, const FrameLayout& seg, const Geom& g, bool vectorize) {
  if (g.frames == 0 || g.chw == 0) return;
  constexpr int V = 16 / sizeof(scalar_t);
  const int v = vectorize ? V : 1;
  const int64_t blocks_x = std::min<int64_t>((g.chw / v + kThreads - 1) / kThreads, 1 << 16);
  const dim3 grid(static_cast<unsigned>(blocks_x),
                  static_cast<unsigned>(std::min<int64_t>(g.frames, 65535)));
  auto stream = at::cuda::getCurrentCUDAStream();
  if (vectorize) {
    frame_map_kernel<V><<<grid, kThreads, 0, stream>>>(op, seg, g);
  } else {
    frame_map_kernel<1><<<grid, kThreads, 0, stream>>>(op, seg, g);
  }
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

// ---------------------------------------------------------------------------------------------
// Accumulators of the per-channel reductions.
// ---------------------------------------------------------------------------------------------

template <typename T>
__device__ __forceinline__ T shfl_down(T v, int off) {
  return __shfl_down_sync(0xffffffffu, v, off);
}

// Welford state (an int64 count, as every backend keeps it: docs/design.md §3.2).
template <typename acc_t>
struct WelfordAcc {
  static constexpr int kFields = 2;  // partials store mean and m2; counts are implied by chunks
  ffn::Welford<acc_t> w;

  __device__ __forceinline__ void merge(const WelfordAcc& o) { w = ffn::welford_merge(w, o.w); }
  __device__ __forceinline__ WelfordAcc shfl(int off) const {
    WelfordAcc r;
    r.w.mean = shfl_down(w.mean, off);
    r.w.m2 = shfl_down(w.m2, off);
    r.w.n = shfl_down(w.n, off);
    return r;
  }
  __device__ __forceinline__ acc_t field(int i) const { return i == 0 ? w.mean : w.m2; }
};

// N plain sums (BN backward: sum_dy, sum_dy_xmu, and the WA gradient sum).
template <typename acc_t, int N>
struct SumAcc {
  static constexpr int kFields = N;
  acc_t v[N];

  __device__ __forceinline__ void merge(const SumAcc& o) {
#pragma unroll
    for (int i = 0; i < N; ++i) v[i] += o.v[i];
  }
  __device__ __forceinline__ SumAcc shfl(int off) const {
    SumAcc r;
#pragma unroll
    for (int i = 0; i < N; ++i) r.v[i] = shfl_down(v[i], off);
    return r;
  }
  __device__ __forceinline__ acc_t field(int i) const { return v[i]; }
};

// Reduces `a` over the threads of a block that share a column (column = linear thread id % cols,
// cols a power of two <= 32): warp shuffles, then the warps' results in order through shared
// memory. The order is fixed, so results are deterministic. True in the thread (warp 0, lane <
// cols) that holds a column's total.
template <typename Acc>
__device__ __forceinline__ bool block_reduce_columns(Acc& a, int cols, Acc* smem) {
  const int tid = threadIdx.x + threadIdx.y * blockDim.x;
  const int lane = tid & 31, warp = tid >> 5;
  const int warps = (blockDim.x * blockDim.y) >> 5;
  for (int off = 16; off >= cols; off >>= 1) a.merge(a.shfl(off));
  if (lane < cols) smem[warp * cols + lane] = a;
  __syncthreads();
  if (warp != 0 || lane >= cols) return false;
  a = smem[lane];
  for (int w = 1; w < warps; ++w) a.merge(smem[w * cols + lane]);
  return true;
}

// ---------------------------------------------------------------------------------------------
// Split per-(segment, channel) reduction. Chunk k (blockIdx.y) covers frames of one segment;
// NCHW blocks reduce one channel (blockIdx.x) over frames (threadIdx.y) x pixels (threadIdx.x);
// channels_last blocks reduce blockDim.x consecutive channels over pixels (threadIdx.y). Each
// block writes its result to partials[field][k][c]. The visitor gives the accumulator type, a
// per-(frame, channel) context (`local`) and the per-element update (`visit`, which may also
// write an output element: the fused shift backward does).
// ---------------------------------------------------------------------------------------------

struct Chunk {
  int s;
  int64_t f0, f1;  // frames [f0, f1)
};

__device__ __forceinline__ Chunk chunk_of(const FrameLayout& seg, int k) {
  int s = 0;
  while (s + 1 < seg.n && k >= seg.chunk_start[s + 1]) ++s;
  const int64_t f0 = seg.start[s] + static_cast<int64_t>(k - seg.chunk_start[s]) * seg.frames_per_chunk;
  return {s, f0, min(f0 + seg.frames_per_chunk, seg.start[s + 1])};
}

template <typename Visitor>
__global__ void __launch_bounds__(kThreads)
    reduce_nchw_kernel(const Visitor vis, const FrameLayout seg, const Geom g,
                       typename Visitor::acc_t* partials, int num_chunks) {
  using Acc = typename Visitor::Acc;
  __shared__ __align__(16) unsigned char smem_raw[sizeof(Acc) * (kThreads / 32)];
  Acc* smem = reinterpret_cast<Acc*>(smem_raw);
  const int c = blockIdx.x;
  const int k = blockIdx.y;
  const Chunk ch = chunk_of(seg, k);
  Acc acc = Visitor::identity();
  for (int64_t f = ch.f0 + threadIdx.y; f < ch.f1; f += blockDim.y) {
    const FramePos fp{ch.s, seg.row[ch.s], static_cast<int>((f - seg.start[ch.s]) % seg.frames[ch.s]),
                      seg.frames[ch.s]};
    const auto loc = vis.local(g, fp, c);
    const int64_t base = f * g.chw + static_cast<int64_t>(c) * g.HW;
    for (int p = threadIdx.x; p < g.HW; p += blockDim.x) vis.visit(acc, loc, base + p);
  }
  if (block_reduce_columns(acc, 1, smem)) {
#pragma unroll
    for (int i = 0; i < Acc::kFields; ++i)
      partials[(static_cast<int64_t>(i) * num_chunks + k) * g.C + c] = acc.field(i);
  }
}

template <typename Visitor>
__global__ void __launch_bounds__(kThreads)
    reduce_channels_last_kernel(const Visitor vis, const FrameLayout seg, const Geom g,
                                typename Visitor::acc_t* partials, int num_chunks) {
  using Acc = typename Visitor::Acc;
  __shared__ __align__(16) unsigned char smem_raw[sizeof(Acc) * kThreads];  // warps*cols <= kThreads
  Acc* smem = reinterpret_cast<Acc*>(smem_raw);
  const int c = blockIdx.x * blockDim.x + threadIdx.x;
  const int k = blockIdx.y;
  const Chunk ch = chunk_of(seg, k);
  Acc acc = Visitor::identity();
  if (c < g.C) {
    for (int64_t f = ch.f0; f < ch.f1; ++f) {
      const FramePos fp{ch.s, seg.row[ch.s],
                        static_cast<int>((f - seg.start[ch.s]) % seg.frames[ch.s]), seg.frames[ch.s]};
      const auto loc = vis.local(g, fp, c);
      const int64_t base = f * g.chw + c;
      for (int p = threadIdx.y; p < g.HW; p += blockDim.y)
        vis.visit(acc, loc, base + static_cast<int64_t>(p) * g.C);
    }
  }
  if (block_reduce_columns(acc, blockDim.x, smem) && c < g.C) {
#pragma unroll
    for (int i = 0; i < Acc::kFields; ++i)
      partials[(static_cast<int64_t>(i) * num_chunks + k) * g.C + c] = acc.field(i);
  }
}

// Launch plan of a split reduction: block shape, chunking, partials size.
struct ReducePlan {
  dim3 block, grid;
  int num_chunks;
};

// Fills seg.frames_per_chunk / seg.chunk_start and returns the launch shape: enough blocks to fill
// the GPU a few times over, each with at least a few thousand elements.
ReducePlan plan_reduce(FrameLayout& seg, const Geom& g);

template <typename Visitor>
void launch_reduce(const Visitor& vis, const FrameLayout& seg, const Geom& g,
                   const ReducePlan& plan, typename Visitor::acc_t* partials) {
  if (plan.num_chunks == 0 || g.C == 0) return;
  auto stream = at::cuda::getCurrentCUDAStream();
  if (g.channels_last) {
    reduce_channels_last_kernel<<<plan.grid, plan.block, 0, stream>>>(vis, seg, g, partials,
                                                                      plan.num_chunks);
  } else {
    reduce_nchw_kernel<<<plan.grid, plan.block, 0, stream>>>(vis, seg, g, partials, plan.num_chunks);
  }
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

// ---------------------------------------------------------------------------------------------
// Host helpers (common.cu).
// ---------------------------------------------------------------------------------------------

// Checks the layout against x ([F, C, H, W]) and builds the segment table.
FrameLayout make_frame_layout(const at::Tensor& x, int64_t clips, at::IntArrayRef frames,
                              at::IntArrayRef rows);
// Geometry of x (its memory format decides channels_last).
Geom make_geom(const at::Tensor& x, int64_t fold_div = 0);
// `t` in memory format `fmt` (no copy when it already is).
at::Tensor in_format(const at::Tensor& t, at::MemoryFormat fmt, const at::Tensor& x, const char* name);
// A [P, C] parameter in acc dtype, contiguous, on x's device; rows of the layout < P.
at::Tensor param(const c10::optional<at::Tensor>& p, const at::Tensor& x, const FrameLayout& seg,
                 const char* name);

// Statistics pass of freq_batch_norm_fwd / bn_add_relu_shift_alter_fwd: per-segment mean/invstd
// ([S, C]) and updated copies of the running statistics (empty when not given).
std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> batch_norm_stats(
    const at::Tensor& x, FrameLayout& seg, const Geom& g,
    const c10::optional<at::Tensor>& running_mean, const c10::optional<at::Tensor>& running_var,
    bool training, at::ArrayRef<double> momentum, double eps);

// Combine of the backward reductions: partials [N, K, C] -> per-segment sums [N, S, C], each
// chunk added in a fixed order (deterministic, no atomics).
at::Tensor combine_sums(const at::Tensor& partials, const FrameLayout& seg, const Geom& g);

// A parameter gradient [P, C]: out[p] = sum of seg_sums[field][s] (times invstd[s] when
// `times_invstd`) over the segments s with row p, added in segment order (deterministic); a row
// used by several segments (eval, or no running statistics) gets the sum of their gradients, as
// autograd, the reference and the CPU kernels do; rows not in the layout get 0.
struct RowGrad {
  int field;
  bool times_invstd;
  at::Tensor out;
};
void row_grads(const at::Tensor& seg_sums, const FrameLayout& seg, const Geom& g,
               const at::Tensor& invstd, const std::vector<RowGrad>& grads);

}  // namespace cuda
}  // namespace ffn_kernels
