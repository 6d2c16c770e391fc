"""What the mask engines need from an optimizer: its per-weight state, reset where a weight's role changed, and
the momentum that sparse momentum grows by."""

from __future__ import annotations

import torch

from .targets import SparseTrainingError

ADAM_FAMILY = (torch.optim.Adam, torch.optim.AdamW, torch.optim.NAdam, torch.optim.RAdam)
MOMENTUM_FAMILY = (torch.optim.SGD, torch.optim.RMSprop)


def unwrap_optimizer(optimizer) -> torch.optim.Optimizer:
    """The torch optimizer inside Accelerate's or Trainer's wrappers."""
    while hasattr(optimizer, "optimizer"):
        optimizer = optimizer.optimizer
    return optimizer


def groups_of(optimizer: torch.optim.Optimizer, parameters: list[torch.Tensor]) -> dict[int, dict]:
    """The param group of each of `parameters` (by id); an error names the first one the optimizer does not train."""
    groups = {id(p): group for group in optimizer.param_groups for p in group["params"]}
    missing = [i for i, p in enumerate(parameters) if id(p) not in groups]
    if missing:
        raise SparseTrainingError(
            f"The optimizer does not train {len(missing)} of the sparse weights; create it from model.parameters() "
            "(after the engine, or before: the weights are the same objects)."
        )
    return {id(p): groups[id(p)] for p in parameters}


def reset_state(optimizer: torch.optim.Optimizer, parameter: torch.Tensor, positions: torch.Tensor) -> None:
    """Zero every per-element state tensor (momentum, Adam moments) of `parameter` at the bool `positions`."""
    for value in optimizer.state.get(parameter, {}).values():
        if torch.is_tensor(value) and value.shape == parameter.shape:
            value.masked_fill_(positions, 0)


def check_momentum_optimizer(optimizer: torch.optim.Optimizer, parameters: list[torch.Tensor]) -> None:
    """Sparse momentum grows weights by momentum: refuse optimizers that keep none."""
    fix = "use torch.optim.SGD(..., momentum=0.9) or Adam/AdamW, whose moments serve as the momentum"
    if isinstance(optimizer, ADAM_FAMILY):
        return
    if not isinstance(optimizer, MOMENTUM_FAMILY):
        raise SparseTrainingError(f"Sparse momentum cannot read a momentum from {type(optimizer).__name__}; {fix}.")
    for group in groups_of(optimizer, parameters).values():
        if not group.get("momentum"):
            raise SparseTrainingError(f"Sparse momentum needs momentum, but a param group has momentum=0; {fix}.")


def momentum_magnitude(optimizer: torch.optim.Optimizer, parameter: torch.Tensor) -> torch.Tensor:
    """|momentum| of every element: SGD's buffer, or Adam's first moment over the root of its second."""
    state = optimizer.state.get(parameter, {})
    if state.get("momentum_buffer") is not None:
        return state["momentum_buffer"].abs()
    if "exp_avg" in state and "exp_avg_sq" in state:
        eps = groups_of(optimizer, [parameter])[id(parameter)].get("eps", 1e-8)
        return state["exp_avg"].abs() / (state["exp_avg_sq"].sqrt() + eps)
    raise SparseTrainingError(
        "The optimizer holds no momentum for a sparse weight yet; call engine.step() after optimizer.step()."
    )
