"""The GPU validation's run-time checks beyond the op tests (``.ci/gpu_check.py`` runs each in a
step of its own, the op sweep under compute-sanitizer), as tests marked ``cuda``: they run on a
GPU and skip elsewhere, saying why.

- ``test_ops_under_sanitizer``: every op forward and backward through ``ffn_kernels.ops`` on the
  cuda backend, small on purpose (compute-sanitizer memcheck and racecheck run it);
- ``test_sync_free_training_step[cuda|triton]``: a fused FFN training step under
  ``torch.cuda.set_sync_debug_mode("error")``;
- ``test_cuda_graph_training_step[cuda|triton]``: a training step captured in a CUDA graph,
  replayed on new data, against an eager copy taking the same step.

Without a GPU, ``test_checks_run_on_cpu`` runs the same code on CPU (CPU backend; no sync mode,
no graph capture there), so it stays valid code.
"""

import copy

import pytest
import torch

import ffn_kernels
from conftest import SKIP_REASON, only
from ffn_kernels import FrameLayout, ops

HAS_GPU = torch.cuda.is_available()


def gpu_backend_skip(backend):
    """Why ``backend`` cannot run on the GPU here (None when it can)."""
    if backend == "cuda":
        return SKIP_REASON["cuda"]
    if not HAS_GPU:
        return "needs a CUDA device (the Triton kernels compiled for it, not interpreted)"
    return SKIP_REASON["triton"]


def on_gpu(backend):
    """Marks of a test of ``backend``'s kernels on the GPU: ``cuda``, and a skip where it cannot
    run."""
    reason = gpu_backend_skip(backend)
    return [pytest.mark.cuda] + ([pytest.mark.skip(reason=reason)] if reason else [])


def gpu_backends():
    return pytest.mark.parametrize("backend", [pytest.param(b, id=b, marks=on_gpu(b))
                                               for b in ("cuda", "triton")])


@pytest.fixture
def restore_backend():
    previous = ffn_kernels.get_backend()
    yield
    ffn_kernels.set_backend(previous)


def use_backend(backend: str, device: str) -> str:
    """``backend`` for ``device``'s tensors (``auto`` on CPU); its name, checked on the GPU."""
    ffn_kernels.set_backend(backend if device == "cuda" else "auto")
    name = ffn_kernels.backend_name(device)
    if device == "cuda":
        assert name == backend, f"backend for cuda tensors is {name!r}, wanted {backend!r}"
        if backend == "cuda":
            assert ffn_kernels.backend.extension_has_cuda(), (
                "ffn_kernels._C has no CUDA kernels (build step failed?)")
    return name


def sweep_ops(device: str = "cuda") -> str:
    """Every op forward + backward through ffn_kernels.ops on the cuda backend: NCHW and
    channels_last, fp32 and fp16 (4- and 8-wide vectors), a vectorisable shape, a scalar-path
    shape (C*H*W not a multiple of the vector width) and a multi-chunk reduction, train and eval
    (eval BN backward: the one-pass kernel). Small on purpose: it runs under compute-sanitizer."""
    name = use_backend("cuda", device)
    cases = [  # (layout, C, (H, W))
        (FrameLayout(clips=2, frames=(2, 3, 4), rows=(0, 1, 2)), 16, (5, 4)),
        (FrameLayout(clips=1, frames=(1, 3, 5), rows=(2, 0, 1)), 10, (3, 3)),
        (FrameLayout(clips=4, frames=(2, 4, 8), rows=(0, 1, 2)), 16, (16, 16)),
    ]
    g = torch.Generator().manual_seed(0)

    def rand(*shape, dtype=torch.float32):
        return torch.randn(*shape, generator=g).to(device=device, dtype=dtype)

    calls = 0
    for fmt in (torch.contiguous_format, torch.channels_last):
        for dtype in (torch.float32, torch.float16):
            for layout, C, hw in cases:
                F = layout.total_frames

                def act():
                    return rand(F, C, *hw, dtype=dtype).contiguous(memory_format=fmt).requires_grad_()

                def param(base=0.0):
                    return (base + 0.3 * rand(3, C)).requires_grad_()

                x, res = act(), act()
                w, b, alter, alter_next = param(1.0), param(), param(), param()
                y = ops.shift_alter(x, layout, alter, 8)
                torch.autograd.backward(y, torch.randn_like(y))
                calls += 1
                for training in (True, False):
                    rm, rv = 0.1 * rand(3, C), 0.5 + rand(3, C).abs()
                    y = ops.freq_batch_norm(x, layout, w, b, rm, rv, training, 0.1, 1e-5, "relu", res)
                    torch.autograd.backward(y, torch.randn_like(y))
                    y = ops.freq_batch_norm(x, layout, w, b, rm, rv, training, 0.1, 1e-5)
                    torch.autograd.backward(y, torch.randn_like(y))
                    out, nxt = ops.bn_add_relu_shift_alter(x, res, layout, w, b, rm, rv, training,
                                                           0.1, 1e-5, alter_next, 8)
                    torch.autograd.backward((out, nxt), (torch.randn_like(out), torch.randn_like(nxt)))
                    calls += 3
                for t in (x, res, w, b, alter, alter_next):
                    assert t.grad is not None and torch.isfinite(t.grad.float()).all(), (
                        f"bad gradient ({fmt}, {dtype}, C={C}, hw={hw})")
    if device == "cuda":
        torch.cuda.synchronize()
    return f"ops ok: {calls} fwd+bwd calls on the {name} backend"


