"""A weight diff written into the weight for one call without gradients, and the weight's own entries written back
after it: with many tokens (evaluation), one product and no copy of the weight, with outputs equal to W + Δ's. For
the cases `transient_weight.dense_product_pays` allows (float32, outside autocast); decoding a token is faster with
the sparse term, which reads no weight entries at random."""

from __future__ import annotations

from contextlib import contextmanager
from typing import Iterator

import torch


@contextmanager
def diff_in_place(weight: torch.Tensor, entries: list[tuple[torch.Tensor, torch.Tensor]]) -> Iterator[None]:
    """Inside the block, `weight` holds W plus every (values, flat indices) entry set; on leaving (an error
    included), exactly W again: the entries it held are kept and written back, not subtracted."""
    flat = weight.data.view(-1)
    kept = []
    try:
        for values, indices in entries:
            kept.append((indices, flat[indices.long()]))
            flat.index_add_(0, indices, values.to(flat.dtype))
        yield
    finally:
        for indices, original in reversed(kept):
            flat[indices.long()] = original
