// Shared pieces of the CPU kernels: the packed layout as a per-frame table, the traversal of a
// 4-D activation in fixed chunks of contiguous runs (both memory formats), and deterministic
// per-(segment, channel) reductions over those chunks.
//
// Memory: an activation [F, C, H, W] is F frames of chw = C*H*W contiguous elements in both
// formats (NCHW: c*HW + p inside a frame; channels_last: p*C + c), so the TSM source of an element
// is the same in-frame offset `delta` frames away.
//
// Chunks (fixed by the shape only, so results do not depend on the thread count):
//   NCHW:          chunk (f, q) = `planes` consecutive channel planes of HW elements (one plane
//                  from 1024 elements up; smaller planes are grouped to amortise the chunk);
//   channels_last: chunk (f, b) = a block of `block` pixels of frame f, all channels.
// A chunk is walked as runs of contiguous elements that share a frame and a TSM shift class:
//   NCHW: pieces of the plane (channel c0 for every element);
//   channels_last: per pixel, the channel ranges [0, fold), [fold, 2*fold), [2*fold, C)
//                  (element i has channel c0 + i).
// Kernels write their element loops once as generic lambdas taking `channels_last` (std::true_type
// for channels_last) and index per-channel arrays with ch<kChannelsLast>(i).
#pragma once

#include <ATen/ATen.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>

#include <algorithm>
#include <cstdint>
#include <memory>
#include <type_traits>
#include <utility>
#include <vector>

#if defined(__SSE2__)
#include <emmintrin.h>
#endif

#include "conventions.h"
#include "cpu/isa.h"
#include "ffn_math.h"

// Before an element loop over a run: its iterations are independent (outputs, and accumulator
// slot i, are distinct from every input), which GCC cannot prove once the run's pointers come
// through lambda captures; past ~10 pointer pairs it stops checking aliasing at run time and
// leaves the loop scalar (the channels_last block backward was: 0.45 of a copy's bandwidth).
// _Pragma, as the loops sit inside AT_DISPATCH macro arguments. Not on the temporal conv's loops,
// which GCC vectorizes without it and ran 8% slower with it.
#define FFN_IVDEP _Pragma("GCC ivdep")

