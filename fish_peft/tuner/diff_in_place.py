"""A weight diff written into the frozen weight for one product, and the weight's own entries written back after it:
one dense product and no copy of the weight, with outputs equal to W + Δ's. Used without gradients (evaluation with
many tokens) and by `transient_weight` in training, for the cases `transient_weight.dense_product_pays` allows
(float32, outside autocast); decoding a token is faster with the sparse term, which reads no weight entries at
random. It writes through `.data`, so autograd's version counters do not see it."""

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
