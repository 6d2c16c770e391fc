"""The Fisher of a completion-only causal-LM loss (labels -100 on the prompt and the padding, as TRL's SFTTrainer
collates them) is the Fisher of the model's own loss on each example alone: the per-example losses it squares the
gradients of equal `model(input_ids=row, attention_mask=row_mask, labels=row_labels).loss` one example at a time, the
vectorised scores equal a one-example-at-a-time loop over those losses, and the completion-only mask is not the mask
of a loss on every token."""

from __future__ import annotations

import pytest
import torch

from fish_peft import compute_fisher, compute_fisher_mask
from fish_peft.masks.losses import loss_kind, per_example_loss
from tests.models import VOCAB, tiny_llama

PAD = 0


def sft_batch(lengths: list[tuple[int, int]], seed: int = 0) -> dict:
    """A right-padded batch of (prompt length, completion length) examples: labels are the completion's tokens,
    -100 on the prompt and the padding."""
    g = torch.Generator().manual_seed(seed)
    width = max(p + c for p, c in lengths)
    input_ids = torch.full((len(lengths), width), PAD)
    attention_mask = torch.zeros(len(lengths), width, dtype=torch.long)
    labels = torch.full((len(lengths), width), -100)
    for row, (prompt, completion) in enumerate(lengths):
        tokens = torch.randint(3, VOCAB, (prompt + completion,), generator=g)
        input_ids[row, : prompt + completion] = tokens
        attention_mask[row, : prompt + completion] = 1
        labels[row, prompt : prompt + completion] = tokens[prompt:]
    return {"input_ids": input_ids, "attention_mask": attention_mask, "labels": labels}


BATCHES = [sft_batch([(3, 4), (5, 2), (2, 6)], seed=0), sft_batch([(4, 3), (6, 1)], seed=1)]


def rows(batch: dict, trim: bool):
    """Each example of `batch` alone: with the batch's padding, or (`trim`) only its own tokens."""
    for i in range(batch["input_ids"].shape[0]):
        length = int(batch["attention_mask"][i].sum()) if trim else batch["input_ids"].shape[1]
        yield {key: value[i : i + 1, :length] for key, value in batch.items()}


def every_token(batch: dict) -> dict:
    """The same batch with labels on every real token (prompt included), -100 on the padding only."""
    return {**batch, "labels": batch["input_ids"].masked_fill(batch["attention_mask"] == 0, -100)}


@pytest.fixture
def model():
    return tiny_llama()


@pytest.mark.parametrize("trim", [False, True], ids=["padded-row", "own-tokens"])
def test_the_fishers_per_example_losses_are_the_models_own_loss_on_each_example(model, trim):
    for batch in BATCHES:
        assert (batch["labels"] == -100).any(1).all() and (batch["labels"] != -100).any(1).all()
        with torch.no_grad():
            logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
            assert loss_kind(model, logits, batch["labels"]) == "causal_lm"
            ours = per_example_loss("causal_lm", logits, batch["labels"])
            own = torch.stack([
                model(input_ids=r["input_ids"], attention_mask=r["attention_mask"], labels=r["labels"]).loss
                for r in rows(batch, trim)
            ])
        torch.testing.assert_close(ours, own, rtol=1e-5, atol=1e-6)
        # and it is the completion's loss alone: the prompt's tokens count for nothing
        with torch.no_grad():
            whole = per_example_loss("causal_lm", logits, every_token(batch)["labels"])
        assert not torch.allclose(ours, whole)


def one_example_at_a_time(model, batches) -> dict[str, torch.Tensor]:
    """Σ over examples of the squared gradient of the model's own loss on that example alone (its own tokens)."""
    params = dict(model.named_parameters())
    scores = {name: torch.zeros_like(p) for name, p in params.items()}
    for batch in batches:
        for example in rows(batch, trim=True):
            model.zero_grad()
            model(**example).loss.backward()
            for name, p in params.items():
                scores[name] += p.grad.pow(2)
    model.zero_grad()
    return scores


@pytest.mark.parametrize("chunk_size", [16, 2])
def test_the_vectorised_fisher_equals_the_loop_over_the_models_own_loss(model, chunk_size):
    expected = one_example_at_a_time(model, BATCHES)
    for vectorized in (True, False):
        scores = compute_fisher(model, BATCHES, num_samples=5, chunk_size=chunk_size, vectorized=vectorized)
        assert scores.keys() == expected.keys()
        for name, score in scores.items():
            scale = float(expected[name].abs().max())
            torch.testing.assert_close(score, expected[name], rtol=1e-4, atol=1e-6 * scale + 1e-12, msg=name)
    assert all(float(s.sum()) > 0 for n, s in expected.items() if "embed_tokens" not in n)


def test_a_completion_only_mask_differs_from_a_mask_over_every_token(model):
    completion = compute_fisher_mask(model, BATCHES, keep_ratio=0.01, num_samples=5, modules_to_save=None)
    whole = compute_fisher_mask(model, [every_token(b) for b in BATCHES], keep_ratio=0.01, num_samples=5, modules_to_save=None)
    assert completion.num_selected == whole.num_selected
    assert completion.digest() != whole.digest()
    assert completion.jaccard(whole) < 0.9
