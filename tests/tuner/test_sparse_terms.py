"""The weight diff of a Linear or Conv1D as a sparse term: outputs and gradients (of the values and of the input)
equal a dense layer with W + Δ, and no W + Δ is formed."""

import itertools

import pytest
import torch
from torch import nn
from transformers.pytorch_utils import Conv1D

from fish_peft.tuner import sparse_terms
from fish_peft.tuner.sparse_terms import CPU_MIN_BLOCK, SparseTerm, csr_pattern, sampled_gradient, sparse_term


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
    y = layer(x) + sparse_term(layer, x, values, csr_pattern(indices, layer.weight.shape))
    reference_values = values.detach().clone().requires_grad_(True)
    reference_x = x.detach().clone().requires_grad_(True)
    reference = dense_reference(layer, reference_x, indices, reference_values)
    torch.testing.assert_close(y, reference)
    g = torch.randn_like(y)
    y.backward(g)
    reference.backward(g)
    torch.testing.assert_close(values.grad, reference_values.grad)
    torch.testing.assert_close(x.grad, reference_x.grad)


@pytest.mark.parametrize("tokens", [0, 5, 2 * CPU_MIN_BLOCK, 33 * CPU_MIN_BLOCK + 17])
@pytest.mark.parametrize("conv1d", [False, True])
@pytest.mark.parametrize("spread", ["scattered", "few rows and columns"])
@pytest.mark.parametrize("product", ["sampled", "dense"])
def test_the_values_gradient_equals_the_dense_weight_gradient_at_the_entries(tokens, conv1d, spread, product, monkeypatch):
    """Sampled in one product (few tokens) or summed over blocks of tokens, with a remainder (many), or read from
    the dense product; with entries all over the weight, or in a few of its rows and columns (x and g then read
    there alone)."""
    monkeypatch.setattr(sparse_terms, "DENSE_GRADIENT_FILL", 0.0 if product == "dense" else float("inf"))
    torch.manual_seed(0)
    rows, columns = 24, 40
    if spread == "scattered":
        indices = torch.randperm(rows * columns)[:50].sort().values
    else:
        grid = (torch.tensor([2, 3, 11, 19])[:, None] * columns + torch.tensor([0, 7, 8, 30, 39])).reshape(-1)
        indices = grid[torch.randperm(grid.numel())[:12]].sort().values
    pattern = csr_pattern(indices, (rows, columns))
    assert (pattern.kept_rows is None) == (spread == "scattered") == (pattern.kept_cols is None)
    assert (pattern.dense_positions is None) == (product == "sampled")
    left = torch.randn(tokens, rows, dtype=torch.float64)
    right = torch.randn(tokens, columns, dtype=torch.float64)
    x, grad = (left, right) if conv1d else (right, left)
    dense = left.t() @ right
    got = sampled_gradient(pattern, pattern.gradient_input(x, conv1d), grad, conv1d)
    torch.testing.assert_close(got, dense.reshape(-1)[indices])



@pytest.mark.parametrize("silent", [0.2, 0.7])
@pytest.mark.parametrize("conv1d", [False, True])
@pytest.mark.parametrize("product", ["sampled", "dense"])
def test_tokens_without_gradient_are_left_out_and_the_values_gradient_is_unchanged(silent, conv1d, product, monkeypatch):
    """Padding-like tokens (an all-zero output gradient) are dropped; a NaN or inf gradient row is not silent."""
    monkeypatch.setattr(sparse_terms, "DENSE_GRADIENT_FILL", 0.0 if product == "dense" else float("inf"))
    torch.manual_seed(0)
    rows, columns, tokens = 24, 40, 20 * CPU_MIN_BLOCK + 3
    indices = torch.randperm(rows * columns)[:50].sort().values
    left = torch.randn(tokens, rows, dtype=torch.float64)
    right = torch.randn(tokens, columns, dtype=torch.float64)
    x, grad = (left, right) if conv1d else (right, left)
    grad[torch.rand(tokens) < silent] = 0.0
    grad[1], grad[2] = 0.0, 0.0
    grad[1, 3], grad[2, 5] = float("nan"), float("inf")
    seen = []
    original = sparse_terms._sampled_product
    monkeypatch.setattr(sparse_terms, "_sampled_product", lambda p, a, b, **k: seen.append(a.shape[0]) or original(p, a, b, **k))
    got = sampled_gradient(csr_pattern(indices, (rows, columns)), x, grad, conv1d)
    torch.testing.assert_close(got, (left.t() @ right).reshape(-1)[indices], equal_nan=True)
    assert got.isnan().any() and got.isinf().any()
    live = int((grad != 0).any(1).sum())
    sampled = tokens if live > 7 / 8 * tokens else -(-live // CPU_MIN_BLOCK) * CPU_MIN_BLOCK
    assert sum(seen) == (sampled if product == "sampled" else 0)


@pytest.mark.parametrize("conv1d", [False, True])
def test_a_mask_in_few_features_keeps_only_those_features_of_the_input(conv1d):
    torch.manual_seed(0)
    layer = Conv1D(32, 64) if conv1d else nn.Linear(64, 32)
    features = torch.tensor([3, 17, 40, 41])  # of the 64 inputs: columns of a Linear's weight, rows of a Conv1D's
    grid = features[:, None] * 32 + torch.arange(32) if conv1d else torch.arange(32)[:, None] * 64 + features
    indices = grid.reshape(-1)[torch.randperm(128)[:60]].sort().values
    values = torch.randn(60, requires_grad=True)
    x = torch.randn(2, 5, 64)
    saved = []
    pattern = csr_pattern(indices, tuple(layer.weight.shape))
    assert pattern.dense_positions is not None  # 60 entries fill 47 % of their 32 × 4 block: gᵀx there is cheaper
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t) or t, lambda t: t):
        term = sparse_term(layer, x, values, pattern)
    assert [tuple(t.shape) for t in saved] == [(2, 5, 4), (60,)]
    term.backward(g := torch.randn(2, 5, 32))
    expected = torch.einsum("ti,to->io" if conv1d else "ti,to->oi", x.reshape(10, 64), g.reshape(10, 32))
    torch.testing.assert_close(values.grad, expected.reshape(-1)[indices])


