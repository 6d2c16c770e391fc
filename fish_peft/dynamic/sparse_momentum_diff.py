"""Sparse momentum on a FISH diff: the k entries flow to the parameters and positions where learning happens.

Every `update_every` steps each adapted parameter drops the `rate` share of its entries with the smallest |Δ|
(keeping at least one); the dropped count is regrown across parameters in proportion to the mean |momentum| of
each parameter's entries (SGD's buffer, or Adam's m/(√v+ε)), at the positions of largest dense gradient outside the
kept entries, starting at 0 with fresh optimizer state. The total stays k; each parameter's count changes, and
`config.sparse_parameters` follows, so the saved adapter loads as an ordinary FISH adapter.
"""

from __future__ import annotations

import torch

from fish_peft.dynamic.evolving_diff import EvolvingDiff, sorted_by_index, top_new_positions
from fish_peft.dynamic.optimizer_state import check_momentum_optimizer, momentum_magnitude, rearrange_entries
from fish_peft.dynamic.sparse_momentum import allocate


class SparseMomentumDiff(EvolvingDiff):
    """Sparse momentum on the entries of a FISH adapter made with `FishConfig(mask_update="sparse_momentum")`."""

    rule = "sparse_momentum"

    def _check_optimizer(self, optimizer: torch.optim.Optimizer) -> None:
        check_momentum_optimizer(optimizer, self.trained_parameters())

    def move_entries(self, rate: float) -> None:
        shares, kept, capacity = {}, {}, {}
        for entry in self.entries:
            count = entry.values.numel()
            shares[entry.name] = float(momentum_magnitude(self.optimizer, entry.values).float().mean())
            order = torch.argsort(entry.values.detach().abs(), descending=True, stable=True)
            kept[entry.name] = order[: count - min(round(rate * count), count - 1)]
            capacity[entry.name] = entry.numel - kept[entry.name].numel()
        dropped = sum(e.values.numel() - kept[e.name].numel() for e in self.entries)
        growth = allocate(dropped, shares, capacity)
        for entry in self.entries:
            stay = kept[entry.name]
            taken = entry.indices.long()[stay]
            grown = top_new_positions(entry.dense_gradient(), taken, growth[entry.name], entry.numel)
            indices, sources = sorted_by_index(torch.cat([taken, grown]), torch.cat([stay, torch.full_like(grown, -1)]))
            (values,) = rearrange_entries(self.optimizer, [entry.values], [sources])
            entry.set_entries(indices, values)
