"""The recipe's `score` reaches the training command's mask: `score: gradient_snr` ranks by the gradient's
signal-to-noise ratio over the examples the Fisher is scored on."""

from transformers import default_data_collator

from fish_peft.cli.recipe import load_recipe
from fish_peft.cli.training import fisher_loader, method_mask
from fish_peft.masks.selection import compute_fisher_mask
from tests.cli.test_recipes import RECIPES
from tests.masks.test_fisher import classification_batches
from tests.models import tiny_bert


def test_score_key_ranks_the_fish_mask_by_gradient_snr():
    examples = [{k: v[i] for k, v in batch.items()} for batch in classification_batches() for i in range(5)]
    overrides = {"score": "gradient_snr", "num_samples": "10", "keep_ratio": "0.05", "batch_size": "5"}
    recipe = load_recipe(RECIPES / "glue" / "sst2.yaml", overrides)
    model = tiny_bert(num_labels=3)
    mask = method_mask(recipe, model, examples, default_data_collator)
    assert mask.info["score"] == "gradient_snr"
    loader = fisher_loader(recipe, examples, default_data_collator)
    expected = compute_fisher_mask(model, loader, 0.05, 10, score="gradient_snr")
    assert mask.jaccard(expected) > 0.99 and mask.jaccard(compute_fisher_mask(model, loader, 0.05, 10)) < 0.9
