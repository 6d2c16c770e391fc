"""save_pretrained / from_pretrained: only the sparse diff is written, read back bit for bit, and checked first."""

import copy
import json
import os

import pytest
import torch
from peft import PeftModel, get_peft_model
from safetensors.torch import load_file, save_file

import fish_peft  # noqa: F401  (registers FISH with PEFT)
from fish_peft import AdapterFileError, FishConfig, FishLayer, FishMask, random_mask
from tests.models import tiny_bert

WEIGHTS = "adapter_model.safetensors"


def trained_adapter(base, keep_ratio=0.2, seed=0, **config_kwargs):
    """A PEFT model whose sparse values and head are random (as if trained)."""
    model = get_peft_model(copy.deepcopy(base), FishConfig(mask=random_mask(base, keep_ratio, seed=seed), **config_kwargs))
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.copy_(torch.randn(p.shape, generator=g))
    return model.eval()


def inputs():
    return {"input_ids": torch.randint(1, 100, (3, 8), generator=torch.Generator().manual_seed(1))}


def fish_tensors(model):
    return {k: v for k, v in model.state_dict().items() if ".fish_" in k}


def test_round_trip_is_bit_identical_and_holds_only_the_diff(tmp_path):
    base = tiny_bert()
    model = trained_adapter(base)
    model.save_pretrained(tmp_path)
    assert sorted(os.listdir(tmp_path)) == ["README.md", "adapter_config.json", WEIGHTS]  # safetensors only, no pickle
    saved = load_file(tmp_path / WEIGHTS)
    k = sum(model.peft_config["default"].sparse_parameters.values())
    assert sorted(saved) == [
        "base_model.model.classifier.bias", "base_model.model.classifier.weight",
        "fish_packed.counts", "fish_packed.index_gap_overflow", "fish_packed.index_gaps", "fish_packed.values",
    ]
    config = model.peft_config["default"]
    assert saved["fish_packed.counts"].tolist() == [config.sparse_parameters[name] for name in sorted(config.sparse_parameters)]
    assert saved["fish_packed.values"].shape == saved["fish_packed.index_gaps"].shape == (k,)

    again = PeftModel.from_pretrained(copy.deepcopy(base), tmp_path)
    before, after = fish_tensors(model), fish_tensors(again)
    assert before.keys() == after.keys()
    assert all(torch.equal(before[k], after[k]) for k in before)
    assert torch.equal(model(**inputs()).logits, again(**inputs()).logits)


@pytest.mark.parametrize("save_dtype, max_bytes", [(None, 8), ("bfloat16", 6), ("float16", 6)])
def test_bytes_per_trainable_value(tmp_path, save_dtype, max_bytes):
    base = tiny_bert(hidden_size=64, intermediate_size=128)
    model = trained_adapter(base, keep_ratio=0.3, save_dtype=save_dtype)
    model.save_pretrained(tmp_path)
    trainable, _ = model.get_nb_trainable_parameters()
    assert os.path.getsize(tmp_path / WEIGHTS) / trainable <= max_bytes

    again = PeftModel.from_pretrained(copy.deepcopy(base), tmp_path)
    dtype = getattr(torch, save_dtype or "float32")
    assert load_file(tmp_path / WEIGHTS)["fish_packed.values"].dtype == dtype
    for key, value in fish_tensors(model).items():  # what was saved comes back exactly
        assert torch.equal(fish_tensors(again)[key], value.to(dtype).to(value.dtype) if value.is_floating_point() else value)


def test_several_adapters_save_and_load_by_name(tmp_path):
    base = tiny_bert()
    model = trained_adapter(base, seed=0)
    model.add_adapter("other", FishConfig(mask=random_mask(base, 0.1, seed=5)))
    model.save_pretrained(tmp_path)
    again = PeftModel.from_pretrained(copy.deepcopy(base), tmp_path)
    again.load_adapter(tmp_path / "other", adapter_name="other")
    again.set_adapter("other")
    model.set_adapter("other")
    assert torch.equal(model(**inputs()).logits, again(**inputs()).logits)


def tamper(path, edit):
    tensors = load_file(path / WEIGHTS)
    edit(tensors)
    save_file(tensors, path / WEIGHTS)


def _set(tensors, key, value):
    tensors[key] = value


def _gap(tensors, position, value):
    tensors["fish_packed.index_gaps"][position] = value


TAMPERINGS = {
    "index out of range": lambda t: _gap(t, 0, 60000),
    "index overflow out of range": lambda t: _set(t, "fish_packed.index_gap_overflow", torch.tensor([[0, 2**40]])),
    "duplicated index": lambda t: _gap(t, 1, 0),
    "float indices": lambda t: _set(t, "fish_packed.index_gaps", t["fish_packed.index_gaps"].float()),
    "int64 overflow table of wrong shape": lambda t: _set(t, "fish_packed.index_gap_overflow", torch.zeros(3, dtype=torch.long)),
    "count differs from config": lambda t: _set(t, "fish_packed.index_gaps", t["fish_packed.index_gaps"][:-1]),
    "values count differs": lambda t: _set(t, "fish_packed.values", t["fish_packed.values"][1:]),
    "integer values": lambda t: _set(t, "fish_packed.values", t["fish_packed.values"].long()),
    "NaN value": lambda t: t["fish_packed.values"].__setitem__(0, float("nan")),
    "inf value": lambda t: t["fish_packed.values"].__setitem__(-1, float("inf")),
    "missing tensor": lambda t: t.pop("fish_packed.values"),
    "unknown tensor": lambda t: _set(t, "base_model.model.bert.pooler.dense.extra", torch.zeros(2)),
}


