"""Streaming stores of the CPU kernels (csrc/cpu/common.h, docs/design.md §4.4): outputs larger
than the last-level cache keeps are written run by run into a stack buffer and streamed to memory
with non-temporal stores. Only outputs from 8 MB (read later) or 64 MB (read by the next op) take
that path, which the rest of the suite's small shapes never reach. Here every pass of the ops that
stream runs on 68 MB activations, in both memory formats, once streamed and once with
``FFN_KERNELS_CPU_STREAM=never`` (each in its own process: the extension reads the variable when it
loads), and the outputs must be the same bits; the in-place path is checked against the reference by
the rest of the suite. 67 channels and 157x161 planes make runs start at every alignment (a run's
16-byte-aligned middle is streamed, its ends stored)."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

from ffn_kernels import backend
from conftest import ROOT

pytestmark = pytest.mark.skipif(not backend.compiled_kernels("CPU"),
                                reason="needs the extension's CPU kernels")

SHAPE = (10, 67, 157, 161)  # 2 clips x (2 + 3) frames; 16.9M elements, 68 MB in float32
FRAMES = [2, 3]

# prints one SHA-256 per output of every streamed pass
CHILD = """
import hashlib, sys, torch
sys.path.insert(0, {bench!r})
from ffn_kernels import backend
from op_passes import op_passes
for channels_last in (False, True):
    for p in op_passes(backend._compiled(), 2, {frames!r}, {shape!r}, channels_last=channels_last):
        if p.op == "freq_layer_norm":  # its outputs are written in place
            continue
        outs = p()
        for k, o in enumerate(outs if isinstance(outs, tuple) else (outs,)):
            digest = hashlib.sha256(o.contiguous().view(torch.uint8).numpy()).hexdigest()
            print(channels_last, p.op, p.pass_, p.mode, k, digest)
"""


def outputs(stream: str) -> list[str]:
    env = dict(os.environ, **{backend.CPU_STREAM_ENV: stream})
    code = CHILD.format(bench=str(ROOT / "bench"), frames=FRAMES, shape=SHAPE)
    run = subprocess.run([sys.executable, "-c", code], env=env, check=True, timeout=600,
                         capture_output=True, text=True)
    return run.stdout.splitlines()


def test_outputs_are_large_enough_to_stream():
    # kStreamSoonBytes in csrc/cpu/common.h: below it no output the next op reads is streamed
    assert SHAPE[0] * SHAPE[1] * SHAPE[2] * SHAPE[3] * 4 >= 64 << 20


def test_streamed_outputs_are_the_bits_written_in_place():
    streamed, in_place = outputs("auto"), outputs("never")
    assert len(streamed) == len(in_place) > 40
    for got, want in zip(streamed, in_place):
        assert got == want

