"""What a training run holds in memory per process: weights, gradients and optimizer state.

``planned_bytes`` is what a decoder about to train will hold (read from its parameters, before the first step:
a sharded parameter counts its local shard), ``held_bytes`` what a model and its optimizer hold now (the tensors
themselves), and ``recipe_bytes`` what a decoder shape would take under one of the recipes of
docs/several-gpus.md, from the shape alone. Activations, the batch and temporary buffers (a sharded block's
gathered weights while it runs) are not counted: they depend on the batch and the context, not on the weights.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from earlyfusion.model.decoder import DecoderConfig
from earlyfusion.training.sharding import local

ADAMW_STATES = 2
"""Tensors AdamW keeps per parameter, each of its size and dtype (exp_avg, exp_avg_sq); its step counts are scalars."""

LORA_RANK = 16
"""The adapter rank of the LoRA recipe (on every projection of every block)."""

MiB = 2 ** 20
GiB = 2 ** 30


@dataclass(frozen=True)
class Held:
    """Bytes held per process."""
    weights: int
    grads: int
    optimizer: int

    @property
    def total(self) -> int:
        return self.weights + self.grads + self.optimizer

    def to_dict(self) -> dict[str, int]:
        return {"weights": self.weights, "grads": self.grads, "optimizer": self.optimizer, "total": self.total}


def local_bytes(t: torch.Tensor) -> int:
    """Bytes of this process's part of ``t`` (its shard of a DTensor)."""
    part = local(t)
    return part.numel() * part.element_size()


def planned_bytes(model: nn.Module) -> Held:
    """What ``model`` will hold once it has trained a step under AdamW: its weights, a gradient for each weight that
    trains, and AdamW's two states for each of those, all in the weights' dtype and sharding."""
    params = list(model.parameters())
    trainable = sum(local_bytes(p) for p in params if p.requires_grad)
    return Held(sum(local_bytes(p) for p in params), trainable, ADAMW_STATES * trainable)


def held_bytes(model: nn.Module, optimizer: torch.optim.Optimizer) -> Held:
    """What ``model`` and ``optimizer`` hold now: the weights, the gradients present, every tensor of the optimizer's
    state (shards counted as this process's part)."""
    params = list(model.parameters())
    states = [v for s in optimizer.state.values() for v in s.values() if isinstance(v, torch.Tensor)]
    return Held(sum(local_bytes(p) for p in params), sum(local_bytes(p.grad) for p in params if p.grad is not None),
                sum(local_bytes(t) for t in states))


def memory_line(held: Held, world: int, sharded: bool) -> str:
    """The start-of-run line: what each process will hold, and whether it is sharded."""
    how = (f"a 1/{world} shard of each on each of {world} processes" if sharded
           else f"all of it on each of {world} processes" if world > 1 else "one process")
    return (f"memory per process: weights {held.weights / MiB:.1f} MiB + gradients {held.grads / MiB:.1f} MiB + AdamW "
            f"state {held.optimizer / MiB:.1f} MiB = {held.total / MiB:.1f} MiB ({how}; activations not counted)")


# ---------------------------------------------------------------- recipes, from the shape alone

RECIPES = ("full", "lora", "image-head")


def lora_params(cfg: DecoderConfig, rank: int = LORA_RANK) -> int:
    """Adapter parameters of LoRA at ``rank`` on every projection of every block (qkv, attention output, gate_up,
    down): rank × (in + out) each."""
    d, hd = cfg.dim, cfg.head_dim
    qkv = d + (cfg.n_heads + 2 * cfg.n_kv_heads) * hd
    proj = cfg.n_heads * hd + d
    mlp = (d + 2 * cfg.hidden_dim) + (cfg.hidden_dim + d)
    return cfg.n_layers * rank * (qkv + proj + mlp)


def recipe_bytes(cfg: DecoderConfig, recipe: str, world: int = 1) -> Held:
    """Bytes per process of training ``cfg``'s shape under ``recipe``, sharded over ``world`` processes:

    * full: fp32 master weights, fp32 gradients and AdamW's two fp32 states: 16 bytes per parameter;
    * lora: the whole decoder frozen in bf16 (2 bytes per parameter, no gradient), adapters of ``LORA_RANK`` on every
      projection trained like full (16 bytes per adapter parameter);
    * image-head: the whole decoder in fp32 (frozen but the output layer), gradient and AdamW state for the output
      layer's (vocab_size, dim) weight, of which only the image ids' rows change (how ``--trainable image-head``
      trains: the other rows' gradient is zeroed).
    """
    if recipe not in RECIPES:
        raise ValueError(f"recipe {recipe!r} is not one of {', '.join(RECIPES)}")
    n = cfg.num_params()
    if recipe == "full":
        weights, trained, bytes_per = 4 * n, n, 4
    elif recipe == "lora":
        adapters = lora_params(cfg)
        weights, trained, bytes_per = 2 * n + 4 * adapters, adapters, 4
    else:
        weights, trained, bytes_per = 4 * n, cfg.vocab_size * cfg.dim, 4
    grads = bytes_per * trained
    return Held(-(-weights // world), -(-grads // world), -(-ADAMW_STATES * grads // world))


def recipe_table(cfg: DecoderConfig, worlds: tuple[int, ...] = (1, 2, 4, 8)) -> str:
    """A markdown table of ``recipe_bytes`` (GiB per process) for each recipe and number of processes."""
    head = "| recipe | parameters with gradients | " + " | ".join(f"{w} GPU{'s' if w > 1 else ''}" for w in worlds) + " |"
    rows = [head, "|" + " --- |" * (len(worlds) + 2)]
    trained = {"full": cfg.num_params(), "lora": lora_params(cfg), "image-head": cfg.vocab_size * cfg.dim}
    for recipe in RECIPES:
        cells = [f"{recipe_bytes(cfg, recipe, w).total / GiB:.1f}" for w in worlds]
        rows.append(f"| {recipe} | {trained[recipe] / 1e6:,.0f}M | " + " | ".join(cells) + " |")
    return "\n".join(rows)