namespace ffn_kernels {
namespace cpu {
inline namespace FFN_CPU_ISA {

using at::Tensor;

template <bool kChannelsLast>
inline int64_t ch(int64_t i) {
  return kChannelsLast ? i : 0;
}

// Position of frame f in the layout: segment s (parameter row `row`), frame t of a T-frame clip.
struct FrameInfo {
  int64_t s, row;
  int t, T;
};

struct FrameLayout {
  int64_t S;                      // segments
  std::vector<int64_t> start;     // first frame of every segment, plus the end (S + 1 entries)
  std::vector<int64_t> rows;      // parameter row of every segment
  std::vector<FrameInfo> frame;   // per frame
};

inline FrameLayout make_frame_layout(int64_t num_frames, int64_t clips, at::IntArrayRef frames,
                                     at::IntArrayRef rows, int64_t num_rows) {
  const int64_t S = static_cast<int64_t>(frames.size());
  TORCH_CHECK(S >= 1 && static_cast<int64_t>(rows.size()) == S, "layout: ", S, " frame counts and ",
              rows.size(), " rows");
  TORCH_CHECK(clips >= 1, "layout: clips must be >= 1, got ", clips);
  FrameLayout L{S, {0}, rows.vec(), {}};
  L.frame.reserve(num_frames);
  for (int64_t s = 0; s < S; ++s) {
    const int64_t T = frames[s];
    TORCH_CHECK(T >= 1 && T <= INT32_MAX, "layout: bad frame count ", T);
    TORCH_CHECK(rows[s] >= 0 && rows[s] < num_rows, "layout: row ", rows[s], " of segment ", s,
                " is outside the ", num_rows, " parameter rows");
    for (int64_t i = 0; i < clips * T; ++i)
      L.frame.push_back({s, rows[s], static_cast<int>(i % T), static_cast<int>(T)});
    L.start.push_back(L.start.back() + clips * T);
  }
  TORCH_CHECK(L.start.back() == num_frames, "layout holds ", L.start.back(),
              " frames but the tensor has ", num_frames);
  return L;
}

// NCHW reductions accumulate a plane into kLanes independent lanes (vectorizable, fixed order).
constexpr int64_t kLanes = 64;
constexpr int64_t kGroupElems = 1024;

struct Geom {
  int64_t F, C, HW, chw;
  bool channels_last;       // walked as channels_last (that format, or 1x1 frames in either)
  int fold;                 // TSM fold (0 for ops without a shift: one run per pixel)
  int64_t block;            // channels_last: pixels per chunk
  int64_t planes;           // NCHW: channel planes per chunk
  int64_t chunks;           // chunks per frame
  int64_t piece[4];         // channels_last run boundaries: 0, fold, 2*fold, C (clamped)
  at::MemoryFormat format;  // of every activation of the op, and of its outputs
};

// Geometry of x; `fold_div` 0 means no shift. x must be NCHW or channels_last contiguous (a
// tensor that is both, e.g. C == 1, is treated as NCHW, as the reference does).
inline Geom make_geom(const Tensor& x, int64_t fold_div) {
  TORCH_CHECK(x.dim() == 4, "expected a 4-D activation, got ", x.sizes());
  TORCH_CHECK(x.device().is_cpu(), "CPU kernel got a tensor on ", x.device());
  // (the chunk arithmetic below divides by C and H*W)
  TORCH_CHECK_VALUE(x.size(1) >= 1 && x.size(2) * x.size(3) >= 1,
                    "expected at least one channel and one pixel, got ", x.sizes());
  TORCH_CHECK(fold_div == 0 || fold_div >= 2, "fold_div must be >= 2, got ", fold_div);
  Geom g;
  g.F = x.size(0);
  g.C = x.size(1);
  g.HW = x.size(2) * x.size(3);
  g.chw = g.C * g.HW;
  g.format = format_of(x);
  const bool channels_last = g.format == at::MemoryFormat::ChannelsLast;
  TORCH_CHECK(x.is_contiguous(g.format), "activations must be NCHW or channels_last contiguous");
  // 1x1 frames are the same memory in both formats; walked as channels_last a frame is three runs
  // instead of C one-element planes (and the sums are the same: one element per channel and frame)
  g.channels_last = channels_last || g.HW == 1;
  TORCH_CHECK(g.C <= INT32_MAX, "too many channels: ", g.C);
  g.fold = fold_div ? static_cast<int>(g.C / fold_div) : 0;
  // ~64K elements per channels_last chunk: big enough to amortise the per-chunk partials (at 16K a
  // C = 2048 chunk was 8 pixels, and its partials cost as much as its elements), small enough that
  // the second statistics pass re-reads it from L2 (docs/design.md §4.4).
  g.block = std::max<int64_t>(1, (int64_t(1) << 16) / std::max<int64_t>(1, g.C));
  // NCHW planes smaller than kGroupElems share a chunk of about that size (a 2x2 plane alone is 4
  // elements: a chunk per plane costs more than its work)
  g.planes = std::clamp<int64_t>((kGroupElems + g.HW - 1) / std::max<int64_t>(1, g.HW), 1, g.C);
  g.chunks = g.channels_last ? (g.HW + g.block - 1) / g.block : (g.C + g.planes - 1) / g.planes;
  g.piece[0] = 0;
  g.piece[1] = std::min<int64_t>(g.fold, g.C);
  g.piece[2] = std::min<int64_t>(2 * g.fold, g.C);
  g.piece[3] = g.C;
  return g;
}

// Checks that an activation matches x's shape, dtype and memory format (the Python layer converts).
inline void check_activation(const Tensor& t, const Tensor& x, const Geom& g, const char* name) {
  TORCH_CHECK(t.sizes() == x.sizes(), name, " has shape ", t.sizes(), ", expected ", x.sizes());
  TORCH_CHECK(t.scalar_type() == x.scalar_type(), name, " has dtype ", t.scalar_type(),
              ", expected ", x.scalar_type());
  TORCH_CHECK(t.device() == x.device(), name, " is on ", t.device(), ", expected ", x.device());
  TORCH_CHECK(t.is_contiguous(g.format), name, " is not in the memory format of the input");
}

// A per-parameter-row tensor: [P, C] contiguous in the acc dtype of x.
inline void check_param(const Tensor& t, const Tensor& x, const char* name) {
  TORCH_CHECK(t.dim() == 2 && t.size(1) == x.size(1) && t.is_contiguous(), name,
              " must be a contiguous [P, C=", x.size(1), "] tensor, got ", t.sizes());
  TORCH_CHECK(t.scalar_type() == acc_type(x), name, " has dtype ", t.scalar_type(), ", expected ",
              acc_type(x));
  TORCH_CHECK(t.device() == x.device(), name, " is on ", t.device(), ", expected ", x.device());
}

inline Tensor empty_activation(const Tensor& x, const Geom& g) {
  return at::empty(x.sizes(), x.options().memory_format(g.format));
}

// Per-segment copy [S, C] of the per-row table `param` ([P, C]); `fn(value)` maps each value.
template <typename acc_t, typename Fn>
std::vector<acc_t> per_segment(const FrameLayout& L, const Tensor& param, int64_t C, Fn&& fn) {
  std::vector<acc_t> out(L.S * C);
  const acc_t* p = param.data_ptr<acc_t>();
  for (int64_t s = 0; s < L.S; ++s)
    for (int64_t c = 0; c < C; ++c) out[s * C + c] = fn(p[L.rows[s] * C + c]);
  return out;
}

// (1 + alter[row, c]) per segment, rounded to scalar_t as the reference multiplies in that type;
// all ones without alter.
template <typename scalar_t, typename acc_t = at::opmath_type<scalar_t>>
std::vector<acc_t> alter_factors(const FrameLayout& L, const c10::optional<Tensor>& alter,
                                 int64_t C) {
  if (!alter.has_value()) return std::vector<acc_t>(L.S * C, acc_t(1));
  return per_segment<acc_t>(L, *alter, C, [](acc_t a) {
    return static_cast<acc_t>(static_cast<scalar_t>(acc_t(1) + a));
  });
}

// Streaming stores. An output written through the cache costs a read of each of its lines
// (write-allocate) before the write; where the output goes to memory anyway, that read is pure
// loss: a pass reading one 45 MB activation and writing two takes 7.1 ms through the cache and
// 3.5 ms streamed on the 2-core Xeon (docs/design.md §4.4). But what the next op reads at once (a
// BN's output, the convolution's input) is better left in the last-level cache. So an output is
// streamed when it is larger than that cache can keep for its reader: from kStreamLaterBytes up
// if the model reads it only later (the block's output, kept for the backward and the next
// block's shortcut; a residual's gradient), from kStreamSoonBytes up if the next op reads it.
// A streamed output is written run by run into a stack buffer, in L1, and streamed from there
// with non-temporal stores. FFN_KERNELS_CPU_STREAM=never writes every output in place.
constexpr int64_t kStageElems = 1024;  // a stack buffer's elements (map_runs' longest NCHW run)
enum class Reader { kNextOp, kLater };
constexpr int64_t kStreamLaterBytes = int64_t(8) << 20;
constexpr int64_t kStreamSoonBytes = int64_t(64) << 20;

// dst[0, n) = src[0, n), the 16-byte-aligned middle of dst with non-temporal stores. (Element
// loops for the ends: a run of a channels_last pixel is often 32 elements, and two memcpy calls
// per run cost more than its streaming saved.)
template <typename T>
inline void stream_copy(T* __restrict__ dst, const T* __restrict__ src, int64_t n) {
  int64_t i = 0;
#if defined(__SSE2__)
  constexpr int64_t kPer = 16 / sizeof(T);
  const uintptr_t addr = reinterpret_cast<uintptr_t>(dst);
  if (addr % sizeof(T) == 0) {
    const int64_t head = std::min<int64_t>(n, (16 - addr % 16) % 16 / sizeof(T));
    for (; i < head; ++i) dst[i] = src[i];
    for (; i + kPer <= n; i += kPer)
      _mm_stream_si128(reinterpret_cast<__m128i*>(dst + i),
                       _mm_loadu_si128(reinterpret_cast<const __m128i*>(src + i)));
  }
#endif
  for (; i < n; ++i) dst[i] = src[i];
}

// Orders this thread's non-temporal stores before whatever it does next (they are weakly ordered).
inline void stream_fence() {
#if defined(__SSE2__)
  _mm_sfence();
#endif
}

// An activation output written run by run: in place, or streamed (see kStreamLaterBytes).
template <typename scalar_t>
struct RunOut {
  scalar_t* base;
  bool stream;

  // write(p) writes the run [off, off + len) at p: the output itself, or a stack buffer streamed
  // to it afterwards (a run longer than the buffer, a channels_last piece of over 1024 channels,
  // is written in place).
  template <typename Write>
  void run(int64_t off, int64_t len, Write&& write) const {
    if (!stream || len > kStageElems) {
      write(base + off);
      return;
    }
    alignas(64) scalar_t stage[kStageElems];
    write(stage);
    stream_copy(base + off, stage, len);
  }
};

// The output of `numel` elements at p, read next by `reader`.
template <typename scalar_t>
RunOut<scalar_t> run_out(scalar_t* p, int64_t numel, Reader reader) {
#if defined(__SSE2__)
  const int64_t from = reader == Reader::kLater ? kStreamLaterBytes : kStreamSoonBytes;
  return {p, streaming_stores() && numel * static_cast<int64_t>(sizeof(scalar_t)) >= from};
#else
  return {p, false};
#endif
}

template <typename scalar_t>
RunOut<scalar_t> run_out(const Tensor& t, Reader reader) {
  return run_out(t.data_ptr<scalar_t>(), t.numel(), reader);
}

// A channels_last run of a shifted channel piece read from a neighbouring frame (the TSM shift's
// source) is a fold of channels per pixel, a few lines every C elements, which the hardware
// prefetcher does not follow: the block's channels_last backward spent most of its time waiting
// on those loads. Fetches the same piece `kPrefetchPixels` pixels ahead (past the tensor's end a
// prefetch is only a hint, and never faults). Runs of NCHW planes and unshifted pieces are long
// and sequential.
constexpr int64_t kPrefetchPixels = 8;

template <typename T>
inline void prefetch_shifted(const Geom& g, const T* run, int64_t len, int64_t c0) {
  if (!g.channels_last || c0 >= 2 * g.fold) return;
  const char* ahead = reinterpret_cast<const char*>(run + kPrefetchPixels * g.C);
  for (int64_t b = 0; b < len * static_cast<int64_t>(sizeof(T)); b += 64) {
#if defined(__x86_64__) || defined(__i386__)
    // GCC 12 deletes a loop of __builtin_prefetch once it is inlined, as having no effect
    __asm__ volatile("prefetcht0 %0" : : "m"(*(ahead + b)));
#else
    __builtin_prefetch(ahead + b);
#endif
  }
}

// The order in which parallel_chunks visits the chunks.
enum class Walk {
  // frame after frame: each thread streams one contiguous part of memory (what a pass over each
  // element once wants: NCHW planes of neighbouring chunks are adjacent)
  kFrames,
  // one clip's frames in order at one chunk index per task: the chunks of the neighbouring frames
  // a stencil over time reads (temporal_conv) were touched a step before and are still in cache,
  // where frame after frame reads them again from memory a whole frame later. Tasks are ordered
  // chunk index first, so every thread's share mixes the short and the long clips.
  kClips,
};

// Calls fn(chunk_frame, chunk_index_in_frame) for every chunk, in parallel, in the order `walk`.
template <typename Fn>
void parallel_chunks(const Geom& g, const FrameLayout& L, Walk walk, Fn&& fn) {
  constexpr int64_t kGrainElems = 1 << 15;
  const int64_t chunk_elems = g.channels_last ? g.block * g.C : g.planes * g.HW;
  if (walk == Walk::kFrames) {
    const int64_t grain = std::max<int64_t>(1, kGrainElems / std::max<int64_t>(1, chunk_elems));
    at::parallel_for(0, g.F * g.chunks, grain, [&](int64_t k0, int64_t k1) {
      for (int64_t k = k0; k < k1; ++k) fn(k / g.chunks, k % g.chunks);
      stream_fence();
    });
    return;
  }
  std::vector<int64_t> clip_start;  // first frame of every clip
  for (int64_t f = 0; f < g.F; f += L.frame[f].T) clip_start.push_back(f);
  const int64_t clips = static_cast<int64_t>(clip_start.size());
  const int64_t task_elems = std::max<int64_t>(1, chunk_elems * g.F / std::max<int64_t>(1, clips));
  at::parallel_for(0, clips * g.chunks, std::max<int64_t>(1, kGrainElems / task_elems),
                   [&](int64_t k0, int64_t k1) {
                     for (int64_t k = k0; k < k1; ++k) {
                       const int64_t first = clip_start[k % clips], q = k / clips;
                       for (int64_t f = first; f < first + L.frame[first].T; ++f) fn(f, q);
                     }
                     stream_fence();
                   });
}

// Accumulator slots of one plane (NCHW: the lanes its HW elements reach, e.g. 4 for a 2x2 plane)
// or of one chunk (channels_last: a channel each).
inline int64_t lane_count(const Geom& g) { return g.channels_last ? g.C : std::min(kLanes, g.HW); }

// `n` zeroed accumulators for one chunk, in a buffer the calling thread reuses (no allocation per
// chunk; a chunk's reduction never starts another).
template <typename T>
T* chunk_scratch(int64_t n) {
  thread_local std::vector<T> buffer;
  buffer.assign(n, T(0));
  return buffer.data();
}

// Sum of the n lanes at p, in lane order.
template <typename T>
inline T sum_lanes(const T* p, int64_t n) {
  T sum = 0;
  for (int64_t i = 0; i < n; ++i) sum += p[i];
  return sum;
}

// Channel planes [first, end) of NCHW chunk q.
inline std::pair<int64_t, int64_t> chunk_planes(const Geom& g, int64_t q) {
  return {q * g.planes, std::min(g.C, (q + 1) * g.planes)};
}

// Calls fn(channels_last, off, len, c0, slot) for the runs of chunk (f, q); NCHW planes are cut
// into runs of at most `max_run` elements, and element i of a run maps to slot `slot + i` of the
// chunk's accumulators (NCHW: lane i of the chunk's k-th plane, slot k * lane_count;
// channels_last: channel c0 + i). A channels_last run is a whole piece (the LayerNorm's, a whole
// token).
template <typename Fn>
inline void chunk_runs(const Geom& g, int64_t f, int64_t q, int64_t max_run, Fn&& fn) {
  const int64_t base = f * g.chw;
  if (!g.channels_last) {
    const auto [c_first, c_end] = chunk_planes(g, q);
    const int64_t lanes = lane_count(g);
    for (int64_t c = c_first; c < c_end; ++c)
      for (int64_t j = 0; j < g.HW; j += max_run)
        fn(std::false_type{}, base + c * g.HW + j, std::min(max_run, g.HW - j), c, (c - c_first) * lanes);
    return;
  }
  const int64_t p1 = std::min(g.HW, (q + 1) * g.block);
  for (int64_t p = q * g.block; p < p1; ++p)
    for (int k = 0; k < 3; ++k)
      if (g.piece[k + 1] > g.piece[k])
        fn(std::true_type{}, base + p * g.C + g.piece[k], g.piece[k + 1] - g.piece[k], g.piece[k],
           g.piece[k]);
}

// Elementwise pass: op(channels_last, frame_info, off, len, c0) on every run.
template <typename Op>
void map_runs(const Geom& g, const FrameLayout& L, Op&& op, Walk walk = Walk::kFrames) {
  parallel_chunks(g, L, walk, [&](int64_t f, int64_t q) {
    chunk_runs(g, f, q, kStageElems,
               [&](auto channels_last, int64_t off, int64_t len, int64_t c0, int64_t) {
                 op(channels_last, L.frame[f], off, len, c0);
               });
  });
}

// Sums of NA quantities per (segment, channel): visit(channels_last, frame_info, off, len, c0, acc,
// stride) adds element i's quantity a to acc[a * stride + i]. Per-chunk partials are summed in
// chunk order. Returns [NA, S, C].
template <int NA, typename acc_t, typename Visit>
std::vector<acc_t> segment_sums(const Geom& g, const FrameLayout& L, Visit&& visit,
                                Walk walk = Walk::kFrames) {
  const int64_t C = g.C, nblk = g.channels_last ? g.chunks : 1, lanes = lane_count(g);
  const int64_t width =
      g.channels_last ? C : g.planes * lanes;  // accumulators per quantity and chunk
  std::vector<acc_t> part(g.F * nblk * NA * C);
  parallel_chunks(g, L, walk, [&](int64_t f, int64_t q) {
    acc_t* acc = chunk_scratch<acc_t>(NA * width);
    chunk_runs(g, f, q, kLanes,
               [&](auto channels_last, int64_t off, int64_t len, int64_t c0, int64_t slot) {
                 visit(channels_last, L.frame[f], off, len, c0, acc + slot, width);
               });
    for (int a = 0; a < NA; ++a) {
      const acc_t* src = acc + a * width;
      if (g.channels_last) {
        std::copy(src, src + C, part.begin() + ((f * nblk + q) * NA + a) * C);
        continue;
      }
      const auto [c_first, c_end] = chunk_planes(g, q);
      for (int64_t c = c_first; c < c_end; ++c)
        part[(f * NA + a) * C + c] = sum_lanes(src + (c - c_first) * lanes, lanes);
    }
  });
  std::vector<acc_t> out(NA * L.S * C, acc_t(0));
  at::parallel_for(0, C, 64, [&](int64_t c0, int64_t c1) {
    for (int64_t s = 0; s < L.S; ++s)
      for (int64_t k = L.start[s] * nblk; k < L.start[s + 1] * nblk; ++k)
        for (int a = 0; a < NA; ++a) {
          acc_t* o = out.data() + (a * L.S + s) * C;
          const acc_t* p = part.data() + (k * NA + a) * C;
          for (int64_t c = c0; c < c1; ++c) o[c] += p[c];
        }
  });
  return out;
}

// Elements per channel in chunk q: its pixels (channels_last) or a whole plane (NCHW).
inline int64_t chunk_count(const Geom& g, int64_t q) {
  return g.channels_last ? std::min(g.HW, (q + 1) * g.block) - q * g.block : g.HW;
}

// Batch statistics per (segment, channel): a two-pass (mean, M2) per chunk in acc_t, merged in
// chunk order in double. A segment can have millions of chunks (one per 1x1 frame), and a float
// merge of that many partials loses digits as a float sum of that many values does. The merge is
// the two-level form of Chan's: the segment mean from the partial means, then
// M2 = sum_k (M2_k + n_k (mean_k - mean)^2), every term >= 0; unlike a partial-by-partial Chan
// merge it has no division per partial and runs vectorized across channels (a per-partial merge
// was a third of the statistics pass at layer3/4 shapes, where a chunk holds few pixels).
// Returns [S, C] Welford triples.
template <typename scalar_t, typename acc_t = at::opmath_type<scalar_t>>
std::vector<ffn::Welford<double>> segment_stats(const Geom& g, const FrameLayout& L,
                                               const scalar_t* x) {
  const int64_t C = g.C, nblk = g.channels_last ? g.chunks : 1, lanes = lane_count(g);
  const int64_t width = g.channels_last ? C : g.planes * lanes,
                means = g.channels_last ? C : g.planes;
  // chunk partials [F * nblk, C], every slot written below (no zero fill)
  std::unique_ptr<acc_t[]> part_mean(new acc_t[g.F * nblk * C]), part_m2(new acc_t[g.F * nblk * C]);
  parallel_chunks(g, L, Walk::kFrames, [&](int64_t f, int64_t q) {
    acc_t* sum = chunk_scratch<acc_t>(2 * width + means);
    acc_t *m2 = sum + width, *mean = m2 + width;
    chunk_runs(g, f, q, kLanes, [&](auto, int64_t off, int64_t len, int64_t, int64_t slot) {
      const scalar_t* __restrict__ xp = x + off;
      acc_t* __restrict__ a = sum + slot;
      FFN_IVDEP
      for (int64_t i = 0; i < len; ++i) a[i] += static_cast<acc_t>(xp[i]);
    });
    // NCHW: the chunk's planes [c_first, c_end), each with its own lanes and mean
    const auto [c_first, c_end] =
        g.channels_last ? std::pair<int64_t, int64_t>{0, C} : chunk_planes(g, q);
    const acc_t inv_n = acc_t(1) / static_cast<acc_t>(chunk_count(g, q));
    if (g.channels_last) {
      for (int64_t c = 0; c < C; ++c) mean[c] = sum[c] * inv_n;
    } else {
      for (int64_t k = 0; k < c_end - c_first; ++k) mean[k] = sum_lanes(sum + k * lanes, lanes) * inv_n;
    }
    chunk_runs(g, f, q, kLanes,
               [&](auto channels_last, int64_t off, int64_t len, int64_t c0, int64_t slot) {
                 constexpr bool kChannelsLast = decltype(channels_last)::value;
                 const scalar_t* __restrict__ xp = x + off;
                 const acc_t* __restrict__ mu = mean + (kChannelsLast ? c0 : c0 - c_first);
                 acc_t* __restrict__ a = m2 + slot;
                 FFN_IVDEP
                 for (int64_t i = 0; i < len; ++i) {
                   const acc_t d = static_cast<acc_t>(xp[i]) - mu[ch<kChannelsLast>(i)];
                   a[i] += d * d;
                 }
               });
    // channels_last: a row per chunk; NCHW: a row per frame, of which this chunk fills its planes
    const int64_t row = g.channels_last ? f * nblk + q : f;
    acc_t *pm = part_mean.get() + row * C, *pv = part_m2.get() + row * C;
    if (g.channels_last) {
      std::copy(mean, mean + C, pm);
      std::copy(m2, m2 + C, pv);
    } else {
      for (int64_t k = 0; k < c_end - c_first; ++k) {
        pm[c_first + k] = mean[k];
        pv[c_first + k] = sum_lanes(m2 + k * lanes, lanes);
      }
    }
  });
  std::vector<ffn::Welford<double>> out(L.S * C);
  at::parallel_for(0, C, 64, [&](int64_t c0, int64_t c1) {
    std::vector<double> mean(c1 - c0), m2(c1 - c0);
    for (int64_t s = 0; s < L.S; ++s) {
      const int64_t k0 = L.start[s] * nblk, k1 = L.start[s + 1] * nblk;
      int64_t n = 0;
      std::fill(mean.begin(), mean.end(), 0.0);
      std::fill(m2.begin(), m2.end(), 0.0);
      for (int64_t k = k0; k < k1; ++k) {
        const int64_t nk = chunk_count(g, k % nblk);
        const acc_t* pm = part_mean.get() + k * C + c0;
        n += nk;
        for (int64_t c = 0; c < c1 - c0; ++c) mean[c] += static_cast<double>(nk) * pm[c];
      }
      const double inv_n = 1.0 / static_cast<double>(n);
      for (int64_t c = 0; c < c1 - c0; ++c) mean[c] *= inv_n;
      for (int64_t k = k0; k < k1; ++k) {
        const double nk = static_cast<double>(chunk_count(g, k % nblk));
        const acc_t *pm = part_mean.get() + k * C + c0, *pv = part_m2.get() + k * C + c0;
        for (int64_t c = 0; c < c1 - c0; ++c) {
          const double d = static_cast<double>(pm[c]) - mean[c];
          m2[c] += static_cast<double>(pv[c]) + nk * d * d;
        }
      }
      for (int64_t c = 0; c < c1 - c0; ++c) out[s * C + c0 + c] = {n, mean[c], m2[c]};
    }
  });
  return out;
}

// Runs fn(std::integral_constant<bool, b>{}) so a runtime flag becomes a compile-time one.
template <typename Fn>
decltype(auto) dispatch_bool(bool b, Fn&& fn) {
  return b ? fn(std::true_type{}) : fn(std::false_type{});
}

}  // namespace FFN_CPU_ISA
}  // namespace cpu
}  // namespace ffn_kernels
