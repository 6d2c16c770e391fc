"""The reference the vectorised Fisher is checked against, in bounded memory.

Per example, one ordinary backward; each parameter's gradient is read at a few entries the moment it is accumulated
and dropped at once, so no more than one parameter's gradient exists at a time, and the sums kept are at most
`MAX_ENTRIES` values per parameter.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping

import torch
from torch import nn

MAX_ENTRIES = 1024  # entries of each parameter compared
SEED = 0


def compared_entries(vectorised: torch.Tensor) -> torch.Tensor:
    """Sorted flat indices to compare for a parameter with these (flat) vectorised scores: all of a small one;
    otherwise the largest score of each of `MAX_ENTRIES // 2` equal runs of entries (so sparse gradients, such as an
    embedding's, are compared where they are not zero) and a seeded random spread."""
    size = vectorised.numel()
    if size <= MAX_ENTRIES:
        return torch.arange(size, device=vectorised.device)
    run = -(-size // (MAX_ENTRIES // 2))
    whole = size // run * run
    peaks = [vectorised[:whole].view(-1, run).argmax(1) + torch.arange(0, whole, run, device=vectorised.device)]
    if whole < size:
        peaks.append(vectorised[whole:].argmax().view(1) + whole)
    spread = torch.randint(size, (MAX_ENTRIES // 2,), generator=torch.Generator().manual_seed(SEED))
    return torch.unique(torch.cat([*peaks, spread.to(vectorised.device)]))


def squared_gradients_at(
    params: Mapping[str, nn.Parameter], entries: Mapping[str, torch.Tensor], losses: Iterable[torch.Tensor]
) -> dict[str, torch.Tensor]:
    """{name: Σ over `losses` (one per example) of the squared gradient of the loss at `entries[name]`}."""
    sums = {name: torch.zeros(idx.numel(), device=idx.device) for name, idx in entries.items()}
    name_of = {id(p): name for name, p in params.items()}
    saved = {name: p.grad for name, p in params.items()}

    def read(param: nn.Parameter) -> None:
        name = name_of[id(param)]
        sums[name] += param.grad.reshape(-1)[entries[name]].float().pow(2)
        param.grad = None

    handles = [p.register_post_accumulate_grad_hook(read) for p in params.values()]
    try:
        for p in params.values():
            p.grad = None
        for loss in losses:
            loss.sum().backward(inputs=list(params.values()))
    finally:
        for handle in handles:
            handle.remove()
        for name, p in params.items():
            p.grad = saved[name]
    return sums
