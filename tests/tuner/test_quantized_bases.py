"""A FISH adapter on a base whose Linear weights are stored quantized (bitsandbytes 4-bit / 8-bit): the diff is a
float32 sparse term over the dequantized (out, in) shape, so the adapted model equals a float model with
dequant(W) + Δ, trains, saves and loads; merging, a keep_ratio config, the Fisher and evolving diffs on such weights,
and unknown quantizations, are refused with what to do instead.

Most tests use a stand-in for bitsandbytes' Linear4bit (same class name, a packed uint8 weight of shape
(out * in / 2, 1), 4-bit absmax codes), so they run without bitsandbytes; the last ones use bitsandbytes itself where
it is installed (its CPU backend runs them too)."""

from __future__ import annotations

import copy

import pytest
import torch
from peft import PeftModel, get_peft_model
from peft.tuners.tuners_utils import BaseTunerLayer
from torch import nn

import fish_peft  # noqa: F401  (registers FISH with PEFT)
from fish_peft import FishConfig, FishLayer, compute_fisher_mask
from fish_peft.tuner.quantized_bases import (
    QuantizedBaseError,
    QuantizedFishLayer,
    dequantized_weight,
    logical_weight_shape,
    quantization_kind,
)
from tests.models import example_inputs, tiny_llama

PROJ = r"_proj\.weight$"


class Linear4bit(nn.Linear):
    """Stands in for bitsandbytes.nn.Linear4bit: the weight is packed, two 4-bit codes per uint8, shape
    (out * in / 2, 1) as Params4bit's (or those bytes as float32, as bitsandbytes' quant_storage=torch.float32 keeps
    them); forward dequantizes it (per-row absmax scale, codes -7..7)."""

    def __init__(self, linear: nn.Linear, storage: torch.dtype = torch.uint8):
        super().__init__(linear.in_features, linear.out_features, bias=linear.bias is not None)
        w = linear.weight.detach().float()
        scale = w.abs().amax(1, keepdim=True).clamp(min=1e-8) / 7
        codes = (torch.round(w / scale).clamp(-7, 7) + 8).to(torch.uint8).reshape(-1)
        packed = (codes[0::2] << 4 | codes[1::2]).view(storage)
        self.weight = nn.Parameter(packed.reshape(-1, 1), requires_grad=False)
        self.register_buffer("scale", scale)
        if linear.bias is not None:
            self.bias = nn.Parameter(linear.bias.detach().clone(), requires_grad=linear.bias.requires_grad)

    def dequantized_weight(self) -> torch.Tensor:
        packed = self.weight.reshape(-1).view(torch.uint8)
        codes = torch.stack([packed >> 4, packed & 15], 1).reshape(self.out_features, self.in_features)
        return (codes.float() - 8) * self.scale

    def forward(self, x):
        return nn.functional.linear(x, self.dequantized_weight().to(x.dtype), self.bias)


def quantize(model: nn.Module, pattern: str = "_proj", storage: torch.dtype = torch.uint8) -> nn.Module:
    """`model` with every Linear whose name ends in `pattern` replaced by the stand-in."""
    for name, module in list(model.named_modules()):
        if isinstance(module, nn.Linear) and name.endswith(pattern):
            parent, _, child = name.rpartition(".")
            setattr(model.get_submodule(parent), child, Linear4bit(module, storage))
    return model


def dequantized_copy(model: nn.Module, deltas: dict[str, torch.Tensor] | None = None) -> nn.Module:
    """A float copy of a (quantized, maybe adapted) model: every quantized Linear a plain Linear with dequant(W) (+ Δ)."""
    float_model = copy.deepcopy(model)
    for name, module in list(float_model.named_modules()):  # adapter layers out: the diff goes into the weights
        if isinstance(module, BaseTunerLayer):
            parent, _, child = name.rpartition(".")
            setattr(float_model.get_submodule(parent), child, module.get_base_layer())
    for name, module in list(float_model.named_modules()):
        if quantization_kind(module) is not None:
            plain = nn.Linear(module.in_features, module.out_features, bias=module.bias is not None)
            weight = dequantized_weight(module)
            plain.weight = nn.Parameter(weight + (deltas or {}).get(f"{name}.weight", 0))
            if module.bias is not None:
                plain.bias = nn.Parameter(module.bias.detach().clone())
            parent, _, child = name.rpartition(".")
            setattr(float_model.get_submodule(parent), child, plain)
    return float_model


def batches(count=3):
    out = []
    for seed in range(count):
        batch = example_inputs("llama", batch=3, seq=8, seed=seed)
        batch["labels"][:, :3] = -100  # a prompt, as a completion-only loss has
        out.append(batch)
    return out


