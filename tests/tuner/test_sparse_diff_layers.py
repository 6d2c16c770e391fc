"""Sparse-diff tuner layers: the adapted model is exactly the dense model with W + Δ, in every PEFT workflow.

The dense references here are built by hand (a deep copy of the base model whose parameters get the adapter's values
added at the mask's flat indices), never through `FishLayer.get_delta_weight`, so a wrong forward, a wrong merge or
a missed tied use of a parameter shows up as a mismatch.
"""

from __future__ import annotations

import copy
import re

import pytest
import torch
from peft import get_peft_model
from torch import nn
from torch.testing import assert_close
from transformers.pytorch_utils import Conv1D

import fish_peft  # noqa: F401  (registers FISH with PEFT)
from fish_peft import FishConfig, FishLayer, FishMask, random_mask
from fish_peft.tuner.tied_layer import FishTiedLayer
from tests.models import MODEL_BUILDERS, example_inputs, tiny_bert, tiny_gpt2

FAMILIES = ["bert", "gpt2", "llama", "t5"]
# Llama has no biases and no dropout by default; turn both on so its mask covers biases too (T5 has no biases at
# all) and train mode really differs from eval mode.
OVERRIDES = {"llama": {"attention_bias": True, "mlp_bias": True, "attention_dropout": 0.1}}
# Modules that share their weight with an adapted embedding and must therefore see the same diff.
TIED = {
    "gpt2": {"lm_head": "transformer.wte.weight"},
    "t5": {"lm_head": "shared.weight", "encoder.embed_tokens": "shared.weight", "decoder.embed_tokens": "shared.weight"},
}
HEAD = {"bert": "classifier"}


# ----------------------------------------------------------------------------------------------------- helpers


@pytest.fixture(autouse=True, scope="module")
def _single_thread():
    """These models are tiny: intra-op threads only add synchronisation overhead (up to 100x on a busy 2-core box)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(params=["sparse_term", "transient_weight"])
def weight_path(request, monkeypatch):
    """Run a test on each way a Linear's/Conv1D's weight diff is computed: as its own sparse term, or in a
    transient W + Δ (which the layers pick by the number of tokens)."""
    from fish_peft.tuner import transient_weight

    tokens = float("inf") if request.param == "sparse_term" else 0
    monkeypatch.setattr(transient_weight, "DENSE_PRODUCT_MIN_TOKENS", {True: tokens, False: tokens})
    return request.param


def build(family: str):
    return MODEL_BUILDERS[family](**OVERRIDES.get(family, {}))


def covering_mask(model: nn.Module, seed: int = 0, keep_ratio: float = 0.1, **kwargs) -> FishMask:
    """A random mask with a share of every eligible parameter (per-module quotas), head left to modules_to_save."""
    return random_mask(model, keep_ratio=keep_ratio, seed=seed, selection="per_module", **kwargs)


def parameter_kinds(model: nn.Module, mask: FishMask) -> set[str]:
    """Which kinds of parameter the mask touches: embedding, norm, bias, linear (Linear / GPT-2 Conv1D weight)."""
    kinds = set()
    for name in mask:
        owner_name, _, attr = name.rpartition(".")
        owner = model.get_submodule(owner_name)
        if isinstance(owner, nn.Embedding):
            kinds.add("embedding")
        elif isinstance(owner, nn.LayerNorm) or re.search(r"(RMS|Layer)Norm$", type(owner).__name__):
            kinds.add("norm")
        elif isinstance(owner, (nn.Linear, Conv1D)):
            kinds.add("bias" if attr == "bias" else "linear")
    return kinds


def assert_mask_covers_all_kinds(model: nn.Module, mask: FishMask, head: str | None) -> None:
    expected = {"embedding", "norm", "linear"}
    if any(n.endswith(".bias") and not (head and n.startswith(head + ".")) for n, _ in model.named_parameters()):
        expected.add("bias")  # every family but T5
    assert expected <= parameter_kinds(model, mask), parameter_kinds(model, mask)


def fish_layers(peft_model) -> dict[str, FishLayer]:
    """FishLayers by the name their base module has in the original model."""
    return {n: m for n, m in peft_model.base_model.model.named_modules() if isinstance(m, FishLayer)}


def values_of(peft_model, param_name: str, adapter: str = "default") -> torch.Tensor:
    owner, _, attr = param_name.rpartition(".")
    return peft_model.base_model.model.get_submodule(owner).fish_values[adapter][attr]


def randomize_values(peft_model, seed: int = 0, std: float = 0.1) -> None:
    """Give every adapter's values random non-zero entries (they start at zero, which would hide any bug)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in peft_model.named_parameters():
            if ".fish_values." in name:
                p.copy_(torch.randn(p.shape, generator=g) * std)
    assert any(".fish_values." in n for n, _ in peft_model.named_parameters())


