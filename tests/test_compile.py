"""The compiler stack at any frame count: torch.compile of eval over frame counts 2..20 and batch
sizes 1..4 with one graph per branch (compile_eval) or a bounded number (plain), the fused
ops' fake kernels on symbolic sizes, torch.export with dynamic N and T, an AOTInductor package run
by a fresh process, ONNX of a folded branch, and function transforms refused naming the op
(double backward: test_<op>_is_differentiable_once in tests/test_<op>.py)."""

import subprocess
import sys
import textwrap

import pytest
import torch
from torch._dynamo.testing import CompileCounterWithBackend

from ffn import FFNResNet
from ffn.losses import temporal_distillation_loss
from ffn.compiled import compile_eval
from ffn.export import export_branch, export_model
from ffn.models import frames_served, nearest_branch
from ffn_kernels import FrameLayout, ops

FRAMES = (4, 8, 16)
SIZE = 16


def small_model():
    torch.manual_seed(0)
    return FFNResNet(depth=18, width=8, frames=FRAMES, num_classes=10).eval()


def clips(n, t, seed=0):
    return torch.randn(n, t, 3, SIZE, SIZE, generator=torch.Generator().manual_seed(seed))


@pytest.fixture(autouse=True)
def fresh_dynamo():
    torch._dynamo.reset()
    yield
    torch._dynamo.reset()


def test_compiled_training_step_matches_eager():
    """torch.compile(fullgraph=True) traces the packed training step, the ops and the block's
    recomputed conv1 input (ConvOfShifted) included, and gives the same loss and gradients."""
    torch.manual_seed(0)
    model = FFNResNet(depth=18, frames=(2, 4), num_classes=10, dropout=0.0, width=8)
    ref = FFNResNet(depth=18, frames=(2, 4), num_classes=10, dropout=0.0, width=8)
    ref.load_state_dict(model.state_dict())
    clips, target = [torch.randn(2, t, 3, 32, 32) for t in (2, 4)], torch.tensor([1, 7])
    compiled = torch.compile(model, fullgraph=True, backend="aot_eager")
    losses = []
    for m in (compiled, ref):
        loss = temporal_distillation_loss(m(clips), target).total
        loss.backward()
        losses.append(loss.detach())
    torch.testing.assert_close(losses[0], losses[1])
    for (name, p), q in zip(model.named_parameters(), ref.parameters()):
        torch.testing.assert_close(p.grad, q.grad, msg=name)


def test_compile_eval_one_graph_per_branch_for_any_frame_count_and_batch_size():
    """Frame counts 2..20 x batch sizes 1..4 (76 shapes) equal eager with one graph per branch."""
    model = small_model()
    counter = CompileCounterWithBackend("aot_eager")
    compiled = compile_eval(model, backend=counter)
    with torch.no_grad():
        for n in (2, 3, 4, 1):
            for t in range(2, 21):
                x = clips(n, t, seed=n * 100 + t)
                torch.testing.assert_close(compiled(x), model(x), msg=f"N={n}, T={t}")
                assert not hasattr(x, "_dynamo_unbacked_indices")  # the caller's tensor is unmarked
    assert counter.frame_count == len(FRAMES)


def test_compile_eval_recompiles_per_grad_mode_not_per_frame_count():
    model = small_model()
    counter = CompileCounterWithBackend("aot_eager")
    compiled = compile_eval(model, backend=counter)
    for grad in (False, True):
        with torch.set_grad_enabled(grad):
            for n, t in ((2, 6), (1, 7), (4, 9), (3, 11)):  # all on the 8-frame branch
                x = clips(n, t)
                torch.testing.assert_close(compiled(x), model(x))
    assert counter.frame_count == 2


@pytest.mark.parametrize("dynamic", [None, True])
def test_plain_compile_answers_any_shape(dynamic):
    """torch.compile(fullgraph=True) without compile_eval: right answers; the extra graphs come
    from PyTorch (size-1 specialisation of N, the CPU convolutions' N*T >= 16 guard, and for
    dynamic=None a first static graph), at most 4 per branch plus 1."""
    model = small_model()
    counter = CompileCounterWithBackend("aot_eager")
    compiled = torch.compile(model, fullgraph=True, backend=counter, dynamic=dynamic)
    with torch.no_grad():
        for n, t in ((2, 3), (3, 5), (2, 7), (4, 9), (1, 13), (2, 20)):
            x = clips(n, t)
            torch.testing.assert_close(compiled(x), model(x), msg=f"N={n}, T={t}")
    assert counter.frame_count <= 4 * len(FRAMES) + 1


@pytest.mark.parametrize("channels_last", [False, True], ids=["contiguous", "channels_last"])
def test_compile_eval_with_inductor(channels_last):
    model = small_model()
    if channels_last:
        model = model.to(memory_format=torch.channels_last)
    compiled = compile_eval(model)
    with torch.no_grad():
        for n, t in ((2, 6), (3, 10), (1, 13)):
            x = clips(n, t)
            torch.testing.assert_close(compiled(x), model(x), rtol=1e-4, atol=1e-4)


