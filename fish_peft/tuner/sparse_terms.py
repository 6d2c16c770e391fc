"""A weight's sparse diff as its own term of the layer's output, computed from the k entries alone, so that no
W + Δ is formed and no dense weight gradient is computed:
- Linear (and GPT-2 Conv1D): y = base(x) + x·Δᵀ, the values' gradient Σ over tokens of g[:, row]·x[:, col];
- Embedding: y = base(ids) + the rows of Δ the batch looks up.
Terms are computed in float32 (or the values' wider dtype) and added to the base output in the output's dtype."""

from __future__ import annotations

import warnings
from typing import NamedTuple

import torch
from torch import nn
from transformers.pytorch_utils import Conv1D

class CsrPattern(NamedTuple):
    """Where a weight's k entries sit, as CSR row pointers and column indices (sorted flat indices are CSR order)."""

    crow: torch.Tensor
    cols: torch.Tensor


def csr_pattern(flat_indices: torch.Tensor, shape: tuple[int, ...]) -> CsrPattern:
    """The CSR pattern of sorted `flat_indices` into a weight of 2-D `shape`, in the indices' integer dtype."""
    rows, cols = flat_indices // shape[1], flat_indices % shape[1]
    crow = torch._convert_indices_from_coo_to_csr(rows, shape[0], out_int32=flat_indices.dtype == torch.int32)
    return CsrPattern(crow, cols)


def sparse_term(layer: nn.Module, x: torch.Tensor, values: torch.Tensor, pattern: CsrPattern) -> torch.Tensor:
    """The diff's term of `layer`'s output (Linear, or Conv1D whose weight is stored in × out) for input `x`."""
    return SparseTerm.apply(x, values, pattern.crow, pattern.cols, tuple(layer.weight.shape), isinstance(layer, Conv1D))


class SparseTerm(torch.autograd.Function):
    """x (..., in) → (..., out): x·Δᵀ for a Linear's Δ (out × in), x·Δ for a Conv1D's (in × out, `transposed`),
    with Δ a CSR matrix of the k entries (sorted flat indices are CSR order). The values' gradient is a sampled
    matrix product (SDDMM) at the k positions. On CPU (Linear(1024), 256 tokens, 0.5 %) this was 4x faster forward
    and 2x faster backward than gathering x's columns and scattering them into y's rows."""

    @staticmethod
    def forward(ctx, x, values, crow, cols, shape, transposed):
        flat = x.reshape(-1, x.shape[-1]).to(_compute_dtype(values))
        delta = _csr(crow, cols, values.to(flat.dtype), shape)
        with torch.autocast(x.device.type, enabled=False):  # in float32, not autocast's dtype
            term = ((delta.t() if transposed else delta) @ flat.t()).t()
        ctx.save_for_backward(x, values, crow, cols)
        ctx.shape, ctx.transposed = shape, transposed
        return term.reshape(*x.shape[:-1], term.shape[-1])

    @staticmethod
    def backward(ctx, grad):
        x, values, crow, cols = ctx.saved_tensors
        flat = x.reshape(-1, x.shape[-1]).to(_compute_dtype(values))
        grad = grad.reshape(-1, grad.shape[-1]).to(flat.dtype)
        with torch.autocast(x.device.type, enabled=False):
            grad_x, grad_values = _gradients(ctx, x, values, crow, cols, flat, grad)
        return grad_x, grad_values, None, None, None, None


def _gradients(ctx, x, values, crow, cols, flat, grad):
    """(x's gradient, the values' gradient), each None where not wanted."""
    grad_x = grad_values = None
    if ctx.needs_input_grad[0]:
        delta = _csr(crow, cols, values.to(flat.dtype), ctx.shape)
        grad_x = ((delta if ctx.transposed else delta.t()) @ grad.t()).t().reshape(x.shape).to(x.dtype)
    if ctx.needs_input_grad[1]:
        pattern = _csr(crow, cols, torch.zeros_like(values, dtype=flat.dtype), ctx.shape)
        left, right = (flat, grad) if ctx.transposed else (grad, flat)
        grad_values = torch.sparse.sampled_addmm(pattern, left.t().contiguous(), right).values().to(values.dtype)
    return grad_x, grad_values


def _compute_dtype(values: torch.Tensor) -> torch.dtype:
    """float32, or the values' dtype when it is wider: 16-bit values (and inputs) are not rounded in the product."""
    return torch.promote_types(values.dtype, torch.float32)


def _csr(crow: torch.Tensor, cols: torch.Tensor, values: torch.Tensor, shape: tuple[int, int]) -> torch.Tensor:
    """Δ as a CSR matrix of `shape`."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*[Ss]parse.*")  # "beta state", "invariant checks disabled"
        return torch.sparse_csr_tensor(crow, cols, values, shape, check_invariants=False)


def embedding_term(layer: nn.Embedding, ids: torch.Tensor, values: torch.Tensor, flat_indices: torch.Tensor) -> torch.Tensor:
    """The diff's rows for the looked-up `ids` (shape ids.shape + (embedding_dim,)), built over the batch's
    distinct ids only. As in `nn.Embedding`, the padding row gets no gradient."""
    dim = layer.embedding_dim
    flat = flat_indices.long()
    rows, cols = flat // dim, flat % dim
    if layer.padding_idx is not None:
        values = torch.where(rows == layer.padding_idx % layer.num_embeddings, values.detach(), values)
    looked_up, inverse = torch.unique(ids, return_inverse=True)
    if not looked_up.numel():  # an empty batch
        return torch.zeros(*ids.shape, dim, dtype=_compute_dtype(values), device=values.device)
    position = torch.searchsorted(looked_up, rows).clamp(max=looked_up.numel() - 1)
    hit = looked_up[position] == rows
    table = torch.zeros(looked_up.numel(), dim, dtype=_compute_dtype(values), device=values.device)
    table = table.index_put((position[hit], cols[hit]), values[hit].to(table.dtype))
    return table[inverse]
