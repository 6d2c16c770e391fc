"""benchmarks/mask_scores.py: its `fisher` score gives the recipe's own mask, and the gradient scores are the mean
gradient of the same examples the Fisher used (checked against a one-example-at-a-time loop)."""

import importlib.util
import re
from pathlib import Path

import torch

from fish_peft.masks.selection import compute_fisher_mask, mask_from_scores
from tests.masks.test_fisher import classification_batches
from tests.models import tiny_bert

ELIGIBLE = r"encoder.*(query|value|dense)\.weight$"


def load_benchmark():
    path = Path(__file__).parent.parent / "benchmarks" / "mask_scores.py"
    spec = importlib.util.spec_from_file_location("mask_scores", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def score_mask(bench, score, model, batches, num_samples):
    spreads = {}
    mask = bench.masks_scored_by(score, spreads)(
        model, batches, 0.05, num_samples, selection="global", eligible=ELIGIBLE, fisher="empirical"
    )
    assert 0 < spreads[score]["top3_share"] <= 1 and 0 < spreads[score]["mean_column_cover"] <= 1
    return mask


def test_fisher_score_is_the_recipes_own_mask():
    bench, model, batches = load_benchmark(), tiny_bert(num_labels=3), classification_batches()
    ours = score_mask(bench, "fisher", model, batches, 8)
    theirs = compute_fisher_mask(model, batches, 0.05, 8, eligible=ELIGIBLE)
    assert ours.jaccard(theirs) == 1.0


def test_gradient_snr_ranks_by_the_mean_gradient_over_the_mean_square():
    bench, model, batches = load_benchmark(), tiny_bert(num_labels=3), classification_batches()
    examples = [{k: v[i : i + 1] for k, v in b.items()} for b in batches for i in range(len(b["labels"]))][:8]
    params = {n: p for n, p in model.named_parameters() if re.search(ELIGIBLE, n)}
    first, second = ({n: torch.zeros_like(p) for n, p in params.items()} for _ in range(2))
    for example in examples:  # the reference: one example at a time
        model.zero_grad()
        model(**example).loss.backward()
        for n, p in params.items():
            first[n] += p.grad / 8
            second[n] += p.grad.square() / 8
    mean = bench.mean_gradient(model, bench.first_examples(batches, 8), params)
    for n in params:
        torch.testing.assert_close(mean[n], first[n], rtol=1e-4, atol=1e-7)
    reference = {n: first[n].square() / second[n].clamp_min(1e-30) for n in params}
    expected = mask_from_scores(model, reference, 0.05, eligible=ELIGIBLE)
    assert score_mask(bench, "gradient_snr", model, batches, 8).jaccard(expected) > 0.99  # float ties may differ
