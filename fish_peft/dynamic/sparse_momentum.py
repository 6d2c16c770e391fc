"""Sparse momentum (Dettmers & Zettlemoyer 2019): train at an exact density, moving weights to where momentum is.

Weights outside the mask are held at zero (re-zeroed after every optimizer step; the momentum stays dense). Every
`update_every` steps: each layer drops the prune-rate fraction of its active weights with the smallest magnitude
(the rate decays from 0.5 along a cosine over `total_steps`); the dropped count is regrown across layers in
proportion to the mean |momentum| of each layer's active weights, at each layer's inactive positions with the
largest |momentum|, starting from zero. Regrowth never picks an active weight, so the density stays exact.
"""

from __future__ import annotations

import math
from typing import Optional, Sequence

import torch
from torch import nn

from fish_peft.dynamic.optimizer_state import check_momentum_optimizer, momentum_magnitude
from fish_peft.dynamic.static import StaticSparse
from fish_peft.dynamic.targets import DEFAULT_SPARSE_MODULES, SparseTrainingError


class SparseMomentum(StaticSparse):
    """Sparse momentum on the Linear, Conv and Embedding weights of `model` (biases and norms stay dense).

    The initial masks are random at each layer's density (seeded). With SGD the momentum is its buffer; with Adam or
    AdamW it is the first moment over the root of the second. `total_steps` (the length of the prune-rate decay) may
    be left out under `SparseTrainingCallback`, which takes the Trainer's number of steps.
    """

    def __init__(
        self,
        model: nn.Module,
        optimizer=None,
        *,
        density: float = 0.05,
        update_every: int,
        total_steps: Optional[int] = None,
        prune_rate: float = 0.5,
        distribution: str = "uniform",
        seed: int = 0,
        module_types: Sequence[type] = DEFAULT_SPARSE_MODULES,
        exclude: Optional[str] = None,
    ):
        if not 0 < prune_rate < 1:
            raise SparseTrainingError(f"prune_rate must be in (0, 1), got {prune_rate}.")
        if total_steps is not None and (not isinstance(total_steps, int) or total_steps < 1):
            raise SparseTrainingError(f"total_steps (for the cosine decay of the prune rate) must be >= 1, got {total_steps!r}.")
        super().__init__(
            model, optimizer, density=density, distribution=distribution, seed=seed, update_every=update_every,
            module_types=module_types, exclude=exclude,
        )
        self.prune_rate = prune_rate
        self.total_steps = total_steps

    def current_prune_rate(self) -> float:
        return cosine_prune_rate(self.prune_rate, self.steps, self.total_steps, "SparseMomentum")

    def _check_optimizer(self, optimizer: torch.optim.Optimizer) -> None:
        check_momentum_optimizer(optimizer, self.trained_parameters())

    def _should_update(self) -> bool:
        return self.total_steps is None or self.steps < self.total_steps

    def update_masks(self) -> None:
        """Prune by magnitude, redistribute by momentum, regrow by momentum; the number of active weights is kept."""
        rate = self.current_prune_rate()
        signals, shares, pruned, capacity = {}, {}, {}, {}
        with torch.no_grad():
            for weight in self.weights:
                name, mask = weight.name, self._masks[weight.name]
                signal = momentum_magnitude(self.optimizer, weight.parameter).float()
                signals[name] = signal
                shares[name] = float(signal[mask].mean())
                active = int(mask.sum())
                count = round(rate * active)
                keep = mask.clone()
                if count:
                    magnitude = weight.parameter.detach().abs().float().masked_fill(~mask, math.inf)
                    keep.view(-1)[torch.topk(magnitude.flatten(), count, largest=False, sorted=False).indices] = False
                pruned[name] = count
                capacity[name] = mask.numel() - int(keep.sum())
                self._masks[name] = keep
            growth = allocate(sum(pruned.values()), shares, capacity)
            for weight in self.weights:
                name, keep = weight.name, self._masks[weight.name]
                if growth[name]:
                    candidates = signals[name].masked_fill(keep, -math.inf).flatten()
                    grown = torch.topk(candidates, growth[name], sorted=False).indices
                    keep.view(-1)[grown] = True
                    weight.parameter.view(-1)[grown] = 0
        self._apply_masks()


def cosine_prune_rate(initial: float, step: int, total_steps: Optional[int], engine: str) -> float:
    """The prune rate at `step`: `initial` decayed to 0 along a cosine over `total_steps` (which `engine` needs)."""
    if total_steps is None:
        raise SparseTrainingError(f"{engine} needs total_steps= (training steps) for its prune-rate schedule.")
    return initial * 0.5 * (1 + math.cos(math.pi * min(step, total_steps) / total_steps))


def allocate(total: int, shares: dict[str, float], capacity: dict[str, int]) -> dict[str, int]:
    """Split `total` whole units across names in proportion to `shares`, never above a name's `capacity`; what a
    full name cannot take goes to the others. Sums to `total` exactly when the capacities allow it."""
    given = {name: 0 for name in shares}
    remaining = total
    while remaining > 0:
        open_names = [n for n in shares if given[n] < capacity[n]]
        if not open_names:
            break
        weights = {n: max(shares[n], 0.0) if math.isfinite(shares[n]) else 0.0 for n in open_names}
        if sum(weights.values()) == 0:
            weights = {n: 1.0 for n in open_names}
        scale = remaining / sum(weights.values())
        exact = {n: weights[n] * scale for n in open_names}
        step = {n: min(capacity[n] - given[n], math.floor(exact[n])) for n in open_names}
        if not any(step.values()):
            by_remainder = sorted(open_names, key=lambda n: (-(exact[n] - math.floor(exact[n])), n))
            step = {n: 1 for n in by_remainder[:remaining]}
        for name, units in step.items():
            given[name] += units
        remaining -= sum(step.values())
    return given
