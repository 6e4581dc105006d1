"""Data-parallel training: which process this is, its share of each epoch, and metrics every rank agrees on.

A single process (torch.distributed not initialised) is rank 0 of 1 and every function here is the
identity, so the single-process path is unchanged. Under torchrun (faceclf.training.launch) or Ray Train
(faceclf.training.ray_train) the process group is initialised before training starts, and:

- every rank draws the same per-epoch permutation (the run's seeded generator, in step on every rank) and
  takes its part of it as DistributedSampler does: padded by wrapping to a multiple of the world size,
  then every world_size-th index from its rank. Every rank therefore runs the same number of equal-sized
  batches (DDP needs every rank in every step) and the generator stays in step, so rank 0's last.pt
  resumes all of them;
- validation is split over ranks the same way (unpadded) and the predictions gathered, so every rank
  computes the same loss and accuracy and takes the same early-stopping decision;
- rank 0 alone writes checkpoints, history, plots and metrics.
"""

from __future__ import annotations

import hashlib
import logging
import os
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import nn

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Rank:
    """This process's place in the training group."""

    rank: int = 0
    world_size: int = 1

    @property
    def is_main(self) -> bool:
        """Rank 0: the one process that writes the run folder."""
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.world_size > 1


def current() -> Rank:
    """This process's rank and the world size; rank 0 of 1 when torch.distributed is not initialised."""
    if dist.is_available() and dist.is_initialized():
        return Rank(dist.get_rank(), dist.get_world_size())
    return Rank()


def backend_for(device: torch.device) -> str:
    """NCCL between GPUs, gloo between CPU processes."""
    return "nccl" if device.type == "cuda" else "gloo"


def init_from_env(device: torch.device) -> Rank:
    """Join the process group the launcher described in the environment (RANK, WORLD_SIZE, MASTER_ADDR,
    MASTER_PORT, as torchrun sets them); on a GPU bind this process to its LOCAL_RANK's device."""
    if device.type == "cuda":
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
    if not dist.is_initialized():
        dist.init_process_group(backend_for(device))
    return current()


def part_of(order: torch.Tensor, part: Rank, pad: bool = True) -> torch.Tensor:
    """This rank's indices of ``order`` (1-D): every world_size-th from its rank. With ``pad`` the order
    is first extended by wrapping to a multiple of the world size (DistributedSampler's rule), so every
    rank gets the same count."""
    if not part.distributed:
        return order
    if pad and len(order):
        total = -(-len(order) // part.world_size) * part.world_size
        order = order.repeat(-(-total // len(order)))[:total]
    return order[part.rank::part.world_size]


def share(n: int, part: Rank) -> int:
    """How many of ``n`` items (padded) each rank gets per epoch."""
    return -(-n // part.world_size) if n else 0


def gather_rows(rows: torch.Tensor, positions: torch.Tensor, n: int, part: Rank) -> torch.Tensor:
    """Every rank's ``rows`` (K_r, ...) placed at their ``positions`` (K_r,) in one (n, ...) tensor, on
    every rank. Single process: ``rows`` put in order."""
    if part.distributed:
        pieces: list[tuple[torch.Tensor, torch.Tensor] | None] = [None] * part.world_size
        dist.all_gather_object(pieces, (rows.cpu(), positions.cpu()))
    else:
        pieces = [(rows, positions)]
    out = torch.empty((n, *rows.shape[1:]), dtype=rows.dtype)
    for got in pieces:
        assert got is not None
        out[got[1]] = got[0]
    return out


def wrap(model: nn.Module, device: torch.device, part: Rank) -> nn.Module:
    """The module training steps go through: DistributedDataParallel across ranks, the model itself alone.
    DDP broadcasts rank 0's initial weights, so every rank starts from the same ones."""
    if not part.distributed:
        return model
    ids = [device.index if device.index is not None else torch.cuda.current_device()] if device.type == "cuda" else None
    return nn.parallel.DistributedDataParallel(model, device_ids=ids)


def weights_digest(model: nn.Module) -> str:
    """sha256 over the model's parameters and buffers (name, dtype, shape, bytes): equal exactly when the
    weights are."""
    h = hashlib.sha256()
    for name, t in model.state_dict().items():
        t = t.detach().cpu().contiguous()
        h.update(f"{name}:{t.dtype}:{tuple(t.shape)}".encode())
        h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return h.hexdigest()


def digests_of_every_rank(model: nn.Module, part: Rank) -> list[str]:
    """The weights digest of each rank, in rank order (on every rank)."""
    mine = weights_digest(model)
    if not part.distributed:
        return [mine]
    out: list[str | None] = [None] * part.world_size
    dist.all_gather_object(out, mine)
    return [str(d) for d in out]


def barrier(part: Rank) -> None:
    """Wait for every rank (no-op alone)."""
    if part.distributed:
        dist.barrier()


def sum_over_ranks(values: list[float], part: Rank) -> list[float]:
    """Each value summed over every rank (float64), on every rank; the values themselves alone."""
    if not part.distributed:
        return values
    t = torch.tensor(values, dtype=torch.float64)
    dist.all_reduce(t)
    return t.tolist()
