"""The layout by context: ``with ffn_kernels.frame_layout(layout):`` lets FreqBatchNorm2d,
ShiftAlter and ffnify's ShiftedConv run without a layout argument (docs/design.md §5.7)."""

import threading

import pytest
import torch
from torch import nn

from ffn.ffnify import ShiftedConv
from ffn_kernels import FrameLayout, FreqBatchNorm2d, ShiftAlter, current_layout, frame_layout

TRAIN = FrameLayout(clips=2, frames=(2, 4))
EVAL = FrameLayout.single(clips=3, frames=3, row=1)


def tiny_net(seed=0) -> nn.Sequential:
    """A block-like chain of every module that reads the context."""
    torch.manual_seed(seed)
    net = nn.Sequential(
        ShiftAlter(8, 2), nn.Conv2d(8, 8, 3, padding=1, bias=False), FreqBatchNorm2d(8, 2),
        nn.ReLU(), ShiftedConv(ShiftAlter(8, 2), nn.Conv2d(8, 8, 1, bias=False)),
        FreqBatchNorm2d(8, 2),
    )
    with torch.no_grad():
        for m in net.modules():
            if isinstance(m, (ShiftAlter, FreqBatchNorm2d)):
                m.weight.normal_(0, 0.3)
    return net


def explicit(net: nn.Sequential, x, layout):
    """The same chain with the layout passed to every module."""
    for m in net:
        x = m(x, layout) if isinstance(m, (ShiftAlter, FreqBatchNorm2d, ShiftedConv)) else m(x)
    return x


def frames_of(layout, seed=0):
    return torch.randn(layout.total_frames, 8, 4, 4, generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("layout", [TRAIN, EVAL], ids=["train", "eval"])
def test_context_equals_explicit(layout):
    a, b = tiny_net(), tiny_net()
    x = frames_of(layout)
    with frame_layout(layout):
        ya = a(x)
    yb = explicit(b, x, layout)
    assert torch.equal(ya, yb)
    ya.square().sum().backward(), yb.square().sum().backward()
    for (name, pa), pb in zip(a.named_parameters(), b.parameters()):
        assert torch.equal(pa.grad, pb.grad), name
    assert all(torch.equal(u, v) for u, v in zip(a.buffers(), b.buffers()))  # running statistics


def test_an_explicit_layout_wins_over_the_context():
    x = frames_of(EVAL)
    with frame_layout(TRAIN):
        inside = explicit(tiny_net(), x, EVAL)
    assert torch.equal(inside, explicit(tiny_net(), x, EVAL))


def test_nested_contexts_restore_the_outer_layout():
    assert current_layout() is None
    with frame_layout(TRAIN) as outer:
        assert outer is TRAIN and current_layout() is TRAIN
        with frame_layout(EVAL):
            assert current_layout() is EVAL
            net = tiny_net()
            net(frames_of(EVAL))  # the inner layout: EVAL's frame count fits, TRAIN's would not
        assert current_layout() is TRAIN
        manager = frame_layout(EVAL)  # one object entered twice (re-entrant)
        with manager, manager:
            assert current_layout() is EVAL
        assert current_layout() is TRAIN
    assert current_layout() is None


def test_an_exception_inside_restores_the_outer_layout():
    with frame_layout(TRAIN):
        with pytest.raises(ValueError, match="layout holds"):
            with frame_layout(EVAL):
                tiny_net()(frames_of(TRAIN))  # TRAIN's frames under EVAL: refused by the op
        assert current_layout() is TRAIN
    assert current_layout() is None


def test_blocks_that_exit_out_of_order_are_refused():
    a, b = frame_layout(TRAIN), frame_layout(EVAL)
    a.__enter__(), b.__enter__()
    with pytest.raises(RuntimeError, match="out of order"):
        a.__exit__(None, None, None)
    b.__exit__(None, None, None), a.__exit__(None, None, None)
    assert current_layout() is None


def test_two_threads_with_different_layouts():
    """Each thread sees its own layout, however the two interleave (a barrier between every step)."""
    nets = {"train": tiny_net(), "eval": tiny_net()}
    layouts = {"train": TRAIN, "eval": EVAL}
    barrier, results, errors = threading.Barrier(2), {}, []

    def work(key):
        try:
            layout, net = layouts[key], nets[key]
            with frame_layout(layout):
                for _ in range(3):
                    barrier.wait(timeout=60)
                    assert current_layout() is layout
                    results[key] = net(frames_of(layout))
        except Exception as e:  # noqa: BLE001 - reported below
            errors.append(e)
            barrier.abort()

    threads = [threading.Thread(target=work, args=(k,)) for k in nets]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors, errors
    assert current_layout() is None  # the main thread never had one
    for key, layout in layouts.items():
        reference = tiny_net()
        for _ in range(3):  # the same three training calls (running statistics) in one thread
            y = explicit(reference, frames_of(layout), layout)
        assert torch.equal(results[key], y), key


def test_compiled_fullgraph_reads_the_context_and_recompiles_for_another_layout():
    """Training mode (batch statistics), so the extra calls' running statistics do not matter."""
    eager, net = tiny_net(), tiny_net()
    compiled = torch.compile(net, fullgraph=True)

    @torch.compile(fullgraph=True)
    def inside(x, layout):  # the context entered inside the compiled region
        with frame_layout(layout):
            return net(x)

    for layout in (TRAIN, EVAL, TRAIN):  # a guard on the context's layout: EVAL recompiles
        x = frames_of(layout)
        with frame_layout(layout):
            expected = eager(x)
            torch.testing.assert_close(compiled(x), expected, rtol=1e-5, atol=1e-5)
        assert current_layout() is None
    x = frames_of(TRAIN)
    torch.testing.assert_close(inside(x, TRAIN), explicit(eager, x, TRAIN), rtol=1e-5, atol=1e-5)
    assert current_layout() is None  # the compiled exit restored it


def test_compiled_without_a_layout_reports_the_missing_layout():
    compiled = torch.compile(FreqBatchNorm2d(8, 2), fullgraph=True)
    # dynamo wraps the module's TypeError (torch._dynamo.exc.Unsupported), keeping its message
    with pytest.raises((TypeError, RuntimeError), match="FreqBatchNorm2d needs a FrameLayout"):
        compiled(frames_of(TRAIN))


@pytest.mark.parametrize("module", [FreqBatchNorm2d(8, 2), ShiftAlter(8, 2),
                                    ShiftedConv(ShiftAlter(8, 2), nn.Conv2d(8, 8, 1))],
                         ids=["FreqBatchNorm2d", "ShiftAlter", "ShiftedConv"])
def test_no_layout_and_no_context_names_both_ways(module):
    with pytest.raises(TypeError, match=rf"{type(module).__name__} needs a FrameLayout: pass it as an "
                                        r"argument.*frame_layout\(layout\)"):
        module(frames_of(TRAIN))
    if isinstance(module, FreqBatchNorm2d):
        with pytest.raises(TypeError, match="needs a FrameLayout"):
            module.add_relu_shift_alter(frames_of(TRAIN), frames_of(TRAIN))


def test_frame_layout_takes_only_a_frame_layout():
    with pytest.raises(TypeError, match="frame_layout: layout must be a ffn_kernels.FrameLayout, got tuple"):
        frame_layout((2, (4, 8)))
