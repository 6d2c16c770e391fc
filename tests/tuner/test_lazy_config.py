"""FishConfig(keep_ratio=...) without a mask: the adapter awaits its mask, `initialize_fish_mask` computes it from data
and installs it, and from then on the adapter is the one a precomputed mask gives."""

import json
import re
import warnings

import pytest
import torch
from peft import PeftModel, get_peft_model
from safetensors.torch import load_file
from torch import nn

import fish_peft  # noqa: F401  (registers FISH with PEFT)
from fish_peft import FishConfig, FishLayer, compute_fisher_mask, initialize_fish_mask, random_mask
from tests.models import example_inputs, tiny_llama

TARGETS = ["q_proj", "v_proj", "down_proj"]


def batches(count=4, size=4):
    """Causal-LM batches whose labels ignore a 3-token prompt (-100), as a completion-only loss does."""
    out = []
    for seed in range(count):
        batch = example_inputs("llama", batch=size, seq=8, seed=seed)
        batch["labels"][:, :3] = -100
        out.append(batch)
    return out


def lazy_model(**config):
    return get_peft_model(tiny_llama(), FishConfig(**{"keep_ratio": 0.02, "num_samples": 16, **config}))


def train(model, optimizer, data, steps=3):
    model.train()
    for batch in data[:steps]:
        model(**batch).loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    return model.eval()


def adam(model):
    return torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)


def layer_names(model):
    return {name.removeprefix("base_model.model.") for name, m in model.named_modules() if isinstance(m, FishLayer)}


def slots(model):
    """The parameters the adapter may hold entries in (each FishLayer's adapted parameters)."""
    return {
        f"{name.removeprefix('base_model.model.')}.{attr}"
        for name, m in model.named_modules()
        if isinstance(m, FishLayer)
        for attr in m.adapted_parameters("default")
    }


def test_lazy_adapter_trains_saves_and_loads_as_the_eager_one_with_the_same_mask(tmp_path):
    data = batches()
    lazy = lazy_model(target_modules=TARGETS)
    optimizer = adam(lazy)  # built before the mask exists, as Trainer builds it
    mask = initialize_fish_mask(lazy, data)

    expected = compute_fisher_mask(
        tiny_llama(), data, keep_ratio=0.02, num_samples=16, modules_to_save=None,
        eligible=r"\.(q_proj|v_proj|down_proj)\.weight$",
    )
    assert mask.keys() == expected.keys() and all(torch.equal(mask[n], expected[n]) for n in mask)
    assert mask.num_selected == int(sum(p.numel() for p in tiny_llama().parameters()) * 0.02)
    config = lazy.peft_config["default"]
    assert config.sparse_parameters == expected.counts() and not config.awaits_mask
    assert layer_names(lazy) == {name.rpartition(".")[0] for name in mask}  # modules without entries unwrapped

    eager = get_peft_model(tiny_llama(), FishConfig(mask=expected))
    train(lazy, optimizer, data)
    train(eager, adam(eager), data)
    x = example_inputs("llama", labels=False, seed=9)
    assert not torch.equal(lazy(**x).logits, tiny_llama()(**x).logits)  # it trained
    assert torch.equal(lazy(**x).logits, eager(**x).logits)

    lazy.save_pretrained(tmp_path / "lazy")
    eager.save_pretrained(tmp_path / "eager")
    lazy_file, eager_file = load_file(tmp_path / "lazy/adapter_model.safetensors"), load_file(tmp_path / "eager/adapter_model.safetensors")
    assert lazy_file.keys() == eager_file.keys() and all(torch.equal(lazy_file[k], eager_file[k]) for k in lazy_file)
    again = PeftModel.from_pretrained(tiny_llama(), tmp_path / "lazy")
    assert torch.equal(again(**x).logits, lazy(**x).logits)