def dense_reference(original: nn.Module, mask: FishMask, peft_model, adapter: str = "default") -> nn.Module:
    """Deep copy of the untouched base model with W[idx] += values for every masked parameter (ties preserved)."""
    ref = copy.deepcopy(original)
    with torch.no_grad():
        for name, idx in mask.items():
            weight = ref.get_parameter(name)
            flat = weight.view(-1)
            flat[idx] = flat[idx] + values_of(peft_model, name, adapter).detach().to(weight.dtype)
    return ref


def forward(model, inputs, seed=None):
    if seed is not None:
        torch.manual_seed(seed)  # same dropout masks for models that draw the same random numbers in the same order
    return model(**inputs)


def make_adapted(family: str, seed: int = 0):
    """(untouched copy of the base model, its covering mask, PEFT model with random values, dense reference)."""
    base = build(family)
    original = copy.deepcopy(base)
    mask = covering_mask(base, seed=seed)
    peft_model = get_peft_model(base, FishConfig(mask=mask))
    randomize_values(peft_model, seed=seed + 100)
    return original, mask, peft_model, dense_reference(original, mask, peft_model)


def module_types(model: nn.Module) -> dict[str, type]:
    return {name: type(m) for name, m in model.named_modules()}


# ------------------------------------------------------------------------- 1. PEFT forward == dense W + Δ model


