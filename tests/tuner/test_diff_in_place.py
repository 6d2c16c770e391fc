"""A weight diff written into the weight for one call without gradients: outputs equal W + Δ's, the weight is
bit for bit W again afterwards (after an error too), and the path is taken only where it is exact."""

import copy

import pytest
import torch
from peft import get_peft_model
from torch import nn

from fish_peft import FishConfig, random_mask
from fish_peft.tuner import layer as layer_module, transient_weight
from fish_peft.tuner.diff_in_place import diff_in_place
from tests.models import example_inputs, tiny_gpt2, tiny_llama


def test_the_weight_holds_w_plus_delta_inside_and_exactly_w_after_even_after_an_error():
    torch.manual_seed(0)
    weight = torch.randn(8, 8)
    original = weight.clone()
    first, second = torch.tensor([1, 5, 9], dtype=torch.int32), torch.tensor([5, 20], dtype=torch.int32)
    a, b = torch.tensor([1e-7, 0.5, -2.0]), torch.tensor([3.0, 1.0])
    expected = original.reshape(-1).index_add(0, first, a).index_add(0, second, b).view(8, 8)
    with diff_in_place(weight, [(a, first), (b, second)]):
        assert torch.equal(weight, expected)
    assert torch.equal(weight, original)  # written back, not subtracted: 1e-7 + W - 1e-7 would not be W
    with pytest.raises(RuntimeError, match="boom"):
        with diff_in_place(weight, [(a, first)]):
            raise RuntimeError("boom")
    assert torch.equal(weight, original)



def test_the_entries_kept_by_one_call_write_the_same_weight_in_a_later_call():
    """The backward's product reuses the forward's kept entries, overlapping entry sets included."""
    torch.manual_seed(0)
    weight = torch.randn(8, 8)
    original = weight.clone()
    sets = [(torch.randn(3), torch.tensor([1, 5, 9], dtype=torch.int32)), (torch.randn(2), torch.tensor([5, 20]))]
    with diff_in_place(weight, sets) as kept:
        first = weight.clone()
    after_first_set = original.view(-1).index_add(0, sets[0][1], sets[0][0])
    assert torch.equal(kept[0], original.view(-1)[[1, 5, 9]]) and torch.equal(kept[1], after_first_set[[5, 20]])
    with diff_in_place(weight, sets, kept):
        assert torch.equal(weight, first)
    assert torch.equal(weight, original)

@pytest.mark.parametrize("build", [tiny_llama, tiny_gpt2])
def test_calls_without_gradients_equal_w_plus_delta_and_leave_the_base_untouched(build, monkeypatch):
    monkeypatch.setattr(transient_weight, "DENSE_PRODUCT_MIN_TOKENS", {True: 0, False: 0})  # every Linear/Conv1D call in place
    base = build()
    mask = random_mask(base, 0.1, seed=0)
    reference = copy.deepcopy(base)
    peft_model = get_peft_model(base, FishConfig(mask=mask, init_weights=False)).eval()
    with torch.no_grad():
        for name, idx in mask.items():
            owner, _, attr = name.rpartition(".")
            values = peft_model.base_model.model.get_submodule(owner).fish_values["default"][attr]
            reference.get_parameter(name).view(-1)[idx] += values
    before = {k: v.clone() for k, v in peft_model.base_model.model.state_dict().items()}
    inputs = example_inputs("llama" if build is tiny_llama else "gpt2", labels=False)
    with torch.no_grad():
        out = peft_model.generate(inputs["input_ids"], max_new_tokens=5, do_sample=False, min_new_tokens=5)
        expected = reference.generate(inputs["input_ids"], max_new_tokens=5, do_sample=False, min_new_tokens=5)
        torch.testing.assert_close(peft_model(**inputs).logits, reference(**inputs).logits)
    assert torch.equal(out, expected)
    after = peft_model.base_model.model.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)


def test_taken_without_gradients_and_with_many_tokens_only(monkeypatch):
    model = nn.Sequential(nn.Linear(16, 16))
    peft_model = get_peft_model(model, FishConfig(mask=random_mask(model, 0.05, modules_to_save=[], eligible=r"weight$")))
    calls, original = [], layer_module.diff_in_place
    monkeypatch.setattr(layer_module, "diff_in_place", lambda *a: calls.append(1) or original(*a))
    many, one = torch.randn(64, 16), torch.randn(1, 16)  # 64 tokens x 12 entries > half of 256 weights; 1 x 12 not
    peft_model(many)
    with torch.no_grad():
        peft_model(one)
        assert not calls
        peft_model(many)
        assert len(calls) == 1