def float_mask(keep_ratio=0.02):
    """The mask a user computes on the base model in float, for the quantized model."""
    return compute_fisher_mask(tiny_llama(), batches(), keep_ratio, 9, eligible=PROJ, modules_to_save=None)


def adapted(init_weights=False, storage=torch.uint8, **config):
    base = quantize(tiny_llama(), storage=storage)
    return get_peft_model(base, FishConfig(mask=float_mask(), init_weights=init_weights, **config))


def deltas(model) -> dict[str, torch.Tensor]:
    """{bare-model weight name: the adapter's dense Δ} of every wrapped quantized Linear."""
    return {
        f"{name.removeprefix('base_model.model.')}.weight": layer.get_delta_weight("default")["weight"]
        for name, layer in model.named_modules()
        if isinstance(layer, QuantizedFishLayer)
    }


def test_the_stand_in_looks_like_bitsandbytes_storage():
    layer = Linear4bit(nn.Linear(64, 32))
    assert layer.weight.dtype == torch.uint8 and tuple(layer.weight.shape) == (64 * 32 // 2, 1)
    assert quantization_kind(layer) == "4-bit" and logical_weight_shape(layer) == (32, 64)


@pytest.mark.parametrize("storage", [torch.uint8, torch.float32], ids=["uint8", "float32-storage"])
def test_the_adapted_quantized_model_equals_a_float_model_with_dequantized_weights_plus_the_diff(storage):
    """Also with the packed bytes kept as float32 and many tokens without gradients, where a float weight would have
    its diff written into it for the call: a packed one never does."""
    model = adapted(storage=storage)
    wrapped = [m for m in model.modules() if isinstance(m, FishLayer)]
    assert wrapped and all(isinstance(m, QuantizedFishLayer) for m in wrapped)
    assert all(v.dtype == torch.float32 for n, v in model.named_parameters() if v.requires_grad)
    reference = dequantized_copy(model.get_base_model(), deltas(model))
    assert any(d.abs().sum() > 0 for d in deltas(model).values())
    batch = batches()[0]
    packed = {n: p.clone() for n, p in model.named_parameters() if n.endswith("_proj.weight") or "base_layer" in n}
    with torch.no_grad():
        torch.testing.assert_close(model(**batch).logits, reference(**batch).logits, atol=1e-5, rtol=1e-5)
        same_bytes = [torch.equal(p.view(torch.uint8), packed[n].view(torch.uint8)) for n, p in model.named_parameters() if n in packed]
        assert same_bytes and all(same_bytes)
        with model.disable_adapter():
            torch.testing.assert_close(model(**batch).logits, dequantized_copy(model.get_base_model())(**batch).logits)


def test_the_values_gradient_is_the_float_models_weight_gradient_at_the_mask():
    model = adapted()
    reference = dequantized_copy(model.get_base_model(), deltas(model))
    batch = batches()[1]
    model.train()
    model(**batch).loss.backward()
    reference(**batch).loss.backward()
    params = dict(reference.named_parameters())
    compared = 0
    for name, layer in model.named_modules():
        if isinstance(layer, QuantizedFishLayer):
            grad = layer.values("default", "weight").grad
            expected = params[f"{name.removeprefix('base_model.model.')}.weight"].grad.reshape(-1)
            torch.testing.assert_close(grad, expected[layer.indices("default", "weight").long()], atol=1e-6, rtol=1e-4)
            compared += 1
    assert compared > 3


def test_trains_saves_and_loads_onto_a_quantized_or_the_dequantized_float_base(tmp_path):
    model = adapted(init_weights=True)
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    model.train()
    losses = []
    for batch in batches() * 2:
        loss = model(**batch).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        losses.append(loss.item())
    model.eval()
    assert losses[-1] < losses[0]
    batch = batches()[0]
    with torch.no_grad():
        trained = model(**batch).logits
        model.save_pretrained(tmp_path)
        again = PeftModel.from_pretrained(quantize(tiny_llama()), tmp_path)
        torch.testing.assert_close(again(**batch).logits, trained)
        # the adapter file does not depend on the quantization: onto a float base it loads and merges
        float_base = dequantized_copy(quantize(tiny_llama()))
        merged = PeftModel.from_pretrained(float_base, tmp_path).merge_and_unload()
        torch.testing.assert_close(merged(**batch).logits, trained, atol=1e-5, rtol=1e-5)


def test_merging_into_a_quantized_weight_is_refused_and_changes_nothing():
    model = adapted()
    batch = batches()[0]
    with torch.no_grad():
        before = model(**batch).logits
    packed = {n: p.clone() for n, p in model.named_parameters() if p.dtype == torch.uint8}
    with pytest.raises(QuantizedBaseError, match=r"Cannot merge .* 4-bit .*bfloat16 or float32.*merge_and_unload"):
        model.merge_and_unload()
    with pytest.raises(QuantizedBaseError, match="Cannot merge"):
        model.merge_adapter()
    layer = next(m for m in model.modules() if isinstance(m, QuantizedFishLayer))
    with pytest.raises(QuantizedBaseError, match="Cannot merge"):
        layer.merge()
    assert all(torch.equal(p, packed[n]) for n, p in model.named_parameters() if n in packed)
    with torch.no_grad():
        torch.testing.assert_close(model(**batch).logits, before)
    tuner = model.base_model
    assert tuner._forward_checks.id in tuner.model._forward_pre_hooks  # refused before the tuner's checks came off
    unloaded = model.unload()  # without merging: the quantized base as it was
    assert isinstance(unloaded.model.layers[0].self_attn.q_proj, Linear4bit)


def test_a_keep_ratio_config_over_quantized_weights_is_refused_with_the_way_out():
    with pytest.raises(QuantizedBaseError, match=r"Fisher.*compute_fisher_mask.*FishConfig\(mask=mask\).*exclude_modules"):
        get_peft_model(quantize(tiny_llama()), FishConfig(keep_ratio=0.01, target_modules="all-linear"))
    # modules left in float may hold entries; the Fisher then runs through the quantized layers
    config = FishConfig(keep_ratio=0.001, target_modules=["lm_head", "norm"], num_samples=9)
    model = get_peft_model(quantize(tiny_llama()), config)
    fish_peft.initialize_fish_mask(model, batches())
    assert model.peft_config["default"].sparse_parameters


def test_the_fisher_over_quantized_weights_is_refused_and_float_parameters_are_scored():
    model = quantize(tiny_llama())
    with pytest.raises(ValueError, match=r"stored quantized.*torch.uint8.*bfloat16 or float32.*FishConfig\(mask=mask\)"):
        compute_fisher_mask(model, batches(), 0.01, 9)
    mask = compute_fisher_mask(model, batches(), 0.01, 9, eligible=r"norm|embed|lm_head")
    assert mask.num_selected > 0


def test_evolving_diffs_and_unknown_quantizations_are_refused():
    with pytest.raises(QuantizedBaseError, match="mask_update='topkast'.*fixed mask"):
        adapted(mask_update="topkast")

    class PackedLinear(nn.Module):  # another library's quantized layer: int8 storage, no known logical shape
        def __init__(self):
            super().__init__()
            self.weight = nn.Parameter(torch.zeros(16, 2, dtype=torch.int8), requires_grad=False)

        def forward(self, x):
            return x

    model = nn.Sequential(nn.Linear(4, 4), PackedLinear())
    mask = fish_peft.FishMask({"1.weight": torch.tensor([0, 3])}, {"1.weight": (16, 2)})
    with pytest.raises(QuantizedBaseError, match="PackedLinear, a quantization fish-peft does not know.*Linear4bit"):
        get_peft_model(model, FishConfig(mask=mask))


def test_a_mask_of_another_shape_is_refused_against_the_dequantized_shape():
    mask = float_mask()
    name = next(iter(mask.shapes))
    shapes = {**mask.shapes, name: (7, 7)}
    wrong = fish_peft.FishMask({n: mask[n][mask[n] < 49] for n in mask.shapes}, shapes)
    with pytest.raises(ValueError, match=r"has shape \[7, 7\], but this model's has \[\d+, \d+\]"):
        get_peft_model(quantize(tiny_llama()), FishConfig(mask=wrong))


def test_a_bias_diff_of_a_quantized_linear_is_applied_and_merged_alone():
    torch.manual_seed(0)
    model = nn.Sequential(Linear4bit(nn.Linear(8, 6)), nn.ReLU(), nn.Linear(6, 2))
    mask = fish_peft.FishMask(
        {"0.bias": torch.tensor([1, 4]), "0.weight": torch.tensor([0, 9, 47])}, {"0.bias": (6,), "0.weight": (6, 8)}
    )
    peft_model = get_peft_model(model, FishConfig(mask=mask, init_weights=False))
    layer = peft_model.base_model.model[0]
    assert isinstance(layer, QuantizedFishLayer)
    delta = layer.get_delta_weight("default")
    x = torch.randn(5, 8)
    expected = nn.functional.linear(x, dequantized_weight(layer) + delta["weight"], layer.bias + delta["bias"])
    torch.testing.assert_close(layer(x), expected)
    bias_only = get_peft_model(
        nn.Sequential(Linear4bit(nn.Linear(8, 6))),
        FishConfig(mask=fish_peft.FishMask({"0.bias": torch.tensor([2])}, {"0.bias": (6,)}), init_weights=False),
    )
    with torch.no_grad():
        out = bias_only(x)
        torch.testing.assert_close(bias_only.merge_and_unload()(x), out)


# bitsandbytes itself (its CPU backend runs these too): marked `bitsandbytes`, left out of CI, which does not install
# it (PEFT and transformers change behaviour when it is present); run with `pip install bitsandbytes` and
# `pytest -m bitsandbytes`


def bnb_tiny_llama(tmp_path, bits: int = 4):
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig

    folder = tmp_path / "base"
    if not folder.exists():
        tiny_llama().save_pretrained(folder)
    quantization = (
        BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_compute_dtype=torch.float32)
        if bits == 4
        else BitsAndBytesConfig(load_in_8bit=True)
    )
    model = AutoModelForCausalLM.from_pretrained(folder, quantization_config=quantization, device_map="cpu")
    for module in model.modules():  # on CPU, bitsandbytes repacks a 4-bit weight for inference at the first eval
        if hasattr(module, "support_avx512bf16_for_cpu"):  # forward (bfloat16 kernel, no backward); keep float32
            module.support_avx512bf16_for_cpu = False
    return model


