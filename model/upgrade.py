"""Decoder checkpoints written before the projections were ``nn.Linear``s, converted on load.

Those checkpoints store every projection weight (in_features, out_features), the transpose of nn.Linear's
layout, and their decoder config (the "decoder" entry of config.json) has no ``weight_layout`` key; every config
written since records ``DecoderConfig.weight_layout``. The key decides, not the shapes: the attention output
projection is square (dim × dim) and reads the same in both layouts.

``upgrade_state_dict`` converts the weights (``training/data/runs.py`` loads every run through it);
``upgrade_optimizer_state`` converts the AdamW moments saved beside them, for resuming such a run.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from typing import Any

import torch
from torch import Tensor, nn

from earlyfusion.core.errors import CheckpointError
from earlyfusion.model.decoder import LEGACY_WEIGHT_LAYOUT, WEIGHT_LAYOUT

# the projection weights (nn.Linear's), under any prefix a wrapper adds to the names
PROJECTION = re.compile(r"(?:^|\.)(?:layers\.\d+\.(?:attn\.qkv|attn\.proj|mlp\.gate_up|mlp\.down)|output)\.weight$")


def weight_layout(config: Mapping[str, Any]) -> str:
    """The layout of the weights saved with ``config``, a checkpoint's decoder config dict as written."""
    layout = config.get("weight_layout", LEGACY_WEIGHT_LAYOUT)
    if layout not in (WEIGHT_LAYOUT, LEGACY_WEIGHT_LAYOUT):
        raise CheckpointError(f"decoder config: unknown weight_layout {layout!r}; it was written by another version "
                              "of earlyfusion or edited by hand")
    return layout


def is_projection(name: str) -> bool:
    """Whether the decoder tensor ``name`` is a projection weight (the tensors whose layout changed)."""
    return PROJECTION.search(name) is not None


def upgrade_state_dict(state: Mapping[str, Tensor], config: Mapping[str, Any]) -> dict[str, Tensor]:
    """``state``, a decoder state dict saved with the decoder config dict ``config``, in the current layout: from a
    checkpoint without ``weight_layout`` the projection weights come back transposed (views: ``.contiguous()``
    them before saving), every other tensor as it is. One tensor at a time works too (a dict of one entry)."""
    if weight_layout(config) == WEIGHT_LAYOUT:
        return dict(state)
    return {name: t.t() if is_projection(name) else t for name, t in state.items()}


def upgrade_optimizer_state(state: dict, optimizer: torch.optim.Optimizer, decoder: nn.Module,
                            config: Mapping[str, Any]) -> dict:
    """``state``, an optimizer state dict saved beside the weights of ``config`` for ``optimizer`` (over
    ``decoder``'s parameters, in the same groups and order), in the current layout: the per-parameter tensors
    (AdamW's moments) of the projection weights transposed, from a checkpoint without ``weight_layout``."""
    if weight_layout(config) == WEIGHT_LAYOUT:
        return state
    names = {id(p): name for name, p in decoder.named_parameters()}
    order = [names.get(id(p), "") for group in optimizer.param_groups for p in group["params"]]
    per_param = {}
    for index, values in state["state"].items():
        if is_projection(order[int(index)]):
            values = {k: v.t().contiguous() if isinstance(v, Tensor) and v.dim() == 2 else v for k, v in values.items()}
        per_param[index] = values
    return {**state, "state": per_param}
