"""A fixed random sparse network: the control that dynamic sparse training must beat."""

from __future__ import annotations

from typing import Optional, Sequence

import torch
from torch import nn

from fish_peft.dynamic.densities import kept_count
from fish_peft.dynamic.engine import NetworkMaskEngine
from fish_peft.dynamic.targets import DEFAULT_SPARSE_MODULES


class StaticSparse(NetworkMaskEngine):
    """Random masks at each layer's density (seeded); weights outside them are zeroed after every optimizer step
    (they may receive gradients and momentum, which sparse momentum reads, but never a value)."""

    def __init__(
        self,
        model: nn.Module,
        optimizer=None,
        *,
        density: float,
        distribution: str = "uniform",
        seed: int = 0,
        update_every: int = 1,
        module_types: Sequence[type] = DEFAULT_SPARSE_MODULES,
        exclude: Optional[str] = None,
    ):
        super().__init__(
            model, density=density, distribution=distribution, update_every=update_every,
            module_types=module_types, exclude=exclude,
        )
        generator = torch.Generator().manual_seed(seed)
        self._masks: dict[str, torch.Tensor] = {}
        for weight in self.weights:
            numel = weight.parameter.numel()
            chosen = torch.randperm(numel, generator=generator)[: kept_count(numel, self.densities[weight.name])]
            mask = torch.zeros(numel, dtype=torch.bool)
            mask[chosen] = True
            self._masks[weight.name] = mask.view_as(weight.parameter).to(weight.parameter.device)
        self._apply_masks()
        if optimizer is not None:
            self.bind(optimizer)

    def masks(self) -> dict[str, torch.Tensor]:
        return dict(self._masks)

    def _load_masks(self, state: dict) -> None:
        for weight in self.weights:
            self._masks[weight.name] = state["masks"][weight.name].to(weight.parameter.device, torch.bool)

    def _after_optimizer_step(self) -> None:
        self._apply_masks()

    def _should_update(self) -> bool:
        return False

    def _apply_masks(self) -> None:
        with torch.no_grad():
            for weight in self.weights:
                weight.parameter.mul_(self._masks[weight.name])
