// Host helpers shared by the CUDA ops, the batch-statistics pass (Welford reduce + combine) and
// the combine kernels of the backward reductions.
#include "common.cuh"

#include <algorithm>
#include <limits>

namespace ffn_kernels {
namespace cuda {

at::Tensor in_format(const at::Tensor& t, at::MemoryFormat fmt, const at::Tensor& x,
                     const char* name) {
  TORCH_CHECK(t.sizes() == x.sizes(), name, " has shape ", t.sizes(), " but x has ", x.sizes());
  TORCH_CHECK(t.scalar_type() == x.scalar_type(), name, " has dtype ", t.scalar_type(),
              " but x has ", x.scalar_type());
  TORCH_CHECK(t.device() == x.device(), name, " is on ", t.device(), " but x is on ", x.device());
  return t.contiguous(fmt);
}

FrameLayout make_frame_layout(const at::Tensor& x, int64_t clips, at::IntArrayRef frames,
                              at::IntArrayRef rows) {
  TORCH_CHECK(x.is_cuda(), "ffn_kernels CUDA kernels got a tensor on ", x.device());
  TORCH_CHECK(x.dim() == 4, "x must be 4-D [frames, C, H, W], got ", x.sizes());
  TORCH_CHECK(clips >= 1, "clips must be >= 1, got ", clips);
  TORCH_CHECK(!frames.empty() && frames.size() == rows.size(),
              "frames and rows must be non-empty and of equal length, got ", frames.size(),
              " and ", rows.size());
  TORCH_CHECK(static_cast<int64_t>(frames.size()) <= kMaxSegments,
              "the CUDA kernels support at most ", kMaxSegments, " segments, got ", frames.size());
  FrameLayout seg{};
  seg.n = static_cast<int>(frames.size());
  seg.start[0] = 0;
  for (int s = 0; s < seg.n; ++s) {
    TORCH_CHECK(frames[s] >= 1 && frames[s] <= std::numeric_limits<int>::max(),
                "frame counts must be >= 1, got ", frames[s]);
    TORCH_CHECK(rows[s] >= 0 && rows[s] <= std::numeric_limits<int>::max(),
                "rows must be >= 0, got ", rows[s]);
    seg.frames[s] = static_cast<int>(frames[s]);
    seg.row[s] = static_cast<int>(rows[s]);
    seg.start[s + 1] = seg.start[s] + clips * frames[s];
  }
  TORCH_CHECK(seg.start[seg.n] == x.size(0), "x.shape[0] is ", x.size(0),
              " but the layout holds ", seg.start[seg.n], " frames");
  return seg;
}

Geom make_geom(const at::Tensor& x, int64_t fold_div) {
  const int64_t chw = x.size(1) * x.size(2) * x.size(3);
  TORCH_CHECK(chw <= std::numeric_limits<int>::max(),
              "one frame of x must hold < 2^31 elements (C*H*W = ", chw, ")");
  Geom g;
  g.frames = x.size(0);
  g.C = static_cast<int>(x.size(1));
  g.HW = static_cast<int>(x.size(2) * x.size(3));
  g.chw = static_cast<int>(chw);
  g.fold = fold_div > 0 ? static_cast<int>(x.size(1) / fold_div) : 0;
  g.channels_last = format_of(x) == at::MemoryFormat::ChannelsLast;
  return g;
}

at::Tensor param(const c10::optional<at::Tensor>& p, const at::Tensor& x, const FrameLayout& seg,
                 const char* name) {
  if (!p.has_value() || !p->defined()) return at::Tensor();
  TORCH_CHECK(p->device() == x.device(), name, " is on ", p->device(), " but x is on ",
              x.device());
  TORCH_CHECK(p->dim() == 2 && p->size(1) == x.size(1), name, " must be [rows, C=", x.size(1),
              "], got ", p->sizes());
  for (int s = 0; s < seg.n; ++s)
    TORCH_CHECK(seg.row[s] < p->size(0), "layout row ", seg.row[s], " is out of range for ", name,
                " with ", p->size(0), " rows");
  return p->to(acc_type(x)).contiguous();
}

static int next_pow2(int v) {
  int p = 1;
  while (p < v) p <<= 1;
  return p;
}

ReducePlan plan_reduce(FrameLayout& seg, const Geom& g) {
  ReducePlan plan;
  int64_t channel_blocks, cols;
  if (g.channels_last) {  // a block = up to 32 consecutive channels x 256/32+ pixel rows
    const int bx = std::min(32, next_pow2(std::max(g.C, 1)));
    plan.block = dim3(bx, kThreads / bx);
    channel_blocks = (g.C + bx - 1) / bx;
    cols = bx;
  } else {  // a block = one channel, pixels along x (coalesced), frames along y
    const int bx = std::min(kThreads, std::max(32, next_pow2(std::max(g.HW, 1))));
    plan.block = dim3(bx, kThreads / bx);
    channel_blocks = g.C;
    cols = 1;
  }
  // Enough chunks for ~8 blocks per SM overall, but >= 4096 elements per block so the partials
  // and their combine stay small next to the data.
  const int64_t sms = at::cuda::getCurrentDeviceProperties()->multiProcessorCount;
  const int64_t want_chunks = std::max<int64_t>(1, (8 * sms + channel_blocks - 1) / channel_blocks);
  int64_t fpc = std::max<int64_t>(1, (g.frames + want_chunks - 1) / want_chunks);
  const int64_t per_frame = std::max<int64_t>(1, static_cast<int64_t>(g.HW) * cols);
  fpc = std::max(fpc, (4096 + per_frame - 1) / per_frame);
  fpc = std::min<int64_t>(fpc, std::max<int64_t>(1, g.frames));
  seg.frames_per_chunk = static_cast<int>(std::min<int64_t>(fpc, std::numeric_limits<int>::max()));
  seg.chunk_start[0] = 0;
  for (int s = 0; s < seg.n; ++s) {
    const int64_t nf = seg.start[s + 1] - seg.start[s];
    seg.chunk_start[s + 1] = seg.chunk_start[s] + static_cast<int>((nf + fpc - 1) / fpc);
  }
  plan.num_chunks = seg.chunk_start[seg.n];
  TORCH_CHECK(plan.num_chunks <= 65535 && channel_blocks <= std::numeric_limits<int>::max(),
              "reduction grid too large");
  plan.grid = dim3(static_cast<unsigned>(channel_blocks), static_cast<unsigned>(plan.num_chunks));
  return plan;
}

namespace {

template <typename scalar_t>
struct WelfordVisitor {
  using acc_t = at::opmath_type<scalar_t>;
  using Acc = WelfordAcc<acc_t>;
  struct Local {};
  const scalar_t* x;