def test_an_adapted_linear_never_forms_w_plus_delta_outside_an_update_step(monkeypatch):
    """On the sparse-term path (few tokens; forced here): see test_transient_weight.py for the other."""
    from peft import get_peft_model

    from fish_peft import FishConfig, random_mask
    from fish_peft.tuner import transient_weight

    monkeypatch.setattr(transient_weight, "DENSE_PRODUCT_MIN_TOKENS", {True: float("inf"), False: float("inf")})

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
        term = sparse_term(layer, x.bfloat16(), values, csr_pattern(indices, layer.weight.shape))
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
    y = layer(ids) + embedding_term(layer, ids, values, csr_pattern(indices, layer.weight.shape))
    reference_values = values.detach().clone().requires_grad_(True)
    weight = layer.weight.detach().reshape(-1).index_add(0, indices, reference_values).view_as(layer.weight)
    reference = nn.functional.embedding(ids, weight, padding_idx=padding_idx)
    torch.testing.assert_close(y, reference)
    g = torch.randn_like(y)
    y.backward(g)
    reference.backward(g)
    torch.testing.assert_close(values.grad, reference_values.grad)


def _sparse_term_path_only(monkeypatch):
    """Force the sparse-term path, and fail on any index_add of a tensor larger than a bias: W + Δ formed."""
    from fish_peft.tuner import transient_weight

    monkeypatch.setattr(transient_weight, "DENSE_PRODUCT_MIN_TOKENS", {True: float("inf"), False: float("inf")})
    original = torch.Tensor.index_add

    def index_add(self, *args, **kwargs):
        assert self.numel() <= 64, "W + Δ formed for a weight"
        return original(self, *args, **kwargs)

    monkeypatch.setattr(torch.Tensor, "index_add", index_add)


def test_a_tied_lm_head_takes_the_embedding_diff_as_a_sparse_term(monkeypatch):
    from peft import get_peft_model

    from fish_peft import FishConfig, FishMask
    from tests.models import example_inputs, tiny_gpt2

    model = tiny_gpt2()
    shape = tuple(model.transformer.wte.weight.shape)
    mask = FishMask({"transformer.wte.weight": torch.randperm(shape[0] * shape[1])[:300].sort().values}, {"transformer.wte.weight": shape})
    peft_model = get_peft_model(model, FishConfig(mask=mask, init_weights=False))
    calls, original = [], SparseTerm.forward
    monkeypatch.setattr(SparseTerm, "forward", staticmethod(lambda *a: calls.append(a[-2].shape) or original(*a)))
    _sparse_term_path_only(monkeypatch)
    peft_model(**example_inputs("gpt2")).loss.backward()
    assert calls == [shape]  # lm_head's product; wte itself looks rows up
    values = peft_model.base_model.model.transformer.wte.fish_values["default"]["weight"]
    assert values.grad is not None and values.grad.abs().sum() > 0


def test_topkast_exploration_entries_get_their_gradient_through_the_sparse_term(monkeypatch):
    from peft import get_peft_model

    from fish_peft import FishConfig, random_mask
    from fish_peft.dynamic.topkast_diff import TopKASTDiff
    from tests.models import example_inputs, tiny_bert

    model = tiny_bert().eval()
    mask = random_mask(model, 0.05, seed=0, eligible=r"(query|value)\.weight$")
    peft_model = get_peft_model(model, FishConfig(mask=mask, mask_update="topkast", update_every=5))
    engine = TopKASTDiff(peft_model, total_steps=10)
    _sparse_term_path_only(monkeypatch)
    peft_model(**example_inputs("bert")).loss.backward()
    assert all(engine.exploration_values(entry).grad.abs().sum() > 0 for entry in engine.entries)


