"""FFN on UniFormer-S (video): the official UniFormer-FFN structure (docs/design.md §5.11).

A 3D network: the branches differ in T, so each branch's clips stay one ``[N, C, T, H, W]``
tensor, and the 3D convs (patch embeddings, positional and local-aggregation depthwise convs, the
CBlocks' 1x1x1 convs) and the attention (over each clip's T·H·W tokens) run per branch. Per branch
(one parameter row each): every BatchNorm3d of the CBlocks (:class:`~ffn_kernels.FreqBatchNorm3d`),
every LayerNorm of the SABlocks and patch embeddings (:class:`~ffn_kernels.FreqLayerNorm`), the
final BatchNorm3d, and Weight Alteration ``(1 + a_p[c]) * x`` before every block. Everything else
is shared. The SABlocks' per-token work (LayerNorms, qkv and output projections, MLP) runs once on
the tokens of all branches packed along dim 0 (the measured choice, §5.11).

``forward`` is :class:`~ffn.models.FrameFlexible`'s: eval at any frame count ``n`` uses the nearest
branch's rows over the ``n`` given frames.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Optional, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ffn_kernels import FrameLayout, FreqBatchNorm3d, FreqLayerNorm, ShiftAlter

from .models import FrameFlexible

DEPTHS = (3, 4, 8, 3)  # UniFormer-S
DIMS = (1, 2, 5, 8)  # stage channels in units of `width` (64: 64, 128, 320, 512)
MLP_RATIO = 4
MIN_SIZE = 32  # the four patch embeddings reduce H and W 32-fold, without padding
SA_EPS = 1e-6  # the SABlocks' LayerNorms; the patch embeddings' keep nn.LayerNorm's 1e-5


@dataclass(frozen=True)
class Passes:
    """How a UniFormer-FFN model runs its per-branch work: :data:`FUSED` (the packed model) or
    :data:`EAGER` (the twin, the official code's operations one branch at a time).

    ``layer_norm(ln, tokens, layout, residual=None)``: per-branch LayerNorm (with a residual,
    ``(LN(x + r), x + r)``); ``batch_norm(bn, x, row)``: one branch's BatchNorm3d;
    ``alter_pos(block, x, row)``: WA then the positional conv, ``a + pos_embed(a)``,
    ``a = (1 + alter[row]) * x``; ``attention(q, k, v)``: softmax(q kᵀ / sqrt(d)) v."""

    layer_norm: Callable[..., object]
    batch_norm: Callable[[FreqBatchNorm3d, Tensor, int], Tensor]
    alter_pos: Callable[[nn.Module, Tensor, int], Tensor]
    attention: Callable[[Tensor, Tensor, Tensor], Tensor]


def to_tokens(xs: Sequence[Tensor]) -> Tensor:
    """Per-branch ``[N, C, T, H, W]`` -> the packed tokens ``[ΣN·T, H·W, C]`` (clip-major,
    frame-minor in each branch's segment: the token layout of :func:`token_layout`)."""
    toks = [x.permute(0, 2, 3, 4, 1).reshape(-1, x.shape[3] * x.shape[4], x.shape[1]) for x in xs]
    return toks[0] if len(toks) == 1 else torch.cat(toks)


def token_layout(xs: Sequence[Tensor], rows: Sequence[int]) -> FrameLayout:
    return FrameLayout(clips=xs[0].shape[0], frames=tuple(x.shape[2] for x in xs), rows=tuple(rows))


def from_tokens(tokens: Tensor, like: Sequence[Tensor]) -> list[Tensor]:
    """The inverse of :func:`to_tokens` (contiguous ``[N, C, T, H, W]`` per branch)."""
    parts = tokens.split([x.shape[0] * x.shape[2] for x in like])
    return [p.view(x.shape[0], *x.shape[2:], x.shape[1]).permute(0, 4, 1, 2, 3).contiguous()
            for p, x in zip(parts, like)]


class PatchEmbed(nn.Module):
    """A shared 3D conv (``kernel = stride`` in H, W, no spatial padding) and a per-branch LN."""

    def __init__(self, cin: int, cout: int, kernel, stride, padding, branches: int) -> None:
        super().__init__()
        self.proj = nn.Conv3d(cin, cout, kernel, stride, padding)
        self.norm = FreqLayerNorm(cout, branches)

    def forward(self, xs: list[Tensor], rows: Sequence[int], passes: Passes) -> list[Tensor]:
        ys = [self.proj(x) for x in xs]
        return from_tokens(passes.layer_norm(self.norm, to_tokens(ys), token_layout(ys, rows)), ys)


def conv3d(cin: int, cout: int, k: int, groups: int = 1) -> nn.Conv3d:
    return nn.Conv3d(cin, cout, k, padding=k // 2, groups=groups)


class CMlp(nn.Module):
    def __init__(self, dim: int, hidden: int) -> None:
        super().__init__()
        self.fc1, self.fc2 = conv3d(dim, hidden, 1), conv3d(hidden, dim, 1)

    def forward(self, x: Tensor) -> Tensor:
        return self.fc2(F.gelu(self.fc1(x)))


def drop_path(x: Tensor, rate: float, clips: int, frames: Sequence[int] = (1,)) -> Tensor:
    """Stochastic depth (timm's ``DropPath``): each clip's ``x`` is zeroed with probability
    ``rate``, else divided by ``1 - rate``. Dim 0 of ``x`` holds segment after segment, each
    ``clips`` clips of ``frames[s]`` entries (``[N, ...]`` for one clip per entry, packed tokens
    ``[N·ΣT, ...]`` with the token layout)."""
    keep = 1 - rate
    mask = x.new_empty(len(frames), clips).bernoulli_(keep).div_(keep)
    mask = torch.cat([m.repeat_interleave(t) for m, t in zip(mask, frames)])
    return x * mask.view(-1, *[1] * (x.dim() - 1))


class Block(nn.Module):
    """What both block kinds have: WA (``alter``, ``[P, C]``), the positional depthwise 3x3x3
    conv applied as ``x + pos_embed(x)`` to the altered input, and the stochastic depth rate of
    both residual branches."""

    def __init__(self, dim: int, branches: int, weight_alteration: bool, drop: float) -> None:
        super().__init__()
        self.alter = ShiftAlter(dim, branches, alter=weight_alteration, shift=False)
        self.pos_embed = conv3d(dim, dim, 3, groups=dim)
        self.drop = drop

    def dropped(self, x: Tensor, clips: int, frames: Sequence[int] = (1,)) -> Tensor:
        return drop_path(x, self.drop, clips, frames) if self.training and self.drop > 0 else x


class CBlock(Block):
    """Convolutional block: local aggregation ``conv2(attn(conv1(BN1 x)))`` (attn a depthwise
    5x5x5 conv) and a 1x1x1-conv MLP after BN2, both residual; BNs per branch."""

    def __init__(self, dim: int, branches: int, weight_alteration: bool, drop: float) -> None:
        super().__init__(dim, branches, weight_alteration, drop)
        self.norm1 = FreqBatchNorm3d(dim, branches)
        self.conv1 = conv3d(dim, dim, 1)
        self.attn = conv3d(dim, dim, 5, groups=dim)
        self.conv2 = conv3d(dim, dim, 1)
        self.norm2 = FreqBatchNorm3d(dim, branches)
        self.mlp = CMlp(dim, dim * MLP_RATIO)

    def forward(self, xs: list[Tensor], rows: Sequence[int], passes: Passes) -> list[Tensor]:
        out = []
        for x, row in zip(xs, rows):
            x = passes.alter_pos(self, x, row)
            n = x.shape[0]
            h = self.conv2(self.attn(self.conv1(passes.batch_norm(self.norm1, x, row))))
            x = x + self.dropped(h, n)
            out.append(x + self.dropped(self.mlp(passes.batch_norm(self.norm2, x, row)), n))
        return out


class Attention(nn.Module):
    """Multi-head self-attention over each clip's T·H·W tokens (qkv with bias, as UniFormer)."""

    def __init__(self, dim: int, heads: int) -> None:
        super().__init__()
        self.heads = heads
        self.qkv = nn.Linear(dim, dim * 3)
        self.proj = nn.Linear(dim, dim)

    def forward(self, tokens: Tensor, layout: FrameLayout, passes: Passes) -> Tensor:
        qkv = self.qkv(tokens)
        c, outs = tokens.shape[-1], []
        for part, seg in zip(layout.split(qkv), layout.segments()):
            # [N·T, HW, 3C] -> q, k, v [N, heads, T·HW, C/heads]: a clip's tokens attend together
            q, k, v = part.reshape(seg.clips, -1, 3, self.heads, c // self.heads).permute(2, 0, 3, 1, 4)
            o = passes.attention(q, k, v).transpose(1, 2)
            outs.append(o.reshape(part.shape[0], part.shape[1], c))
        return self.proj(outs[0] if len(outs) == 1 else torch.cat(outs))


class Mlp(nn.Module):
    def __init__(self, dim: int, hidden: int) -> None:
        super().__init__()
        self.fc1, self.fc2 = nn.Linear(dim, hidden), nn.Linear(hidden, dim)

    def forward(self, x: Tensor) -> Tensor:
        return self.fc2(F.gelu(self.fc1(x)))


class SABlock(Block):
    """Self-attention block: pre-LN attention and MLP, both residual; LNs per branch. The
    per-token work runs on the packed tokens of all branches, the attention per clip."""

    def __init__(self, dim: int, heads: int, branches: int, weight_alteration: bool,
                 drop: float) -> None:
        super().__init__(dim, branches, weight_alteration, drop)
        self.norm1 = FreqLayerNorm(dim, branches, eps=SA_EPS)
        self.attn = Attention(dim, heads)
        self.norm2 = FreqLayerNorm(dim, branches, eps=SA_EPS)
        self.mlp = Mlp(dim, dim * MLP_RATIO)

    def forward(self, xs: list[Tensor], rows: Sequence[int], passes: Passes) -> list[Tensor]:
        xs = [passes.alter_pos(self, x, row) for x, row in zip(xs, rows)]
        t, layout = to_tokens(xs), token_layout(xs, rows)
        a = self.attn(passes.layer_norm(self.norm1, t, layout), layout, passes)
        a = self.dropped(a, layout.clips, layout.frames)
        h, s = passes.layer_norm(self.norm2, a, layout, residual=t)  # s = t + a, h = LN2(s)
        return from_tokens(s + self.dropped(self.mlp(h), layout.clips, layout.frames), xs)


class FFNUniFormer(FrameFlexible):
    """Frame Flexible UniFormer-S (video): ``frames``, ``forward`` as :class:`FrameFlexible`.

    ``width`` is the first stage's channel count (64 in UniFormer-S: stages of 64, 128, 320, 512
    channels and heads of 64 channels, i.e. 1, 2, 5, 8 heads); the head width scales with it, so a
    small width (CPU tests) keeps the head counts. Frames must be at least 32x32 pixels; any frame
    count works (the first patch embedding halves T, rounding up). ``dropout`` is applied before
    the classifier (the official UniFormer-FFN has none: 0 reproduces it). ``drop_path``: the
    stochastic depth rate of the last block, rising linearly from 0 at the first (official: 0.1)."""

    def __init__(self, frames: Sequence[int] = (4, 8, 16), num_classes: int = 400,
                 dropout: float = 0.0, width: int = 64, weight_alteration: bool = True,
                 drop_path: float = 0.0) -> None:
        super().__init__(frames)
        if width < 1:
            raise ValueError(f"width must be >= 1, got {width}")
        if not 0 <= drop_path < 1:
            raise ValueError(f"drop_path must be in [0, 1), got {drop_path}")
        self.config = dict(frames=self.frames, num_classes=num_classes, dropout=dropout,
                           width=width, weight_alteration=weight_alteration, drop_path=drop_path)
        p, dims = self.num_branches, [width * d for d in DIMS]
        self.patch_embed1 = PatchEmbed(3, dims[0], (3, 4, 4), (2, 4, 4), (1, 0, 0), p)
        for i in range(1, 4):
            self.add_module(f"patch_embed{i + 1}", PatchEmbed(dims[i - 1], dims[i], (1, 2, 2),
                                                              (1, 2, 2), 0, p))
        rates = iter(torch.linspace(0, drop_path, sum(DEPTHS), device="cpu").tolist())  # as timm
        for i, (dim, depth) in enumerate(zip(dims, DEPTHS)):
            make = ((lambda: CBlock(dim, p, weight_alteration, next(rates))) if i < 2 else
                    (lambda: SABlock(dim, dim // width, p, weight_alteration, next(rates))))
            self.add_module(f"blocks{i + 1}", nn.ModuleList(make() for _ in range(depth)))
        self.norm = FreqBatchNorm3d(dims[-1], p)
        self.dropout = nn.Dropout(dropout)
        self.head = nn.Linear(dims[-1], num_classes)
        for m in self.modules():  # UniFormer's init: Linear layers N(0, 0.02) truncated at ±2
            if isinstance(m, nn.Linear):
                nn.init.trunc_normal_(m.weight, std=0.02)
                nn.init.zeros_(m.bias)

    def stages(self):
        for i in range(1, 5):
            yield getattr(self, f"patch_embed{i}"), getattr(self, f"blocks{i}")

    def features(self, xs: list[Tensor], rows: Sequence[int], passes: Optional[Passes] = None
                 ) -> list[Tensor]:
        """Pooled ``[N, C]`` features per branch of clips ``xs`` ``[N, 3, T, H, W]``."""
        passes = passes or FUSED
        for embed, blocks in self.stages():
            xs = embed(xs, rows, passes)
            for block in blocks:
                xs = block(xs, rows, passes)
        return [passes.batch_norm(self.norm, x, row).flatten(2).mean(-1) for x, row in zip(xs, rows)]

    def clips(self, x: Tensor, layout: FrameLayout) -> list[Tensor]:
        """Packed frames ``[F, 3, H, W]`` -> ``[N, 3, T, H, W]`` per segment."""
        if min(x.shape[-2:]) < MIN_SIZE:
            raise ValueError(f"UniFormer needs frames of at least {MIN_SIZE}x{MIN_SIZE} pixels, "
                             f"got {tuple(x.shape[-2:])}")
        return [xs.view(seg.clips, seg.frames, *x.shape[1:]).transpose(1, 2).contiguous()
                for xs, seg in zip(layout.split(x), layout.segments())]

    def branch_logits(self, x: Tensor, layout: FrameLayout) -> tuple[Tensor, ...]:
        pooled = self.features(self.clips(x, layout), layout.rows)
        return tuple(self.head(self.dropout(p)) for p in pooled)


def fused_layer_norm(ln: FreqLayerNorm, x: Tensor, layout: FrameLayout,
                     residual: Optional[Tensor] = None):
    return ln(x, layout, residual=residual)


def fused_batch_norm(bn: FreqBatchNorm3d, x: Tensor, row: int) -> Tensor:
    return bn(x, row)


def fused_alter_pos(block: Block, x: Tensor, row: int) -> Tensor:
    """``a + pos_embed(a)`` with ``a = s·x``, ``s = 1 + alter[row]`` per channel: the positional
    conv is depthwise, so ``pos_embed(s·x)`` is the conv of ``x`` with its taps scaled by ``s``,
    and ``a`` is added in the same pass (``addcmul``); ``a`` is never stored (§5.11)."""
    conv = block.pos_embed
    if block.alter.weight is None:
        return x + conv(x)
    s = 1 + block.alter.weight[row]
    y = F.conv3d(x, conv.weight * s.view(-1, 1, 1, 1, 1), conv.bias, padding=conv.padding,
                 groups=conv.groups)
    return torch.addcmul(y, x, s.view(-1, 1, 1, 1))


FUSED = Passes(fused_layer_norm, fused_batch_norm, fused_alter_pos,
               F.scaled_dot_product_attention)


def eager_layer_norm(ln: FreqLayerNorm, x: Tensor, layout: FrameLayout,
                     residual: Optional[Tensor] = None):
    """One branch's ``nn.LayerNorm`` (the layout has one segment)."""
    (seg,) = layout.segments()
    s = x if residual is None else x + residual
    y = F.layer_norm(s, (ln.normalized_shape,), ln.weight[seg.row], ln.bias[seg.row], ln.eps)
    return y if residual is None else (y, s)


def eager_batch_norm(bn: FreqBatchNorm3d, x: Tensor, row: int) -> Tensor:
    from .eager import branch_norm

    return branch_norm(bn, x, row)


def eager_alter_pos(block: Block, x: Tensor, row: int) -> Tensor:
    """The official order: ``adaconv`` as a residual depthwise 1x1x1 conv, then ``x + pos_embed(x)``."""
    if block.alter.weight is not None:
        c = x.shape[1]
        x = x + F.conv3d(x, block.alter.weight[row].view(c, 1, 1, 1, 1), groups=c)
    return x + block.pos_embed(x)


def eager_attention(q: Tensor, k: Tensor, v: Tensor) -> Tensor:
    return ((q @ k.transpose(-2, -1)) * q.shape[-1] ** -0.5).softmax(-1) @ v


EAGER = Passes(eager_layer_norm, eager_batch_norm, eager_alter_pos, eager_attention)


class EagerFFNUniFormer(FFNUniFormer):
    """Eager twin of :class:`FFNUniFormer` (same modules and keys), structured like the official
    code: the branches run one after another through every layer, each norm is ``F.layer_norm`` /
    ``F.batch_norm`` on its row, WA a residual depthwise conv, attention an explicit softmax."""

    def branch_logits(self, x: Tensor, layout: FrameLayout) -> tuple[Tensor, ...]:
        return tuple(self.head(self.dropout(self.features([c], [row], EAGER)[0]))
                     for c, row in zip(self.clips(x, layout), layout.rows))