@pytest.mark.parametrize("name", sorted(TAMPERINGS))
def test_tampered_adapter_is_refused_and_base_model_left_alone(tmp_path, name):
    base = tiny_bert()
    trained_adapter(base).save_pretrained(tmp_path)
    tamper(tmp_path, TAMPERINGS[name])
    fresh = copy.deepcopy(base)
    expected = fresh(**inputs()).logits
    with pytest.raises(AdapterFileError):
        PeftModel.from_pretrained(fresh, tmp_path)
    assert not any(isinstance(m, FishLayer) for m in fresh.modules())
    assert type(fresh.classifier) is torch.nn.Linear and not hasattr(fresh, "peft_config")
    assert all(p.requires_grad for p in fresh.parameters())
    assert torch.equal(fresh(**inputs()).logits, expected)


def test_tampered_second_adapter_is_refused_and_the_first_keeps_working(tmp_path):
    base = tiny_bert()
    first = trained_adapter(base, seed=0)
    trained_adapter(base, seed=1).save_pretrained(tmp_path)
    tamper(tmp_path, TAMPERINGS["duplicated index"])
    expected = first(**inputs()).logits
    with pytest.raises(AdapterFileError, match="strictly increasing"):
        first.load_adapter(tmp_path, adapter_name="second")
    assert list(first.peft_config) == ["default"]
    assert torch.equal(first(**inputs()).logits, expected)


def test_adapter_for_another_base_model_is_refused_before_any_change(tmp_path):
    trained_adapter(tiny_bert()).save_pretrained(tmp_path)
    other = tiny_bert(hidden_size=48)
    with pytest.raises(ValueError, match="shape"):
        PeftModel.from_pretrained(other, tmp_path)
    assert not any(isinstance(m, FishLayer) for m in other.modules())


def test_config_errors():
    with pytest.raises(ValueError, match="needs a mask"):
        FishConfig()
    with pytest.raises(TypeError, match="FishMask"):
        FishConfig(mask={"bert.pooler.dense.weight": torch.tensor([0])})
    with pytest.raises(ValueError, match="save_dtype"):
        FishConfig(mask=random_mask(tiny_bert(), 0.2), save_dtype="int8")
    alien = FishMask({"encoder.missing.weight": torch.tensor([0, 1])}, {"encoder.missing.weight": (4,)})
    with pytest.raises(ValueError, match="does not have"):
        get_peft_model(tiny_bert(), FishConfig(mask=alien))


def test_adapter_config_holds_counts_and_shapes_not_indices(tmp_path):
    model = trained_adapter(tiny_bert())
    model.save_pretrained(tmp_path)
    config = json.loads((tmp_path / "adapter_config.json").read_text())
    assert config["peft_type"] == "FISH"
    assert config["sparse_parameters"] == model.peft_config["default"].sparse_parameters
    assert "mask" not in config and config["modules_to_save"] == ["classifier"]


def test_a_file_with_another_mask_is_refused_by_an_adapter_already_in_the_model(tmp_path):
    """Loading into an existing adapter decodes the file with that adapter's counts; the counts stored in the file
    catch one whose per-parameter counts differ even when their total is the same."""
    base = tiny_bert()
    first = trained_adapter(base, seed=0)
    mask = random_mask(base, 0.2, seed=0)
    a, b = sorted(mask)[:2]
    free = (~mask.to_dense(b).flatten()).nonzero().flatten()[:1]
    indices = {**mask, a: mask[a][:-1], b: torch.cat([mask[b], free]).sort().values}  # same k, another split
    moved = FishMask(indices, mask.shapes, modules_to_save=mask.modules_to_save)
    assert moved.num_selected == mask.num_selected and moved.counts() != mask.counts()
    get_peft_model(copy.deepcopy(base), FishConfig(mask=moved)).save_pretrained(tmp_path)
    expected = first(**inputs()).logits
    with pytest.raises(AdapterFileError, match="another mask than adapter 'default'.*new adapter name"):
        first.load_adapter(tmp_path, adapter_name="default")
    assert list(first.peft_config) == ["default"]
    assert torch.equal(first(**inputs()).logits, expected)


def test_files_written_before_counts_were_stored_still_load(tmp_path):
    base = tiny_bert()
    model = trained_adapter(base)
    model.save_pretrained(tmp_path)
    tamper(tmp_path, lambda t: t.pop("fish_packed.counts"))
    loaded = PeftModel.from_pretrained(copy.deepcopy(base), tmp_path)
    assert torch.equal(loaded(**inputs()).logits, model(**inputs()).logits)
