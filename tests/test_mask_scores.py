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


def test_gradient_scores_use_the_mean_gradient_of_the_fishers_examples():
    bench, model, batches = load_benchmark(), tiny_bert(num_labels=3), classification_batches()
    examples = [{k: v[i : i + 1] for k, v in b.items()} for b in batches for i in range(len(b["labels"]))][:8]
    params = {n: p for n, p in model.named_parameters() if re.search(ELIGIBLE, n)}
    mean = {n: torch.zeros_like(p) for n, p in params.items()}
    for example in examples:  # the reference: one example at a time
        model.zero_grad()
        model(**example).loss.backward()
        for n, p in params.items():
            mean[n] += p.grad / 8
    expected = mask_from_scores(model, {n: g.square() for n, g in mean.items()}, 0.05, eligible=ELIGIBLE)
    assert score_mask(bench, "gradient", model, batches, 8).jaccard(expected) > 0.99  # float ties may differ
    library = compute_fisher_mask(model, batches, 0.05, 8, eligible=ELIGIBLE, score="gradient_snr")
    assert score_mask(bench, "gradient_snr", model, batches, 8).jaccard(library) == 1.0
