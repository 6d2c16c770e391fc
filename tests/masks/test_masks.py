"""Mask selection: the paper's budget, global top-k, per-module quotas, baselines, determinism, FishMask itself."""

import pytest
import torch

from fish_peft import FishMask, compute_fisher, compute_fisher_mask, magnitude_mask, random_mask
from fish_peft.masks.selection import select_top_k
from tests.models import tiny_bert
from tests.masks.test_fisher import classification_batches


def head_size(model):
    return sum(p.numel() for p in model.classifier.parameters())


def total_size(model):
    return sum(p.numel() for p in model.parameters())


def assert_is_top_k(mask, scores, model):
    """Every selected entry scores at least as high as every unselected eligible entry."""
    eligible = [n for n, _ in model.named_parameters() if not n.startswith("classifier")]
    flat = torch.cat([scores[n].flatten() for n in eligible])
    chosen = torch.cat([mask.to_dense(n).flatten() if n in mask else torch.zeros(scores[n].numel(), dtype=torch.bool) for n in eligible])
    assert chosen.sum() == mask.num_selected
    assert flat[chosen].min() >= flat[~chosen].max()


def test_fisher_mask_is_the_global_top_k_of_the_fisher_under_the_paper_budget():
    model = tiny_bert(num_labels=3)
    batches = classification_batches()
    mask = compute_fisher_mask(model, batches, keep_ratio=0.02, num_samples=10)
    k = int(total_size(model) * 0.02) - head_size(model)
    assert mask.num_selected == k
    assert mask.modules_to_save == ("classifier",)
    assert not any(name.startswith("classifier") for name in mask)

    assert_is_top_k(mask, compute_fisher(model, batches, num_samples=10), model)


def test_mask_is_a_mapping_of_sorted_int64_flat_indices_named_like_named_parameters():
    model = tiny_bert(num_labels=3)
    mask = random_mask(model, keep_ratio=0.1, seed=0)
    params = dict(model.named_parameters())
    assert set(mask) <= set(params)
    for name, idx in mask.items():
        assert idx.dtype == torch.int64 and idx.dim() == 1
        assert torch.all(idx[1:] > idx[:-1]) and idx[-1] < params[name].numel()
    # every kind of parameter is eligible: embeddings, LayerNorm, biases
    assert any("embeddings" in n for n in mask) and any("LayerNorm" in n for n in mask) and any(n.endswith("bias") for n in mask)
    rows = {row["parameter"]: row for row in mask.report()}
    name = next(iter(mask))
    assert rows[name]["selected"] == mask[name].numel()
    assert rows[name]["density"] == pytest.approx(mask[name].numel() / params[name].numel())


def test_per_module_selection_gives_each_parameter_its_share():
    model = tiny_bert(num_labels=3)
    mask = magnitude_mask(model, keep_ratio=0.1, selection="per_module")
    k = int(total_size(model) * 0.1) - head_size(model)
    assert mask.num_selected == k
    for name, p in model.named_parameters():
        if not name.startswith("classifier"):
            share = p.numel() * k / (total_size(model) - head_size(model))
            assert abs(mask.counts().get(name, 0) - share) < 1


def test_magnitude_mask_takes_the_largest_weights():
    model = tiny_bert(num_labels=3)
    mask = magnitude_mask(model, keep_ratio=0.05)
    assert_is_top_k(mask, {n: p.detach().abs() for n, p in model.named_parameters()}, model)


def test_same_inputs_give_the_same_mask():
    model = tiny_bert(num_labels=3)
    batches = classification_batches()
    a = compute_fisher_mask(model, batches, keep_ratio=0.05, num_samples=10)
    b = compute_fisher_mask(model, batches, keep_ratio=0.05, num_samples=10)
    assert a.jaccard(b) == 1.0
    assert random_mask(model, 0.05, seed=3).jaccard(random_mask(model, 0.05, seed=3)) == 1.0
    assert random_mask(model, 0.05, seed=3).jaccard(random_mask(model, 0.05, seed=4)) < 0.5


def test_ties_go_to_the_lowest_index():
    scores = {"a": torch.ones(5), "b": torch.tensor([2.0, 1.0, 1.0])}
    assert select_top_k(scores, 3)["a"].tolist() == [0, 1] and select_top_k(scores, 3)["b"].tolist() == [0]


def test_mask_saves_and_loads(tmp_path):
    mask = random_mask(tiny_bert(num_labels=3), keep_ratio=0.05, seed=1)
    mask.save(str(tmp_path / "mask.safetensors"))
    again = FishMask.load(str(tmp_path / "mask.safetensors"))
    assert again.jaccard(mask) == 1.0 and again.shapes == mask.shapes
    assert again.modules_to_save == mask.modules_to_save and again.info == mask.info


@pytest.mark.parametrize("ratio, error", [(0, ValueError), (1.5, ValueError), (-0.1, ValueError), ("0.1", TypeError), (True, TypeError)])
def test_bad_keep_ratio(ratio, error):
    with pytest.raises(error, match="keep_ratio"):
        random_mask(tiny_bert(num_labels=3), keep_ratio=ratio)


def test_keep_ratio_too_small_for_the_head():
    with pytest.raises(ValueError, match="head"):
        random_mask(tiny_bert(num_labels=3), keep_ratio=0.001)


def test_fish_mask_rejects_bad_indices():
    with pytest.raises(ValueError, match="sorted and unique"):
        FishMask({"w": torch.tensor([3, 1])}, {"w": (4,)})
    with pytest.raises(ValueError, match=r"\[0, 4\)"):
        FishMask({"w": torch.tensor([1, 4])}, {"w": (4,)})
    with pytest.raises(TypeError, match="int32/int64"):
        FishMask({"w": torch.tensor([1.0])}, {"w": (4,)})


def test_masks_of_an_already_wrapped_model_use_base_model_names():
    from peft import get_peft_model

    from fish_peft import FishConfig

    base = tiny_bert(num_labels=3)
    expected = random_mask(base, 0.05, seed=2)
    wrapped = get_peft_model(tiny_bert(num_labels=3), FishConfig(mask=random_mask(base, 0.05, seed=1)))
    again = random_mask(wrapped, 0.05, seed=2)
    assert set(again) == set(expected) and again.jaccard(expected) == 1.0
    batches = classification_batches()
    fisher_on_wrapped = compute_fisher_mask(wrapped, batches, keep_ratio=0.05, num_samples=10)
    assert fisher_on_wrapped.jaccard(compute_fisher_mask(base, batches, keep_ratio=0.05, num_samples=10)) == 1.0
    wrapped.add_adapter("second", FishConfig(mask=again))  # a second adapter from a mask of the wrapped model
    assert "second" in wrapped.peft_config
