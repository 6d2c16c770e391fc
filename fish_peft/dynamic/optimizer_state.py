"""What the mask engines need from an optimizer: its per-weight state, reset where a weight's role changed, and
the momentum that sparse momentum grows by."""

from __future__ import annotations

import torch

from fish_peft.dynamic.targets import SparseTrainingError

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
            f"The optimizer does not train {len(missing)} of the tensors the engine moves; create it after the engine, "
            "from the model's trainable parameters."
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


def rearrange_entries(optimizer, parameters: list[torch.nn.Parameter], sources: list[torch.Tensor]) -> list[torch.nn.Parameter]:
    """Refill 1-D `parameters` from their concatenated old entries: parameter i becomes old[sources[i]], where -1
    marks a new entry (value 0). Per-entry optimizer state (momentum, Adam moments) moves with its entry and is zero
    for new ones. Returns the parameters: the same objects where the length stays, new ones (which the optimizer
    trains from now on) where it changes, since autograd graphs still alive remember a leaf's shape. Gradients are
    dropped: call between optimizer steps."""
    states = [optimizer.state.get(p, {}) if optimizer is not None else {} for p in parameters]
    keys = sorted({k for p, s in zip(parameters, states) for k, v in s.items() if _per_entry(v, p)})
    pools = {
        key: torch.cat([s[key] if _per_entry(s.get(key), p) else torch.zeros_like(p) for p, s in zip(parameters, states)])
        for key in keys
    }
    values = torch.cat([p.detach() for p in parameters])
    result = []
    for parameter, state, source in zip(parameters, states, sources):
        source = source.to(parameter.device)
        for key, pool in pools.items():
            if state:
                state[key] = _gather(pool, source)
        if source.numel() == parameter.numel():
            parameter.data.copy_(_gather(values, source))
            parameter.grad = None
        else:
            parameter = _replace_parameter(optimizer, parameter, _gather(values, source))
        result.append(parameter)
    return result


def entry_sources(old_indices: torch.Tensor, new_indices: torch.Tensor) -> torch.Tensor:
    """`rearrange_entries`' sources for an entry moving from sorted `old_indices` to sorted `new_indices`: where each
    new position was among the old ones, -1 where it is new."""
    new_indices = new_indices.to(old_indices.device)
    if old_indices.numel() == 0:
        return torch.full_like(new_indices, -1)
    where = torch.searchsorted(old_indices, new_indices).clamp(max=old_indices.numel() - 1)
    return torch.where(old_indices[where] == new_indices, where, torch.full_like(where, -1))


def drop_parameter(optimizer, parameter: torch.nn.Parameter) -> None:
    """Stop training `parameter`: out of its param group, its state forgotten (nothing without an optimizer)."""
    if optimizer is None:
        return
    for group in optimizer.param_groups:
        group["params"] = [p for p in group["params"] if p is not parameter]
    optimizer.state.pop(parameter, None)


def _replace_parameter(optimizer, old: torch.nn.Parameter, data: torch.Tensor) -> torch.nn.Parameter:
    new = torch.nn.Parameter(data, requires_grad=old.requires_grad)
    if optimizer is not None:
        for group in optimizer.param_groups:
            group["params"] = [new if p is old else p for p in group["params"]]
        if old in optimizer.state:
            optimizer.state[new] = optimizer.state.pop(old)
    return new


def _per_entry(value, parameter: torch.Tensor) -> bool:
    return torch.is_tensor(value) and value.shape == parameter.shape


def _gather(pool: torch.Tensor, source: torch.Tensor) -> torch.Tensor:
    out = pool.new_zeros(source.numel())
    known = source >= 0
    out[known] = pool[source[known]]
    return out
