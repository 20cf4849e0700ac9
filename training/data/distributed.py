"""The processes of a data command or a training stream: which one this is, and the few collectives they need.

Processes come from ``accelerate launch`` or ``torchrun`` (the environment's RANK / WORLD_SIZE); a command that runs
before anything set up ``torch.distributed`` joins the group itself (``join``, gloo). The collectives run on CPU
tensors over gloo: where the training group is NCCL, a gloo group beside it (``cpu_group``) carries them.
"""

from __future__ import annotations

import os
from datetime import timedelta

import torch
import torch.distributed as dist

from earlyfusion.core.errors import UserError

_GROUPS: dict[str, object] = {}


def rank_world() -> tuple[int, int]:
    """(rank, world size) of the process group, (0, 1) without one."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def join() -> tuple[int, int]:
    """(rank, world size), joining the process group that RANK / WORLD_SIZE describe when nothing joined it yet."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world > 1 and not (dist.is_available() and dist.is_initialized()):
        try:
            dist.init_process_group("gloo", timeout=timedelta(hours=2))
        except (ValueError, RuntimeError) as e:
            raise UserError(f"WORLD_SIZE={world} but the process group cannot be joined ({e}); start the processes "
                            "with `accelerate launch` or `torchrun`") from None
    return rank_world()


def cpu_group():
    """A process group whose collectives take CPU tensors: the default one when it is gloo, else a gloo group beside it
    (made once; every process must ask for it at the same point)."""
    if dist.get_backend() == "gloo":
        return None
    if "gloo" not in _GROUPS:
        _GROUPS["gloo"] = dist.new_group(backend="gloo")
    return _GROUPS["gloo"]


def gather_objects(obj) -> list:
    """Every process's ``obj`` (picklable), in rank order; ``[obj]`` alone."""
    _, world = rank_world()
    if world == 1:
        return [obj]
    out = [None] * world
    dist.all_gather_object(out, obj, group=cpu_group())
    return out


def gather_rows(rows: torch.Tensor) -> torch.Tensor:
    """Every process's ``rows`` (same shape and dtype on all), concatenated in rank order along the first dimension."""
    _, world = rank_world()
    if world == 1:
        return rows
    out = [torch.empty_like(rows) for _ in range(world)]
    dist.all_gather(out, rows.contiguous(), group=cpu_group())
    return torch.cat(out)
