"""Sharded data parallelism for the decoder (``train --sharding fsdp``): FSDP2 and sharded checkpoints.

``shard_decoder`` applies ``torch.distributed.fsdp.fully_shard`` to each transformer block (``Block``, the unit
whose weights are gathered for its forward and backward and freed after), to the token embedding and the output
layer, and then to the whole decoder, on a device mesh of all processes. Each process then holds 1/N
of every weight as a DTensor, its gradient and, since the optimizer is made over those DTensors, 1/N of AdamW's
state. Gradients are reduce-scattered (averaged) as DDP would all-reduce them, so the update is the one a single
process computes on the same global batch. It works wherever torch.distributed runs: gloo on CPU processes, NCCL
on GPUs.

Checkpoints: every process writes its shards of the weights and of AdamW's state with torch.distributed.checkpoint
(DCP) into ``SHARDED_DIR`` of the step directory (``save_sharded``); ``load_sharded`` reads them back on any number
of processes, sharded or not, since DCP reshards on load. The weights are also gathered to the main process and
written as the ordinary ``model.safetensors`` beside them (``full_weights``), so that ``load_run``, ``sample``,
``eval`` and ``--init-from`` read a sharded run like any other. DCP's ``.metadata`` file is a pickle: only
``--resume`` reads it.
"""

from __future__ import annotations

from pathlib import Path

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch import nn
from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict, get_state_dict, set_state_dict
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.fsdp import FSDPModule, fully_shard
from torch.distributed.tensor import DTensor, distribute_tensor

from earlyfusion.model.decoder import Block, Decoder

SHARDED_DIR = "sharded"
"""The folder of a step checkpoint that holds the DCP state (weights and optimizer) of a --sharding fsdp run."""


def shard_decoder(model: Decoder, device: torch.device) -> Decoder:
    """Shard ``model`` over all processes (torch.distributed must be initialised): each ``Block`` is one unit, and so
    are the token embedding and the output layer when they are separate, the rest of the decoder (the final norm)
    the root one. The weights move to ``device``; the module stays a ``Decoder``."""
    mesh = init_device_mesh(device.type, (dist.get_world_size(),))
    units = [m for m in model.modules() if isinstance(m, Block)]
    # a unit's weights are whole only while it runs: the embedding and the output layer, the largest weights of a
    # decoder with a large vocabulary, are gathered one at a time rather than both for the whole forward and
    # backward. A tied output reads the embedding's weight outside the embedding's forward, so both stay in the root.
    if model.output is not None:
        units += [model.tok_emb, model.output]
    for unit in units:
        fully_shard(unit, mesh=mesh)
    fully_shard(model, mesh=mesh)
    return model


def is_sharded(model: nn.Module) -> bool:
    return isinstance(model, FSDPModule)


def local(t: torch.Tensor) -> torch.Tensor:
    """This process's part of ``t``: its shard of a DTensor, else all of it."""
    return t.to_local() if isinstance(t, DTensor) else t


def all_finite(tensors: list[torch.Tensor]) -> bool:
    """Whether every element of ``tensors`` is finite. Sharded tensors are checked shard by shard and the answer
    agreed over the processes (every process must call it)."""
    ok = all(bool(torch.isfinite(local(t)).all()) for t in tensors)
    if any(isinstance(t, DTensor) for t in tensors) and dist.is_initialized():
        flag = torch.tensor([1 if ok else 0], device=next(local(t) for t in tensors).device)
        dist.all_reduce(flag, op=dist.ReduceOp.MIN)
        ok = bool(flag.item())
    return ok


def global_norm(norm: torch.Tensor) -> float:
    """A gradient norm as a number: the norm over all shards (clip_grad_norm_ returns a DTensor for sharded
    gradients, whose local value would be the norm of this process's part)."""
    return float(norm.full_tensor() if isinstance(norm, DTensor) else norm)


def zero_grad_rows_outside(weight: nn.Parameter, rows: range) -> None:
    """Zero the gradient of a row-sharded weight outside ``rows`` (``lm_inputs.mask_to_image_head`` for a DTensor,
    whose slices cannot be assigned): the mask of rows is cut the way the weight is, each process zeroes its part."""
    grad = weight.grad
    if grad is None:
        return
    keep = torch.zeros(grad.shape[0], 1, dtype=torch.bool, device=local(grad).device)
    keep[rows.start:rows.stop] = True
    # src_data_rank None: every process holds the whole mask and takes its own rows (no communication)
    mine = distribute_tensor(keep, grad.device_mesh, grad.placements, src_data_rank=None).to_local()
    local(grad).masked_fill_(~mine, 0)


class Weights:
    """Gathered weights in the place of a module where only its ``state_dict()`` is read (``rundir.write_decoder``)."""

    def __init__(self, tensors: dict[str, torch.Tensor]):
        self.tensors = tensors

    def state_dict(self) -> dict[str, torch.Tensor]:
        return self.tensors


def full_weights(model: nn.Module) -> Weights:
    """The whole weights of a sharded model, gathered to the main process's CPU memory (every process must call it;
    the others get an empty set). The gathered tensors are the model's fp32 master weights, one copy."""
    return Weights(get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True)))


def save_sharded(directory: Path, model: nn.Module, optimizer: torch.optim.Optimizer) -> None:
    """Write this process's shards of the weights and of the optimizer state into ``directory/SHARDED_DIR``
    (every process, the same ``directory``; DCP's coordinator, the main process, writes the index)."""
    model_state, optim_state = get_state_dict(model, optimizer)
    dcp.save({"model": model_state, "optimizer": optim_state}, checkpoint_id=Path(directory) / SHARDED_DIR,
             no_dist=not dist.is_initialized())


def load_sharded(directory: Path, model: nn.Module, optimizer: torch.optim.Optimizer) -> None:
    """Load the weights and optimizer state of ``directory/SHARDED_DIR`` into ``model`` and ``optimizer``, sharded
    over any number of processes or not sharded at all (DCP reads each process's part from whichever files hold
    it). Every process must call it."""
    # the state dicts of this model and optimizer, as the places to load into (AdamW's state is created, zero)
    model_state, optim_state = get_state_dict(model, optimizer)
    state = {"model": model_state, "optimizer": optim_state}
    dcp.load(state, checkpoint_id=Path(directory) / SHARDED_DIR, no_dist=not dist.is_initialized())
    set_state_dict(model, optimizer, model_state_dict=state["model"], optim_state_dict=state["optimizer"])


def main_value(value, main: bool):
    """``value`` of the main process, on every process (every process must call it)."""
    if not dist.is_initialized() or dist.get_world_size() == 1:
        return value
    box = [value if main else None]
    dist.broadcast_object_list(box, src=0)
    return box[0]
