"""How a network's density budget is spread over its sparse layers: uniformly or by Erdős–Rényi-kernel."""

from __future__ import annotations

import math

import torch

from fish_peft.dynamic.targets import SparseTrainingError

DISTRIBUTIONS = ("uniform", "erk")


def check_density(density: float, name: str = "density") -> None:
    if not isinstance(density, (int, float)) or not 0 < density <= 1:
        raise SparseTrainingError(f"{name} must be in (0, 1] (e.g. 0.05 keeps 5 % of the weights), got {density!r}.")


def layer_densities(shapes: dict[str, torch.Size], density: float, distribution: str = "uniform") -> dict[str, float]:
    """Each layer's density, such that the layers together keep `density` of their weights.

    "erk" (Evci et al. 2020) makes a layer's density proportional to sum(shape) / prod(shape), so small layers stay
    denser; layers that would exceed 1 are made dense and the rest re-scaled.
    """
    check_density(density)
    if distribution == "uniform":
        return {name: float(density) for name in shapes}
    if distribution != "erk":
        raise SparseTrainingError(f"distribution must be one of {DISTRIBUTIONS}, got {distribution!r}.")
    sizes = {name: math.prod(shape) for name, shape in shapes.items()}
    scores = {name: sum(shape) / sizes[name] for name, shape in shapes.items()}
    dense: set[str] = set()
    while True:
        budget = density * sum(sizes.values()) - sum(sizes[n] for n in dense)
        scale = budget / sum(scores[n] * sizes[n] for n in shapes if n not in dense)
        saturated = {n for n in shapes if n not in dense and scale * scores[n] >= 1}
        if not saturated:
            return {n: 1.0 if n in dense else scale * scores[n] for n in shapes}
        dense |= saturated


def kept_count(numel: int, density: float) -> int:
    """Number of weights a layer of `numel` keeps at `density`: rounded, at least one."""
    return min(numel, max(1, round(density * numel)))
