"""LoRA adapters on the decoder's projections (peft): added in place, trained alone, saved alone, merged back.

The decoder's projections are plain ``nn.Linear``s, so peft's own LoRA layers wrap them by name; nothing here is an
adapter of our own. A LoRA run keeps its base decoder frozen and saves only the adapters (a few MB for a 7B model);
``merge_adapters`` folds them into the weights and puts plain ``nn.Linear``s back, which is what sampling,
evaluation and export use.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import torch
from torch import nn

from earlyfusion.core.errors import UserError
from earlyfusion.model.decoder import Decoder

LORA_TARGETS = ("qkv", "proj", "gate_up", "down")
"""The decoder's projections by module name: attention's fused q/k/v and output, the MLP's gate/up and down."""


@dataclass(frozen=True)
class LoraSpec:
    """The shape of a run's adapters (recorded in each checkpoint's config)."""
    rank: int
    alpha: float
    dropout: float
    targets: tuple[str, ...] = LORA_TARGETS

    def to_dict(self) -> dict:
        return {**asdict(self), "targets": list(self.targets)}

    @classmethod
    def from_dict(cls, d: dict) -> LoraSpec:
        return cls(rank=int(d["rank"]), alpha=float(d["alpha"]), dropout=float(d["dropout"]),
                   targets=tuple(d["targets"]))


def add_adapters(decoder: Decoder, spec: LoraSpec) -> Decoder:
    """Wrap the ``spec.targets`` projections of ``decoder`` in peft's LoRA layers (in place), zero-initialised so the
    model computes what it did, and leave only the adapters trainable."""
    try:
        from peft import LoraConfig, inject_adapter_in_model  # optional: only LoRA runs need peft
    except ImportError as e:
        raise UserError(f"LoRA needs the peft package ({e}); install it with `pip install peft`") from None

    config = LoraConfig(r=spec.rank, lora_alpha=spec.alpha, lora_dropout=spec.dropout,
                        target_modules=list(spec.targets), bias="none")
    inject_adapter_in_model(config, decoder)
    for name, p in decoder.named_parameters():
        p.requires_grad_(is_adapter(name))
    return decoder


def is_adapter(name: str) -> bool:
    return ".lora_" in name


def adapter_state(decoder: nn.Module) -> dict[str, torch.Tensor]:
    """The adapters' tensors alone (what a LoRA checkpoint stores)."""
    return {k: v.detach() for k, v in decoder.state_dict().items() if is_adapter(k)}


def load_adapters(decoder: nn.Module, state: dict[str, torch.Tensor]) -> None:
    """Copy saved adapter tensors into a decoder that has the same adapters; names and shapes must match exactly."""
    own = adapter_state(decoder)
    if set(own) != set(state):
        missing, unexpected = sorted(set(own) - set(state)), sorted(set(state) - set(own))
        raise ValueError(f"adapters do not match: missing {missing[:3]}, unexpected {unexpected[:3]}")
    with torch.no_grad():
        for k, t in own.items():
            if t.shape != state[k].shape:
                raise ValueError(f"adapter {k}: shape {tuple(state[k].shape)} saved, {tuple(t.shape)} here")
            t.copy_(state[k])


@torch.no_grad()
def merge_adapters(decoder: nn.Module) -> nn.Module:
    """Fold every LoRA layer's adapters into its base weight and put the plain ``nn.Linear`` back in its place."""
    wrapped = [(name, m) for name, m in decoder.named_modules() if hasattr(m, "get_base_layer") and hasattr(m, "merge")]
    for name, m in wrapped:
        m.merge()
        parent_name, _, child = name.rpartition(".")
        parent = decoder.get_submodule(parent_name) if parent_name else decoder
        setattr(parent, child, m.get_base_layer())
    for p in decoder.parameters():
        p.requires_grad_(True)
    return decoder
