"""Process-group set-up from torchrun's environment, and the few collectives training needs."""

from __future__ import annotations

import gc
import os
from dataclasses import dataclass
from datetime import timedelta

import torch
import torch.distributed as dist
from torch import nn

from ..config import UserError


@dataclass(frozen=True)
class Dist:
    """This process's place in the run (a single process is rank 0 of 1)."""

    rank: int = 0
    world: int = 1
    local_rank: int = 0

    @property
    def main(self) -> bool:
        return self.rank == 0

    @property
    def enabled(self) -> bool:
        return self.world > 1


def setup(device: str = "auto", timeout: float = 10.0) -> tuple[Dist, torch.device]:
    """Join the process group torchrun describes (``RANK``, ``WORLD_SIZE``, ``LOCAL_RANK``): NCCL on
    GPUs, gloo on CPUs. ``device`` is auto, cpu or cuda. ``timeout`` (minutes, ``train.dist_timeout``)
    bounds the wait for the other processes, to join and in every collective: a process whose
    peers died or never started fails then, instead of after torch's 30 minutes."""
    d = Dist(int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1)),
             int(os.environ.get("LOCAL_RANK", 0)))
    if device == "cuda" and not torch.cuda.is_available():
        why = "this PyTorch is built without CUDA" if torch.version.cuda is None else "no CUDA device is visible"
        raise UserError(f"config train.device: 'cuda' but {why}; use train.device=auto or cpu")
    use_cuda = device == "cuda" or (device == "auto" and torch.cuda.is_available())
    if use_cuda:
        torch.cuda.set_device(d.local_rank)
        dev = torch.device("cuda", d.local_rank)
    else:
        dev = torch.device("cpu")
    if d.enabled and not dist.is_initialized():
        try:
            dist.init_process_group("nccl" if use_cuda else "gloo", rank=d.rank, world_size=d.world,
                                    timeout=timedelta(minutes=timeout))
        except dist.DistError as e:  # the store or the peers did not answer in time
            raise UserError(
                f"config train.dist_timeout: rank {d.rank} of {d.world} could not join the others "
                f"within {timeout:g} min ({type(e).__name__}); are all processes of the run "
                f"started (torchrun), and MASTER_ADDR/MASTER_PORT right?") from None
    return d, dev


def teardown() -> None:
    """Destroy the process group after collecting the garbage that may still hold it: the
    finished run's DDP wrapper, kept alive by reference cycles, otherwise held the gloo group
    until the interpreter's shutdown, whose destruction there aborted the process ("terminate
    called without an active exception") in 8 of 50 2-process runs, and in none of 40 with the
    collection (docs/design.md §7)."""
    if dist.is_initialized():
        gc.collect()
        dist.destroy_process_group()


def all_sum(values: list[float], d: Dist, device: torch.device) -> list[float]:
    """Element-wise sum of ``values`` over all processes."""
    t = torch.tensor(values, dtype=torch.float64, device=device)
    if d.enabled:
        dist.all_reduce(t)
    return t.tolist()


def all_min(value: int, d: Dist, device: torch.device) -> int:
    t = torch.tensor([value], device=device)
    if d.enabled:
        dist.all_reduce(t, op=dist.ReduceOp.MIN)
    return int(t.item())


def gather(obj, d: Dist) -> list:
    """``obj`` of every rank, in rank order."""
    if not d.enabled:
        return [obj]
    out = [None] * d.world
    dist.all_gather_object(out, obj)
    return out


def broadcast_buffers(model: nn.Module, d: Dist) -> None:
    """Give every rank rank 0's buffers (BN running statistics), as the checkpoint holds them."""
    if d.enabled:
        for b in model.buffers():
            dist.broadcast(b, 0)
