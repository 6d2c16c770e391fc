"""A weight's sparse diff as its own term of the layer's output, computed from the k entries alone, so that no
W + Δ is formed and no dense weight gradient is computed:
- Linear (and GPT-2 Conv1D): y = base(x) + x·Δᵀ, the values' gradient Σ over tokens of g[:, row]·x[:, col];
- Embedding: y = base(ids) + the rows of Δ the batch looks up.
Terms are computed in float32 (or the values' wider dtype) and added to the base output in the output's dtype."""

from __future__ import annotations

import warnings
from contextlib import nullcontext
from typing import NamedTuple, Optional

import torch
from torch import nn
from transformers.pytorch_utils import Conv1D


COMPACT_SHARE = 0.25
"""The values' gradient reads x only at the weight's columns that hold entries (rows for Conv1D) and g only at its
rows that do, where at most this share of them do: a Fisher mask puts its entries into a few percent of most
matrices' columns (MiniLM), so a layer keeps that much of its input for the backward, not all of it, and the product
transposes that much. A random mask touches every column: nothing changes."""

DENSE_GRADIENT_FILL = 0.08
"""Where the entries fill at least this share of the kept rows × kept columns, the values' gradient is the dense
product gᵀx there, read at the entries: on CPU (256 × 1024 to 2816 × 1024, 512–2048 tokens) the sampled product was
as fast at 5 %, and 1.1–2.5× slower at 10 %, 2.5–3.5× at 20 % (a Fisher mask on the 0.25B Llama fills its v_proj
matrices to 17 %)."""


class CsrPattern(NamedTuple):
    """Where a weight's k entries sit, as a CSR matrix of the weight's `shape` (sorted flat indices are CSR order)
    and of its transpose, whose entries hold the values `values[order_t]`; and, for the values' gradient, the rows
    and columns that hold entries where they are few (`COMPACT_SHARE`; None: all) with the entries' CSR among them
    (`sampled_shape`: the kept rows by the kept columns), and the entries' flat positions in that block where they
    fill it (`DENSE_GRADIENT_FILL`; else None)."""

    shape: tuple[int, int]
    crow: torch.Tensor
    cols: torch.Tensor
    crow_t: torch.Tensor
    cols_t: torch.Tensor
    order_t: torch.Tensor
    kept_rows: Optional[torch.Tensor]
    kept_cols: Optional[torch.Tensor]
    sampled_crow: torch.Tensor
    sampled_cols: torch.Tensor
    sampled_shape: tuple[int, int]
    dense_positions: Optional[torch.Tensor]

    def matrix(self, values: torch.Tensor, transposed: bool = False) -> torch.Tensor:
        """Δ (or Δᵀ) holding `values` at the k entries."""
        if transposed:
            return _csr(self.crow_t, self.cols_t, values[self.order_t], self.shape[::-1])
        return _csr(self.crow, self.cols, values, self.shape)

    def gradient_input(self, x: torch.Tensor, conv1d: bool) -> torch.Tensor:
        """What the values' gradient reads of a layer's input `x`: its features at the weight's kept columns (rows
        for Conv1D's in × out weight), or all of x."""
        kept = self.kept_rows if conv1d else self.kept_cols
        return x if kept is None else x.index_select(-1, kept)


def csr_pattern(flat_indices: torch.Tensor, shape: tuple[int, ...]) -> CsrPattern:
    """The CSR pattern of sorted `flat_indices` into a weight of 2-D `shape`, in the indices' integer dtype."""
    rows, cols = flat_indices // shape[1], flat_indices % shape[1]
    int32 = flat_indices.dtype == torch.int32
    order_t = torch.argsort(cols, stable=True)  # (row, column) order → (column, row) order
    crow_t = torch._convert_indices_from_coo_to_csr(cols[order_t], shape[1], out_int32=int32)
    crow = torch._convert_indices_from_coo_to_csr(rows, shape[0], out_int32=int32)
    kept_rows, kept_cols = _few(rows, shape[0]), _few(cols[order_t], shape[1])
    sampled_crow = crow if kept_rows is None else torch.cat([crow[kept_rows], crow[-1:]])
    sampled_cols = cols if kept_cols is None else torch.searchsorted(kept_cols, cols, out_int32=int32)
    block_rows = shape[0] if kept_rows is None else kept_rows.numel()
    block_cols = shape[1] if kept_cols is None else kept_cols.numel()
    dense_positions = None
    if flat_indices.numel() >= DENSE_GRADIENT_FILL * block_rows * block_cols:
        sampled_rows = rows if kept_rows is None else torch.searchsorted(kept_rows, rows)
        dense_positions = sampled_rows.long() * block_cols + sampled_cols.long()
    return CsrPattern(
        (shape[0], shape[1]), crow, cols, crow_t, rows[order_t], order_t, kept_rows, kept_cols, sampled_crow,
        sampled_cols, (block_rows, block_cols), dense_positions,
    )


