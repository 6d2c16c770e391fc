"""The exact top-k over many score tensors, without concatenating them.

One pass finds the k-th largest score: blocks of scores are streamed through a pool of candidates that keeps the
k largest seen so far whenever it reaches 2k, and only scores at or above the pool's k-th largest value enter it.
A second pass keeps the entries above that threshold, plus as many entries equal to it as the budget still allows,
earliest first in (tensor order, flat index): the same entries as a top-k over the concatenation with ties going to
the lower index. Beyond the result (k indices) nothing larger than 2k values plus one block is allocated, on the
scores' device.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping

import torch

BLOCK = 1 << 22  # scores read at a time


def top_k(scores: Mapping[str, torch.Tensor], k: int) -> dict[str, torch.Tensor]:
    """{name: sorted flat indices} of the k highest scores over all tensors; among equal scores the earlier tensor,
    then the lower flat index, wins. Scores are compared as float32."""
    total = sum(s.numel() for s in scores.values())
    if k >= total:
        return {name: torch.arange(s.numel(), device=s.device) for name, s in scores.items()}
    if k <= 0:
        return {name: torch.empty(0, dtype=torch.int64, device=s.device) for name, s in scores.items()}
    threshold, ties = _kth_largest(scores, k)
    return _pick(scores, threshold, ties)


def _blocks(score: torch.Tensor) -> Iterator[tuple[int, torch.Tensor]]:
    flat = score.reshape(-1)
    for start in range(0, flat.numel(), BLOCK):
        yield start, flat[start : start + BLOCK].float()


def _kth_largest(scores: Mapping[str, torch.Tensor], k: int) -> tuple[torch.Tensor, int]:
    """(the k-th largest score as a 0-d float32 tensor, how many entries equal to it the top k hold)."""
    pool: list[torch.Tensor] = []
    size, floor = 0, None
    for score in scores.values():
        for _, block in _blocks(score):
            if floor is not None:
                block = block[~(block < floor)]  # NaN stays in, to be caught below
            pool.append(block)
            size += block.numel()
            if size >= 2 * k:
                pool = [_largest(torch.cat(pool), k)]
                size, floor = k, pool[0].min()
    largest = _largest(torch.cat(pool), k)
    threshold = largest.min()
    return threshold, k - int((largest > threshold).sum())


def _largest(values: torch.Tensor, k: int) -> torch.Tensor:
    if torch.isnan(values).any():
        raise ValueError("Scores contain NaN; cannot rank parameters.")
    return torch.topk(values, k, sorted=False).values


def _pick(scores: Mapping[str, torch.Tensor], threshold: torch.Tensor, ties: int) -> dict[str, torch.Tensor]:
    """Every entry above `threshold`, and the first `ties` entries equal to it in (tensor, flat index) order."""
    result = {}
    for name, score in scores.items():
        parts = [torch.empty(0, dtype=torch.int64, device=score.device)]
        for start, block in _blocks(score):
            chosen = block > threshold
            if ties:
                equal = (block == threshold).nonzero().squeeze(1)[:ties]
                chosen[equal] = True
                ties -= equal.numel()
            parts.append(chosen.nonzero().squeeze(1) + start)
        result[name] = torch.cat(parts)
    return result
