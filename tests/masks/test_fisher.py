"""The vectorised Fisher equals a plain one-example-at-a-time loop over `model(**example).loss`."""

import pytest
import torch
from torch import nn

from fish_peft import compute_fisher
from fish_peft.masks import fisher_scorer
from fish_peft.masks import per_example, sampled_gradients
from tests.models import tiny_bert, tiny_gpt2, tiny_llama, tiny_t5


def reference_fisher(model, batches, weights_by_class=False):
    """Σ_examples (∂ loss_i / ∂θ)², one example at a time, with the model's own `.loss`."""
    model.eval()
    scores = {n: torch.zeros_like(p) for n, p in model.named_parameters()}
    for batch in batches:
        for i in range(batch["labels"].shape[0]):
            example = {k: v[i : i + 1] for k, v in batch.items()}
            label_weights = [(example["labels"], 1.0)]
            if weights_by_class:
                with torch.no_grad():
                    probs = torch.softmax(model(**{k: v for k, v in example.items() if k != "labels"}).logits, -1)[0]
                label_weights = [(torch.tensor([c]), probs[c].item()) for c in range(probs.numel())]
            for labels, weight in label_weights:
                model.zero_grad()
                model(**{**example, "labels": labels}).loss.backward()
                for n, p in model.named_parameters():
                    if p.grad is not None:
                        scores[n] += weight * p.grad**2
    return scores


def assert_scores_close(scores, reference):
    assert set(scores) == set(reference)
    for name, ref in reference.items():
        scale = ref.abs().max().clamp(min=1e-12)
        err = ((scores[name] - ref).abs().max() / scale).item()
        assert err < 1e-4, f"{name}: relative error {err:.2e}"


def classification_batches(vocab=100, num_labels=3, regression=False, seed=0):
    g = torch.Generator().manual_seed(seed)
    batches = []
    for _ in range(2):
        ids = torch.randint(1, vocab, (5, 9), generator=g)
        mask = torch.ones_like(ids)
        mask[0, 6:] = 0  # padding must not leak into the per-example gradients
        labels = torch.randn(5, generator=g) if regression else torch.randint(0, num_labels, (5,), generator=g)
        batches.append({"input_ids": ids, "attention_mask": mask, "labels": labels})
    return batches


def lm_batches(vocab=100, seed=0):
    g = torch.Generator().manual_seed(seed)
    batches = []
    for _ in range(2):
        ids = torch.randint(0, vocab, (4, 10), generator=g)
        labels = ids.clone()
        labels[1, :3] = -100  # ignored positions
        batches.append({"input_ids": ids, "labels": labels})
    return batches


@pytest.mark.parametrize(
    "build, batches",
    [
        (lambda: tiny_bert(num_labels=3), classification_batches()),
        (lambda: tiny_bert(num_labels=1), classification_batches(regression=True)),
        (tiny_gpt2, lm_batches()),
        (tiny_llama, lm_batches()),
        (tiny_t5, lm_batches()),
    ],
    ids=["bert-classification", "bert-regression", "gpt2-lm", "llama-lm", "t5-seq2seq"],
)
def test_vectorised_fisher_equals_one_example_loop(build, batches):
    model = build()
    scores = compute_fisher(model, batches, num_samples=sum(b["labels"].shape[0] for b in batches), chunk_size=3)
    assert_scores_close(scores, reference_fisher(model, batches))


def test_expected_fisher_weights_each_class_by_the_model_probability():
    model = tiny_bert(num_labels=3)
    batches = classification_batches()
    scores = compute_fisher(model, batches, num_samples=10, fisher="expected")
    assert_scores_close(scores, reference_fisher(model, batches, weights_by_class=True))


def test_sampled_expected_fisher_is_seeded():
    model = tiny_gpt2()
    batches = lm_batches()
    a = compute_fisher(model, batches, num_samples=8, fisher="expected", seed=1)
    b = compute_fisher(model, batches, num_samples=8, fisher="expected", seed=1)
    empirical = compute_fisher(model, batches, num_samples=8)
    assert all(torch.equal(a[n], b[n]) for n in a)
    assert any(not torch.allclose(a[n], empirical[n]) for n in a)


def test_chunk_size_and_num_samples():
    model = tiny_bert(num_labels=3)
    batches = classification_batches()
    whole = compute_fisher(model, batches, num_samples=7, chunk_size=16)
    pieces = compute_fisher(model, batches, num_samples=7, chunk_size=1)
    first_seven = [batches[0], {k: v[:2] for k, v in batches[1].items()}]
    assert_scores_close(whole, reference_fisher(model, first_seven))
    assert_scores_close(pieces, whole)


