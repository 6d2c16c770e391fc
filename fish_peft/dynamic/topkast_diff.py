"""Top-KAST on a FISH diff: k entries in the forward pass, an exploration set beside them that only learns.

Per adapted parameter, A holds its k_p entries (the adapter's values) and B \\ A about `exploration`·k_p more,
which receive the gradient they would get in the forward pass but do not change the model's output (Top-KAST's
backward set). The penalty (λ/2)·(Σ_A Δ² + Σ_{B\\A} Δ²/D), with D the diff's density over the adapted parameters,
acts on the gradients once per optimizer step (penalty.py, shared with the whole-network engine). Every
`update_every` steps, A becomes the k_p entries of B with the largest |Δ|; of the rest, the `rate` share with the
smallest |Δ| leaves B, replaced by the positions of largest dense gradient, starting at 0. Top-KAST's own B is the
next-largest weights by magnitude; a diff's unused entries all have magnitude 0, so fish-peft ranks them by gradient
instead. The exploration set starts at random positions (seeded) and is never saved: the adapter is A.
"""

from __future__ import annotations

import math
from typing import Any, Optional

import torch
from torch import nn

from fish_peft.dynamic import step_hook
from fish_peft.dynamic.evolving_diff import DiffEntry, EvolvingDiff, sorted_by_index, top_new_positions
from fish_peft.dynamic.optimizer_state import rearrange_entries, unwrap_optimizer
from fish_peft.dynamic.penalty import ExplorationPenalty
from fish_peft.dynamic.targets import SparseTrainingError


class TopKASTDiff(ExplorationPenalty, EvolvingDiff):
    """Top-KAST on the entries of a FISH adapter made with `FishConfig(mask_update="topkast")`."""

    rule = "topkast"

    def __init__(
        self, model: nn.Module, optimizer=None, *, adapter_name: Optional[str] = None, total_steps: Optional[int] = None,
        seed: int = 0,
    ):
        self.seed = seed  # of the random first exploration set
        super().__init__(model, optimizer, adapter_name=adapter_name, total_steps=total_steps)
        step_hook.watch(self)

    def _prepare(self) -> None:
        """Draw the first exploration entries."""
        self.forward_density = sum(e.values.numel() for e in self.entries) / sum(e.numel for e in self.entries)
        generator = torch.Generator().manual_seed(self.seed)
        by_layer: dict[int, dict[str, torch.Tensor]] = {}
        for entry in self.entries:
            room = entry.numel - entry.values.numel()
            count = min(math.ceil(self.config.exploration * entry.values.numel()), room)
            if count:
                free = torch.ones(entry.numel, dtype=torch.bool)
                free[entry.indices.long().cpu()] = False
                candidates = free.nonzero().flatten()
                chosen = candidates[torch.randperm(candidates.numel(), generator=generator)[:count]]
                by_layer.setdefault(id(entry.layer), {})[entry.attr] = chosen.sort().values
        for layer in self._layers:
            if id(layer) in by_layer:
                layer.set_exploration(self.adapter, by_layer[id(layer)])

    def bind(self, optimizer) -> None:
        """As for any engine; an optimizer made before the engine also gets the exploration values, each in the
        param group that trains its parameter's values."""
        inner = unwrap_optimizer(optimizer)
        groups = {id(p): group for group in inner.param_groups for p in group["params"]}
        for entry in self.entries:
            if self._explores(entry) and id(self.exploration_values(entry)) not in groups and id(entry.values) in groups:
                groups[id(entry.values)]["params"].append(self.exploration_values(entry))
        super().bind(optimizer)

    def trained_parameters(self) -> list[torch.Tensor]:
        return super().trained_parameters() + [self.exploration_values(e) for e in self.entries if self._explores(e)]

    def _explores(self, entry: DiffEntry) -> bool:
        values = entry.layer.fish_explore_values
        return entry.adapter in values and entry.key in values[entry.adapter]

    def exploration_values(self, entry: DiffEntry) -> nn.Parameter:
        return entry.layer.fish_explore_values[entry.adapter][entry.key]

    def exploration_indices(self, entry: DiffEntry) -> torch.Tensor:
        return entry.layer.fish_explore_indices[entry.adapter][entry.key]

    def stored_indices(self, entry: DiffEntry) -> list[torch.Tensor]:
        return [entry.indices] + ([self.exploration_indices(entry)] if self._explores(entry) else [])

    def state_dict(self) -> dict[str, Any]:
        """Besides the counts, the exploration entries (indices and values), which the adapter file leaves out."""
        exploration = {
            e.name: {"indices": self.exploration_indices(e).cpu().clone(), "values": self.exploration_values(e).detach().cpu().clone()}
            for e in self.entries if self._explores(e)
        }
        return {**super().state_dict(), "exploration": exploration}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        super().load_state_dict(state)
        saved = state["exploration"]
        if set(saved) != {e.name for e in self.entries if self._explores(e)}:
            raise SparseTrainingError("The engine state explores other parameters than this Top-KAST diff; it belongs to another run.")
        for entry in (e for e in self.entries if e.name in saved):
            indices, values = saved[entry.name]["indices"], saved[entry.name]["values"]
            current = self.exploration_values(entry)
            if indices.shape != values.shape or values.shape != current.shape:
                raise SparseTrainingError(f"The engine state's exploration entries of '{entry.name}' have another count than this run's.")
            with torch.no_grad():
                current.copy_(values)
            old = self.exploration_indices(entry)
            entry.layer.fish_explore_indices[entry.adapter][entry.key] = indices.to(old.device, old.dtype)

    @property
    def penalty_strength(self) -> float:
        return self.config.penalty

    def penalty_terms(self):
        """The adapter's values (A, scale 1) and the exploration values (B\\A, scale 1/D), as they are now."""
        for entry in self.entries:
            yield entry.values, 1.0
            if self._explores(entry):
                yield self.exploration_values(entry), 1 / self.forward_density

    def move_entries(self, rate: float) -> None:
        for entry in self.entries:
            if not self._explores(entry):
                continue
            explore = self.exploration_values(entry)
            forward_count, explore_count = entry.values.numel(), explore.numel()
            pool_indices = torch.cat([entry.indices.long(), self.exploration_indices(entry).long()])
            order = torch.argsort(torch.cat([entry.values.detach(), explore.detach()]).abs(), descending=True, stable=True)
            forward, rest = order[:forward_count], order[forward_count:]
            leaving = min(round(rate * explore_count), entry.numel - pool_indices.numel())  # free positions
            staying = rest[: explore_count - leaving]
            grown = top_new_positions(entry.dense_gradient(), pool_indices, leaving, entry.numel)
            forward_indices, forward_sources = sorted_by_index(pool_indices[forward], forward)
            explore_indices, explore_sources = sorted_by_index(
                torch.cat([pool_indices[staying], grown]), torch.cat([staying, torch.full_like(grown, -1)])
            )
            old_explore_indices = self.exploration_indices(entry)
            values, _ = rearrange_entries(self.optimizer, [entry.values, explore], [forward_sources, explore_sources])
            entry.set_entries(forward_indices, values)
            entry.layer.fish_explore_indices[entry.adapter][entry.key] = explore_indices.to(
                old_explore_indices.device, old_explore_indices.dtype
            )
