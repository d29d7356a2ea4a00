// The shared parts of the public ops' entries and their argument checks (see dispatch.h).
#include "ops/dispatch.h"

#include <ATen/FuncTorchTLS.h>
#include <ATen/core/grad_mode.h>
#include <c10/util/safe_numerics.h>

#include <cstdint>

namespace ffn_kernels {
namespace ops {

void define_op(torch::Library& m, const std::string& name, const char* fwd, const char* bwd) {
  m.def((name + fwd).c_str());
  m.def((name + "_backward" + bwd).c_str());
  m.def((name + "_fwd" + fwd).c_str());
  m.def((name + "_bwd" + bwd).c_str());
}

void refuse_double_backward(const char* op, at::ArrayRef<Tensor> inputs) {
  if (!at::GradMode::is_enabled()) return;
  for (const Tensor& t : inputs)
    TORCH_CHECK(!(t.defined() && t.requires_grad()), "ffn_kernels::", op,
                " is differentiable once: its backward has no derivative (double backward, "
                "create_graph=True through it, and forward-mode AD are not supported)");
}

void refuse_transforms(const char* op, at::ArrayRef<Tensor> inputs) {
  const char* what = nullptr;
  if (const auto& functorch = at::functorch::functorchTLSAccessor()) {
    try {
      functorch->checkSupportsCppAutogradFunction();  // throws inside a torch.func transform
    } catch (const c10::Error&) {
      what = "torch.func transforms (grad, vjp, jvp, vmap)";
    }
  }
  for (const Tensor& t : inputs)
    if (!what && t.defined() && t._fw_grad(/*level=*/0).defined()) what = "forward-mode AD";
  TORCH_CHECK(what == nullptr, "ffn_kernels::", op, " does not support ", what,
              ": its derivative is reverse mode only; differentiate it with torch.autograd "
              "(loss.backward() or torch.autograd.grad)");
}

namespace {
// Whether a size condition holds. Under torch.compile / torch.export the sizes (and clips, frames)
// may be symbols: a condition that does not follow from what the tracer knows becomes a runtime
// assert rather than a guard (no recompile per size; unbacked sizes cannot be guarded on at all).
bool holds(const c10::SymBool& ok) { return ok.expect_true(__FILE__, __LINE__); }
}  // namespace

void check_input(const char* name, const Tensor& x, const c10::SymInt& clips,
                 c10::SymIntArrayRef frames, at::IntArrayRef rows) {
  TORCH_CHECK_VALUE(x.dim() == 4, name, " must be 4-D [frames, C, H, W], got shape ",
                    x.sym_sizes());
  TORCH_CHECK_VALUE(holds(x.sym_size(1).sym_ge(1)) && holds(x.sym_size(2).sym_ge(1)) &&
                        holds(x.sym_size(3).sym_ge(1)),
                    name, " must have at least one channel and one pixel, got shape ",
                    x.sym_sizes());
  const auto dt = x.scalar_type();
  TORCH_CHECK_TYPE(dt == at::kHalf || dt == at::kBFloat16 || dt == at::kFloat || dt == at::kDouble,
                   name, " must be float16, bfloat16, float32 or float64, got ", dt);
  // FrameLayout validates these in Python; direct callers of torch.ops.ffn_kernels get them here
  TORCH_CHECK_VALUE(holds(clips.sym_ge(1)), "layout: clips must be >= 1, got ", clips);
  TORCH_CHECK_VALUE(!frames.empty() && frames.size() == rows.size(), "layout: ", frames.size(),
                    " frame counts and ", rows.size(), " rows (one row per segment, at least one)");
  c10::SymInt total = 0;
  for (size_t s = 0; s < frames.size(); ++s) {
    TORCH_CHECK_VALUE(holds(frames[s].sym_ge(1)), "layout: every frame count must be >= 1, got ",
                      frames);
    TORCH_CHECK_VALUE(rows[s] >= 0, "layout: rows must be >= 0, got ", rows);
    // the kernels index frame counts and rows as int32, frames as int64
    TORCH_CHECK_VALUE(holds(frames[s].sym_le(INT32_MAX)) && rows[s] <= INT32_MAX,
                      "layout: frame counts and rows must be < 2^31, got frames=", frames,
                      ", rows=", rows);
    const auto c = clips.maybe_as_int(), t = frames[s].maybe_as_int(), sum = total.maybe_as_int();
    int64_t n = 0, next = 0;
    TORCH_CHECK_VALUE(!(c && t && sum) || (!c10::mul_overflows(*c, *t, &n) &&
                                           !c10::add_overflows(*sum, n, &next)),
                      "layout: clips=", clips, " x frames=", frames,
                      " is more than 2^63 - 1 frames (int64 overflow)");
    total = total + clips * frames[s];
  }
  TORCH_CHECK_VALUE(holds(x.sym_size(0).sym_eq(total)), name, ".shape[0] is ", x.sym_size(0),
                    " but the layout holds ", total, " frames (clips=", clips, " x frames=", frames,
                    ")");
}

void check_param(const char* name, const OptTensor& p, const Tensor& x, at::IntArrayRef rows) {
  if (!p) return;
  TORCH_CHECK_VALUE(p->dim() == 2 && holds(p->sym_size(1).sym_eq(x.sym_size(1))), name,
                    " must have shape [rows, C=", x.sym_size(1), "] (one row per branch), got ",
                    p->sym_sizes());
  TORCH_CHECK_TYPE(at::isFloatingType(p->scalar_type()), name,
                   " must be a floating-point tensor, got ", p->scalar_type());
  TORCH_CHECK_VALUE(p->device() == x.device(), name, " is on ", p->device(), " but x is on ",
                    x.device(), " (mixed devices)");
  const int64_t top = *std::max_element(rows.begin(), rows.end());
  TORCH_CHECK_VALUE(holds(p->sym_size(0).sym_gt(top)), "layout rows ", rows, " index row ", top,
                    " of ", name, ", which has only ", p->sym_size(0), " rows");
}

void check_like(const char* name, const OptTensor& t, const Tensor& x, const char* x_name) {
  if (!t) return;
  bool same = t->dim() == x.dim();
  for (int64_t d = 0; same && d < x.dim(); ++d) same = holds(t->sym_size(d).sym_eq(x.sym_size(d)));
  TORCH_CHECK_VALUE(same, name, " has shape ", t->sym_sizes(), " but ", x_name, " has ",
                    x.sym_sizes());
  TORCH_CHECK_TYPE(t->scalar_type() == x.scalar_type(), name, " has dtype ", t->scalar_type(),
                   " but ", x_name, " has ", x.scalar_type());
  TORCH_CHECK_VALUE(t->device() == x.device(), name, " is on ", t->device(), " but ", x_name,
                    " is on ", x.device(), " (mixed devices)");
}

void check_fold_div(int64_t fold_div, const Tensor& x) {
  TORCH_CHECK_VALUE(fold_div >= 2, "fold_div must be an int >= 2, got ", fold_div);
  TORCH_CHECK_VALUE(holds(x.sym_size(1).sym_ge(fold_div)), "fold_div=", fold_div, " exceeds the ",
                    x.sym_size(1), " channels: no channel would shift (C // fold_div == 0)");
}

void check_norm(const char* name, const Tensor& x, const c10::SymInt& clips,
                c10::SymIntArrayRef frames, at::IntArrayRef rows, const Tensor& weight,
                const Tensor& bias, const OptTensor& running_mean, const OptTensor& running_var,
                bool training, at::ArrayRef<double> momentum, double eps) {
  check_input(name, x, clips, frames, rows);
  check_param("weight", weight, x, rows);
  check_param("bias", bias, x, rows);
  check_param("running_mean", running_mean, x, rows);
  check_param("running_var", running_var, x, rows);
  TORCH_CHECK_VALUE(running_mean.has_value() == running_var.has_value(),
                    "running_mean and running_var must be given together (or both None)");
  TORCH_CHECK_VALUE(training || running_mean.has_value(),
                    "training=False needs running_mean and running_var");
  TORCH_CHECK_VALUE(momentum.size() == frames.size(), "momentum has ", momentum.size(),
                    " values but the layout has ", frames.size(), " segments");
  TORCH_CHECK_VALUE(eps > 0, "eps must be > 0, got ", eps);
  for (const double m : momentum)  // NaN fails both comparisons
    TORCH_CHECK_VALUE(m >= 0 && m <= 1, "momentum must be in [0, 1], got ", momentum);
  if (!training) return;
  if (running_mean) {
    for (size_t a = 0; a < rows.size(); ++a)
      for (size_t b = a + 1; b < rows.size(); ++b)
        TORCH_CHECK_VALUE(rows[a] != rows[b], "layout rows ", rows,
                          " repeat a row; in training each parameter row may appear at most once "
                          "per call (its running statistics would be updated twice)");
  }
  c10::SymInt fewest = frames[0];
  for (const c10::SymInt& t : frames) fewest = t.min(fewest);
  const c10::SymInt per_channel = clips * fewest * x.sym_size(2) * x.sym_size(3);
  TORCH_CHECK_VALUE(holds(per_channel.sym_ge(2)),
                    "training BatchNorm needs more than 1 value per channel in every segment, got ",
                    per_channel, " (clips=", clips, ", frames=", frames, ", spatial=[",
                    x.sym_size(2), ", ", x.sym_size(3), "])");
}

}  // namespace ops
}  // namespace ffn_kernels