@pytest.mark.bitsandbytes
def test_bitsandbytes_4bit_base_trains_loads_and_refuses_merging(tmp_path):
    model = get_peft_model(bnb_tiny_llama(tmp_path), FishConfig(mask=float_mask(), init_weights=False))
    layers = [m for m in model.modules() if isinstance(m, QuantizedFishLayer)]
    assert layers and type(layers[0].get_base_layer()).__name__ == "Linear4bit"
    assert layers[0].get_base_layer().weight.dtype == torch.uint8
    batch = batches()[0]
    reference = dequantized_copy(model.get_base_model(), deltas(model))
    with torch.no_grad():
        torch.testing.assert_close(model(**batch).logits, reference(**batch).logits, atol=1e-4, rtol=1e-4)
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    model.train()
    for batch in batches():
        model(**batch).loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    model.eval()
    with torch.no_grad():
        trained = model(**batch).logits
        model.save_pretrained(tmp_path / "adapter")
        again = PeftModel.from_pretrained(bnb_tiny_llama(tmp_path), tmp_path / "adapter")
        torch.testing.assert_close(again(**batch).logits, trained)
    with pytest.raises(QuantizedBaseError, match="Cannot merge"):
        again.merge_and_unload()
    with pytest.raises(QuantizedBaseError, match="Fisher"):
        get_peft_model(bnb_tiny_llama(tmp_path), FishConfig(keep_ratio=0.01, target_modules="all-linear"))
    with pytest.raises(ValueError, match="stored quantized"):
        compute_fisher_mask(bnb_tiny_llama(tmp_path), batches(), 0.01, 9)


