"""Top-KAST's exploration penalty (λ/2)·(Σ_A θ² + Σ_{B\\A} θ²/D), shared by the whole-network engine (θ: the
weights, A and B masks over them) and the evolving diff (θ: the diff's values on A, its exploration values on B\\A).

Its gradient λ·θ on A, λ/D·θ on B\\A is added to θ's gradient once per optimizer step, just before the step, not in
backward: a step that accumulates N micro-batches runs N backwards but takes the penalty once, and under a gradient
scaler (fp16) the gradients are unscaled by then. Gradient clipping, which runs before the step, leaves the penalty
whole, as it leaves decoupled weight decay.
"""

from __future__ import annotations

from abc import abstractmethod
from typing import Iterable, Union

import torch

Scale = Union[torch.Tensor, float]  # per element (1 on A, 1/D on B\A, 0 elsewhere) or one number for a whole tensor


class ExplorationPenalty:
    """Mixin of the Top-KAST engines: they name λ (`penalty_strength`) and the (θ, scale) pairs
    (`penalty_terms`); `_before_optimizer_step` runs before every step of the engine's optimizer (step_hook.py)."""

    @property
    @abstractmethod
    def penalty_strength(self) -> float:
        """λ."""

    @abstractmethod
    def penalty_terms(self) -> Iterable[tuple[torch.Tensor, Scale]]:
        """(θ, scale) pairs, scale 1 on A, 1/D on B\\A and 0 elsewhere."""

    def _before_optimizer_step(self) -> None:
        """Add λ·scale·θ to each gradient (a tensor without one is left alone, as the optimizer leaves it)."""
        if self.penalty_strength == 0:
            return
        with torch.no_grad():
            for theta, scale in self.penalty_terms():
                if theta.grad is not None:
                    theta.grad.add_(theta * scale, alpha=self.penalty_strength)

    def penalty_value(self) -> torch.Tensor:
        """(λ/2)·Σ scale·θ², for logging."""
        total = torch.zeros(())
        for theta, scale in self.penalty_terms():
            total = total + (theta.detach().float() ** 2 * scale).sum().cpu()
        return self.penalty_strength / 2 * total