@pytest.mark.parametrize(
    "target_modules, exclude_modules, expected",
    [
        (["q_proj"], None, r"model\.layers\.\d\.self_attn\.q_proj\.weight"),
        ("all-linear", None, r"model\.layers\.\d\.(self_attn|mlp)\.\w+_proj\.weight"),
        (r".*mlp\.(up|down)_proj", None, r"model\.layers\.\d\.mlp\.(up|down)_proj\.weight"),
        ("all-linear", ["o_proj", "layers.1"], r"model\.layers\.0\.(self_attn\.[qkv]_proj|mlp\.\w+_proj)\.weight"),
        (None, ["layers.1", "lm_head"], r"model\.(embed_tokens|norm|layers\.0\.\S+)\.weight"),
    ],
)
def test_target_and_exclude_modules_decide_where_entries_may_go(target_modules, exclude_modules, expected):
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        model = lazy_model(keep_ratio=0.01, target_modules=target_modules, exclude_modules=exclude_modules)
    assert not [w for w in caught if "no modules were excluded" in str(w.message)]  # PEFT sees the exclusions
    every = {name for name, _ in tiny_llama().named_parameters()}
    wanted = {name for name in every if re.fullmatch(expected, name)}
    assert wanted and slots(model) == wanted
    initialize_fish_mask(model, batches())
    chosen = model.peft_config["default"].sparse_parameters
    assert chosen and set(chosen) <= wanted
    assert sum(chosen.values()) == int(0.01 * sum(p.numel() for p in tiny_llama().parameters()))


def test_all_linear_leaves_the_output_layer_alone_and_the_head_goes_to_modules_to_save():
    model = lazy_model(target_modules="all-linear", modules_to_save=["lm_head"], keep_ratio=0.2)
    assert "lm_head" not in layer_names(model)
    head = model.base_model.model.lm_head
    initialize_fish_mask(model, batches())
    config = model.peft_config["default"]
    total = sum(p.numel() for p in tiny_llama().parameters())
    assert sum(config.sparse_parameters.values()) == int(total * 0.2) - head.original_module.weight.numel()


def test_training_or_saving_before_the_mask_exists_is_an_error_and_inference_is_the_base_model(tmp_path):
    model = lazy_model(target_modules="all-linear")
    x = example_inputs("llama", labels=False)
    model.eval()
    assert torch.equal(model(**x).logits, tiny_llama()(**x).logits)
    model.train()
    with torch.no_grad():
        model(**x)  # no gradients: nothing can train
    with pytest.raises(RuntimeError, match="no mask yet.*initialize_fish_mask.*FishMaskInitCallback"):
        model(**x)
    with pytest.raises(RuntimeError, match="Cannot save FISH adapter 'default'.*no mask yet"):
        model.save_pretrained(tmp_path)
    assert not (tmp_path / "adapter_model.safetensors").exists()


@pytest.mark.parametrize("keep_ratio", [0, -0.1, 1.5, float("nan")])
def test_a_keep_ratio_outside_0_1_is_refused_by_the_config(keep_ratio):
    with pytest.raises(ValueError, match="keep_ratio must be in"):
        FishConfig(keep_ratio=keep_ratio)


@pytest.mark.parametrize(
    "config, match",
    [
        (dict(keep_ratio=1e-6), "leaves 0 entries for the mask; raise keep_ratio"),
        (dict(keep_ratio=0.5, target_modules=["q_proj"]), "asks for 12,496 trainable entries, but the target modules hold only 2,048"),
        (dict(keep_ratio=0.01, target_modules=["query"]), "leaves no parameter of this model for the mask"),
        (dict(keep_ratio=0.01, modules_to_save=["lm_head"]), "once the head \\(modules_to_save\\) takes its 3,200"),
    ],
)
def test_a_budget_the_model_cannot_honour_is_refused_when_the_adapter_is_made(config, match):
    with pytest.raises(ValueError, match=match):
        get_peft_model(tiny_llama(), FishConfig(**config))


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(), "needs a mask or a keep_ratio"),
        (dict(keep_ratio=0.01, num_samples=0), "num_samples must be a positive integer"),
        (dict(keep_ratio=0.01, fisher="gold"), "fisher must be one of"),
        (dict(keep_ratio=0.01, target_modules=3), "target_modules must be None, a regex or a list"),
    ],
)
def test_config_errors(kwargs, match):
    with pytest.raises(ValueError, match=match):
        FishConfig(**kwargs)


