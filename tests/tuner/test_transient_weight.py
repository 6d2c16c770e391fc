"""A Linear or Conv1D run with W + Δ written into W for each product only: outputs and gradients (input, bias, every
entry set's values) equal a dense layer with W + Δ, W is given back bit for bit, nothing weight-sized is kept for
the backward, and the path is taken only where it is exact and pays."""

import pytest
import torch
from torch import nn
from transformers.pytorch_utils import Conv1D

from fish_peft.tuner import sparse_terms
from fish_peft.tuner.sparse_terms import csr_pattern
from fish_peft.tuner.transient_weight import transient_weight_linear, dense_product_pays


def entry_set(numel, count, shape, generator):
    indices = torch.randperm(numel, generator=generator)[:count].sort().values.int()
    values = torch.randn(count, dtype=torch.float64, generator=generator).requires_grad_(True)
    return values, indices, csr_pattern(indices, shape)


@pytest.mark.parametrize("gradient", ["sampled", "sampled in the kept rows and columns", "dense"])
@pytest.mark.parametrize("layer", [nn.Linear(12, 7), Conv1D(7, 12)])
def test_outputs_and_gradients_equal_a_dense_layer_with_w_plus_delta(layer, gradient, monkeypatch):
    """With the values' gradients sampled at the entries (reading x and g at all rows and columns, or at the kept
    ones alone), or read from the dense product."""
    monkeypatch.setattr(sparse_terms, "COMPACT_SHARE", 1.0 if "kept" in gradient else 0.0)
    monkeypatch.setattr(sparse_terms, "DENSE_GRADIENT_FILL", 0.0 if gradient == "dense" else float("inf"))
    generator = torch.Generator().manual_seed(0)
    layer = layer.double().requires_grad_(False)
    shape = tuple(layer.weight.shape)
    sets = [entry_set(84, 20, shape, generator), entry_set(84, 9, shape, generator)]
    bias_values = torch.randn(7, dtype=torch.float64, generator=generator).requires_grad_(True)
    x = torch.randn(3, 4, 12, dtype=torch.float64, generator=generator).requires_grad_(True)
    original = layer.weight.detach().clone()
    y = transient_weight_linear(layer, x, layer.bias + bias_values, sets)
    assert torch.equal(layer.weight, original)

    reference_x = x.detach().clone().requires_grad_(True)
    reference_values = [v.detach().clone().requires_grad_(True) for v, _, _ in sets]
    reference_bias = bias_values.detach().clone().requires_grad_(True)
    weight = layer.weight.detach().reshape(-1)
    for (_, indices, _), values in zip(sets, reference_values):
        weight = weight.index_add(0, indices, values)
    weight = weight.view(shape)
    bias = layer.bias + reference_bias
    reference = reference_x @ weight + bias if isinstance(layer, Conv1D) else nn.functional.linear(reference_x, weight, bias)
    torch.testing.assert_close(y, reference)

    g = torch.randn(y.shape, dtype=torch.float64, generator=generator)
    y.backward(g)
    reference.backward(g)
    torch.testing.assert_close(x.grad, reference_x.grad)
    torch.testing.assert_close(bias_values.grad, reference_bias.grad)
    for (values, _, _), expected in zip(sets, reference_values):
        torch.testing.assert_close(values.grad, expected.grad)
    assert torch.equal(layer.weight, original)


def test_nothing_weight_sized_is_kept_for_the_backward():
    generator = torch.Generator().manual_seed(0)
    layer = nn.Linear(64, 64).requires_grad_(False)
    values, indices, pattern = entry_set(64 * 64, 40, (64, 64), generator)
    values = values.detach().float().requires_grad_(True)
    x = torch.randn(128, 64)
    saved = []

    def pack(tensor):
        saved.append(tensor)
        return tensor

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
        y = transient_weight_linear(layer, x, layer.bias, [(values, indices, pattern)])
    weight_sized = [t for t in saved if t.numel() == layer.weight.numel()]
    assert all(t.untyped_storage().data_ptr() == layer.weight.untyped_storage().data_ptr() for t in weight_sized)
    y.sum().backward()
    assert values.grad is not None and layer.weight.grad is None


def test_a_mask_in_few_columns_keeps_only_those_columns_of_x():
    generator = torch.Generator().manual_seed(0)
    layer = nn.Linear(64, 32).requires_grad_(False)
    columns = torch.tensor([3, 17, 40, 41])
    indices = (torch.arange(32)[:, None] * 64 + columns).reshape(-1)[torch.randperm(128, generator=generator)[:60]]
    indices = indices.sort().values
    values = torch.randn(60, generator=generator).requires_grad_(True)
    x = torch.randn(128, 64, generator=generator)
    saved = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t) or t, lambda t: t):
        y = transient_weight_linear(layer, x, layer.bias, [(values, indices, csr_pattern(indices, (32, 64)))])
    assert [tuple(t.shape) for t in saved if t.shape[0] == 128] == [(128, 4)]
    y.backward(g := torch.randn(128, 32, generator=generator))
    torch.testing.assert_close(values.grad, (g.t() @ x).reshape(-1)[indices])


def test_taken_only_where_it_is_exact_and_pays():
    layer = nn.Linear(100, 100).requires_grad_(False)
    assert dense_product_pays(layer, torch.randn(1, 1, 100))  # training: from one token
    with torch.no_grad():
        assert dense_product_pays(layer, torch.randn(4, 8, 100))
        assert not dense_product_pays(layer, torch.randn(1, 1, 100))  # decoding a token
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert not dense_product_pays(layer, torch.randn(4, 25, 100))  # W + Δ would be cast to bfloat16
    assert not dense_product_pays(layer.to(torch.bfloat16), torch.randn(4, 25, 100, dtype=torch.bfloat16))
    layer = nn.Linear(100, 100)
    assert not dense_product_pays(layer, torch.randn(4, 25, 100))  # W trains too: it needs its gradient
    assert dense_product_pays(layer.requires_grad_(False), torch.randn(4, 25, 100))