@pytest.mark.parametrize("family", FAMILIES)
def test_adapted_model_equals_dense_model_with_diff(family, weight_path):
    original, mask, peft_model, ref = make_adapted(family)
    head = HEAD.get(family)
    assert_mask_covers_all_kinds(original, mask, head)
    # every eligible (non-head) parameter got entries, and the wrapping follows the mask
    eligible = {n for n, _ in original.named_parameters() if head is None or not n.startswith(head + ".")}
    assert set(mask) == eligible
    layers = fish_layers(peft_model)
    assert set(layers) == {n.rpartition(".")[0] for n in mask}
    for name, idx in mask.items():
        owner, _, attr = name.rpartition(".")
        buf = layers[owner].fish_indices["default"][attr]
        assert buf.dtype == torch.int32 and torch.equal(buf.long(), idx)
        values = layers[owner].fish_values["default"][attr]
        assert values.dtype == torch.float32 and values.requires_grad and (values != 0).all()
    # modules tied to an adapted embedding are wrapped and share the very same tensor in the reference too
    for module_name, source in TIED.get(family, {}).items():
        assert isinstance(peft_model.base_model.model.get_submodule(module_name), FishTiedLayer), module_name
        assert source in mask
        assert ref.get_submodule(module_name).weight is ref.get_parameter(source)

    inputs = example_inputs(family)

    # eval mode
    peft_model.eval(), ref.eval(), original.eval()
    with torch.no_grad():
        out, expected, base_out = forward(peft_model, inputs), forward(ref, inputs), forward(original, inputs)
    assert_close(out.logits, expected.logits)
    assert_close(out.loss, expected.loss)
    assert not torch.allclose(out.logits, base_out.logits, atol=1e-3)  # the diff does change the outputs

    # train mode with non-zero dropout (the configs' defaults; Llama's attention_dropout set above): the global RNG is reseeded before each forward, and
    # neither the FISH layers nor PEFT draw random numbers, so both models get identical dropout masks.
    peft_model.train(), ref.train()
    out, expected = forward(peft_model, inputs, seed=1234), forward(ref, inputs, seed=1234)
    assert_close(out.logits, expected.logits)
    with torch.no_grad():
        eval_expected = ref.eval()(**inputs).logits
    assert not torch.allclose(expected.logits, eval_expected, atol=1e-4)  # dropout really was active
    # ... and training sees the same gradients: dL/dvalues == dL/dW at the masked entries (for a tied embedding,
    # that includes the gradient through lm_head / the other tied uses)
    out.loss.backward()
    expected.loss.backward()
    for name, idx in mask.items():
        grad = values_of(peft_model, name).grad
        assert grad is not None, name
        assert_close(grad, ref.get_parameter(name).grad.view(-1)[idx], rtol=1e-4, atol=1e-6, msg=name)
    for module in fish_layers(peft_model).values():
        assert all(p.grad is None and not p.requires_grad for p in module.base_layer.parameters())
    if head:
        trained_head = peft_model.base_model.model.get_submodule(head).modules_to_save["default"]
        assert_close(trained_head.weight.grad, ref.get_submodule(head).weight.grad, rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("family,param,token", [("gpt2", "transformer.wte.weight", 0), ("t5", "shared.weight", 2)])
def test_tied_output_embedding_gets_the_diff(family, param, token):
    """Adapt only the embedding row of a token absent from the input: only the tied lm_head can show it."""
    base = build(family)
    original = copy.deepcopy(base)
    shape = tuple(original.get_parameter(param).shape)
    mask = FishMask({param: torch.arange(token * shape[1], (token + 1) * shape[1])}, {param: shape})
    peft_model = get_peft_model(base, FishConfig(mask=mask)).eval()
    randomize_values(peft_model, std=1.0)
    inputs = example_inputs(family, labels=False)
    if family == "t5":
        inputs["decoder_input_ids"][:, 0] = 0  # decoder start token; `token` itself appears nowhere in the inputs
    assert not any((v == token).any() for k, v in inputs.items() if k.endswith("input_ids"))
    with torch.no_grad():
        out = peft_model(**inputs).logits
        base_out = original(**inputs).logits
        expected = dense_reference(original, mask, peft_model)(**inputs).logits
    assert_close(out, expected)
    others = [c for c in range(out.shape[-1]) if c != token]
    assert_close(out[..., others], base_out[..., others], rtol=0, atol=0)
    assert not torch.allclose(out[..., token], base_out[..., token], atol=1e-3)


# ---------------------------------------------------------- 2. merge / unmerge / unload / disable_adapter


@pytest.mark.parametrize("family", FAMILIES)
def test_merge_unmerge_and_disable(family):
    original, mask, peft_model, ref = make_adapted(family)
    peft_model.eval()
    inputs = example_inputs(family, labels=False)
    with torch.no_grad():
        expected = ref(**inputs).logits
        base_out = original(**inputs).logits
        unmerged = peft_model(**inputs).logits
    assert_close(unmerged, expected)
    layers = fish_layers(peft_model)

    peft_model.merge_adapter()
    assert all(layer.merged for layer in layers.values())
    for name in mask:  # merged weights are W + Δ, bit for bit
        owner, _, attr = name.rpartition(".")
        assert torch.equal(getattr(layers[owner].base_layer, attr), ref.get_parameter(name)), name
    with torch.no_grad():
        merged = peft_model(**inputs).logits
    assert_close(merged, unmerged)

    peft_model.unmerge_adapter()
    assert not any(layer.merged for layer in layers.values())
    for name, p in original.named_parameters():  # unmerge restores the base weights exactly
        owner, _, attr = name.rpartition(".")
        if owner in layers:
            assert torch.equal(getattr(layers[owner].base_layer, attr), p), name
    with torch.no_grad():
        assert_close(peft_model(**inputs).logits, expected)

    with peft_model.disable_adapter():
        with torch.no_grad():
            disabled = peft_model(**inputs).logits
    assert_close(disabled, base_out)
    with torch.no_grad():
        assert_close(peft_model(**inputs).logits, expected)
    assert all(p.requires_grad for n, p in peft_model.named_parameters() if ".fish_values.default." in n)

    # disabling a merged adapter also gives the base model, and enabling it again the adapted one
    peft_model.merge_adapter()
    with peft_model.disable_adapter():
        with torch.no_grad():
            disabled = peft_model(**inputs).logits
    assert_close(disabled, base_out)
    with torch.no_grad():
        assert_close(peft_model(**inputs).logits, expected)


@pytest.mark.parametrize("family", FAMILIES)
def test_merge_and_unload_gives_dense_model(family):
    original, mask, peft_model, ref = make_adapted(family)
    inputs = example_inputs(family, labels=False)
    merged = peft_model.merge_and_unload().eval()
    assert module_types(merged) == module_types(original)
    merged_params = dict(merged.named_parameters())
    assert set(merged_params) == {n for n, _ in original.named_parameters()}
    for name, p in ref.named_parameters():
        assert torch.equal(merged_params[name], p), name
    for module_name, source in TIED.get(family, {}).items():  # ties survive the merge
        assert merged.get_submodule(module_name).weight is merged.get_parameter(source)
    with torch.no_grad():
        assert_close(merged(**inputs).logits, ref(**inputs).logits)


@pytest.mark.parametrize("family", FAMILIES)
def test_unload_gives_original_model(family):
    original, mask, peft_model, ref = make_adapted(family)
    inputs = example_inputs(family, labels=False)
    unloaded = peft_model.unload().eval()
    assert module_types(unloaded) == module_types(original)
    unloaded_params = dict(unloaded.named_parameters())
    assert set(unloaded_params) == {n for n, _ in original.named_parameters()}
    for name, p in original.named_parameters():
        assert torch.equal(unloaded_params[name], p), name
    for module_name, source in TIED.get(family, {}).items():
        assert unloaded.get_submodule(module_name).weight is unloaded.get_parameter(source)
    with torch.no_grad():
        assert_close(unloaded(**inputs).logits, original(**inputs).logits, rtol=0, atol=0)


# ------------------------------------------------------------------------------------------ 3. several adapters


@pytest.mark.parametrize("family", FAMILIES)
def test_several_adapters(family):
    base = build(family)
    original = copy.deepcopy(base)
    # adapter "default" leaves every parameter with ".1." in its name (block/layer 1) alone, adapter "b" covers all:
    # some modules are then wrapped only when "b" is added, while "default" is active
    mask_a = random_mask(base, keep_ratio=0.1, seed=0, eligible=lambda name, _p: ".1." not in name)
    mask_b = covering_mask(base, seed=1)
    peft_model = get_peft_model(base, FishConfig(mask=mask_a))
    peft_model.add_adapter("b", FishConfig(mask=mask_b))
    randomize_values(peft_model, seed=7)
    layers = fish_layers(peft_model)
    only_b = [n for n, m in layers.items() if set(m.fish_values) == {"b"}]
    assert only_b, "adapter b should wrap modules adapter default does not"

    def requires_grad_by_adapter():
        flags = {}
        for name, p in peft_model.named_parameters():
            if ".fish_values." in name:
                flags.setdefault(name.split(".fish_values.")[1].split(".")[0], set()).add(p.requires_grad)
        return flags

    head = HEAD.get(family)
    num_head = sum(p.numel() for p in original.get_submodule(head).parameters()) if head else 0
    assert requires_grad_by_adapter() == {"default": {True}, "b": {False}}
    assert peft_model.get_nb_trainable_parameters()[0] == mask_a.num_selected + num_head

    inputs = example_inputs(family, labels=False)
    peft_model.eval()
    ref_a = dense_reference(original, mask_a, peft_model, "default").eval()
    ref_b = dense_reference(original, mask_b, peft_model, "b").eval()
    with torch.no_grad():
        out_a, out_b = ref_a(**inputs).logits, ref_b(**inputs).logits
        assert not torch.allclose(out_a, out_b, atol=1e-3)
        assert_close(peft_model(**inputs).logits, out_a)

        peft_model.set_adapter("b")
        assert requires_grad_by_adapter() == {"default": {False}, "b": {True}}
        assert peft_model.get_nb_trainable_parameters()[0] == mask_b.num_selected + num_head
        assert_close(peft_model(**inputs).logits, out_b)

        peft_model.set_adapter("default")
        assert requires_grad_by_adapter() == {"default": {True}, "b": {False}}
        assert_close(peft_model(**inputs).logits, out_a)

        peft_model.delete_adapter("b")
        assert "b" not in peft_model.peft_config
        leftover = [
            n
            for n in list(peft_model.state_dict()) + [n for n, _ in peft_model.named_parameters()]
            if ".fish_values.b." in n or ".fish_indices.b." in n or n.endswith(".b")
        ]
        assert not leftover, leftover[:5]
        for module in peft_model.modules():
            if isinstance(module, FishLayer):
                assert "b" not in module.fish_values and "b" not in module.fish_indices
                assert module.active_adapters == ["default"]
        assert requires_grad_by_adapter() == {"default": {True}}
        assert_close(peft_model(**inputs).logits, out_a)


@pytest.mark.parametrize("family", FAMILIES)
def test_several_active_adapters_add_their_diffs(family, weight_path):
    """Both adapters active at once: outputs and both adapters' gradients equal a dense model with W + Δa + Δb;
    disabled, the base model; merged, the same outputs again."""
    base = build(family)
    original = copy.deepcopy(base)
    # the head too gets a diff: PEFT activates one modules_to_save copy at a time
    mask_a, mask_b = covering_mask(base, seed=0, modules_to_save=[]), covering_mask(base, seed=1, modules_to_save=[])
    peft_model = get_peft_model(base, FishConfig(mask=mask_a))
    peft_model.add_adapter("b", FishConfig(mask=mask_b))
    randomize_values(peft_model, seed=3)
    peft_model.base_model.set_adapter(["default", "b"])
    reference = dense_reference(dense_reference(original, mask_a, peft_model, "default"), mask_b, peft_model, "b")
    for p in reference.parameters():
        p.requires_grad_(True)
    peft_model.eval(), reference.eval(), original.eval()
    inputs = example_inputs(family)
    out, expected = peft_model(**inputs), reference(**inputs)
    assert_close(out.logits, expected.logits)
    out.loss.backward()
    expected.loss.backward()
    for adapter, mask in (("default", mask_a), ("b", mask_b)):
        for name, idx in mask.items():
            assert_close(values_of(peft_model, name, adapter).grad, reference.get_parameter(name).grad.view(-1)[idx], rtol=1e-4, atol=1e-6, msg=name)
    with torch.no_grad():
        with peft_model.disable_adapter():
            assert_close(peft_model(**inputs).logits, original(**inputs).logits)
        peft_model.merge_adapter(["default", "b"])
        assert_close(peft_model(**inputs).logits, expected.logits)
        peft_model.unmerge_adapter()
        assert_close(peft_model(**inputs).logits, expected.logits)


# --------------------------------------------------------------- 4. training touches only the masked entries


def test_training_moves_only_masked_entries():
    base = tiny_bert(num_labels=3)
    original = copy.deepcopy(base)
    mask = covering_mask(base, seed=3)
    peft_model = get_peft_model(base, FishConfig(mask=mask))
    assert peft_model.peft_config["default"].modules_to_save == ["classifier"]
    peft_model.train()
    # every parameter goes to the optimizer: frozen ones get no gradient, hence no state and no weight decay
    optimizer = torch.optim.AdamW(peft_model.parameters(), lr=1e-2, weight_decay=0.1)
    for step in range(4):
        loss = peft_model(**example_inputs("bert", batch=4, seed=step)).loss
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()

    # the wrapped base parameters did not move (and are frozen)
    layers = fish_layers(peft_model)
    for owner, layer in layers.items():
        for attr, p in layer.base_layer.named_parameters(recurse=False):
            assert not p.requires_grad and p.grad is None
            assert torch.equal(p, original.get_parameter(f"{owner}.{attr}")), f"{owner}.{attr}"

    # optimizer state ∝ k: exp_avg and exp_avg_sq for each trainable value and head parameter, nothing else
    num_head = sum(p.numel() for p in original.classifier.parameters())
    trainable = [p for p in peft_model.parameters() if p.requires_grad]
    assert sum(p.numel() for p in trainable) == mask.num_selected + num_head
    assert set(optimizer.state) == set(trainable)
    state_numel = 0
    for state in optimizer.state.values():
        assert set(state) == {"step", "exp_avg", "exp_avg_sq"}
        assert state["step"].numel() == 1
        state_numel += state["exp_avg"].numel() + state["exp_avg_sq"].numel()
    assert state_numel == 2 * (mask.num_selected + num_head)
    assert state_numel < 0.5 * sum(p.numel() for p in original.parameters())

    trained_values = {name: values_of(peft_model, name).detach().clone() for name in mask}
    merged = peft_model.merge_and_unload()
    merged_params = dict(merged.named_parameters())
    num_changed = 0
    for name, p0 in original.named_parameters():
        p = merged_params[name]
        if name.startswith("classifier."):
            assert not torch.equal(p, p0)  # the head is trained in full
            continue
        changed = (p != p0).view(-1)
        allowed = torch.zeros_like(changed)
        if name in mask:
            allowed[mask[name]] = True
            expected = p0.view(-1)[mask[name]] + trained_values[name]
            assert torch.equal(p.view(-1)[mask[name]], expected), name
        assert not (changed & ~allowed).any(), f"{name}: entries outside the mask moved"
        num_changed += int(changed.sum())
    assert num_changed > mask.num_selected // 2


# ------------------------------------------------------------------------------- 5. trainable-parameter counts


@pytest.mark.parametrize("family", ["bert", "gpt2"])
def test_trainable_parameter_count(family, capsys):
    base = tiny_bert(num_labels=3) if family == "bert" else tiny_gpt2()
    num_total = sum(p.numel() for p in base.parameters())  # tied weights counted once
    num_head = sum(p.numel() for p in base.classifier.parameters()) if family == "bert" else 0
    mask = random_mask(base, keep_ratio=0.05, seed=0)
    assert mask.num_selected == int(num_total * 0.05) - num_head  # the paper's budget: the head counts against it
    peft_model = get_peft_model(base, FishConfig(mask=mask))
    trainable, total = peft_model.get_nb_trainable_parameters()
    assert trainable == mask.num_selected + num_head
    # all = base model + the values + PEFT's trainable copy of the head
    assert total == num_total + mask.num_selected + num_head
    peft_model.print_trainable_parameters()
    printed = capsys.readouterr().out
    assert f"trainable params: {trainable:,} || all params: {total:,}" in printed
