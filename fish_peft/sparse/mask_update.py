"""The engine that moves a FISH adapter's mask by the rule its config names."""

from __future__ import annotations

from typing import Optional

from torch import nn

from .evolving_diff import EvolvingDiff
from .sparse_momentum_diff import SparseMomentumDiff
from .targets import SparseTrainingError
from .topkast_diff import TopKASTDiff

ENGINES = {"topkast": TopKASTDiff, "sparse_momentum": SparseMomentumDiff}


def evolving_diff_engine(
    model: nn.Module, optimizer=None, *, adapter_name: Optional[str] = None, total_steps: Optional[int] = None
) -> EvolvingDiff:
    """The engine for `FishConfig(mask_update=...)` of the model's adapter: build it after `get_peft_model` and
    before the optimizer (Top-KAST adds exploration values the optimizer must train), then call `step()` after each
    `optimizer.step()`, or pass it to `SparseTrainingCallback` in a Trainer."""
    configs = getattr(model, "peft_config", None) or {}
    adapter = adapter_name or getattr(model, "active_adapter", None)
    rule = getattr(configs.get(adapter), "mask_update", None)
    if rule not in ENGINES:
        raise SparseTrainingError(
            f"The adapter's FishConfig has mask_update={rule!r}; create it with mask_update='topkast' or "
            "'sparse_momentum' for a mask that evolves (a fixed mask needs no engine)."
        )
    return ENGINES[rule](model, optimizer, adapter_name=adapter, total_steps=total_steps)
