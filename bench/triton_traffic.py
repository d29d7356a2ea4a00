"""The traffic meter: memory traffic of the Triton kernels, counted from their own loads and stores
(docs/design.md §6). A measuring tool of the benchmark (``bench/traffic_section.py``), not part
of the library.

Under ``TRITON_INTERPRET=1`` every ``tl.load``/``tl.store`` goes through the interpreter's
builder; :func:`meter` wraps its masked load/store (plain ones route through them) and adds
``element size x active lanes`` (masked-off lanes touch no memory). :func:`report` runs each op's
forward and backward on one packed input and sets the bytes per element of ``x`` against the
minimum: every big input read once and every big output written once (parameters, statistics and
the layout table are ignored by the minimum, but counted in the measurement).

Measured with ``TRITON_INTERPRET=1 python bench/triton_traffic.py`` (float32, 4 bytes per
element; clips=2, frames=(4, 8, 16), C=32, 8x8, alter given, ``d alter`` requested; bytes per
element of ``x``, read and written in units of ``x``'s size):

=======================  ====  =====  =================================  =======  ========  ====  =======
op                       pass  mode   big tensors (read -> written)      minimum  measured  read  written
=======================  ====  =====  =================================  =======  ========  ====  =======
shift_alter              fwd   -      x -> y                             8        8.01      1.00  1.00
shift_alter              bwd   -      dy, x -> dx                        12       11.91     1.98  1.00
freq_batch_norm          fwd   train  x -> y                             8        12.07     2.01  1.01
freq_batch_norm          bwd   train  dy, x -> dx                        12       20.07     4.01  1.01
freq_batch_norm          fwd   eval   x -> y                             8        8.03      1.01  1.00
freq_batch_norm          bwd   eval   dy, x -> dx                        12       12.05     2.01  1.01
bn_add_relu_shift_alter  fwd   train  z, identity -> out, next_in        16       20.07     3.01  2.01
bn_add_relu_shift_alter  bwd   train  dout, dnext, z, out -> dz, did     24       39.88     7.96  2.01
bn_add_relu_shift_alter  fwd   eval   z, identity -> out, next_in        16       16.04     2.01  2.00
bn_add_relu_shift_alter  bwd   eval   dout, dnext, z, out -> dz, did     24       23.96     3.98  2.01
=======================  ====  =====  =================================  =======  ========  ====  =======

The few hundredths above a whole number are the layout table, parameters, statistics and
per-chunk partials. Backward passes can come in under the minimum because the gathered
``dnext``/``dy`` elements that the shift drops at clip edges are never loaded.

The excess in training is the statistics pass: batch statistics must be known before any output
element, so the forward reads ``x`` (``z``) once more and the backward reads its inputs once
more (the ``Σ g`` / ``Σ g·xhat`` pass). Eval is one pass at the minimum; the shift costs nothing
extra because it is scattered from (forward) or gathered into (backward) the same pass.
"""

from __future__ import annotations

import contextlib
import math
import dataclasses

import numpy as np
import torch

from op_passes import op_passes


@dataclasses.dataclass
class Traffic:
    read: int = 0
    written: int = 0


def _active_bytes(ptrs, mask) -> int:
    lanes = np.count_nonzero(np.broadcast_to(mask.data, ptrs.data.shape))
    return int(lanes) * (ptrs.get_element_ty().primitive_bitwidth // 8)


@contextlib.contextmanager
def meter():
    """Count the bytes Triton kernels load and store while the block runs (interpreter only).

    >>> with meter() as t:  # doctest: +SKIP
    ...     y = shift_alter_fwd(x, 2, [4, 8], [0, 1], None, 8)
    >>> t.read, t.written  # doctest: +SKIP
    """
    from triton import knobs
    from triton.runtime import interpreter

    if not knobs.runtime.interpret:
        raise RuntimeError("the traffic meter needs TRITON_INTERPRET=1 (set before importing triton)")
    builder = interpreter.InterpreterBuilder
    load, store = builder.create_masked_load, builder.create_masked_store
    counts = Traffic()

    def counted_load(self, ptrs, mask, *args):
        counts.read += _active_bytes(ptrs, mask)
        return load(self, ptrs, mask, *args)

    def counted_store(self, ptrs, value, mask, *args):
        counts.written += _active_bytes(ptrs, mask)
        return store(self, ptrs, value, mask, *args)

    builder.create_masked_load, builder.create_masked_store = counted_load, counted_store
    try:
        yield counts
    finally:
        builder.create_masked_load, builder.create_masked_store = load, store


def measure(fn, *args, **kwargs) -> tuple[int, int]:
    """``(bytes read, bytes written)`` by the Triton kernels that ``fn(*args, **kwargs)`` runs."""
    with meter() as counts:
        fn(*args, **kwargs)
    return counts.read, counts.written


def report(clips=2, frames=(4, 8, 16), channels=32, hw=(8, 8), dtype=torch.float32) -> list[dict]:
    """Bytes per element of ``x`` moved by each op's forward and backward (training and eval for
    the BN ops) next to the minimum. Rows: ``op``, ``pass``, ``mode``, ``minimum``, ``measured``."""
    import ffn_kernels.triton as api

    shape = (clips * sum(frames), channels, *hw)
    elements = math.prod(shape)
    size = torch.empty((), dtype=dtype).element_size()
    rows = []
    for p in op_passes(api, clips, list(frames), shape, dtype):
        read, written = measure(p.fn, *p.args)
        rows.append(dict(op=p.op, mode=p.mode, minimum=p.floor * size, measured=(read + written) / elements,
                         read=read / (elements * size), written=written / (elements * size),
                         **{"pass": p.pass_}))
    return rows


def format_table(rows: list[dict]) -> str:
    lines = [f"{'op':<26}{'pass':<6}{'mode':<7}{'minimum B/elem':>15}{'measured B/elem':>17}"
             f"{'(read':>8}{'written)':>10}"]
    for r in rows:
        lines.append(f"{r['op']:<26}{r['pass']:<6}{r['mode']:<7}{r['minimum']:>15.2f}"
                     f"{r['measured']:>17.2f}{r['read']:>8.2f}{r['written']:>10.2f}")
    return "\n".join(lines)


def main(argv=None) -> None:
    """The table of :func:`report` at its defaults, or with ``--json DTYPE`` its rows as one JSON
    line (how ``bench/traffic_section.py`` reads them from a child process)."""
    import argparse
    import json

    p = argparse.ArgumentParser(description="Memory traffic of the Triton kernels (TRITON_INTERPRET=1)")
    p.add_argument("--json", metavar="DTYPE", help="print report(dtype=DTYPE)'s rows as JSON")
    p.add_argument("--clips", type=int, default=2)
    p.add_argument("--frames", default="4,8,16", help="comma-separated frame counts")
    p.add_argument("--channels", type=int, default=32)
    p.add_argument("--hw", default="8,8", help="H,W")
    args = p.parse_args(argv)
    shape = dict(clips=args.clips, frames=tuple(int(f) for f in args.frames.split(",")),
                 channels=args.channels, hw=tuple(int(v) for v in args.hw.split(",")))
    if args.json:
        print(json.dumps(report(**shape, dtype=getattr(torch, args.json))))
    else:
        print(format_table(report(**shape)))


if __name__ == "__main__":
    main()
