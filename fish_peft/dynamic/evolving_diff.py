"""Evolving sparse diffs: a FISH adapter whose k entries move while it trains, by Top-KAST's or sparse momentum's
rule. The engines drive a `PeftModel` made with `FishConfig(mask_update=...)`; call `engine.step()` after every
`optimizer.step()` (or use `SparseTrainingCallback` in a Trainer). What is saved is an ordinary FISH adapter.

Entries that were never in the diff have Δ = 0 and no optimizer state, so neither magnitude nor momentum can rank
them; regrowth ranks them by the dense gradient of the loss in W + Δ, captured on the update step only (summed over
its micro-batches), which is the signal both papers' momentum is built from.

In several processes (DDP through Accelerate or a Trainer) the engine averages the values' gradients itself, since a
sparse-momentum diff changes their lengths, which DDP does not allow: create it before `accelerator.prepare(model)`
(a Trainer prepares the model when training starts). The dense gradients are averaged before each update, so every
process makes the same decision; the masks are compared across processes after it.
"""

from __future__ import annotations

import math
from abc import abstractmethod
from dataclasses import dataclass
from typing import Any, Optional

import torch
from torch import nn

from fish_peft.distributed.communication import Traffic, reduce_across_processes
from fish_peft.tuner.config import FishConfig
from fish_peft.distributed.processes import rank_and_world, tensors_digest
from fish_peft.tuner.layer import FishLayer, storage_key
from fish_peft.masks.fish_mask import FishMask
from fish_peft.dynamic.engine import MaskEngine
from fish_peft.dynamic.sparse_momentum import cosine_prune_rate
from fish_peft.dynamic.targets import SparseTrainingError


@dataclass
class DiffEntry:
    """One adapted parameter of the adapter: its name in the config and the layer that holds its values."""

    name: str
    layer: FishLayer
    attr: str
    adapter: str
    numel: int

    @property
    def key(self) -> str:
        """Where the layer stores this parameter's entries (its dicts take no dotted names)."""
        return storage_key(self.attr)

    @property
    def values(self) -> nn.Parameter:
        return self.layer.values(self.adapter, self.attr)

    @property
    def indices(self) -> torch.Tensor:
        return self.layer.indices(self.adapter, self.attr)

    def set_entries(self, indices: torch.Tensor, values: nn.Parameter) -> None:
        self.layer.set_entries(self.adapter, self.attr, indices, values)

    def dense_gradient(self) -> Optional[torch.Tensor]:
        """The flat gradient of the loss in W + Δ captured since the last update, if the parameter was used."""
        captured = self.layer.captured_gradients
        return None if captured is None else captured.get(self.attr)


