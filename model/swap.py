"""Putting other modules in the place of a model's submodules, and putting the originals back.

The decoder is built from plain torch modules (``model/decoder.py``). A faster way to compute what one of them
computes (a row-by-row product, a compiled-friendly reduction, another attention kernel) is applied from
outside: each chosen submodule is replaced on its parent (``setattr``) by a new module that shares its
Parameters, so the state dict, an optimizer's parameters and tools such as PEFT see the same tensors, and the
module's own class and attributes are never touched. ``swapped`` undoes its replacements on exit.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import TypeVar

from torch import nn

L = TypeVar("L", bound=nn.Linear)


@dataclass(frozen=True)
class Swap:
    """One replacement: ``parent.<name>`` was ``old`` and is ``new``."""

    parent: nn.Module
    name: str
    old: nn.Module
    new: nn.Module


def swap_modules(root: nn.Module, select: Callable[[nn.Module], bool],
                 make: Callable[[nn.Module], nn.Module]) -> list[Swap]:
    """Replace every submodule ``m`` of ``root`` (not ``root`` itself) for which ``select(m)`` holds with ``make(m)``,
    at every place it is registered; returns the replacements (``restore`` undoes them). Submodules of a replaced
    module are left as they are."""
    swaps: list[Swap] = []
    chosen = [(name, m) for name, m in root.named_modules(remove_duplicate=False) if name and select(m)]
    for qualified, old in chosen:
        parent_name, _, name = qualified.rpartition(".")
        parent = root.get_submodule(parent_name)
        if getattr(parent, name, None) is not old:  # inside a module replaced above
            continue
        new = make(old)
        setattr(parent, name, new)
        swaps.append(Swap(parent, name, old, new))
    return swaps


def restore(swaps: list[Swap]) -> None:
    """Put back the modules ``swaps`` replaced (last replaced, first restored)."""
    for s in reversed(swaps):
        setattr(s.parent, s.name, s.old)


@contextmanager
def swapped(root: nn.Module, select: Callable[[nn.Module], bool],
            make: Callable[[nn.Module], nn.Module]) -> Iterator[list[Swap]]:
    """``swap_modules`` for the duration of the block; the original modules come back afterwards, also on an error."""
    swaps = swap_modules(root, select, make)
    try:
        yield swaps
    finally:
        restore(swaps)


def sharing(cls: type[L], linear: nn.Linear) -> L:
    """An instance of ``cls`` (an ``nn.Linear`` subclass whose constructor takes nn.Linear's arguments) holding
    ``linear``'s own weight and bias Parameters: nothing is copied or allocated."""
    new = cls(linear.in_features, linear.out_features, bias=linear.bias is not None, device="meta")
    new.weight = linear.weight
    new.bias = linear.bias
    return new.train(linear.training)
