"""Putting other modules in the place of a model's submodules, and putting the originals back.

The decoder is built from plain torch modules (``model/decoder.py``). A faster way to compute what one of them
computes (a row-by-row product, a compiled-friendly reduction, another attention kernel) is applied from
outside: each chosen submodule is replaced on its parent (``setattr``) by a new module that shares its
Parameters, so the state dict, an optimizer's parameters and tools such as PEFT see the same tensors, and the
module's own class and attributes are never touched. ``swaps`` makes the replacements without putting them in,
``applied`` puts them in for the duration of a block.
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
    """One replacement: ``parent.<name>`` is ``old``, and ``new`` may take its place."""

    parent: nn.Module
    name: str
    old: nn.Module
    new: nn.Module


def swaps(root: nn.Module, select: Callable[[nn.Module], bool], make: Callable[[nn.Module], nn.Module]) -> list[Swap]:
    """A replacement ``make(m)`` for every submodule ``m`` of ``root`` (not ``root`` itself) for which ``select(m)``
    holds, at every place it is registered; nothing is put in yet (``apply``, ``applied``)."""
    return [Swap(root.get_submodule(qualified.rpartition(".")[0]), qualified.rpartition(".")[2], m, make(m))
            for qualified, m in root.named_modules(remove_duplicate=False) if qualified and select(m)]


def apply(replacements: list[Swap]) -> None:
    """Put each replacement in the place of its module (which must still be there)."""
    for s in replacements:
        if getattr(s.parent, s.name, None) is not s.old:
            raise RuntimeError(f"cannot swap {s.name!r}: the module there changed since the swap was made")
        setattr(s.parent, s.name, s.new)


def restore(replacements: list[Swap]) -> None:
    """Put back the modules ``replacements`` replaced (last replaced, first restored)."""
    for s in reversed(replacements):
        setattr(s.parent, s.name, s.old)


@contextmanager
def applied(replacements: list[Swap]) -> Iterator[list[Swap]]:
    """``replacements`` in place for the duration of the block; the original modules come back afterwards, also on
    an error."""
    apply(replacements)
    try:
        yield replacements
    finally:
        restore(replacements)


def swap_modules(root: nn.Module, select: Callable[[nn.Module], bool],
                 make: Callable[[nn.Module], nn.Module]) -> list[Swap]:
    """``swaps`` put in for good; returns them (``restore`` undoes them)."""
    made = swaps(root, select, make)
    apply(made)
    return made


def sharing(cls: type[L], linear: nn.Linear) -> L:
    """An instance of ``cls`` (an ``nn.Linear`` subclass whose constructor takes nn.Linear's arguments) holding
    ``linear``'s own weight and bias Parameters: nothing is copied or allocated."""
    new = cls(linear.in_features, linear.out_features, bias=linear.bias is not None, device="meta")
    new.weight = linear.weight
    new.bias = linear.bias
    return new.train(linear.training)