def model_step(backend: str, device: str, depth: int = 50, width: int = 16, size: int = 32):
    """A small fused FFN model (by default ResNet-50 bottlenecks, width 16, 3 branches, 32x32) with its
    inputs, an SGD optimiser and a training-step function (forward, distillation loss, backward,
    step)."""
    from ffn import FFNResNet
    from ffn.losses import temporal_distillation_loss

    name = use_backend(backend, device)
    torch.manual_seed(0)
    frames = (2, 4, 8)
    model = FFNResNet(depth=depth, frames=frames, num_classes=5, dropout=0.0, width=width).to(device)
    clips = [torch.randn(2, t, 3, size, size, device=device) for t in frames]
    target = torch.randint(5, (2,), device=device)
    opt = torch.optim.SGD(model.parameters(), lr=1e-3, momentum=0.9)

    def step(model=model, opt=opt):
        opt.zero_grad(set_to_none=True)
        loss = temporal_distillation_loss(model(clips), target).total
        loss.backward()
        opt.step()
        return loss

    return name, model, clips, target, opt, step


def sync_free_step(backend: str, device: str = "cuda", **model_kw) -> str:
    """One training step with every synchronising CUDA call an error (after one warm-up step,
    which may create cuDNN/cuBLAS handles and load modules)."""
    name, model, clips, target, opt, step = model_step(backend, device, **model_kw)
    step()
    if device == "cuda":
        torch.cuda.synchronize()
        torch.cuda.set_sync_debug_mode("error")
    try:
        loss = step()
    finally:
        if device == "cuda":
            torch.cuda.set_sync_debug_mode("default")
    if device == "cuda":
        torch.cuda.synchronize()
    assert torch.isfinite(loss), f"loss is {loss.item()}"
    return f"sync-free training step ok on the {name} backend (loss {loss.item():.4f})"


def graph_step(backend: str, device: str = "cuda", **model_kw) -> str:
    """A training step captured in a CUDA graph (as torch.cuda.graph's docs: warm up on a side
    stream, grads set to None before capture), replayed on new data, against an eager copy of the
    model and optimiser taking the same step. On CPU only the eager part runs."""
    from ffn.losses import temporal_distillation_loss

    name, model, clips, target, opt, step = model_step(backend, device, **model_kw)
    use_graph = device == "cuda"
    if use_graph:
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            for _ in range(3):
                step()
        torch.cuda.current_stream().wait_stream(side)
    else:
        step()
    twin = copy.deepcopy(model)
    twin_opt = torch.optim.SGD(twin.parameters(), lr=1e-3, momentum=0.9)
    twin_opt.load_state_dict(copy.deepcopy(opt.state_dict()))
    if use_graph:
        graph = torch.cuda.CUDAGraph()
        opt.zero_grad(set_to_none=True)  # grads are then allocated from the graph's pool
        with torch.cuda.graph(graph):
            static_loss = step()
    gen = torch.Generator().manual_seed(1)
    for c in clips:  # new data into the static inputs
        c.copy_(torch.randn(c.shape, generator=gen).to(device))
    if use_graph:
        graph.replay()
        loss = static_loss.detach().clone()
    else:
        loss = step().detach()
    twin_opt.zero_grad(set_to_none=True)
    twin_loss = temporal_distillation_loss(twin(clips), target).total
    twin_loss.backward()
    twin_opt.step()
    if device == "cuda":
        torch.cuda.synchronize()
    torch.testing.assert_close(loss, twin_loss.detach(), rtol=1e-3, atol=1e-4,
                               msg=lambda m: f"graph loss vs eager: {m}")
    worst = 0.0
    for (pn, p), q in zip(model.named_parameters(), twin.parameters()):
        rel = float((p - q).detach().norm() / q.detach().norm().clamp_min(1e-12))
        worst = max(worst, rel)
        assert rel <= 1e-3, f"parameter {pn} after the graph step differs from eager by {rel:.2e}"
    for (bn, b), c in zip(model.named_buffers(), twin.buffers()):
        assert not b.is_floating_point() or torch.allclose(b, c, rtol=1e-3, atol=1e-5), (
            f"buffer {bn} after the graph step differs from eager")
    if use_graph:
        for _ in range(2):  # replays keep training
            graph.replay()
        torch.cuda.synchronize()
        assert torch.isfinite(static_loss), "loss after replays is not finite"
    return (f"{'CUDA-graph' if use_graph else 'eager'} training step ok on the {name} backend "
            f"(loss {loss.item():.4f}, eager {twin_loss.item():.4f}, params within {worst:.1e})")


@only("cuda")
def test_ops_under_sanitizer(restore_backend):
    print(sweep_ops("cuda"))


@gpu_backends()
def test_sync_free_training_step(backend, restore_backend):
    print(sync_free_step(backend, "cuda"))


@gpu_backends()
def test_cuda_graph_training_step(backend, restore_backend):
    print(graph_step(backend, "cuda"))


def test_checks_run_on_cpu(restore_backend):
    """The op sweep and the training steps are valid code: on CPU they run with the CPU backend
    (no sync mode, no graph capture there)."""
    assert "ops ok" in sweep_ops("cpu")
    small = dict(depth=18, width=8, size=16)
    assert "sync-free training step ok" in sync_free_step("cuda", "cpu", **small)
    assert "eager training step ok" in graph_step("cuda", "cpu", **small)
