"""A Linear's (or Conv1D's) output with W + Δ written into the frozen W for the product alone and again for the
backward (`diff_in_place`: W's own entries written back after each), never copied: one dense product instead of
the base product plus a sparse one. On CPU that is the faster way in training at any token count, and without
autograd from a few dozen tokens on; decoding a token is faster with `sparse_terms`. Only for float32/float64
weights outside autocast: a low-precision W + Δ would round the diff away. Like `diff_in_place` itself, not for one
model run by several threads at once."""

from __future__ import annotations

import torch
from torch import nn
from transformers.pytorch_utils import Conv1D

from fish_peft.tuner.diff_in_place import diff_in_place
from fish_peft.tuner.sparse_terms import CsrPattern, sampled_gradient

DENSE_PRODUCT_MIN_TOKENS = {True: 1, False: 32}
"""With autograd (True) and without (False), the tokens from which the product with W + Δ pays. Measured on CPU,
Linear(384→1536) to Linear(1024→32000), 100 entries to 0.5 % of the weight: in training it was the faster from 1
token (2–3x at 2048: the sparse term writes a tokens × outputs product and adds it transposed); without autograd the
sparse term was faster up to 8–16 tokens, level at 16–64, and 1.3–2x slower from 256."""


def dense_product_pays(layer: nn.Module, x: torch.Tensor) -> bool:
    """Whether one product with W + Δ (`transient_weight_linear`, or `diff_in_place` without gradients) is the
    faster and exact way for this layer and input: enough tokens, a float32/float64 weight outside autocast, and
    never a weight that trains itself (the product gives W no gradient)."""
    if layer.weight.requires_grad or torch.is_autocast_enabled(x.device.type):
        return False
    return x.numel() // max(x.shape[-1], 1) >= dense_product_min_tokens(layer)


def dense_product_min_tokens(layer: nn.Module) -> float:
    """The tokens from which one product with W + Δ is faster than the sparse terms, with autograd or without as
    it is now (inf for a weight below float32, which W + Δ would round)."""
    if layer.weight.dtype not in (torch.float32, torch.float64):
        return float("inf")
    return DENSE_PRODUCT_MIN_TOKENS[torch.is_grad_enabled()]


def transient_weight_linear(
    layer: nn.Module,
    x: torch.Tensor,
    bias: torch.Tensor | None,
    entries: list[tuple[torch.Tensor, torch.Tensor, CsrPattern]],
) -> torch.Tensor:
    """`layer`'s output for `x` with its weight plus every (values, flat indices, pattern) entry set, and `bias`."""
    places = tuple((indices, pattern) for _, indices, pattern in entries)
    values = tuple(v for v, _, _ in entries)
    return TransientWeightLinear.apply(x, bias, layer.weight, isinstance(layer, Conv1D), places, *values)


class TransientWeightLinear(torch.autograd.Function):
    """y = x·(W + ΣΔ)ᵀ + b (x·(W + ΣΔ) + b for Conv1D's in × out weight), W frozen. Saves the values and what
    their gradients read of x (`CsrPattern.gradient_input`), not W + ΣΔ (only W's k entries that the diff
    overwrites, to write back after the backward's product); the values' gradients are sampled products (SDDMM) at
    their entries: no dense weight gradient."""

    @staticmethod
    def forward(ctx, x, bias, weight, conv1d, places, *values):
        trained = ctx.needs_input_grad[5:]
        kept_x = [pattern.gradient_input(x, conv1d) if t else None for t, (_, pattern) in zip(trained, places)]
        ctx.save_for_backward(weight, *values, *kept_x)
        ctx.conv1d, ctx.places = conv1d, places
        with diff_in_place(weight, _entries(places, values)) as ctx.originals:
            return nn.functional.linear(x, weight.t() if conv1d else weight, bias)

    @staticmethod
    def backward(ctx, grad):
        weight, *saved = ctx.saved_tensors
        values, kept_x = saved[: len(ctx.places)], saved[len(ctx.places) :]
        grad_x = grad_bias = None
        flat_grad = grad.reshape(-1, grad.shape[-1])
        if ctx.needs_input_grad[0]:
            with diff_in_place(weight, _entries(ctx.places, values), ctx.originals):
                grad_x = grad @ (weight.t() if ctx.conv1d else weight)
        if ctx.needs_input_grad[1]:
            grad_bias = flat_grad.sum(0)
        grad_values = [
            None if x is None else sampled_gradient(pattern, x.reshape(-1, x.shape[-1]), flat_grad, ctx.conv1d)
            for x, (_, pattern) in zip(kept_x, ctx.places)
        ]
        return grad_x, grad_bias, None, None, None, *grad_values


def _entries(places, values) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """(values, flat indices) of every entry set, as `diff_in_place` takes them."""
    return [(v, indices) for (indices, _), v in zip(places, values)]
