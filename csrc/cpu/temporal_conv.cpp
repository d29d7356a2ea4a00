// CPU kernels of temporal_conv (docs/design.md §3.6): y[f] = w0*x[f-1] + w1*x[f] + w2*x[f+1] per
// channel, the neighbours only inside f's clip. A frame's neighbours are the same in-frame offset
// one frame (chw elements) away in both memory formats.
#include "cpu/common.h"
#include "ops/temporal_conv.h"

namespace ffn_kernels {
namespace cpu {
inline namespace FFN_CPU_ISA {
namespace {

void check_taps(const Tensor& weight, const Tensor& x) {
  TORCH_CHECK(weight.dim() == 2 && weight.size(0) == x.size(1) && weight.size(1) == 3 &&
                  weight.is_contiguous(),
              "weight must be a contiguous [C=", x.size(1), ", 3] tensor, got ", weight.sizes());
  TORCH_CHECK(weight.scalar_type() == acc_type(x), "weight has dtype ", weight.scalar_type(),
              ", expected ", acc_type(x));
}

FrameLayout shared_layout(const Geom& g, int64_t clips, at::IntArrayRef frames) {
  return make_frame_layout(g.F, clips, frames, std::vector<int64_t>(frames.size(), 0), 1);
}

// The [C, 3] taps as three contiguous [C] rows (tap j of channel c at j * C + c): along a
// channels_last run the taps of consecutive channels are then consecutive, where [C, 3] made the
// element loop read each tap with a stride of 3.
template <typename acc_t>
std::vector<acc_t> tap_rows(const Tensor& weight) {
  const int64_t C = weight.size(0);
  const acc_t* w = weight.data_ptr<acc_t>();
  std::vector<acc_t> rows(3 * C);
  for (int64_t c = 0; c < C; ++c)
    for (int j = 0; j < 3; ++j) rows[j * C + c] = w[c * 3 + j];
  return rows;
}

// out[i] = a*in[i] + b*in[i - chw] (if `before`) + c*in[i + chw] (if `after`) over a run, with
// a, b, c the taps of the run's channel (of channel c0 + i along channels_last runs).
template <bool kChannelsLast, typename scalar_t, typename acc_t>
void stencil(const scalar_t* __restrict__ in, scalar_t* __restrict__ out, int64_t len, int64_t chw,
             bool before, bool after, const acc_t* __restrict__ ka,
             const acc_t* __restrict__ kb, const acc_t* __restrict__ kc) {
  dispatch_bool(before, [&](auto b) {
    dispatch_bool(after, [&](auto a) {
      for (int64_t i = 0; i < len; ++i) {
        const int64_t j = ch<kChannelsLast>(i);
        acc_t v = ka[j] * static_cast<acc_t>(in[i]);
        if constexpr (decltype(b)::value) v += kb[j] * static_cast<acc_t>(in[i - chw]);
        if constexpr (decltype(a)::value) v += kc[j] * static_cast<acc_t>(in[i + chw]);
        out[i] = static_cast<scalar_t>(v);
      }
    });
  });
}

Tensor temporal_conv_fwd(const Tensor& x, int64_t clips, at::IntArrayRef frames,
                         const Tensor& weight) {
  const Geom g = make_geom(x, 0);
  check_taps(weight, x);
  const FrameLayout L = shared_layout(g, clips, frames);
  Tensor y = empty_activation(x, g);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "temporal_conv_fwd", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    const scalar_t* xp = x.data_ptr<scalar_t>();
    const RunOut<scalar_t> yw = run_out<scalar_t>(y, Reader::kNextOp);
    const std::vector<acc_t> taps = tap_rows<acc_t>(weight);
    const acc_t* w = taps.data();
    map_runs(
        g, L,
        [&](auto channels_last, const FrameInfo& fi, int64_t off, int64_t len, int64_t c0) {
          yw.run(off, len, [&](scalar_t* yo) {
            // y[f] = w1 x[f] + w0 x[f-1] + w2 x[f+1]
            stencil<decltype(channels_last)::value>(xp + off, yo, len, g.chw, fi.t > 0,
                                                    fi.t < fi.T - 1, w + g.C + c0, w + c0,
                                                    w + 2 * g.C + c0);
          });
        },
        Walk::kClips);
  });
  return y;
}

// dx is the transposed stencil: dx[f] = w1*dy[f] + w0*dy[f+1] + w2*dy[f-1] (inside the clip).
// d weight[c, k] = sum over the frames f with a source of dy[f] * x[f - 1 + k], one pass with dx.
std::tuple<Tensor, Tensor> temporal_conv_bwd(const Tensor& dy, const Tensor& x, int64_t clips,
                                             at::IntArrayRef frames, const Tensor& weight,
                                             bool weight_grad) {
  const Geom g = make_geom(dy, 0);
  check_taps(weight, dy);
  if (weight_grad) check_activation(x, dy, g, "x");
  const FrameLayout L = shared_layout(g, clips, frames);
  Tensor dx = empty_activation(dy, g);
  Tensor dweight = weight_grad ? at::empty({g.C, 3}, weight.options()) : unused_acc(dy);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, dy.scalar_type(), "temporal_conv_bwd", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    const scalar_t* dyp = dy.data_ptr<scalar_t>();
    const RunOut<scalar_t> dxw = run_out<scalar_t>(dx, Reader::kNextOp);
    const std::vector<acc_t> taps = tap_rows<acc_t>(weight);
    const acc_t* w = taps.data();
    auto store_dx = [&](auto channels_last, const FrameInfo& fi, int64_t off, int64_t len,
                        int64_t c0) {
      dxw.run(off, len, [&](scalar_t* dxo) {
        // dx[f] = w1 dy[f] + w2 dy[f-1] + w0 dy[f+1]
        stencil<decltype(channels_last)::value>(dyp + off, dxo, len, g.chw, fi.t > 0,
                                                fi.t < fi.T - 1, w + g.C + c0, w + 2 * g.C + c0,
                                                w + c0);
      });
    };
    if (!weight_grad) {
      map_runs(g, L, store_dx, Walk::kClips);
      return;
    }
    const scalar_t* xp = x.data_ptr<scalar_t>();
    const std::vector<acc_t> sums = segment_sums<3, acc_t>(
        g, L,
        [&](auto channels_last, const FrameInfo& fi, int64_t off, int64_t len, int64_t c0,
            acc_t* acc, int64_t stride) {
          store_dx(channels_last, fi, off, len, c0);
          const scalar_t* __restrict__ d = dyp + off;
          const scalar_t* __restrict__ xc = xp + off;
          for (int64_t i = 0; i < len; ++i) acc[stride + i] += static_cast<acc_t>(d[i]) * xc[i];
          if (fi.t > 0)
            for (int64_t i = 0; i < len; ++i)
              acc[i] += static_cast<acc_t>(d[i]) * static_cast<acc_t>(xc[i - g.chw]);
          if (fi.t < fi.T - 1)
            for (int64_t i = 0; i < len; ++i)
              acc[2 * stride + i] += static_cast<acc_t>(d[i]) * static_cast<acc_t>(xc[i + g.chw]);
        },
        Walk::kClips);
    // [3, S, C] -> [C, 3]: the taps are shared, so their gradient adds every segment, in order
    acc_t* dw = dweight.data_ptr<acc_t>();
    for (int64_t c = 0; c < g.C; ++c)
      for (int k = 0; k < 3; ++k) {
        acc_t total = 0;
        for (int64_t s = 0; s < L.S; ++s) total += sums[(k * L.S + s) * g.C + c];
        dw[c * 3 + k] = total;
      }
  });
  return {dx, dweight};
}

}  // namespace

FFN_CPU_KERNELS(temporal_conv, temporal_conv_fwd, temporal_conv_bwd)

}  // namespace FFN_CPU_ISA
}  // namespace cpu
}  // namespace ffn_kernels
