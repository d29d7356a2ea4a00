"""Top-1/top-5 accuracy of a model at given frame counts (each on its nearest branch)."""

from __future__ import annotations

import sys
from typing import Iterable, Optional

import torch
from torch import nn
from torch.utils.data import DataLoader, Subset

from ..config import DataConfig, UserError
from ..data import EvalClips, build_source, collate, eval_dataset
from ..data.dataset import Source
from .distributed import Dist, all_sum
from .progress import Progress


@torch.no_grad()
def accuracy(model: nn.Module, dataset: EvalClips, batch_size: int, workers: int, device: torch.device,
             d: Dist = Dist(), amp_dtype: Optional[torch.dtype] = None, reported: Optional[set] = None) -> dict:
    """``{"top1", "top5", "videos", "skipped"}`` over the whole dataset, each rank taking every
    ``world``-th video; views (crops, twice-sampling) average their logits. Each skipped video is
    printed to stderr (once per ``reported`` set where one is given)."""
    reported = set() if reported is None else reported
    was_training = model.training
    model.eval()
    loader = DataLoader(Subset(dataset, range(d.rank, len(dataset), d.world)), batch_size,
                        num_workers=workers, collate_fn=collate)
    top1 = top5 = videos = skipped = 0
    for batch in loader:
        skipped += len(batch.skipped)
        for bad in batch.skipped:
            if bad.index not in reported:
                reported.add(bad.index)
                print(f"skipped validation video {bad.index}: {bad.reason}", file=sys.stderr)
        if not len(batch):
            continue
        batch = batch.to(device, non_blocking=True)
        n, v = batch.clips.shape[:2]
        with torch.autocast(device.type, dtype=amp_dtype or torch.float32, enabled=amp_dtype is not None):
            logits = model(batch.clips.flatten(0, 1))
        logits = logits.float().view(n, v, -1).mean(1)
        hits = logits.topk(min(5, logits.shape[1]), 1).indices == batch.labels[:, None]
        top1 += int(hits[:, 0].sum())
        top5 += int(hits.any(1).sum())
        videos += n
    model.train(was_training)
    top1, top5, videos, skipped = all_sum([top1, top5, videos, skipped], d, device)
    if not videos:
        raise UserError(f"no readable validation video ({int(skipped)} skipped with --skip-bad)")
    return {"top1": 100 * top1 / videos, "top5": 100 * top5 / videos, "videos": int(videos),
            "skipped": int(skipped)}


def accuracy_by_frames(model: nn.Module, cfg: DataConfig, frames: Iterable[int], device: torch.device,
                       d: Dist = Dist(), twice: bool = False, crops: int = 1,
                       amp_dtype: Optional[torch.dtype] = None,
                       source: Optional[Source] = None,
                       progress: Optional[Progress] = None) -> dict[int, dict]:
    """:func:`accuracy` on the validation split (``source``, or the one ``cfg`` names) at every frame
    count in ``frames``; each skipped video is printed once. ``progress`` is updated after each
    count with its top-1."""
    source = build_source(cfg, "val") if source is None else source
    reported: set = set()
    results = {}
    for n in frames:
        results[n] = accuracy(model, eval_dataset(cfg, n, twice, crops, source), cfg.batch_size,
                              cfg.workers, device, d, amp_dtype, reported)
        if progress is not None:
            progress.update(frames=n, top1=f"{results[n]['top1']:.1f}")
    return results
