"""The engine that moves a FISH adapter's mask by the rule its config names."""

from __future__ import annotations

from typing import Optional

from torch import nn

from fish_peft.dynamic.evolving_diff import EvolvingDiff, fish_adapter_config
from fish_peft.dynamic.sparse_momentum_diff import SparseMomentumDiff
from fish_peft.dynamic.targets import SparseTrainingError
from fish_peft.dynamic.topkast_diff import TopKASTDiff

ENGINES = {"topkast": TopKASTDiff, "sparse_momentum": SparseMomentumDiff}


def evolving_diff_engine(
    model: nn.Module, optimizer=None, *, adapter_name: Optional[str] = None, total_steps: Optional[int] = None
) -> EvolvingDiff:
    """The engine for `FishConfig(mask_update=...)` of the model's adapter (default: the active one). Build it after
    `get_peft_model`, best before the optimizer (Top-KAST adds exploration values to train; an optimizer made earlier
    gets them added when bound), then call `step()` after each `optimizer.step()`, or pass it to
    `SparseTrainingCallback` in a Trainer. `total_steps` sets the prune-rate schedule (the callback fills it in)."""
    adapter, config = fish_adapter_config(model, adapter_name)
    if config.awaits_mask:
        raise SparseTrainingError(
            f"Adapter '{adapter}' was made from FishConfig(keep_ratio=...) and has no mask yet; call "
            "fish_peft.initialize_fish_mask(model, dataloader) before building its engine."
        )
    if config.mask_update not in ENGINES:
        raise SparseTrainingError(
            f"Adapter '{adapter}' has mask_update={config.mask_update!r}; create it with mask_update='topkast' or "
            "'sparse_momentum' for a mask that evolves (a fixed mask needs no engine)."
        )
    return ENGINES[config.mask_update](model, optimizer, adapter_name=adapter, total_steps=total_steps)
