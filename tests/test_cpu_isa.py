"""The CPU kernels' two builds (csrc/cpu/isa.cpp, docs/design.md §4.4): the extension registers the
AVX2 + FMA build where the CPU has both, else the baseline one, and ``FFN_KERNELS_CPU_ISA=baseline``
forces the baseline. The rest of the suite runs whichever this machine gets; here every raw op pass
(forward and backward, training and eval, both memory formats) runs in a fresh process per build
and is checked against the reference."""

from __future__ import annotations

import os
import platform
import subprocess
import sys

import pytest
import torch

import ffn_kernels
from ffn_kernels import backend, reference
from conftest import ROOT, load_script

pytestmark = pytest.mark.skipif(not backend.compiled_kernels("CPU"),
                                reason="needs the extension's CPU kernels")

SHAPE = (10, 16, 5, 5)  # 2 clips x (2 + 3) frames, fold 2 of 16 channels
FRAMES = [2, 3]

CHILD = """
import sys, torch
sys.path.insert(0, {bench!r})
from ffn_kernels import backend
from op_passes import op_passes
assert torch.ops.ffn_kernels.cpu_isa() == {isa!r}, torch.ops.ffn_kernels.cpu_isa()
out = {{}}
for channels_last in (False, True):
    for i, p in enumerate(op_passes(backend._compiled(), 2, {frames!r}, {shape!r},
                                    channels_last=channels_last)):
        out[(channels_last, i)] = p()
torch.save(out, {path!r})
"""


def cpu_flags() -> set[str]:
    try:
        with open("/proc/cpuinfo") as f:
            return next((set(line.split(":", 1)[1].split()) for line in f
                         if line.startswith("flags")), set())
    except OSError:
        return set()


def has_avx2() -> bool:
    return platform.machine() in ("x86_64", "AMD64") and {"avx2", "fma"} <= cpu_flags()


def builds() -> list[str]:
    return ["baseline", "avx2"] if has_avx2() else ["baseline"]


def test_the_best_build_the_cpu_runs_is_registered():
    expected = "avx2" if has_avx2() and os.environ.get(backend.CPU_ISA_ENV) != "baseline" \
        else "baseline"
    assert backend.cpu_isa() == expected


@pytest.mark.parametrize("isa", ["baseline", "avx2"])
def test_every_pass_of_each_build_matches_the_reference(isa, tmp_path):
    if isa not in builds():
        pytest.skip("this CPU has no AVX2 + FMA")
    path = tmp_path / f"{isa}.pt"
    env = dict(os.environ, **{backend.CPU_ISA_ENV: "baseline" if isa == "baseline" else "auto"})
    code = CHILD.format(bench=str(ROOT / "bench"), isa=isa, frames=FRAMES, shape=SHAPE,
                        path=str(path))
    subprocess.run([sys.executable, "-c", code], env=env, check=True, timeout=300)
    got = torch.load(path, weights_only=True)
    op_passes = load_script("bench/op_passes.py").op_passes
    for channels_last in (False, True):
        for i, p in enumerate(op_passes(reference, 2, FRAMES, SHAPE, channels_last=channels_last)):
            want = p()
            outs = got[(channels_last, i)]
            want = want if isinstance(want, tuple) else (want,)
            outs = outs if isinstance(outs, tuple) else (outs,)
            for k, (g, w) in enumerate(zip(outs, want)):
                torch.testing.assert_close(
                    g, w, rtol=1e-4, atol=1e-4,
                    msg=lambda m: f"{isa} {p.op} {p.pass_} {p.mode} "
                                  f"{'channels_last' if channels_last else 'nchw'} output {k}: {m}")


@pytest.mark.parametrize("variable, value, choices", [
    (backend.CPU_ISA_ENV, "avx512", "auto, baseline"),
    (backend.CPU_STREAM_ENV, "always", "auto, never"),  # the streaming stores' switch
])
def test_an_unknown_cpu_kernel_setting_is_refused_naming_the_variable(variable, value, choices):
    env = dict(os.environ, **{variable: value})
    run = subprocess.run([sys.executable, "-c", "import ffn_kernels"], env=env,
                         capture_output=True, text=True, timeout=120)
    assert run.returncode != 0
    assert f"{variable}={value!r}: expected one of {choices}" in run.stderr
