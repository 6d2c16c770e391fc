"""The checks PEFT's common tester makes of every method, run for FISH on small custom models and tiny Hugging Face
models built from configs. Adapters start away from zero (`init_weights=False`), so an adapter the forward ignores
cannot pass; every parameter of every model is eligible for the mask."""

from __future__ import annotations

import copy

import pytest
import torch
from peft import PeftModel, get_peft_model
from peft.tuners.tuners_utils import BaseTunerLayer, _get_in_out_features
from torch import nn
from transformers import ViTConfig, ViTForImageClassification
from transformers.pytorch_utils import Conv1D

from fish_peft import FishConfig, random_mask
from fish_peft.tuner.layer import FishLayer
from tests.models import VOCAB, tiny_bert, tiny_gpt2, tiny_llama


class MLP(nn.Module):
    def __init__(self):
        super().__init__()
        self.lin0, self.norm, self.lin1 = nn.Linear(10, 20), nn.LayerNorm(20), nn.Linear(20, 2)

    def forward(self, x):
        return self.lin1(self.norm(torch.relu(self.lin0(x))))


class EmbeddingConv1D(nn.Module):
    def __init__(self):
        super().__init__()
        self.emb, self.conv1d, self.lin = nn.Embedding(VOCAB, 5), Conv1D(3, 5), nn.Linear(30, 2)

    def forward(self, ids):
        return self.lin(self.conv1d(self.emb(ids)).flatten(1))


class Conv2dModel(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv, self.lin = nn.Conv2d(3, 4, 3), nn.Linear(16, 2)

    def forward(self, x):
        return self.lin(torch.relu(self.conv(x)).flatten(1))


class MHAModel(nn.Module):
    def __init__(self):
        super().__init__()
        self.mha, self.lin = nn.MultiheadAttention(8, 2, batch_first=True), nn.Linear(8, 2)

    def forward(self, x):
        return self.lin(self.mha(x, x, x, need_weights=False)[0].mean(1))


class GRUModel(nn.Module):
    def __init__(self):
        super().__init__()
        self.gru, self.lin = nn.GRU(6, 8, batch_first=True), nn.Linear(8, 2)

    def forward(self, x):
        return self.lin(self.gru(x)[0][:, -1])


def tiny_vit():
    config = ViTConfig(
        image_size=8, patch_size=4, num_channels=3, hidden_size=16, num_hidden_layers=1, num_attention_heads=2,
        intermediate_size=32, num_labels=2,
    )
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        return ViTForImageClassification(config).eval()


def _ids(batch=3, length=10):
    return torch.randint(3, VOCAB, (batch, length), generator=torch.Generator().manual_seed(1))


def _randn(*shape):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(1))


CASES = {
    "mlp": (lambda: MLP(), lambda: {"x": _randn(3, 10)}),
    "embedding_conv1d": (lambda: EmbeddingConv1D(), lambda: {"ids": _ids()}),
    "conv2d": (lambda: Conv2dModel(), lambda: {"x": _randn(3, 3, 4, 4)}),
    "mha": (lambda: MHAModel(), lambda: {"x": _randn(3, 5, 8)}),
    "gru": (lambda: GRUModel(), lambda: {"x": _randn(3, 4, 6)}),
    "bert": (lambda: tiny_bert(num_labels=2), lambda: {"input_ids": _ids()}),
    "gpt2": (lambda: tiny_gpt2(), lambda: {"input_ids": _ids()}),
    "llama": (lambda: tiny_llama(), lambda: {"input_ids": _ids()}),
    "vit": (lambda: tiny_vit(), lambda: {"pixel_values": _randn(3, 3, 8, 8)}),
}


def _base(case: str) -> nn.Module:
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        return CASES[case][0]().eval()


def _inputs(case: str) -> dict:
    return CASES[case][1]()


def _out(model, inputs) -> torch.Tensor:
    out = model(**inputs)
    return out if isinstance(out, torch.Tensor) else out.logits


def _config(base: nn.Module, seed: int = 0, **kwargs) -> FishConfig:
    """A random mask over every parameter (each gets entries), values started away from zero."""
    mask = random_mask(base, keep_ratio=0.5, seed=seed, selection="per_module")
    return FishConfig(mask=mask, init_weights=False, **kwargs)


def _fish(case: str, **kwargs):
    base = _base(case)
    return get_peft_model(base, _config(base, **kwargs))


def _dense_reference(case: str, peft_model, adapter: str = "default") -> nn.Module:
    """A plain copy of the base model with W + Δ written into its weights, entry by entry."""
    reference = _base(case)
    params = dict(reference.named_parameters())
    with torch.no_grad():
        for name, param in peft_model.base_model.model.named_parameters():  # the head, trained in full
            if f".modules_to_save.{adapter}." in name:
                params[name.replace(f".modules_to_save.{adapter}.", ".")].copy_(param)
        for module_name, module in peft_model.base_model.model.named_modules():
            if isinstance(module, FishLayer):
                for attr in module.adapted_parameters(adapter):
                    flat = params[f"{module_name}.{attr}"].view(-1)
                    for i, v in zip(module.indices(adapter, attr).tolist(), module.values(adapter, attr).tolist()):
                        flat[i] += v
    return reference


