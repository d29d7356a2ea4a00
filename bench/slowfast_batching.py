"""Would SlowFast-FFN gain from running its branches' temporal-kernel-1 convs as one call?
(docs/design.md §5.10.) For a few such convs of SlowFast-R50 (width 64, 112-pixel input), the three
branches' convs one after another (as :class:`ffn.slowfast.FFNSlowFast` runs them) vs one conv2d on
all branches' frames packed along N (the packing itself not timed: a packed design would not copy).

    python bench/slowfast_batching.py [--clips 2] [--repeats 7]
"""

from __future__ import annotations

import argparse

import torch
import torch.nn.functional as F

from timing import measure

# (conv, C_in, C_out, spatial kernel, H = W, the branches' T): slow T = fast T / 4
CONVS = [("res3 slow c 1x1x1", 128, 512, 1, 14, (4, 8, 16)),
         ("res4 slow b 1x3x3", 256, 256, 3, 7, (4, 8, 16)),
         ("res2 fast b 1x3x3", 8, 8, 3, 28, (16, 32, 64)),
         ("res4 fast c 1x1x1", 32, 128, 1, 7, (16, 32, 64))]


def best_ms(fn, repeats: int) -> float:
    return measure(fn, torch.device("cpu"), repeats).min_ms


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--clips", type=int, default=2)
    p.add_argument("--repeats", type=int, default=7)
    args = p.parse_args()
    torch.manual_seed(0)
    print(f"{torch.get_num_threads()} threads, {args.clips} clips, best of {args.repeats}")
    for name, cin, cout, k, hw, ts in CONVS:
        w = torch.randn(cout, cin, 1, k, k)
        xs = [torch.randn(args.clips, cin, t, hw, hw) for t in ts]
        per_branch = best_ms(lambda: [F.conv3d(x, w, padding=(0, k // 2, k // 2)) for x in xs],
                             args.repeats)
        packed = torch.cat([x.transpose(1, 2).flatten(0, 1) for x in xs])  # [N·ΣT, C, H, W]
        one = best_ms(lambda: F.conv2d(packed, w[:, :, 0], padding=k // 2), args.repeats)
        print(f"{name}: per branch (3 conv3d) {per_branch:.2f} ms, packed (1 conv2d) {one:.2f} ms, "
              f"{per_branch / one:.2f}x")


if __name__ == "__main__":
    main()