def test_a_mask_together_with_a_keep_ratio_or_outside_target_modules_is_refused():
    mask = random_mask(tiny_llama(), 0.01, modules_to_save=None)
    with pytest.raises(ValueError, match="a mask or a keep_ratio"):
        FishConfig(mask=mask, keep_ratio=0.01)
    with pytest.raises(ValueError, match="outside target_modules=\\['q_proj'\\]"):
        get_peft_model(tiny_llama(), FishConfig(mask=mask, target_modules=["q_proj"]))


def test_an_empty_dataloader_or_a_second_initialization_is_an_error():
    model = lazy_model()
    with pytest.raises(ValueError, match="holds no examples"):
        initialize_fish_mask(model, torch.utils.data.DataLoader([]))
    with pytest.raises(ValueError, match="yielded no examples"):
        initialize_fish_mask(model, iter([]))
    assert model.peft_config["default"].awaits_mask
    initialize_fish_mask(model, batches())
    with pytest.raises(ValueError, match="already has its mask"):
        initialize_fish_mask(model, batches())


def test_fewer_examples_than_num_samples_use_them_all_with_a_warning():
    model = lazy_model(num_samples=1024)
    data = torch.utils.data.DataLoader([{k: v[i] for k, v in b.items()} for b in batches() for i in range(4)], batch_size=4)
    with pytest.warns(UserWarning, match="all 16 training examples"):
        mask = initialize_fish_mask(model, data)
    assert mask.info["num_samples"] == 16


def test_adapter_config_json_round_trip(tmp_path):
    model = lazy_model(target_modules=TARGETS, exclude_modules=["layers.1.self_attn.q_proj"], num_samples=8, fisher="expected")
    initialize_fish_mask(model, batches())
    model.save_pretrained(tmp_path)
    saved = json.loads((tmp_path / "adapter_config.json").read_text())
    assert saved["keep_ratio"] == 0.02 and saved["num_samples"] == 8 and saved["fisher"] == "expected"
    assert sorted(saved["target_modules"]) == sorted(TARGETS)
    assert saved["exclude_modules"] == ["layers.1.self_attn.q_proj"]
    assert "model.layers.1.self_attn.q_proj.weight" not in saved["sparse_parameters"]
    loaded = FishConfig.from_pretrained(tmp_path)
    config = model.peft_config["default"]
    for key in ("keep_ratio", "exclude_modules", "num_samples", "fisher", "sparse_parameters", "parameter_shapes", "mask_info"):
        assert getattr(loaded, key) == getattr(config, key), key
    assert set(loaded.target_modules) == set(config.target_modules) and not loaded.awaits_mask


def test_unwrapped_modules_are_plain_again_and_merging_touches_only_the_mask():
    model = lazy_model(target_modules="all-linear")
    initialize_fish_mask(model, batches())
    chosen = model.peft_config["default"].sparse_parameters
    base = model.base_model.model
    for name in ("model.layers.0.self_attn.q_proj", "model.layers.1.mlp.up_proj"):
        module = base.get_submodule(name)
        assert isinstance(module, FishLayer) == (f"{name}.weight" in chosen)
        if not isinstance(module, FishLayer):
            assert type(module) is nn.Linear
    train(model, adam(model), batches())
    before = dict(tiny_llama().named_parameters())
    merged = dict(model.merge_and_unload().named_parameters())
    for name, weight in merged.items():
        changed = (weight != before[name]).flatten().nonzero().flatten()
        allowed = model.peft_config["default"].mask[name] if name in chosen else torch.empty(0, dtype=torch.long)
        assert torch.isin(changed, allowed).all(), name
        if name in chosen:
            assert changed.numel() > 0.9 * chosen[name]
