"""A weight diff written into the frozen weight for one product, and the weight's own entries written back after it:
one dense product and no copy of the weight, with outputs equal to W + Δ's. Used without gradients (evaluation with
many tokens) and by `transient_weight` in training, for the cases `transient_weight.dense_product_pays` allows
(float32, outside autocast), and without gradients for the parameters that take no sparse term (norms, biases:
cheaper than calling the module with substituted parameters); decoding a token is faster with the sparse term,
which reads no weight entries at random. It writes through `.data`, so autograd's version counters do not see it."""

from __future__ import annotations

from contextlib import contextmanager
from typing import ContextManager, Iterator, Optional

import torch


def diff_in_place(
    weight: torch.Tensor,
    entries: list[tuple[torch.Tensor, torch.Tensor]],
    originals: Optional[list[torch.Tensor]] = None,
) -> ContextManager[list[torch.Tensor]]:
    """Inside the block, `weight` holds W plus every (values, flat indices) entry set; on leaving (an error
    included), exactly W again: the entries it held are kept and written back, not subtracted. Yields those kept
    entries, one tensor per set; giving them back as `originals` to a later call on the same unchanged W and indices
    skips reading them again (entries of a large weight are read at random, out of the cache)."""
    return diffs_in_place([(weight, entries)], originals)


@contextmanager
def diffs_in_place(
    diffs: list[tuple[torch.Tensor, list[tuple[torch.Tensor, torch.Tensor]]]],
    originals: Optional[list[torch.Tensor]] = None,
) -> Iterator[list[torch.Tensor]]:
    """`diff_in_place` for several (weight, entries) at once, in one block (a norm's call without autograd pays
    for every Python operation); the kept entries and `originals` run over every weight's sets in order."""
    written = []
    try:
        for weight, entries in diffs:
            flat = weight.data.view(-1)
            for values, indices in entries:
                original = None if originals is None else originals[len(written)]
                written.append((flat, *_write(flat, values, indices, original)))
        yield [original for _, _, original in written]
    finally:
        for flat, where, original in reversed(written):
            flat[where] = original


def _write(flat: torch.Tensor, values: torch.Tensor, indices: torch.Tensor, original: Optional[torch.Tensor] = None):
    """Writes W + values at `indices` into `flat` (W's entries there read unless given as `original`); returns the
    positions and those entries, for writing them back. One write: unlike `index_add_`, parallel on CPU."""
    where = indices.long()
    original = flat[where] if original is None else original
    flat[where] = original + values.to(flat.dtype)
    return where, original