def _fish_layers(model) -> list[FishLayer]:
    return [m for m in model.modules() if isinstance(m, FishLayer)]


ALL = list(CASES)


@pytest.mark.parametrize("case", ALL)
def test_every_parameter_is_adapted_and_the_adapter_changes_the_output(case):
    model = _fish(case)
    adapted = {n for n, p in model.named_parameters() if ".fish_values." in n}
    head = [n for n, _ in _base(case).named_parameters() if n.startswith("classifier.")]
    assert len(adapted) == len(list(_base(case).parameters())) - len(head)
    base_out = _out(_base(case), _inputs(case))
    assert not torch.allclose(_out(model, _inputs(case)), base_out, atol=1e-6)
    with model.disable_adapter():
        torch.testing.assert_close(_out(model, _inputs(case)), base_out)


@pytest.mark.parametrize("case", ALL)
def test_outputs_and_gradients_equal_a_dense_model_with_the_diff(case):
    model = _fish(case)
    reference = _dense_reference(case, model)
    out = _out(model, _inputs(case))
    ref_out = _out(reference, _inputs(case))
    torch.testing.assert_close(out, ref_out, atol=1e-5, rtol=1e-5)
    out.square().sum().backward()
    ref_out.square().sum().backward()
    ref_params = dict(reference.named_parameters())
    for module_name, layer in model.base_model.model.named_modules():
        if isinstance(layer, FishLayer):
            for attr in layer.adapted_parameters("default"):
                grad = layer.values("default", attr).grad
                assert grad is not None, f"{module_name}.{attr} got no gradient"
                expected = ref_params[f"{module_name}.{attr}"].grad.view(-1)[layer.indices("default", attr).long()]
                torch.testing.assert_close(grad, expected, atol=1e-5, rtol=1e-4)
    assert all(p.grad is None for n, p in model.named_parameters() if ".fish_" not in n and ".modules_to_save." not in n)


@pytest.mark.parametrize("case", ALL)
def test_save_and_load_give_the_same_outputs_and_loaded_adapters_are_frozen(case, tmp_path):
    model = _fish(case)
    expected = _out(model, _inputs(case))
    model.save_pretrained(tmp_path)
    loaded = PeftModel.from_pretrained(_base(case), tmp_path)
    torch.testing.assert_close(_out(loaded, _inputs(case)), expected)
    assert not any(p.requires_grad for p in loaded.parameters())
    trainable = PeftModel.from_pretrained(_base(case), tmp_path, is_trainable=True)
    assert all(p.requires_grad == (".fish_" in n or ".modules_to_save." in n) for n, p in trainable.named_parameters())