def _few(sorted_positions: torch.Tensor, size: int) -> Optional[torch.Tensor]:
    """The distinct `sorted_positions`, where they are at most `COMPACT_SHARE` of `size` (else None)."""
    if sorted_positions.numel() == 0:
        return None
    distinct = torch.unique_consecutive(sorted_positions)
    return distinct if distinct.numel() <= COMPACT_SHARE * size else None


def sparse_term(layer: nn.Module, x: torch.Tensor, values: torch.Tensor, pattern: CsrPattern) -> torch.Tensor:
    """The diff's term of `layer`'s output (Linear, or Conv1D whose weight is stored in × out) for input `x`;
    without autograd's bookkeeping where nothing needs a gradient (decoding)."""
    conv1d = isinstance(layer, Conv1D)
    if torch.is_grad_enabled() and (x.requires_grad or values.requires_grad):
        return SparseTerm.apply(x, values, pattern, conv1d)
    return _product(x, values, pattern, conv1d)


def add_products(y: torch.Tensor, x: torch.Tensor, matrices: tuple[torch.Tensor, ...]) -> torch.Tensor:
    """`y` plus x·Mᵀ for each CSR matrix M (Δ, or Δᵀ for Conv1D, in the terms' dtype), without autograd and
    autocast (decoding, evaluation): the fewest operations per token, summed into `y` itself when it is in the terms'
    dtype, else added in that dtype and rounded once."""
    flat, total = x.reshape(-1, x.shape[-1]), None
    one_token = flat.shape[0] == 1  # a matrix-vector product: on CPU ~30 µs a decoded layer less than a matrix's
    if one_token and len(matrices) == 1 and y.dtype == matrices[0].dtype and y.is_contiguous():
        return y.view(-1).addmv_(matrices[0], flat[0].to(y.dtype)).view_as(y)
    for matrix in matrices:
        inputs = flat.to(matrix.dtype)
        term = torch.mv(matrix, inputs[0]) if one_token else matrix @ inputs.t()
        total = term if total is None else total + term
    if total is None:
        return y
    if y.dtype == total.dtype and y.is_contiguous():
        return y.view(-1, y.shape[-1]).add_(total.t()).view_as(y)
    return (y.to(total.dtype) + total.t().reshape(y.shape)).to(y.dtype)


def _product(x: torch.Tensor, values: torch.Tensor, pattern: CsrPattern, conv1d: bool) -> torch.Tensor:
    """x·Δᵀ (x·Δ for Conv1D) in float32 (or the values' wider dtype), whatever autocast says."""
    flat = x.reshape(-1, x.shape[-1]).to(compute_dtype(values))
    autocast = torch.is_autocast_enabled(x.device.type)
    with torch.autocast(x.device.type, enabled=False) if autocast else nullcontext():
        term = (pattern.matrix(values.to(flat.dtype), transposed=conv1d) @ flat.t()).t()
    return term.reshape(*x.shape[:-1], term.shape[-1])


