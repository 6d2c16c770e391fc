"""Top-KAST (Jayakumar et al. 2020): always-sparse training with a forward set A and a larger backward set B.

Per layer, A holds the top-D fraction of weights by magnitude and B ⊇ A the top-(D+M). The forward pass sees
θ ⊙ 1_A; the gradient reaches θ only on B. An exploration penalty, (λ/2)·(Σ_A θ² + Σ_{B\\A} θ²/D), keeps
weights from staying in A only because they got there first; it acts once per optimizer step (penalty.py). A and B
are recomputed every `update_every` steps (1 in the paper; 100 was as good). The dense θ is kept, since weights
outside B keep their values and may re-enter.
"""

from __future__ import annotations

from typing import Optional, Sequence

import torch
from torch import nn
from torch.nn.utils import parametrize

from fish_peft.dynamic import step_hook
from fish_peft.dynamic.densities import check_density, kept_count
from fish_peft.dynamic.engine import NetworkMaskEngine
from fish_peft.dynamic.optimizer_state import groups_of, reset_state
from fish_peft.dynamic.penalty import ExplorationPenalty
from fish_peft.dynamic.targets import DEFAULT_SPARSE_MODULES, SparseTrainingError


class _ForwardOnABackwardOnB(torch.autograd.Function):
    @staticmethod
    def forward(ctx, weight, forward_mask, backward_mask):
        ctx.save_for_backward(backward_mask)
        return weight * forward_mask

    @staticmethod
    def backward(ctx, grad):
        (backward_mask,) = ctx.saved_tensors
        return grad * backward_mask, None, None


class TopKASTWeight(nn.Module):
    """The parametrization that replaces a layer's weight by θ ⊙ 1_A, with gradients on B."""

    def __init__(self, forward_mask: torch.Tensor, backward_mask: torch.Tensor):
        super().__init__()
        self.register_buffer("forward_mask", forward_mask)
        self.register_buffer("backward_mask", backward_mask)

    def forward(self, weight: torch.Tensor) -> torch.Tensor:
        return _ForwardOnABackwardOnB.apply(weight, self.forward_mask.to(weight.dtype), self.backward_mask.to(weight.dtype))


class TopKAST(ExplorationPenalty, NetworkMaskEngine):
    """Top-KAST on the Linear, Conv and Embedding weights of `model` (biases and norms stay dense).

    `forward_density` is D, `backward_density` is D+M (>= D). `penalty` is λ of the exploration penalty, added to
    θ's gradient once per optimizer step; `penalty_value()` gives its value for logging. Use no optimizer weight
    decay on the sparse weights (it would move weights outside B): the penalty replaces it.
    """

    def __init__(
        self,
        model: nn.Module,
        optimizer=None,
        *,
        forward_density: float,
        backward_density: float,
        penalty: float = 1e-4,
        update_every: int = 1,
        distribution: str = "uniform",
        module_types: Sequence[type] = DEFAULT_SPARSE_MODULES,
        exclude: Optional[str] = None,
    ):
        check_density(forward_density, "forward_density")
        check_density(backward_density, "backward_density")
        if backward_density < forward_density:
            raise SparseTrainingError(
                f"backward_density ({backward_density}) must be at least forward_density ({forward_density}): the "
                "backward set B contains the forward set A."
            )
        if penalty < 0:
            raise SparseTrainingError(f"penalty must be >= 0, got {penalty}.")
        super().__init__(
            model, density=forward_density, distribution=distribution, update_every=update_every,
            module_types=module_types, exclude=exclude,
        )
        self.penalty = penalty
        self.backward_density = backward_density
        self.parametrizations: dict[str, TopKASTWeight] = {}
        for weight in self.weights:
            a_mask, b_mask = self._select(weight.name, weight.parameter.detach())
            self.parametrizations[weight.name] = TopKASTWeight(a_mask, b_mask)
            for module, attribute in weight.holders:
                parametrize.register_parametrization(module, attribute, self.parametrizations[weight.name], unsafe=True)
        if optimizer is not None:
            self.bind(optimizer)
        step_hook.watch(self)

    def counts(self, name: str) -> tuple[int, int]:
        """Sizes of A and B for one weight."""
        numel = next(w.parameter.numel() for w in self.weights if w.name == name)
        forward = kept_count(numel, self.densities[name])
        backward_fraction = min(1.0, self.densities[name] * self.backward_density / self.density_target)
        return forward, max(forward, kept_count(numel, backward_fraction))

    def _select(self, name: str, theta: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        forward, backward = self.counts(name)
        order = torch.topk(theta.abs().flatten(), backward, sorted=True).indices
        a_mask = torch.zeros(theta.numel(), dtype=torch.bool, device=theta.device)
        b_mask = torch.zeros_like(a_mask)
        a_mask[order[:forward]] = True
        b_mask[order] = True
        return a_mask.view_as(theta), b_mask.view_as(theta)

    @property
    def penalty_strength(self) -> float:
        return self.penalty

    def penalty_terms(self):
        """Each weight, scaled 1 on A and 1/D on B\\A (D: its layer's forward density)."""
        for weight in self.weights:
            masks = self.parametrizations[weight.name]
            explore = masks.backward_mask & ~masks.forward_mask
            yield weight.parameter, masks.forward_mask + explore / self.densities[weight.name]

    def _check_optimizer(self, optimizer: torch.optim.Optimizer) -> None:
        for group in groups_of(optimizer, self.trained_parameters()).values():
            if group.get("weight_decay", 0):
                raise SparseTrainingError(
                    "Top-KAST: the optimizer applies weight_decay to the sparse weights, which would move weights "
                    "outside the backward set B; set weight_decay=0 for them (Top-KAST's penalty= replaces it)."
                )
        self._forget_state_outside_b()

    def update_masks(self) -> None:
        """Recompute A and B from |θ|; weights that leave B forget their optimizer state."""
        with torch.no_grad():
            for weight in self.weights:
                masks = self.parametrizations[weight.name]
                a_mask, b_mask = self._select(weight.name, weight.parameter)
                masks.forward_mask.copy_(a_mask)
                masks.backward_mask.copy_(b_mask)
        self._forget_state_outside_b()

    def _forget_state_outside_b(self) -> None:
        """With no gradient and no momentum, no optimizer moves a weight: that keeps θ outside B fixed."""
        if self.optimizer is None:
            return
        for weight in self.weights:
            reset_state(self.optimizer, weight.parameter, ~self.parametrizations[weight.name].backward_mask)

    def masks(self) -> dict[str, torch.Tensor]:
        return {name: p.forward_mask for name, p in self.parametrizations.items()}

    def backward_masks(self) -> dict[str, torch.Tensor]:
        return {name: p.backward_mask for name, p in self.parametrizations.items()}

    def state_dict(self) -> dict:
        return {**super().state_dict(), "backward_masks": {n: m.detach().cpu().clone() for n, m in self.backward_masks().items()}}

    def _load_masks(self, state: dict) -> None:
        with torch.no_grad():
            for name, masks in self.parametrizations.items():
                masks.forward_mask.copy_(state["masks"][name])
                masks.backward_mask.copy_(state["backward_masks"][name])

    def export_dense(self) -> nn.Module:
        """Make the model an ordinary dense model holding θ ⊙ 1_A (zeros elsewhere); the engine is spent."""
        step_hook.unwatch(self)
        with torch.no_grad():
            for weight in self.weights:
                weight.parameter.mul_(self.parametrizations[weight.name].forward_mask)
                for module, attribute in weight.holders:
                    parametrize.remove_parametrizations(module, attribute, leave_parametrized=False)
        return self.model
