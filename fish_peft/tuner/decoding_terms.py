"""A Linear's or Conv1D's weight diff while decoding: without autograd, the CSR matrices of the active adapters'
weight entries are kept between calls and checked with a few dictionary lookups, so a decoded token costs the base
product plus one sparse product per adapter. The adapter's general forward (finding the active entries, building
each CSR matrix, the checks for the other paths) cost about 100 µs of Python a layer on CPU once the base product
had evicted it from the cache: more than the sparse product itself."""

from __future__ import annotations

from typing import Optional

import torch
from torch import nn
from transformers.pytorch_utils import Conv1D

from fish_peft.tuner.sparse_terms import add_products, compute_dtype
from fish_peft.tuner.transient_weight import dense_product_min_tokens


class DecodingTerms:
    """One layer's cached weight-diff matrices, valid while the same adapters are active with the same values and
    indices tensors, unchanged in place (their version counters), and only the weight adapted."""

    def __init__(self) -> None:
        self.clear()

    def __reduce__(self):
        """Copied (`copy.deepcopy`) or pickled empty: a CSR tensor has no storage to copy, and the copy's layer
        holds other tensors."""
        return DecodingTerms, ()

    def clear(self) -> None:
        self._key: tuple = ()
        self._kept: list[torch.Tensor] = []  # the keyed tensors, alive, so that their ids are not reused
        self._matrices: tuple[torch.Tensor, ...] = ()
        self._dense_from_tokens = float("inf")  # `dense_product_pays`'s threshold (a no-grad call needs no other check)

    def output(self, layer: nn.Module, x: torch.Tensor) -> Optional[torch.Tensor]:
        """The FishLayer `layer`'s output for `x` with the weight diffs, or None where this path does not apply
        (autograd or autocast on, another parameter adapted too, or enough tokens for `dense_product_pays`: the base
        weight's own gradient, its other condition, plays no part without autograd)."""
        if torch.is_grad_enabled() or torch.is_autocast_enabled(x.device.type):
            return None
        entries = _weight_entries(layer)
        if entries is None:
            return None
        key = tuple((name, id(v), v._version, id(i), i._version) for name, v, i in entries)
        base = layer._modules["base_layer"]
        if key != self._key:
            conv1d = isinstance(base, Conv1D)
            self._matrices = tuple(
                layer._csr_pattern((name, False), i).matrix(v.detach().to(compute_dtype(v)), transposed=conv1d)
                for name, v, i in entries
            )
            self._key, self._kept = key, [t for _, v, i in entries for t in (v, i)]
            self._dense_from_tokens = dense_product_min_tokens(base)
        if x.numel() // max(x.shape[-1], 1) >= self._dense_from_tokens:
            return None
        return add_products(base(x), x, self._matrices)


def _weight_entries(layer: nn.Module) -> Optional[list[tuple[str, torch.Tensor, torch.Tensor]]]:
    """(adapter, values, indices) of the weight for each active adapter, read straight from the layer's dicts; None
    where an active adapter changes another parameter too (its diff is applied through the general forward)."""
    values_dicts, indices_dicts = layer._modules["fish_values"]._modules, layer._modules["fish_indices"]._modules
    entries = []
    for name in layer.active_adapters:
        values = values_dicts.get(name)
        if values is None or not values._parameters:
            continue
        if len(values._parameters) > 1 or "weight" not in values._parameters:
            return None
        entries.append((name, values._parameters["weight"], indices_dicts[name]._buffers["weight"]))
    return entries
