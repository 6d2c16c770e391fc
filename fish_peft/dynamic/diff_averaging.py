"""Periodic diff averaging, the FISH paper's distributed training with real processes: every process trains its own
copy of a FISH adapter on its own data (no DDP), and every `merge_every` steps (read: average every N steps) the
processes average what their sparse diffs changed since the last averaging round (their mean, or their sum); every
`recompute_every` rounds the mask is recomputed. ("Averaging", not PEFT's "merge": the adapter stays an adapter.)

Processes that share a mask exchange only its k values (one all-reduce); processes with masks of their own (the
paper's individual masks, e.g. `compute_fisher_mask(..., per_process=True)` on each process's data) exchange k
positions and values each (one all-gather). A round folds the averaged change into the base weights, so a process's
adapter restarts from zero on the averaged model; the task head, trained densely, is averaged the same way. `finish()`
turns everything averaged into one FISH adapter over the union of the positions ever averaged, which
`save_pretrained` writes as usual. File keys ("merges", "merged") stay as earlier releases wrote them.
"""

from __future__ import annotations

from typing import Callable, Optional

import torch
import torch.distributed as dist
from torch import nn

from fish_peft.distributed.communication import Traffic, reduce_across_processes
from fish_peft.tuner.config import FishConfig
from fish_peft.distributed.processes import (
    ProcessMismatchError,
    check_same_everywhere,
    collective_device,
    digest_integers,
    gather_integers,
    rank_and_world,
    tensors_digest,
)
from fish_peft.masks.fish_mask import FishMask
from fish_peft.masks.selection import base_named_parameters
from fish_peft.dynamic.evolving_diff import diff_entries, fish_adapter_config
from fish_peft.dynamic.optimizer_state import drop_parameter, entry_sources, rearrange_entries, unwrap_optimizer
from fish_peft.dynamic.targets import SparseTrainingError

REDUCTIONS = ("mean", "sum")
CHECK_INS = ("average", "finish")  # the calls at which every process reports its step and mask