class EvolvingDiff(MaskEngine):
    """Base of the evolving-diff engines: finds the adapter's entries, schedules the prune rate, captures dense
    gradients before each update and keeps `config.sparse_parameters` in step with the entries."""

    rule: str  # the FishConfig.mask_update value the engine implements

    def __init__(
        self, model: nn.Module, optimizer=None, *, adapter_name: Optional[str] = None, total_steps: Optional[int] = None
    ):
        adapter, config = fish_adapter_config(model, adapter_name)
        if config.mask_update != self.rule:
            raise SparseTrainingError(
                f"Adapter '{adapter}' was made with mask_update={config.mask_update!r}; this engine moves the mask by "
                f"{self.rule}: create it with FishConfig(mask=..., mask_update='{self.rule}')."
            )
        if total_steps is not None and (not isinstance(total_steps, int) or total_steps < 1):
            raise SparseTrainingError(f"total_steps (for the cosine decay of the prune rate) must be >= 1, got {total_steps!r}.")
        super().__init__(model, update_every=config.update_every)
        self.adapter = adapter
        self.config = config
        self.total_steps = total_steps
        self.updates = 0
        self.entries = diff_entries(model, adapter, config)
        self._layers = list({id(e.layer): e.layer for e in self.entries}.values())
        self.traffic = Traffic()
        if rank_and_world()[1] > 1:
            for layer in self._layers:
                layer.gradient_traffic = self.traffic
        self._capture(self._update_due(1))
        self._prepare()
        if optimizer is not None:
            self.bind(optimizer)

    def _prepare(self) -> None:
        """What the rule needs before training starts (nothing here)."""

    def trained_parameters(self) -> list[torch.Tensor]:
        return [entry.values for entry in self.entries]

    def current_prune_rate(self) -> float:
        return cosine_prune_rate(self.config.prune_rate, self.steps, self.total_steps, f"The {self.rule} diff")

    def step(self, optimizer=None) -> bool:
        steps = self.steps
        updated = super().step(optimizer)
        if self.steps != steps:  # not a micro-batch inside Accelerate's accumulation, which keeps capturing
            self._capture(self._update_due(self.steps + 1))
        return updated

    def _should_update(self) -> bool:
        return self._update_due(self.steps)

    def _update_due(self, step: int) -> bool:
        return step % self.update_every == 0 and (self.total_steps is None or step < self.total_steps)

    def _capture(self, on: bool) -> None:
        """Start collecting dense gradients (afresh) for the coming step, or stop and free them."""
        for layer in self._layers:
            layer.captured_gradients = {} if on else None

    def update_masks(self) -> None:
        with torch.no_grad():
            self._average_dense_gradients()
            self.move_entries(self.current_prune_rate())
        for entry in self.entries:
            self.config.sparse_parameters[entry.name] = entry.indices.numel()
        self.updates += 1

    def _average_dense_gradients(self) -> None:
        """Make every process rank candidates by the same (averaged) dense gradients."""
        if rank_and_world()[1] == 1:
            return
        for entry in sorted(self.entries, key=lambda e: e.name):
            gradient = entry.dense_gradient()
            if gradient is None:  # not used in this process's forward: it still takes part in the collective
                gradient = torch.zeros(entry.numel, device=entry.values.device)
            entry.layer.captured_gradients[entry.attr] = reduce_across_processes(gradient, self.traffic, "dense gradients")

    @abstractmethod
    def move_entries(self, rate: float) -> None:
        """The rule: replace about `rate` of the entries, keeping k."""

    def state_dict(self) -> dict[str, Any]:
        """What continuing the run needs besides the model, optimizer and schedule: the step and update counts, and
        what the adapter file leaves out (Top-KAST's exploration entries). `SparseTrainingCallback` saves it in each
        Trainer checkpoint; in an Accelerate loop, `accelerator.register_for_checkpointing(engine)`."""
        return {
            "rule": self.rule, "steps": self.steps, "updates": self.updates, "total_steps": self.total_steps,
            "update_seconds": self.update_seconds, "adapter_digest": self._adapter_digest(),
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Continue from `state_dict()`, once the model holds the adapter saved with it (and, with Accelerate, the
        optimizer its state): Trainer's `resume_from_checkpoint` and Accelerate's `load_state` load those first."""
        if state.get("rule") != self.rule:
            raise SparseTrainingError(f"The engine state was saved by a {state.get('rule')!r} diff; this engine is {self.rule!r}.")
        if state["adapter_digest"] != self._adapter_digest():
            raise SparseTrainingError(
                f"The model's adapter '{self.adapter}' is not the one this engine state was saved with (step {state['steps']}): "
                "load the checkpoint's adapter into the model first (Trainer's resume_from_checkpoint and Accelerate's "
                "load_state do), then the engine state."
            )
        if self.total_steps is not None and state["total_steps"] not in (None, self.total_steps):
            raise SparseTrainingError(
                f"The run was scheduled over {state['total_steps']} steps, this one over {self.total_steps}: resume with the "
                "same number of steps, or the prune rate would follow another schedule."
            )
        self.total_steps = state["total_steps"] if self.total_steps is None else self.total_steps
        self.steps, self.updates, self.update_seconds = state["steps"], state["updates"], state["update_seconds"]
        for entry in self.entries:
            self.config.sparse_parameters[entry.name] = entry.indices.numel()
        self._capture(self._update_due(self.steps + 1))

    def _adapter_digest(self) -> str:
        """A hash of the adapter's entries (not the exploration), to check an engine state against the model."""
        return self._digest(lambda entry: [entry.indices])

    def masks(self) -> dict[str, torch.Tensor]:
        """{parameter name: flat bool mask of the entries the forward pass uses}."""
        masks = {}
        for entry in self.entries:
            mask = torch.zeros(entry.numel, dtype=torch.bool)
            mask[entry.indices.long().cpu()] = True
            masks[entry.name] = mask
        return masks

    def mask_digest(self) -> str:
        return self._digest(self.stored_indices)

    def _digest(self, indices_of) -> str:
        return tensors_digest(
            {f"{entry.name}#{i}": indices.long() for entry in self.entries for i, indices in enumerate(indices_of(entry))}
        )

    def stored_indices(self, entry: DiffEntry) -> list[torch.Tensor]:
        return [entry.indices]

    def current_mask(self) -> FishMask:
        """The adapter's support now, as a `FishMask` (for plots, reports and model cards)."""
        info = {**self.config.mask_info, "mask_update": self.rule, "mask_updates": self.updates}
        return FishMask(
            {e.name: e.indices.long().cpu() for e in self.entries},
            self.config.parameter_shapes,
            modules_to_save=self.config.modules_to_save or (),
            info=info,
        )


def fish_adapter_config(model: nn.Module, adapter_name: Optional[str]) -> tuple[str, FishConfig]:
    """The name and config of the FISH adapter an engine should move (default: the active one)."""
    if isinstance(model, torch.nn.parallel.DistributedDataParallel):
        raise SparseTrainingError(
            "The model is already wrapped in DistributedDataParallel: create the evolving-diff engine on the PeftModel "
            "before accelerator.prepare(model), then pass the prepared optimizer to engine.step()."
        )
    configs = getattr(model, "peft_config", None)
    if not configs:
        raise SparseTrainingError("An evolving diff needs the PeftModel from get_peft_model(model, FishConfig(...)).")
    adapter = adapter_name or getattr(model, "active_adapter", None) or next(iter(configs))
    config = configs.get(adapter)
    if not isinstance(config, FishConfig):
        raise SparseTrainingError(f"Adapter '{adapter}' is not a FISH adapter; evolving diffs move FISH masks.")
    return adapter, config


def diff_entries(model: nn.Module, adapter: str, config: FishConfig, missing_ok: bool = False) -> list[DiffEntry]:
    """The adapted parameters of adapter `adapter` in `model`; with `missing_ok`, those `config` does not name are
    left out instead of refused."""
    entries = []
    for module_name, module in model.named_modules():
        if not isinstance(module, FishLayer) or adapter not in module.fish_values:
            continue
        owner = module_name.removeprefix("base_model.model.")
        for attr in module.adapted_parameters(adapter):
            name = f"{owner}.{attr}"
            if name not in config.sparse_parameters:
                if missing_ok:
                    continue
                raise SparseTrainingError(f"'{name}' is in the model's adapter '{adapter}' but not in its config.")
            numel = math.prod(config.parameter_shapes[name])
            entries.append(DiffEntry(name, module, attr, adapter, numel))
    if not entries:
        raise SparseTrainingError(f"The model holds no entries of adapter '{adapter}'.")
    return entries


def sorted_by_index(indices: torch.Tensor, sources: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """`indices` in increasing order, and `sources` reordered with them (an adapter stores sorted indices)."""
    order = torch.argsort(indices)
    return indices[order], sources[order]


def top_new_positions(signal: Optional[torch.Tensor], taken: torch.Tensor, count: int, numel: int) -> torch.Tensor:
    """The `count` flat positions outside `taken` with the largest |signal|; without a signal (a parameter the step
    did not use) any free positions."""
    if count == 0:
        return taken.new_zeros(0, dtype=torch.long)
    if count > numel - taken.numel():
        raise SparseTrainingError(f"Cannot grow {count} entries: only {numel - taken.numel()} positions are free.")
    score = torch.zeros(numel, device=taken.device) if signal is None else signal.abs().flatten().float().clone()
    score[taken.long()] = -math.inf
    return torch.topk(score, count, sorted=False).indices