class SparseTerm(torch.autograd.Function):
    """x (..., in) → (..., out): x·Δᵀ for a Linear's Δ (out × in), x·Δ for a Conv1D's (in × out, `conv1d`), as
    CSR-times-dense products: Δ in one direction, Δᵀ (its own CSR, not a transposed view) in the other. The
    values' gradient is a sampled matrix product (SDDMM) at the k positions. On CPU (Linear(1024), 256 tokens,
    0.5 %) this was 4x faster forward and 2x faster backward than gathering x's columns and scattering them into
    y's rows; a CSR Δᵀ halves the time of a transposed view's product."""

    @staticmethod
    def forward(ctx, x, values, pattern, conv1d):
        ctx.save_for_backward(pattern.gradient_input(x, conv1d) if ctx.needs_input_grad[1] else None, values)
        ctx.pattern, ctx.conv1d, ctx.x_shape, ctx.x_dtype = pattern, conv1d, x.shape, x.dtype
        return _product(x, values, pattern, conv1d)

    @staticmethod
    def backward(ctx, grad):
        kept_x, values = ctx.saved_tensors
        dtype = compute_dtype(values)
        grad = grad.reshape(-1, grad.shape[-1]).to(dtype)
        grad_x = grad_values = None
        with torch.autocast(grad.device.type, enabled=False):
            if ctx.needs_input_grad[0]:
                delta = ctx.pattern.matrix(values.to(dtype), transposed=not ctx.conv1d)
                grad_x = (delta @ grad.t()).t().reshape(ctx.x_shape).to(ctx.x_dtype)
            if ctx.needs_input_grad[1]:
                flat = kept_x.reshape(-1, kept_x.shape[-1]).to(dtype)
                grad_values = sampled_gradient(ctx.pattern, flat, grad, ctx.conv1d).to(values.dtype)
        return grad_x, grad_values, None, None


CPU_BLOCKS = 32
CPU_MIN_BLOCK = 64
"""On CPU the values' gradient is one batched product over up to `CPU_BLOCKS` blocks of at least `CPU_MIN_BLOCK`
tokens: the product wants both factors transposed, and CPU kernels transpose a 2-D matrix on one thread and out of
the cache, a batch of small blocks on every thread and inside it. On MiniLM's and a 0.25B Llama's matrices at
0.5 % (2048 tokens) that made it 2-3x faster than one product; other devices take all tokens in one product."""

SILENT_SHARE = 0.125
"""On CPU, tokens whose output gradient is all zeros (padding, tokens without a label) are left out of the values'
gradient when they are at least this share of the batch: they add nothing to it. Finding them takes one pass over
the gradient, made only when two of its columns say it may pay (MiniLM on padded sentences, 64 % silent: the
products 75 → 55 ms a step)."""