  static __device__ __forceinline__ Acc identity() {
    Acc a;
    a.w = ffn::Welford<acc_t>{};
    return a;
  }
  __device__ __forceinline__ Local local(const Geom&, const FramePos&, int) const { return {}; }
  __device__ __forceinline__ void visit(Acc& a, const Local&, int64_t off) const {
    ffn::welford_add(a.w, static_cast<acc_t>(x[off]));
  }
};

// Elements of channel c that chunk k of segment s covers.
__device__ __forceinline__ int64_t chunk_count(const FrameLayout& seg, const Geom& g, int s,
                                               int k) {
  const int64_t f0 = seg.start[s] + static_cast<int64_t>(k - seg.chunk_start[s]) * seg.frames_per_chunk;
  return (min(f0 + seg.frames_per_chunk, seg.start[s + 1]) - f0) * g.HW;
}

// One thread per (segment, channel): merges the segment's chunk partials in order (Chan), writes
// mean/invstd and the running-stat update of the segment's row; in eval (batch == false) takes
// the row's running statistics instead.
template <typename acc_t>
__global__ void stats_combine_kernel(const acc_t* __restrict__ partials, int num_chunks,
                                     const FrameLayout seg, const Geom g, double eps, bool batch,
                                     const acc_t* __restrict__ running_mean,
                                     const acc_t* __restrict__ running_var, acc_t* mean,
                                     acc_t* invstd, acc_t* new_rm, acc_t* new_rv) {
  const int c = blockIdx.x * blockDim.x + threadIdx.x;
  const int s = blockIdx.y;
  if (c >= g.C) return;
  const int64_t sc = static_cast<int64_t>(s) * g.C + c;
  const int64_t rc = static_cast<int64_t>(seg.row[s]) * g.C + c;
  if (!batch) {
    mean[sc] = running_mean[rc];
    invstd[sc] = ffn::inv_std(running_var[rc], eps);
    return;
  }
  ffn::Welford<acc_t> w{};
  for (int k = seg.chunk_start[s]; k < seg.chunk_start[s + 1]; ++k) {
    ffn::Welford<acc_t> part;
    part.mean = partials[static_cast<int64_t>(k) * g.C + c];
    part.m2 = partials[(static_cast<int64_t>(num_chunks) + k) * g.C + c];
    part.n = chunk_count(seg, g, s, k);
    w = ffn::welford_merge(w, part);
  }
  const acc_t var = ffn::welford_var(w);
  mean[sc] = w.mean;
  invstd[sc] = ffn::inv_std(var, eps);
  if (new_rm != nullptr) {
    const acc_t m = static_cast<acc_t>(seg.momentum[s]);
    new_rm[rc] = ffn::running_update(running_mean[rc], w.mean, m);
    new_rv[rc] = ffn::running_update(running_var[rc], ffn::unbiased_var(var, w.n), m);
  }
}

template <typename acc_t>
__global__ void sums_combine_kernel(const acc_t* __restrict__ partials, int fields, int num_chunks,
                                    const FrameLayout seg, int C, acc_t* __restrict__ out) {
  const int c = blockIdx.x * blockDim.x + threadIdx.x;
  const int s = blockIdx.y;
  if (c >= C) return;
  for (int i = 0; i < fields; ++i) {
    acc_t sum = 0;
    for (int k = seg.chunk_start[s]; k < seg.chunk_start[s + 1]; ++k)
      sum += partials[(static_cast<int64_t>(i) * num_chunks + k) * C + c];
    out[(static_cast<int64_t>(i) * seg.n + s) * C + c] = sum;
  }
}

constexpr int kMaxRowGrads = 3;

template <typename acc_t>
struct RowGradArgs {
  acc_t* out[kMaxRowGrads];
  int field[kMaxRowGrads];
  bool times_invstd[kMaxRowGrads];
  int n;
};

template <typename acc_t>
__global__ void row_grads_kernel(const acc_t* __restrict__ sums, const acc_t* __restrict__ invstd,
                                 const FrameLayout seg, int C, int64_t total,
                                 const RowGradArgs<acc_t> a) {
  for (int64_t idx = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; idx < total;
       idx += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    const int p = static_cast<int>(idx / C), c = static_cast<int>(idx % C);
#pragma unroll
    for (int i = 0; i < kMaxRowGrads; ++i) {  // unrolled: a.out[i] is not copied to the stack
      if (i >= a.n) break;
      acc_t v = 0;
      for (int s = 0; s < seg.n; ++s) {  // segments in order: a repeated row sums them
        if (seg.row[s] != p) continue;
        acc_t t = sums[(static_cast<int64_t>(a.field[i]) * seg.n + s) * C + c];
        if (a.times_invstd[i]) t *= invstd[static_cast<int64_t>(s) * C + c];
        v += t;
      }
      a.out[i][idx] = v;
    }
  }
}

}  // namespace

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> batch_norm_stats(
    const at::Tensor& x, FrameLayout& seg, const Geom& g,
    const c10::optional<at::Tensor>& running_mean, const c10::optional<at::Tensor>& running_var,
    bool training, at::ArrayRef<double> momentum, double eps) {
  const bool has_running = running_mean.has_value() && running_mean->defined();
  TORCH_CHECK(has_running == (running_var.has_value() && running_var->defined()),
              "running_mean and running_var must be given together");
  TORCH_CHECK(static_cast<int>(momentum.size()) == seg.n, "momentum has ", momentum.size(),
              " values but the layout has ", seg.n, " segments");
  for (int s = 0; s < seg.n; ++s) seg.momentum[s] = momentum[s];
  const bool batch = training || !has_running;
  const at::Tensor rm = param(running_mean, x, seg, "running_mean");
  const at::Tensor rv = param(running_var, x, seg, "running_var");
  const auto acc_opts = x.options().dtype(acc_type(x)).memory_format(at::MemoryFormat::Contiguous);
  at::Tensor new_rm = has_running ? rm.clone() : at::empty({0}, acc_opts);
  at::Tensor new_rv = has_running ? rv.clone() : at::empty({0}, acc_opts);
  const bool update = training && has_running;
  if (update) {  // each row's running statistics are updated once, by one segment
    for (int s = 0; s < seg.n; ++s)
      for (int r = 0; r < s; ++r)
        TORCH_CHECK(seg.row[r] != seg.row[s], "layout rows repeat row ", seg.row[s],
                    "; in training each parameter row may appear at most once per call");
  }
  at::Tensor mean = at::empty({seg.n, g.C}, acc_opts);
  at::Tensor invstd = at::empty({seg.n, g.C}, acc_opts);
  if (g.C == 0) return {mean, invstd, new_rm, new_rv};

  at::Tensor partials;
  int num_chunks = 0;
  if (batch) {
    const ReducePlan plan = plan_reduce(seg, g);
    num_chunks = plan.num_chunks;
    partials = at::empty({2, num_chunks, g.C}, acc_opts);
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "ffn_bn_stats", [&] {
      using acc_t = at::opmath_type<scalar_t>;
      if (g.HW > 0)
        launch_reduce(WelfordVisitor<scalar_t>{x.data_ptr<scalar_t>()}, seg, g, plan,
                      partials.data_ptr<acc_t>());
    });
  }
  AT_DISPATCH_FLOATING_TYPES(mean.scalar_type(), "ffn_bn_stats_combine", [&] {
    using acc_t = scalar_t;
    const dim3 grid((g.C + kThreads - 1) / kThreads, seg.n);
    stats_combine_kernel<acc_t><<<grid, kThreads, 0, at::cuda::getCurrentCUDAStream()>>>(
        batch ? partials.data_ptr<acc_t>() : nullptr, num_chunks, seg, g, eps,
        batch, has_running ? rm.data_ptr<acc_t>() : nullptr,
        has_running ? rv.data_ptr<acc_t>() : nullptr, mean.data_ptr<acc_t>(),
        invstd.data_ptr<acc_t>(), update ? new_rm.data_ptr<acc_t>() : nullptr,
        update ? new_rv.data_ptr<acc_t>() : nullptr);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  return {mean, invstd, new_rm, new_rv};
}

at::Tensor combine_sums(const at::Tensor& partials, const FrameLayout& seg, const Geom& g) {
  const int fields = static_cast<int>(partials.size(0));
  const int num_chunks = static_cast<int>(partials.size(1));
  at::Tensor out = at::empty({fields, seg.n, g.C}, partials.options());
  if (g.C == 0) return out;
  AT_DISPATCH_FLOATING_TYPES(partials.scalar_type(), "ffn_combine_sums", [&] {
    const dim3 grid((g.C + kThreads - 1) / kThreads, seg.n);
    sums_combine_kernel<scalar_t><<<grid, kThreads, 0, at::cuda::getCurrentCUDAStream()>>>(
        partials.data_ptr<scalar_t>(), fields, num_chunks, seg, g.C, out.data_ptr<scalar_t>());
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  return out;
}

void row_grads(const at::Tensor& seg_sums, const FrameLayout& seg, const Geom& g,
               const at::Tensor& invstd, const std::vector<RowGrad>& grads) {
  TORCH_CHECK(!grads.empty() && grads.size() <= kMaxRowGrads, "row_grads: 1 to 3 outputs");
  const int64_t total = grads[0].out.numel();
  if (total == 0) return;
  AT_DISPATCH_FLOATING_TYPES(seg_sums.scalar_type(), "ffn_row_grads", [&] {
    RowGradArgs<scalar_t> a{};
    a.n = static_cast<int>(grads.size());
    for (int i = 0; i < a.n; ++i) {
      TORCH_CHECK(grads[i].out.numel() == total && grads[i].out.is_contiguous(),
                  "row_grads: outputs must be contiguous [P, C]");
      a.out[i] = grads[i].out.data_ptr<scalar_t>();
      a.field[i] = grads[i].field;
      a.times_invstd[i] = grads[i].times_invstd;
    }
    const int blocks = static_cast<int>(std::min<int64_t>((total + kThreads - 1) / kThreads, 4096));
    row_grads_kernel<scalar_t><<<blocks, kThreads, 0, at::cuda::getCurrentCUDAStream()>>>(
        seg_sums.data_ptr<scalar_t>(), invstd.defined() ? invstd.data_ptr<scalar_t>() : nullptr,
        seg, g.C, total, a);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
}

}  // namespace cuda
}  // namespace ffn_kernels