def test_layout_and_fake_kernels_take_symbolic_sizes():
    """Under make_fx with symbolic shapes the layout holds SymInts, and every op's fake kernel
    returns outputs with symbolic shapes (no specialisation to the example's sizes)."""
    from torch.fx.experimental.proxy_tensor import make_fx

    seen = []

    def fn(x, identity, weight, bias, alter):
        n, t = x.shape[:2]
        layout = FrameLayout.single(n, t, 1)
        seen.append((type(layout.clips), type(layout.frames[0])))
        x, identity = x.flatten(0, 1), identity.flatten(0, 1)
        y = ops.shift_alter(x, layout, alter)
        y = ops.freq_batch_norm(y, layout, weight, bias, training=True, activation="relu")
        out, nxt = ops.bn_add_relu_shift_alter(y, identity, layout, weight, bias, training=True,
                                               alter_next=alter)
        return out + nxt

    args = (torch.randn(2, 5, 8, 3, 3), torch.randn(2, 5, 8, 3, 3), torch.ones(3, 8),
            torch.zeros(3, 8), torch.zeros(3, 8))
    graph = make_fx(fn, tracing_mode="symbolic")(*args)
    assert seen == [(torch.SymInt, torch.SymInt)]
    outs = [n.meta["val"] for n in graph.graph.nodes
            if n.op == "call_function" and str(n.target).startswith("ffn_kernels.")]
    assert len(outs) == 3
    for out in outs:
        out = out[0] if isinstance(out, (tuple, list)) else out
        assert isinstance(out.shape[0], torch.SymInt), out.shape  # N*T, not the example's 10
    x = (torch.randn(3, 7, 8, 3, 3), torch.randn(3, 7, 8, 3, 3), *args[2:])
    torch.testing.assert_close(graph(*x), fn(*x))


def test_nearest_branch_splits_frame_counts_into_ranges():
    assert [frames_served(FRAMES, r, 20) for r in range(3)] == [range(1, 6), range(6, 12),
                                                                 range(12, 21)]
    for n in range(1, 40):
        key = [(abs(t - n), -t) for t in FRAMES]
        assert nearest_branch(FRAMES, n) == key.index(min(key))


def test_export_dynamic_batch_and_frames_per_branch(tmp_path):
    model = small_model()
    programs = export_model(model, SIZE, max_clips=8, max_frames=20)
    assert sorted(programs) == [0, 1, 2]
    path = tmp_path / "branch1.pt2"
    torch.export.save(programs[1], path)
    loaded = torch.export.load(path).module()
    with torch.no_grad():
        for n in (1, 2, 5):
            for t in range(2, 21):
                row = model.branch_for(t)
                run = loaded if row == 1 else programs[row].module()
                x = clips(n, t)
                torch.testing.assert_close(run(x), model(x), msg=f"N={n}, T={t}")


def test_export_refuses_training_mode():
    with pytest.raises(ValueError, match="eval"):
        export_model(small_model().train(), SIZE)


def test_aot_inductor_package_runs_in_a_process_that_imports_ffn_kernels(tmp_path):
    model = small_model()
    program = export_model(model, SIZE, max_clips=4, max_frames=11)[1]
    package = torch._inductor.aoti_compile_and_package(program,
                                                       package_path=str(tmp_path / "m.pt2"))
    x = clips(3, 7)
    with torch.no_grad():
        torch.save({"x": x, "y": model(x)}, tmp_path / "io.pt")
    script = textwrap.dedent(f"""
        import torch, ffn_kernels  # registers the fused ops the package calls
        io = torch.load({str(tmp_path / "io.pt")!r}, weights_only=True)
        runner = torch._inductor.aoti_load_package({package!r})
        torch.testing.assert_close(runner(io["x"]), io["y"], rtol=1e-4, atol=1e-4)
        print("ok")
    """)
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True,
                          timeout=600)
    assert done.returncode == 0 and "ok" in done.stdout, done.stderr[-3000:]


def test_folded_branch_through_onnx_runtime(tmp_path):
    """export_branch is plain aten: ONNX and onnxruntime run it without ffn_kernels (extra
    ``onnx``; skipped without it)."""
    pytest.importorskip("onnxscript")
    onnx = pytest.importorskip("onnx")
    ort = pytest.importorskip("onnxruntime")
    model = small_model()
    folded = export_branch(model, 1)
    x = clips(2, 8)
    path = tmp_path / "branch.onnx"
    torch.onnx.export(folded, (x,), str(path), dynamo=True, input_names=["clips"],
                      dynamic_shapes=({0: torch.export.Dim("N", max=64)},))
    onnx.checker.check_model(str(path))
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    for n in (2, 5):
        x = clips(n, 8, seed=n)
        (got,) = session.run(None, {"clips": x.numpy()})
        with torch.no_grad():
            torch.testing.assert_close(torch.from_numpy(got), model(x), rtol=1e-4, atol=1e-4)


LAYOUT = FrameLayout(clips=1, frames=(3,), rows=(0,))


def _op_calls():
    w = torch.ones(1, 8, dtype=torch.float64)
    return {
        "shift_alter": lambda x: ops.shift_alter(x, LAYOUT, 0.1 * w),
        "freq_batch_norm": lambda x: ops.freq_batch_norm(x, LAYOUT, w, 0 * w),
        "bn_add_relu_shift_alter": lambda x: ops.bn_add_relu_shift_alter(x, x, LAYOUT, w, 0 * w)[1],
    }


@pytest.mark.parametrize("op", list(_op_calls()))
@pytest.mark.parametrize("transform", ["grad", "jvp", "vjp", "forward_ad"])
def test_function_transforms_raise_naming_the_op(op, transform):
    fn = _op_calls()[op]
    x = torch.randn(3, 8, 2, 2, dtype=torch.float64)
    with pytest.raises(RuntimeError, match=rf"ffn_kernels::{op}\b.*torch\.autograd"):
        if transform == "grad":
            torch.func.grad(lambda v: fn(v).sum())(x)
        elif transform == "jvp":
            torch.func.jvp(fn, (x,), (torch.ones_like(x),))
        elif transform == "vjp":
            torch.func.vjp(fn, x)
        else:
            import torch.autograd.forward_ad as fwad
            with fwad.dual_level():
                fn(fwad.make_dual(x, torch.ones_like(x)))