class LeakyModel(nn.Module):
    """Uses `a.weight` outside `a`'s own forward, which forward hooks cannot see."""

    def __init__(self):
        super().__init__()
        self.a = nn.Linear(4, 4)
        self.b = nn.Linear(4, 3)

    def forward(self, x, labels=None):
        hidden = torch.tanh(self.a(x) + x @ self.a.weight.T)
        logits = self.b(hidden)
        loss = nn.functional.cross_entropy(logits, labels) if labels is not None else None
        return type("Output", (), {"logits": logits, "loss": loss})()


class BatchMixingModel(LeakyModel):
    """Mixes examples after `a` (centres over the batch), so one backward cannot separate their gradients."""

    def forward(self, x, labels=None):
        hidden = self.a(x)
        logits = self.b(torch.tanh(hidden - hidden.mean(0, keepdim=True) + x))
        loss = nn.functional.cross_entropy(logits, labels) if labels is not None else None
        return type("Output", (), {"logits": logits, "loss": loss})()


@pytest.mark.parametrize("model_cls", [LeakyModel, BatchMixingModel])
def test_parameters_hooks_cannot_score_fall_back_to_the_loop(model_cls):
    torch.manual_seed(0)
    model = model_cls()
    batches = [{"x": torch.randn(6, 4), "labels": torch.randint(0, 3, (6,))} for _ in range(2)]
    with pytest.warns(UserWarning, match="one example at a time"):
        scores = compute_fisher(model, batches, num_samples=12, chunk_size=3)
    assert_scores_close(scores, reference_fisher(model, batches))


def test_fisher_leaves_model_state_as_it_was():
    model = tiny_bert(num_labels=3).train()
    model.bert.embeddings.word_embeddings.weight.requires_grad_(False)
    compute_fisher(model, classification_batches(), num_samples=4)
    assert model.training
    assert not model.bert.embeddings.word_embeddings.weight.requires_grad
    assert all(p.grad is None for p in model.parameters())


def test_bad_inputs_get_clear_errors():
    model = tiny_bert(num_labels=3)
    batches = classification_batches()
    loader = torch.utils.data.DataLoader(
        [{"input_ids": torch.ones(4, dtype=torch.long), "labels": torch.tensor(0)}] * 3, batch_size=2
    )
    with pytest.raises(ValueError, match="holds only 3 examples"):
        compute_fisher(model, loader, num_samples=4)
    with pytest.raises(ValueError, match="yielded only 10 examples"):
        compute_fisher(model, iter(batches), num_samples=11)
    with pytest.raises(ValueError, match="no examples"):
        compute_fisher(model, [], num_samples=1)
    with pytest.raises(ValueError, match="labels"):
        compute_fisher(model, [{"input_ids": batches[0]["input_ids"]}], num_samples=1)
    with pytest.raises(ValueError, match="positive integer"):
        compute_fisher(model, batches, num_samples=0)
    with pytest.raises(ValueError, match="fisher must be"):
        compute_fisher(model, batches, num_samples=2, fisher="diagonal")
    with torch.no_grad():
        model.classifier.weight.fill_(float("nan"))
    with pytest.raises(ValueError, match="NaN/inf for example 0"):
        compute_fisher(model, batches, num_samples=2)


class WideLeakyModel(LeakyModel):
    """`a` has more entries than the self-check compares, and its weight is used outside its own forward."""

    def __init__(self):
        nn.Module.__init__(self)
        self.a = nn.Linear(48, 48)
        self.b = nn.Linear(48, 3)


def test_the_self_check_compares_a_bounded_sample_yet_catches_a_leaky_parameter(monkeypatch):
    monkeypatch.setattr(sampled_gradients, "MAX_ENTRIES", 64)
    compared = {}
    real = fisher_scorer.squared_gradients_at

    def spy(params, entries, losses):
        compared.update({name: idx.numel() for name, idx in entries.items()})
        return real(params, entries, losses)

    monkeypatch.setattr(fisher_scorer, "squared_gradients_at", spy)
    torch.manual_seed(0)
    model = WideLeakyModel()
    batches = [{"x": torch.randn(6, 48), "labels": torch.randint(0, 3, (6,))} for _ in range(2)]
    with pytest.warns(UserWarning, match="1 parameter.*a.weight"):
        scores = compute_fisher(model, batches, num_samples=12, chunk_size=5)
    assert compared["a.weight"] <= 64 < model.a.weight.numel()
    assert_scores_close(scores, reference_fisher(model, batches))