class DiffAverager:
    """Averages the FISH diffs that several processes train apart. Call `step()` after every `optimizer.step()` and
    `finish()` after the last one.

    Args:
        model: the `PeftModel` with a fixed-mask FISH adapter, not wrapped in DDP (prepare only the dataloader).
        optimizer: the optimizer that trains the adapter (Accelerate's wrapper is fine).
        merge_every: local steps between averaging rounds (>= 1).
        reduction: "mean" or "sum" of the processes' changes.
        recompute_every: averaging rounds between mask recomputations (None: the mask stays).
        recompute_mask: `() -> FishMask`, called on every process at a recomputation.
        total_steps: the run's length, if known: no mask is recomputed after the last round.
    """

    def __init__(
        self,
        model: nn.Module,
        optimizer,
        *,
        merge_every: int,
        reduction: str = "mean",
        recompute_every: Optional[int] = None,
        recompute_mask: Optional[Callable[[], FishMask]] = None,
        total_steps: Optional[int] = None,
        adapter_name: Optional[str] = None,
    ):
        if isinstance(merge_every, bool) or not isinstance(merge_every, int) or merge_every < 1:
            raise ValueError(f"merge_every must be a whole number of steps >= 1, got {merge_every!r}.")
        if reduction not in REDUCTIONS:
            raise ValueError(f"reduction must be one of {REDUCTIONS}, got {reduction!r}.")
        if recompute_every is not None and (isinstance(recompute_every, bool) or not isinstance(recompute_every, int) or recompute_every < 1):
            raise ValueError(f"recompute_every must be a whole number of averaging rounds >= 1 (or None), got {recompute_every!r}.")
        if recompute_every is not None and recompute_mask is None:
            raise ValueError("recompute_every needs recompute_mask, the function that computes the new mask.")
        if isinstance(model, nn.parallel.DistributedDataParallel):
            raise SparseTrainingError(
                "Averaged diffs train every process on its own: do not wrap the model in DDP (with Accelerate, prepare "
                "the optimizer and dataloader but not the model)."
            )
        self.adapter, self.config = fish_adapter_config(model, adapter_name)
        if self.config.mask_update is not None:
            raise SparseTrainingError("Averaged diffs need a fixed mask; this adapter's mask evolves (mask_update).")
        self.model = model
        self.optimizer = unwrap_optimizer(optimizer)
        self.merge_every, self.reduction = merge_every, reduction
        self.recompute_every, self.recompute_mask = recompute_every, recompute_mask
        self.total_steps = total_steps
        self.steps = self.rounds = self.recomputations = 0
        self.traffic = Traffic()
        self.base = dict(base_named_parameters(model))
        self.offsets = _offsets(self.base)
        self.head = {n: p for n, p in model.named_parameters() if p.requires_grad and ".fish_" not in n}
        self.head_at_round = {n: p.detach().clone() for n, p in self.head.items()}
        self.original: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}  # positions ever averaged into, their W then
        self.entries = diff_entries(model, self.adapter, self.config)
        check_same_everywhere(tensors_digest({**self.base, **self.head}), "model at the start of diff averaging")

    def step(self) -> bool:
        """Call after `optimizer.step()`; averages every `merge_every` steps and returns whether it did."""
        self.steps += 1
        if self.steps % self.merge_every:
            return False
        self.average()
        return True

    @property
    def merges(self) -> int:
        """The old name of `rounds`."""
        return self.rounds

    def average(self) -> None:
        """Fold the processes' averaged changes into every process's model; the adapters restart from zero."""
        shared = self._check_in("average")
        with torch.no_grad():
            for name, (positions, change) in self._averaged_changes(shared).items():
                self._fold(name, positions, change)
            for entry in self.entries:
                entry.values.zero_()
            self._average_head()
        self.rounds += 1
        last = self.total_steps is not None and self.steps >= self.total_steps
        if self.recompute_every and self.rounds % self.recompute_every == 0 and not last:
            self._recompute()

    def _average_head(self) -> None:
        """The head's averaged change, all of its tensors in one reduction."""
        names = sorted(self.head)
        if not names:
            return
        changes = self._reduce(torch.cat([(self.head[n] - self.head_at_round[n]).flatten() for n in names]), "head")
        for name, change in zip(names, changes.split([self.head[n].numel() for n in names])):
            parameter = self.head[name]
            parameter.copy_(self.head_at_round[name] + change.view_as(parameter))
            self.head_at_round[name] = parameter.detach().clone()

    def _check_in(self, what: str) -> bool:
        """Every process must be at the same step of the same call; returns whether all hold the same mask."""
        world = rank_and_world()[1]
        if world == 1:
            return True
        calls = list(CHECK_INS)
        reports = gather_integers([calls.index(what), self.steps, *digest_integers(self.mask_digest())])
        if len({(w, s) for w, s, *_ in reports}) > 1:
            raise ProcessMismatchError(
                f"The processes are out of step: {[(calls[w], s) for w, s, *_ in reports]} (call, local steps) by rank. "
                "Diff averaging needs every process to take the same number of steps: give each the same number "
                "of batches (a process with no data cannot take part)."
            )
        return len({tuple(d) for _, _, *d in reports}) == 1

    def mask_digest(self) -> str:
        return tensors_digest({e.name: e.indices for e in self.entries})

    def _averaged_changes(self, shared: bool) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
        """{parameter: (flat positions, averaged change)} of this round."""
        entries = sorted(self.entries, key=lambda e: e.name)
        if shared:  # every process holds the same positions: reduce the values alone
            values = self._reduce(torch.cat([e.values.detach().flatten() for e in entries]), "diff values")
            return {e.name: (e.indices.long(), part) for e, part in zip(entries, values.split([e.values.numel() for e in entries]))}
        positions = torch.cat([self.offsets[e.name] + e.indices.long() for e in entries])
        values = torch.cat([e.values.detach().flatten() for e in entries])
        positions, values = self._gather(positions, values)
        positions, inverse = torch.unique(positions, return_inverse=True)
        values = torch.zeros(positions.numel(), dtype=values.dtype, device=values.device).index_add_(0, inverse, values)
        if self.reduction == "mean":
            values /= rank_and_world()[1]
        return _split_by_parameter(positions, values, self.offsets)

    def _reduce(self, tensor: torch.Tensor, what: str) -> torch.Tensor:
        """Sum or mean of `tensor` over the processes."""
        return reduce_across_processes(tensor, self.traffic, what, mean=self.reduction == "mean")

    def _gather(self, positions: torch.Tensor, values: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Every process's (positions, values), concatenated (their counts may differ)."""
        world = rank_and_world()[1]
        if world == 1:
            return positions, values
        counts = [count for (count,) in gather_integers([positions.numel()])]
        longest, device = max(counts), collective_device(values)
        padded = torch.zeros(longest, dtype=torch.long, device=device), torch.zeros(longest, dtype=values.dtype, device=device)
        padded[0][: positions.numel()], padded[1][: values.numel()] = positions, values
        gathered = []
        for tensor, what in zip(padded, ("diff positions", "diff values")):
            parts = [torch.empty_like(tensor) for _ in range(world)]
            self.traffic.add(what, tensor)
            dist.all_gather(parts, tensor)
            gathered.append(torch.cat([part[:count] for part, count in zip(parts, counts)]).to(values.device))
        return gathered[0], gathered[1]

    def _fold(self, name: str, positions: torch.Tensor, change: torch.Tensor) -> None:
        """W[positions] += change, remembering W at positions never averaged into before."""
        flat = self.base[name].data.view(-1)
        seen, before = self.original.get(name, (positions.new_zeros(0), flat.new_zeros(0)))
        new = positions[~torch.isin(positions, seen)]
        known = torch.cat([seen, new])
        order = torch.argsort(known)
        self.original[name] = known[order], torch.cat([before, flat[new].clone()])[order]
        flat.index_add_(0, positions, change.to(flat.dtype))

    def _recompute(self) -> None:
        """A new mask from `recompute_mask`, called with the sparse-diff layers bypassed: their values are zero just
        after a round, and the Fisher is taken in the base weights the layers wrap."""
        layers = {id(e.layer): e.layer for e in self.entries}.values()
        for layer in layers:
            layer._disable_adapters = True
        try:
            mask = self.recompute_mask()
        finally:
            for layer in layers:
                layer._disable_adapters = False
        if not mask.info.get("per_process") and rank_and_world()[1] > 1:
            self.traffic.add("fisher scores", torch.empty(sum(int(torch.Size(s).numel()) for s in mask.shapes.values())))
        self._install(dict(mask), mask, values=None)
        self.recomputations += 1

    def state_dict(self) -> dict:
        """This process's part of the run right after a round (its adapter holds zeros then): counters, traffic and
        its mask. `averaged_model_state()` holds the part every process shares; `load_state_dict` takes both."""
        self._check_just_averaged()
        return {
            "processes": rank_and_world()[1], "steps": self.steps, "merges": self.rounds,
            "recomputations": self.recomputations,
            "traffic": {"bytes": dict(self.traffic.bytes), "calls": dict(self.traffic.calls)},
            "mask": {e.name: e.indices.long().clone() for e in self.entries}, "mask_info": dict(self.config.mask_info),
        }

    def averaged_model_state(self) -> dict:
        """What the rounds so far changed, the same on every process: the base-weight entries they folded into
        (positions, pretrained and averaged values) and the task head."""
        self._check_just_averaged()
        folded = {}
        for name, (positions, pretrained) in self.original.items():
            merged = self.base[name].detach().view(-1)[positions].clone()
            folded[name] = {"positions": positions.clone(), "pretrained": pretrained.clone(), "merged": merged}
        return {"folded": folded, "head": {name: p.detach().clone() for name, p in self.head.items()}}

    def load_state_dict(self, state: dict, averaged_model: dict) -> None:
        """Continue a run from its `state_dict()` and `averaged_model_state()`, on an averager made like the run's: the
        model it started from (pretrained base weights; the adapter's mask is replaced by the saved one) and a new
        optimizer, whose state the caller restores after this."""
        world = rank_and_world()[1]
        if state["processes"] != world:
            raise SparseTrainingError(
                f"This checkpoint of diff averaging was saved by {state['processes']} processes; resume it with as "
                f"many (now {world})."
            )
        with torch.no_grad():
            folded = {
                name: {key: tensor.to(self.base[name].device) for key, tensor in saved.items()}
                for name, saved in averaged_model["folded"].items()
            }
            for name, saved in folded.items():
                flat = self.base[name].data.view(-1)
                if not torch.equal(flat[saved["positions"]], saved["pretrained"].to(flat.dtype)):
                    raise SparseTrainingError(
                        f"'{name}' does not hold the pretrained weights this checkpoint was averaged into: load it onto "
                        "the model the run started from, built afresh from the same pretrained checkpoint."
                    )
            for name, saved in folded.items():
                self.base[name].data.view(-1)[saved["positions"]] = saved["merged"].to(self.base[name].dtype)
                self.original[name] = saved["positions"], saved["pretrained"].to(self.base[name].dtype)
            for name, parameter in self.head.items():
                parameter.copy_(averaged_model["head"][name])
                self.head_at_round[name] = parameter.detach().clone()
        shapes = {name: tuple(self.base[name].shape) for name in state["mask"]}
        mask = FishMask(state["mask"], shapes, modules_to_save=self.config.modules_to_save or (), info=state["mask_info"])
        self._install(dict(mask), mask, values=None)
        self.steps, self.rounds, self.recomputations = state["steps"], state["merges"], state["recomputations"]
        self.traffic.bytes.update(state["traffic"]["bytes"])
        self.traffic.calls.update(state["traffic"]["calls"])
        check_same_everywhere(tensors_digest({**self.base, **self.head}), "averaged model read back from the checkpoint")

    def _check_just_averaged(self) -> None:
        if self.steps % self.merge_every:
            raise SparseTrainingError(
                f"Diff averaging is checkpointed right after an averaging round (every {self.merge_every} steps); this is step "
                f"{self.steps}."
            )

    def finish(self) -> None:
        """Average what is left, then make the adapter hold everything averaged: the base weights go back to the
        pretrained ones and the adapter's entries are the union of averaged positions, valued W_averaged - W."""
        if self.steps % self.merge_every:
            self.average()
        self._check_in("finish")
        indices, values = {}, {}
        with torch.no_grad():
            for name, (positions, before) in self.original.items():
                flat = self.base[name].data.view(-1)
                values[name] = (flat[positions] - before).float()
                flat[positions] = before
                indices[name] = positions
        shapes = {name: tuple(p.shape) for name, p in self.base.items()}
        mask = FishMask(indices, {n: shapes[n] for n in indices}, modules_to_save=self.config.modules_to_save or (),
                        info={**self.config.mask_info, "merged_from_processes": rank_and_world()[1], "merges": self.rounds})
        self._install(indices, mask, values)

    def _install(self, indices: dict[str, torch.Tensor], mask: FishMask, values: Optional[dict[str, torch.Tensor]]) -> None:
        """Give the adapter `mask`'s entries (value 0, or `values`): modules it did not touch yet are wrapped,
        parameters it no longer names leave the adapter; the optimizer trains the new values, with the state of
        entries that stay."""
        fresh = FishConfig(mask=mask, save_dtype=self.config.save_dtype)
        for key in ("sparse_parameters", "parameter_shapes", "target_modules", "mask_info", "mask"):
            setattr(self.config, key, getattr(fresh, key))
        old = {e.name: e for e in self.entries}
        _wrap_new_modules(self.model, self.config, self.adapter)
        self.entries = diff_entries(self.model, self.adapter, self.config, missing_ok=True)
        group = self._values_group(old.values())
        for entry in self.entries:
            wanted = indices.get(entry.name)
            if wanted is None:
                continue
            wanted = wanted.long().sort().values
            data = torch.zeros(wanted.numel()) if values is None else values[entry.name]
            if entry.name in old:  # trained before this call: its optimizer state moves with its positions
                sources = entry_sources(entry.indices.long(), wanted)
                (parameter,) = rearrange_entries(self.optimizer, [entry.values], [sources])
                parameter.data = data.to(parameter.device).contiguous()
            else:
                parameter = nn.Parameter(data.to(entry.values.device).contiguous())
                if self.optimizer is not None:
                    group["params"].append(parameter)
            entry.set_entries(wanted, parameter)
        for name, entry in old.items():
            if name not in indices:
                drop_parameter(self.optimizer, entry.values)
                entry.layer.remove_parameter(entry.adapter, entry.attr)
        self.entries = [e for e in self.entries if e.name in indices]

    def _values_group(self, entries) -> dict:
        if self.optimizer is None:
            return {"params": []}
        owners = {id(p): g for g in self.optimizer.param_groups for p in g["params"]}
        for entry in entries:
            if id(entry.values) in owners:
                return owners[id(entry.values)]
        raise SparseTrainingError("The optimizer does not train the adapter's values; build it from model.parameters().")


def _offsets(parameters: dict[str, nn.Parameter]) -> dict[str, int]:
    """Where each parameter starts in one flat numbering of all of them (the same on every process)."""
    offsets, start = {}, 0
    for name in sorted(parameters):
        offsets[name] = start
        start += parameters[name].numel()
    return offsets


def _split_by_parameter(positions: torch.Tensor, values: torch.Tensor, offsets: dict[str, int]) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    names = sorted(offsets, key=offsets.get)
    starts = torch.tensor([offsets[n] for n in names], device=positions.device)
    owner = torch.bucketize(positions, starts, right=True) - 1
    result = {}
    for i in owner.unique().tolist():
        chosen = owner == i
        result[names[i]] = positions[chosen] - offsets[names[i]], values[chosen]
    return result


def _wrap_new_modules(model: nn.Module, config: FishConfig, adapter: str) -> None:
    """Wrap the modules `config` names that the adapter does not wrap yet, and add adapted parameters to wrapped
    ones (with placeholder entries that `_install` fills)."""
    from peft.tuners.tuners_utils import _get_submodules

    from fish_peft.tuner.layer import FishLayer
    from fish_peft.tuner.model import _module_indices, adapted_modules

    tuner = model.base_model
    for module_name, attrs in adapted_modules(tuner.model, config.sparse_parameters).items():
        parent, target, target_name = _get_submodules(tuner.model, module_name)
        indices = _module_indices(config, module_name, attrs)
        if isinstance(target, FishLayer):
            target.add_parameters(adapter, {a: idx for a, idx in indices.items() if a not in target.adapted_parameters(adapter)})
        else:
            tuner._create_and_replace(config, adapter, target, target_name, parent, current_key=module_name)


DiffMerger = DiffAverager  # its earlier name ("merge" there meant this averaging, not PEFT's merge)
