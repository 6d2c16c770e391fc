"""Which weights of a network are sparse: those of Linear, Conv and Embedding layers by default; biases and norms
stay dense."""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Optional, Sequence

from torch import nn
from transformers.pytorch_utils import Conv1D

DEFAULT_SPARSE_MODULES = (nn.Linear, nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.Embedding, Conv1D)


class SparseTrainingError(ValueError):
    """A sparse-training setting that cannot work, found before any training step."""


@dataclass
class SparseWeight:
    """One sparse weight: its name in the model and every module that holds it (several when tied)."""

    name: str
    parameter: nn.Parameter
    holders: list[tuple[nn.Module, str]]


def find_sparse_weights(
    model: nn.Module, module_types: Sequence[type] = DEFAULT_SPARSE_MODULES, exclude: Optional[str] = None
) -> list[SparseWeight]:
    """The `weight` of every module of `module_types` whose name does not match the `exclude` regex, in model order.

    A weight tied between modules (an embedding shared with an output layer) appears once, with all its holders.
    """
    pattern = re.compile(exclude) if exclude else None
    found: dict[int, SparseWeight] = {}
    for module_name, module in model.named_modules(remove_duplicate=False):
        weight = module._parameters.get("weight") if isinstance(module, tuple(module_types)) else None
        if weight is None or (pattern is not None and pattern.search(module_name)):
            continue
        entry = found.setdefault(id(weight), SparseWeight(f"{module_name}.weight" if module_name else "weight", weight, []))
        if all(holder is not module for holder, _ in entry.holders):
            entry.holders.append((module, "weight"))
    if not found:
        kinds = ", ".join(t.__name__ for t in module_types)
        raise SparseTrainingError(
            f"{type(model).__name__} has no layer to sparsify (looked for the weights of {kinds}"
            + (f", not matching exclude={exclude!r}" if exclude else "")
            + "); pass module_types= with the layer classes your model uses."
        )
    return list(found.values())
