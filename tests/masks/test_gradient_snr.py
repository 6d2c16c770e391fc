"""The summed gradients beside the Fisher equal a one-example loop, and score='gradient_snr' ranks by (Σg)² / Σg²
across the library: compute_fisher_mask, FishConfig(keep_ratio=...), the recipe key."""

import pytest
import torch

from peft import get_peft_model

from fish_peft import FishConfig, compute_fisher, compute_fisher_mask, initialize_fish_mask
from fish_peft.masks.selection import gradient_snr, mask_from_scores
from tests.masks.test_fisher import BatchMixingModel, LeakyModel, assert_scores_close, classification_batches, lm_batches, reference_fisher
from tests.models import tiny_bert, tiny_gpt2, tiny_llama


def reference_sums(model, batches):
    """Σ_examples ∂ loss_i / ∂θ, one example at a time, with the model's own `.loss`."""
    model.eval()
    sums = {n: torch.zeros_like(p) for n, p in model.named_parameters()}
    for batch in batches:
        for i in range(batch["labels"].shape[0]):
            model.zero_grad()
            model(**{k: v[i : i + 1] for k, v in batch.items()}).loss.backward()
            for n, p in model.named_parameters():
                if p.grad is not None:
                    sums[n] += p.grad
    return sums


def assert_sums_close(sums, reference):
    """Close relative to each parameter's largest sum, or to the largest of all where a sum is only rounding noise
    (an attention key's bias has no gradient: softmax ignores what it adds to every score)."""
    assert set(sums) == set(reference)
    largest = max(ref.abs().max() for ref in reference.values())
    for name, ref in reference.items():
        err = (sums[name] - ref).abs().max()
        assert err <= 1e-4 * ref.abs().max() + 1e-6 * largest, f"{name}: error {err:.2e}, largest sum {ref.abs().max():.2e}"


@pytest.mark.parametrize(
    "build, batches",
    [(lambda: tiny_bert(num_labels=3), classification_batches()), (tiny_gpt2, lm_batches()), (tiny_llama, lm_batches())],
    ids=["bert: Linear, Embedding, LayerNorm", "gpt2: Conv1D", "llama: RMSNorm through vmap"],
)
def test_gradient_sums_equal_one_example_loop_and_leave_the_fisher_unchanged(build, batches):
    model = build()
    n = sum(b["labels"].shape[0] for b in batches)
    scores, sums = compute_fisher(model, batches, num_samples=n, chunk_size=3, gradient_sums=True)
    assert_scores_close(scores, reference_fisher(model, batches))
    assert_sums_close(sums, reference_sums(model, batches))


@pytest.mark.parametrize("model_cls", [LeakyModel, BatchMixingModel])
def test_gradient_sums_of_parameters_scored_by_the_loop(model_cls):
    torch.manual_seed(0)
    model = model_cls()
    batches = [{"x": torch.randn(6, 4), "labels": torch.randint(0, 3, (6,))} for _ in range(2)]
    with pytest.warns(UserWarning, match="one example at a time"):
        _, sums = compute_fisher(model, batches, num_samples=12, chunk_size=3, gradient_sums=True)
    assert_sums_close(sums, reference_sums(model, batches))


def test_gradient_snr_mask_ranks_by_squared_sum_over_sum_of_squares():
    model, batches = tiny_bert(num_labels=3), classification_batches()
    squares, sums = reference_fisher(model, batches), reference_sums(model, batches)
    floor = 1e-10 * max(s.max() for s in squares.values())  # key biases: rounding noise only
    expected = mask_from_scores(model, {n: gradient_snr(squares[n], sums[n], floor) for n in squares}, 0.05)
    mask = compute_fisher_mask(model, batches, 0.05, num_samples=10, score="gradient_snr")
    assert mask.jaccard(expected) > 0.99 and mask.info["score"] == "gradient_snr"  # float ties may fall either way
    assert mask.jaccard(compute_fisher_mask(model, batches, 0.05, num_samples=10)) < 0.9  # another ranking
    assert gradient_snr(torch.zeros(3), torch.zeros(3)).tolist() == [0, 0, 0]  # no example moves it: 0, not NaN


def test_gradient_snr_refuses_the_expected_fisher_and_unknown_scores():
    model, batches = tiny_bert(num_labels=3), classification_batches()
    with pytest.raises(ValueError, match="gold labels: use it with fisher='empirical'"):
        compute_fisher_mask(model, batches, 0.05, num_samples=4, score="gradient_snr", fisher="expected")
    with pytest.raises(ValueError, match="score must be one of"):
        compute_fisher_mask(model, batches, 0.05, num_samples=4, score="magnitude")
    with pytest.raises(ValueError, match="fisher='empirical'"):
        FishConfig(keep_ratio=0.05, score="gradient_snr", fisher="expected")
    with pytest.raises(ValueError, match="score must be one of"):
        FishConfig(keep_ratio=0.05, score="snr")


def test_keep_ratio_config_with_gradient_snr_initializes_that_mask():
    batches = classification_batches()
    config = FishConfig(keep_ratio=0.05, score="gradient_snr", num_samples=10, task_type="SEQ_CLS")
    model = get_peft_model(tiny_bert(num_labels=3), config)
    mask = initialize_fish_mask(model, batches)
    assert mask.info["score"] == "gradient_snr"
    direct = compute_fisher_mask(tiny_bert(num_labels=3), batches, 0.05, num_samples=10, score="gradient_snr")
    assert mask.jaccard(direct) > 0.99