def sampled_gradient(pattern: CsrPattern, flat: torch.Tensor, grad: torch.Tensor, conv1d: bool) -> torch.Tensor:
    """The values' gradient: gᵀx (Linear) or xᵀg (Conv1D) at the k entries only (`flat`: the tokens' inputs as
    `pattern.gradient_input` keeps them; `grad`: their output gradients)."""
    kept = pattern.kept_cols if conv1d else pattern.kept_rows
    if kept is not None:
        grad = grad.index_select(1, kept)
    cpu = flat.device.type == "cpu"
    if cpu:
        flat, grad = _tokens_with_gradient(flat, grad)
    left, right = (flat, grad) if conv1d else (grad, flat)
    if pattern.dense_positions is not None:
        return (left.t() @ right).view(-1)[pattern.dense_positions]
    tokens = flat.shape[0]
    if not cpu or tokens < 2 * CPU_MIN_BLOCK:
        return _sampled_product(pattern, left, right)
    block = max(CPU_MIN_BLOCK, -(-tokens // CPU_BLOCKS))
    split = tokens // block * block
    total = _sampled_product(pattern, left[:split], right[:split], blocks=split // block)
    return total if split == tokens else total + _sampled_product(pattern, left[split:], right[split:])


def _tokens_with_gradient(flat: torch.Tensor, grad: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """`flat`'s and `grad`'s rows without the silent tokens (`SILENT_SHARE`), as many of them kept as round the
    count up to a whole number of `CPU_MIN_BLOCK` blocks (a silent row adds zero wherever it goes)."""
    tokens = grad.shape[0]
    if grad.numel() == 0 or int(((grad[:, 0] == 0) & (grad[:, -1] == 0)).sum()) < SILENT_SHARE * tokens:
        return flat, grad  # two columns rule out most rows: a batch without padding is not read in full
    silent = (grad.amax(1) == 0) & (grad.amin(1) == 0)  # two reads, no |grad| written; NaN rows are not silent
    live = (~silent).nonzero().squeeze(1)
    dropped = tokens - live.numel()
    if dropped < SILENT_SHARE * tokens:
        return flat, grad
    filler = -live.numel() % CPU_MIN_BLOCK
    if filler:
        live = torch.cat([live, silent.nonzero()[:1, 0].expand(min(filler, dropped))])
    return flat.index_select(0, live), grad.index_select(0, live)


def _sampled_product(pattern: CsrPattern, left: torch.Tensor, right: torch.Tensor, blocks: int = 1) -> torch.Tensor:
    """leftᵀ·right at the pattern's entries (left: tokens × rows, right: tokens × columns), summed over `blocks`
    equal blocks of tokens, each a batch entry of one sampled product (SDDMM)."""
    crow, cols, (rows, columns) = pattern.sampled_crow, pattern.sampled_cols, pattern.sampled_shape
    if blocks == 1:
        zeros = _csr(crow, cols, left.new_zeros(cols.numel()), (rows, columns))
        return torch.sparse.sampled_addmm(zeros, left.t().contiguous(), right).values()
    crow, cols = crow.expand(blocks, -1), cols.expand(blocks, -1)
    zeros = _csr(crow, cols, left.new_zeros(blocks, cols.shape[-1]), (blocks, rows, columns))
    left = left.reshape(blocks, -1, rows).transpose(1, 2).contiguous()
    return torch.sparse.sampled_addmm(zeros, left, right.reshape(blocks, -1, columns)).values().sum(0)


def compute_dtype(values: torch.Tensor) -> torch.dtype:
    """float32, or the values' dtype when it is wider: 16-bit values (and inputs) are not rounded in the product."""
    return torch.promote_types(values.dtype, torch.float32)


def _csr(crow: torch.Tensor, cols: torch.Tensor, values: torch.Tensor, shape: tuple[int, ...]) -> torch.Tensor:
    """Δ as a CSR matrix of `shape`, batched if it has three sizes (its invariants hold by construction: not checked
    on every forward). PyTorch warns once per process that CSR tensors are in beta; that one warning is silenced
    here, and later calls skip the costly `warnings.catch_warnings` (a decoded token builds one CSR per layer)."""
    global _csr_warned_once
    if _csr_warned_once:
        return torch.sparse_csr_tensor(crow, cols, values, shape, check_invariants=False)
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="Sparse (CSR tensor support is in beta|invariant checks)")
        matrix = torch.sparse_csr_tensor(crow, cols, values, shape, check_invariants=False)
    _csr_warned_once = True
    return matrix


_csr_warned_once = False


def embedding_term(layer: nn.Embedding, ids: torch.Tensor, values: torch.Tensor, pattern: CsrPattern) -> torch.Tensor:
    """The diff's rows for the looked-up `ids` (shape ids.shape + (embedding_dim,)), gathered through the CSR row
    pointers for the batch's distinct ids only: the work follows the entries of those rows, not all k. As in
    `nn.Embedding`, the padding row gets no gradient."""
    looked_up, inverse = torch.unique(ids, return_inverse=True)
    starts = pattern.crow[looked_up].long()
    counts = pattern.crow[looked_up + 1].long() - starts
    owner = torch.repeat_interleave(torch.arange(looked_up.numel(), device=ids.device), counts)
    first_of_owner = torch.cumsum(counts, 0) - counts
    positions = starts[owner] + torch.arange(owner.numel(), device=ids.device) - first_of_owner[owner]
    gathered = values[positions]
    if layer.padding_idx is not None:
        padding = looked_up[owner] == layer.padding_idx % layer.num_embeddings
        gathered = torch.where(padding, gathered.detach(), gathered)
    table = torch.zeros(looked_up.numel(), layer.embedding_dim, dtype=compute_dtype(values), device=values.device)
    table = table.index_put((owner, pattern.cols[positions].long()), gathered.to(table.dtype))
    return nn.functional.embedding(inverse, table)  # its backward sums rows far faster than indexing's on CPU