@pytest.mark.bitsandbytes
def test_bitsandbytes_8bit_base_adds_the_diff_as_its_own_term(tmp_path):
    model = get_peft_model(bnb_tiny_llama(tmp_path, bits=8), FishConfig(mask=float_mask(), init_weights=False))
    layer = next(m for m in model.modules() if isinstance(m, QuantizedFishLayer))
    assert quantization_kind(layer.get_base_layer()) == "8-bit"
    x = torch.randn(2, 3, layer.in_features)
    with torch.no_grad():
        expected = layer.get_base_layer()(x) + nn.functional.linear(x, layer.get_delta_weight("default")["weight"])
        torch.testing.assert_close(layer(x), expected, atol=1e-3, rtol=1e-3)
    with pytest.raises(QuantizedBaseError, match="8-bit"):
        model.merge_and_unload()


@pytest.mark.bitsandbytes
def test_the_gpu_checks_4bit_check_runs_here():
    """benchmarks/gpu_check.py's quantized_4bit check, on the CPU at its --quick size, so a GPU session runs it as is."""
    from benchmarks.gpu_check import SIZES, check_quantized_4bit

    details = check_quantized_4bit(SIZES["quick"], torch.device("cpu"))
    assert details["adapted_layers"] > 0 and set(details["refused"]) == {"merge", "keep_ratio", "fisher"}