@pytest.mark.parametrize("case", ALL)
def test_merge_unmerge_and_safe_merge(case):
    model = _fish(case)
    expected = _out(model, _inputs(case))
    weights = {n: p.detach().clone() for n, p in model.named_parameters() if ".fish_" not in n}
    model.merge_adapter()
    torch.testing.assert_close(_out(model, _inputs(case)), expected, atol=1e-5, rtol=1e-5)
    model.unmerge_adapter()
    for name, param in model.named_parameters():
        if ".fish_" not in name:
            assert torch.equal(param, weights[name]), name
    model.merge_adapter(safe_merge=True)
    torch.testing.assert_close(_out(model, _inputs(case)), expected, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("case", ALL)
def test_merge_and_unload_and_unload(case):
    model = _fish(case)
    expected = _out(model, _inputs(case))
    merged = copy.deepcopy(model).merge_and_unload()
    assert not any(isinstance(m, BaseTunerLayer) for m in merged.modules())
    torch.testing.assert_close(_out(merged, _inputs(case)), expected, atol=1e-5, rtol=1e-5)
    unloaded = model.unload()
    assert not any(isinstance(m, BaseTunerLayer) for m in unloaded.modules())
    torch.testing.assert_close(_out(unloaded, _inputs(case)), _out(_base(case), _inputs(case)))


@pytest.mark.parametrize("case", ALL)
def test_several_adapters_switch_delete_and_save(case, tmp_path):
    model = _fish(case)
    first = _out(model, _inputs(case))
    model.add_adapter("other", _config(_base(case), seed=1))
    assert torch.allclose(_out(model, _inputs(case)), first)  # adding does not activate
    model.set_adapter("other")
    second = _out(model, _inputs(case))
    assert not torch.allclose(second, first, atol=1e-6)
    torch.testing.assert_close(second, _out(_dense_reference(case, model, "other"), _inputs(case)), atol=1e-5, rtol=1e-5)
    assert all(p.requires_grad == (".other." in n) for n, p in model.named_parameters())
    model.save_pretrained(tmp_path)
    loaded = PeftModel.from_pretrained(_base(case), tmp_path / "other")
    torch.testing.assert_close(_out(loaded, _inputs(case)), second)
    model.set_adapter("default")
    torch.testing.assert_close(_out(model, _inputs(case)), first)
    model.delete_adapter("other")
    assert "other" not in model.peft_config
    assert not any(".other." in n for n, _ in model.named_parameters())
    torch.testing.assert_close(_out(model, _inputs(case)), first)


@pytest.mark.parametrize("case", ALL)
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_adapter_dtype_follows_autocast_adapter_dtype(case, dtype):
    base = _base(case)
    config = _config(base)
    upcast = get_peft_model(copy.deepcopy(base).to(dtype), config)
    assert {p.dtype for n, p in upcast.named_parameters() if ".fish_values." in n} == {torch.float32}
    kept = get_peft_model(base.to(dtype), _config(_base(case)), autocast_adapter_dtype=False)
    assert {p.dtype for n, p in kept.named_parameters() if ".fish_values." in n} == {dtype}
    inputs = {k: v.to(dtype) if v.is_floating_point() else v for k, v in _inputs(case).items()}
    assert _out(kept, inputs).dtype == dtype


@pytest.mark.parametrize("case", ALL)
def test_layers_expose_in_and_out_features_as_peft_layers_do(case):
    for layer in _fish_layers(_fish(case)):
        base = layer.get_base_layer()
        if isinstance(base, (nn.Linear, nn.Embedding, nn.Conv2d, Conv1D)):
            assert (layer.in_features, layer.out_features) == _get_in_out_features(base)


@pytest.mark.parametrize("case", ["mlp", "mha", "gru"])
def test_merging_a_diff_that_is_not_finite_says_so_in_peft_words(case):
    model = _fish(case)
    layer = _fish_layers(model)[0]
    name = layer.adapted_parameters("default")[0]
    with torch.no_grad():
        layer.values("default", name)[0] = float("nan")
    weights = {n: p.detach().clone() for n, p in model.named_parameters() if ".fish_" not in n}
    with pytest.raises(ValueError, match="NaNs detected in the merged weights"):
        model.merge_adapter(safe_merge=True)
    assert all(torch.equal(p, weights[n]) for n, p in model.named_parameters() if ".fish_" not in n)


def test_multihead_attention_out_proj_diff_reaches_the_forward():
    """MultiheadAttention reads out_proj.weight itself: a diff there alone must change the output and train."""
    base = _base("mha")
    mask = random_mask(base, keep_ratio=0.3, seed=0, selection="per_module", eligible=r"out_proj\.weight")
    model = get_peft_model(base, FishConfig(mask=mask, init_weights=False))
    out = _out(model, _inputs("mha"))
    assert not torch.allclose(out, _out(_base("mha"), _inputs("mha")), atol=1e-6)
    out.sum().backward()
    (layer,) = _fish_layers(model)
    assert layer.adapted_parameters("default") == ["out_proj.weight"]
    assert layer.values("default", "out_proj.weight").grad.abs().sum() > 0
    torch.testing.assert_close(_out(copy.deepcopy(model).merge_and_unload(), _inputs("mha")), out)


@pytest.mark.parametrize("rule", ["topkast", "sparse_momentum"])
@pytest.mark.parametrize("case", ["mha", "vit"])
def test_evolving_diffs_move_entries_of_parameters_adapted_around_a_parent(case, rule):
    """out_proj.weight of MultiheadAttention and ViT's patch projection live in their parent's layer under dotted
    names; the engines' updates must find, move and save them like any other."""
    from fish_peft.dynamic import evolving_diff_engine

    base = _base(case)
    model = get_peft_model(base, _config(base, mask_update=rule, update_every=1))
    engine = evolving_diff_engine(model, total_steps=3)
    optimizer = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.1, momentum=0.9)
    before = {n: b.clone() for n, b in model.named_buffers() if ".fish_indices." in n}
    model.train()
    for _ in range(3):
        _out(model, _inputs(case)).square().sum().backward()
        optimizer.step()
        optimizer.zero_grad()
        engine.step(optimizer)
    assert engine.updates >= 2
    moved = [n for n, b in model.named_buffers() if ".fish_indices." in n and not torch.equal(b, before[n])]
    assert any("/" in n for n in moved), moved  # a dotted parameter's entries moved too
    model.eval()
    torch.testing.assert_close(_out(model, _inputs(case)), _out(_dense_reference(case, model), _inputs(case)), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("reentrant", [True, False])
@pytest.mark.parametrize("case", ["bert", "gpt2", "llama"])
def test_activation_checkpointing_gives_the_gradients_of_a_plain_backward(case, reentrant):
    """The checkpointed blocks run FISH's layers again in the backward (reentrant: first without autograd), with
    the dropout masks of their first run."""
    model = _fish(case).train()
    plain = copy.deepcopy(model)
    model.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": reentrant})
    assert model.base_model.model.is_activation_checkpointing
    for peft_model in (model, plain):
        torch.manual_seed(0)
        _out(peft_model, _inputs(case)).square().sum().backward()
    expected = {n: p.grad for n, p in plain.named_parameters() if p.requires_grad}
    assert all(g is not None for g in expected.values())
    for name, param in model.named_parameters():
        if param.requires_grad:
            torch.testing.assert_close(param.grad, expected[name], msg=name)