def test_the_self_check_catches_a_wrong_vectorised_rule(monkeypatch):
    monkeypatch.setattr(sampled_gradients, "MAX_ENTRIES", 64)
    right = per_example._linear

    def wrong(module, attr, args, kwargs, delta):
        return right(module, attr, args, kwargs, delta * 1.1)

    monkeypatch.setattr(per_example, "_linear", wrong)
    model = tiny_llama()
    batches = lm_batches()
    with pytest.warns(UserWarning, match="lm_head.weight, model.layers.0.mlp.down_proj.weight"):
        scores = compute_fisher(model, batches, num_samples=8, chunk_size=3)
    reference = reference_fisher(model, batches)
    largest = max(r.max() for r in reference.values())
    # caught wherever the error exceeds the check's tolerance (1e-3 of the parameter's largest score + 1e-5 of the
    # model's): here every parameter but attention queries and keys, whose scores are ~1e-5 of the largest
    kept = {name for name, r in reference.items() if r.max() > 1e-4 * largest}
    assert_scores_close({n: scores[n] for n in kept}, {n: reference[n] for n in kept})


@pytest.mark.parametrize("fisher", ["empirical", "expected"])
def test_scores_kept_in_bfloat16_or_on_another_device(fisher):
    model = tiny_bert(num_labels=3)
    batches = classification_batches()
    full = compute_fisher(model, batches, num_samples=10, fisher=fisher, chunk_size=3)
    half = compute_fisher(
        model, batches, num_samples=10, fisher=fisher, chunk_size=3, score_dtype=torch.bfloat16, score_device="cpu"
    )
    for name, score in full.items():
        assert half[name].dtype == torch.bfloat16 and half[name].device.type == "cpu"
        assert torch.allclose(half[name].float(), score, rtol=2e-2, atol=1e-12)
    with pytest.raises(ValueError, match="score_dtype"):
        compute_fisher(model, batches, num_samples=2, score_dtype=torch.int8)


def test_large_per_example_gradients_are_built_a_block_of_rows_at_a_time(monkeypatch):
    monkeypatch.setattr(per_example, "GRADIENT_BLOCK", 100)  # 3 rows of a 32-column weight at a time
    model = tiny_llama()
    batches = lm_batches()
    assert_scores_close(compute_fisher(model, batches, num_samples=8, chunk_size=3), reference_fisher(model, batches))


def test_a_bfloat16_model_is_scored_vectorised_and_close_to_its_float32_scores():
    """The self-check allows the rounding of the model's dtype: a bfloat16 model is not sent to the slow loop."""
    import warnings

    from tests.models import example_inputs

    batch = example_inputs("llama", batch=4, seq=8)
    loader = [batch]
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # the loop fallback warns
        low = compute_fisher(tiny_llama().to(torch.bfloat16), loader, num_samples=4)
    full = compute_fisher(tiny_llama(), loader, num_samples=4)
    for name in full:
        top = full[name].abs().max()
        assert (low[name].float() - full[name]).abs().max() <= 0.1 * top + 1e-12, name


def test_each_parameter_is_squared_during_the_backward_not_after_it(monkeypatch):
    """Streaming: when a parameter's per-example gradients are squared, the output-gradients of the layers the
    backward has not reached yet do not exist, and those already used are dropped: a few are alive at once, not
    one per layer."""
    model = tiny_llama()
    batches = lm_batches()
    alive, recorders = [], []
    original_init = per_example.CallRecorder.__init__

    def keep(self, *args, **kwargs):
        original_init(self, *args, **kwargs)
        recorders.append(self)

    original_rule = per_example._rule

    def counting_rule(module):
        alive.append(sum(call.delta is not None for call in recorders[-1].calls))
        return original_rule(module)

    monkeypatch.setattr(per_example.CallRecorder, "__init__", keep)
    monkeypatch.setattr(per_example, "_rule", counting_rule)
    scores = compute_fisher(model, batches, num_samples=8, chunk_size=4)
    assert len(alive) >= len(list(model.parameters()))  # every parameter squared at least once
    assert max(alive) <= 3  # the tied embedding/lm_head pair and the call being scored
    assert_scores_close(scores, reference_fisher(model, batches))


class InPlaceModel(nn.Module):
    """Scales `a`'s output in place after the call, as some models do with their hidden states."""

    def __init__(self):
        super().__init__()
        self.a = nn.Linear(4, 4)
        self.b = nn.Linear(4, 3)

    def forward(self, x, labels=None):
        hidden = self.a(x)
        hidden.mul_(3.0)
        logits = self.b(torch.tanh(hidden))
        loss = nn.functional.cross_entropy(logits, labels) if labels is not None else None
        return type("Output", (), {"logits": logits, "loss": loss})()


def test_an_output_changed_in_place_after_its_module_is_scored_vectorised_and_exactly():
    """The output-gradient is taken at the module's own output, before the model's later in-place change."""
    import warnings

    torch.manual_seed(0)
    model = InPlaceModel()
    batches = [{"x": torch.randn(6, 4), "labels": torch.randint(0, 3, (6,))} for _ in range(2)]
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # the loop fallback warns
        scores = compute_fisher(model, batches, num_samples=12, chunk_size=3)
    assert_scores_close(scores, reference_fisher(model, batches))