def test_an_update_far_below_bfloat16_resolution_changes_the_output():
    """With a bfloat16 base, W + Δ rounded to bfloat16 would swallow an update of 1e-5 (weights of std 0.02 have a
    resolution of about 1e-4); the sparse term and a single rounding of the sum keep it."""
    from peft import get_peft_model

    from fish_peft import FishConfig, random_mask

    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(256, 256)).to(torch.bfloat16)
    nn.init.normal_(model[0].weight, std=0.02)
    peft_model = get_peft_model(model, FishConfig(mask=random_mask(model, 0.05, modules_to_save=[], eligible=r"weight$")))
    values = next(p for n, p in peft_model.named_parameters() if "fish_values" in n)
    assert values.dtype == torch.float32  # PEFT's autocast_adapter_dtype
    x = torch.randn(64, 256, dtype=torch.bfloat16)
    with torch.no_grad():
        before = peft_model(x)
        values += 1e-5
        after = peft_model(x)
        weight, indices = model[0].base_layer.weight.reshape(-1), model[0].fish_indices["default"]["weight"].long()
        rounded = weight.index_add(0, indices, values.to(weight.dtype))
    assert after.dtype == torch.bfloat16
    assert (after != before).sum() > 100
    assert (rounded[indices] == weight[indices]).float().mean() > 0.7  # what the W + Δ path would have run


def test_the_csr_pattern_is_computed_once_and_again_when_the_indices_change(monkeypatch):
    from peft import get_peft_model

    from fish_peft import FishConfig, random_mask
    from fish_peft.tuner import layer as layer_module

    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(16, 16))
    peft_model = get_peft_model(model, FishConfig(mask=random_mask(model, 0.2, modules_to_save=[], eligible=r"weight$"), init_weights=False))
    computed, original = [], layer_module.csr_pattern
    monkeypatch.setattr(layer_module, "csr_pattern", lambda *a: computed.append(1) or original(*a))
    x = torch.randn(3, 16)
    with torch.no_grad():
        for _ in range(5):
            peft_model(x)
        assert len(computed) == 1
        fish = model[0]
        state = peft_model.state_dict()
        other = torch.randperm(256)[: fish.fish_indices["default"]["weight"].numel()].sort().values
        state = {k: (other.int() if k.endswith("fish_indices.default.weight") else v) for k, v in state.items()}
        peft_model.load_state_dict(state)  # written in place
        out = peft_model(x)
    assert len(computed) == 2
    weight = fish.base_layer.weight.detach().reshape(-1).index_add(0, other, fish.fish_values["default"]["weight"].detach())
    torch.testing.assert_close(out, nn.functional.linear(x, weight.view(16, 16), fish.base_layer.bias))
    peft_model.double()
    with torch.no_grad():
        peft_model(x.double())
    assert len(computed) == 3


@pytest.mark.parametrize("layer", [nn.Linear(24, 10), Conv1D(10, 24)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_without_autograd_the_terms_of_several_adapters_equal_the_autograd_path(layer, dtype):
    """Decoding (no_grad, one token or a few, one adapter or two) takes `add_products`: the same output as the
    path that records the graph, and as a dense W + ΣΔ in float32 rounded once."""
    from fish_peft.tuner.layer import FishLayer

    torch.manual_seed(0)
    layer = layer.to(dtype)
    first, second = torch.randperm(240)[:30].sort().values, torch.randperm(240)[:20].sort().values
    fish = FishLayer(layer, "first", {"weight": first}, init_weights=False)
    fish.update_layer("second", {"weight": second}, init_weights=False)
    for active, batch, tokens in itertools.product((["first"], ["first", "second"]), (1, 2), (1, 5)):
        fish.set_adapter(active)
        x = torch.randn(batch, tokens, 24, dtype=dtype)
        with torch.no_grad():
            decoded = fish(x)
        recorded = fish(x)
        assert recorded.requires_grad
        torch.testing.assert_close(decoded, recorded.detach(), rtol=0, atol=0)
        weight = layer.weight.detach().float().reshape(-1).clone()
        for name, indices in (("first", first), ("second", second))[: len(active)]:
            weight.index_add_(0, indices, fish.values(name, "weight").detach().float())
        weight = weight.view_as(layer.weight)
        dense = x.float() @ weight + layer.bias.float() if isinstance(layer, Conv1D) else nn.functional.linear(x.float(), weight, layer.bias.float())
        torch.testing.assert_close(decoded.float(), dense.to(dtype).float(), **({} if dtype == torch.float32 else {"rtol": 2e-2, "atol": 2e-2}))
