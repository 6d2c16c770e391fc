"""The weight diff of a Linear or Conv1D as a sparse term: outputs and gradients (of the values and of the input)
equal a dense layer with W + Δ, and no W + Δ is formed."""

import pytest
import torch
from torch import nn
from transformers.pytorch_utils import Conv1D

from fish_peft.tuner.sparse_terms import SparseTerm, sparse_term


def dense_reference(layer, x, indices, values):
    weight = layer.weight.detach().clone().reshape(-1).index_add(0, indices, values).view_as(layer.weight)
    if isinstance(layer, Conv1D):
        return x @ weight + layer.bias
    return nn.functional.linear(x, weight, layer.bias)


@pytest.mark.parametrize("layer", [nn.Linear(12, 7), Conv1D(7, 12)])
def test_the_sparse_term_equals_a_dense_layer_with_w_plus_delta(layer):
    torch.manual_seed(0)
    layer = layer.double()
    indices = torch.randperm(84)[:20].sort().values
    values = torch.randn(20, dtype=torch.float64, requires_grad=True)
    x = torch.randn(3, 4, 12, dtype=torch.float64, requires_grad=True)
    y = layer(x) + sparse_term(layer, x, values, indices)
    reference_values = values.detach().clone().requires_grad_(True)
    reference_x = x.detach().clone().requires_grad_(True)
    reference = dense_reference(layer, reference_x, indices, reference_values)
    torch.testing.assert_close(y, reference)
    g = torch.randn_like(y)
    y.backward(g)
    reference.backward(g)
    torch.testing.assert_close(values.grad, reference_values.grad)
    torch.testing.assert_close(x.grad, reference_x.grad)


def test_an_adapted_linear_never_forms_w_plus_delta_outside_an_update_step(monkeypatch):
    from peft import get_peft_model

    from fish_peft import FishConfig, random_mask

    model = nn.Sequential(nn.Linear(16, 16), nn.ReLU(), nn.Linear(16, 2))
    mask = random_mask(model, 0.1, modules_to_save=[], eligible=r"weight$")
    peft_model = get_peft_model(model, FishConfig(mask=mask, init_weights=False))
    calls, original = [], SparseTerm.forward
    monkeypatch.setattr(SparseTerm, "forward", staticmethod(lambda *a: calls.append(1) or original(*a)))
    monkeypatch.setattr(torch.Tensor, "index_add", lambda *a, **k: pytest.fail("W + Δ formed for a weight"))
    peft_model(torch.randn(5, 16)).sum().backward()
    assert len(calls) == 2 and all(p.grad is not None for p in peft_model.parameters() if p.requires_grad)


def test_under_bfloat16_autocast_the_term_is_computed_in_float32():
    torch.manual_seed(0)
    layer = nn.Linear(12, 7)
    indices = torch.randperm(84)[:20].sort().values
    values = torch.full((20,), 1e-4, requires_grad=True)  # far below bfloat16's resolution of the weights
    x = torch.randn(4, 12)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        term = sparse_term(layer, x.bfloat16(), values, indices)
    assert term.dtype == torch.float32
    torch.testing.assert_close(term, dense_reference(layer, x.bfloat16().float(), indices, values.detach()) - layer(x.bfloat16().float()), rtol=1e-4, atol=1e-7)
    term.sum().backward()
    assert values.grad.dtype == torch.float32 and torch.isfinite(values.grad).all()


@pytest.mark.parametrize("padding_idx", [None, 0])
def test_the_embedding_term_equals_a_dense_table_with_w_plus_delta(padding_idx):
    from fish_peft.tuner.sparse_terms import embedding_term

    torch.manual_seed(0)
    layer = nn.Embedding(30, 6, padding_idx=padding_idx).double()
    indices = torch.randperm(180)[:40].sort().values
    values = torch.randn(40, dtype=torch.float64, requires_grad=True)
    ids = torch.tensor([[3, 0, 3, 29], [7, 7, 11, 0]])
    y = layer(ids) + embedding_term(layer, ids, values, indices)
    reference_values = values.detach().clone().requires_grad_(True)
    weight = layer.weight.detach().reshape(-1).index_add(0, indices, reference_values).view_as(layer.weight)
    reference = nn.functional.embedding(ids, weight, padding_idx=padding_idx)
    torch.testing.assert_close(y, reference)
    g = torch.randn_like(y)
    y.backward(g)
    reference.backward(g)
    torch.testing.assert_close(values.grad, reference_values.grad)
