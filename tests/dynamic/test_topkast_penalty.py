"""Top-KAST's exploration penalty acts once per optimizer step, however many micro-batches a step accumulates.

Each test runs one SGD step twice from the same start, with the penalty λ and without it: the difference of the two
results, divided by the learning rate, is the penalty's contribution to the update. It must be λ·θ on A, λ/D·θ on
B \\ A and 0 elsewhere (DESIGN.md), for a plain torch loop, an Accelerate loop and a Trainer accumulating N.
"""

import pytest
import torch
from accelerate import Accelerator
from peft import get_peft_model
from torch.testing import assert_close
from transformers import Trainer, TrainingArguments

import fish_peft  # noqa: F401  (registers FISH with PEFT)
from fish_peft import FishConfig, random_mask
from fish_peft.dynamic import SparseTrainingCallback, TopKAST, TopKASTDiff
from tests.models import example_inputs, tiny_bert

LR = 0.5
NO_DROPOUT = dict(hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)  # Trainer trains in train mode


def network_engine(penalty):
    """Whole-network Top-KAST on a tiny BERT; A is 20 % of each weight, B 50 %."""
    model = tiny_bert(**NO_DROPOUT)
    return model, TopKAST(model, forward_density=0.2, backward_density=0.5, penalty=penalty)


def diff_engine(penalty):
    """A Top-KAST diff on a tiny BERT, its values and exploration values away from 0 (else λ·Δ would be 0)."""
    base = tiny_bert(**NO_DROPOUT)
    config = FishConfig(mask=random_mask(base, 0.02, seed=0), mask_update="topkast", penalty=penalty, update_every=100)
    model = get_peft_model(base, config)
    engine = TopKASTDiff(model, total_steps=100)
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for values in penalised(engine):
            values.copy_(torch.randn(values.shape, generator=generator) * 0.05)
    return model, engine


ENGINES = {"network": (network_engine, 0.5), "diff": (diff_engine, 0.01)}  # builder, λ


def penalised(engine):
    """The tensors the penalty acts on."""
    if isinstance(engine, TopKAST):
        return [weight.parameter for weight in engine.weights]
    return [e.values for e in engine.entries] + [engine.exploration_values(e) for e in engine.entries]


def expected_contribution(engine, penalty):
    """The plain reference: λ·θ on A, λ/D·θ on B \\ A, 0 elsewhere, for each penalised tensor."""
    if isinstance(engine, TopKAST):
        expected = []
        for weight in engine.weights:
            a, b = engine.masks()[weight.name], engine.backward_masks()[weight.name]
            theta, d = weight.parameter.detach(), engine.densities[weight.name]
            expected.append(penalty * (theta * a + theta * (b & ~a) / d))
        return expected
    forward = [penalty * e.values.detach() for e in engine.entries]
    return forward + [penalty / engine.forward_density * engine.exploration_values(e).detach() for e in engine.entries]


def micro_batches(count):
    """`count` copies of one batch."""
    return [example_inputs("bert", batch=4, seed=0) for _ in range(count)]


def torch_step(model, engine, count):
    """One optimizer step of a plain loop over `count` micro-batches, each loss divided by `count`; the engine first
    hears of the optimizer after its step, as in scripts that build the engine before the optimizer."""
    optimizer = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=LR)
    for inputs in micro_batches(count):
        (model(**inputs).loss / count).backward()
    optimizer.step()
    engine.step(optimizer)


def scaled_step(model, engine, count):
    """The plain loop under a gradient scaler (as fp16 training runs), the engine bound before the step."""
    optimizer = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=LR)
    engine.bind(optimizer)
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**10)
    for inputs in micro_batches(count):
        scaler.scale(model(**inputs).loss / count).backward()
    scaler.step(optimizer)
    scaler.update()
    engine.step()


def accelerate_step(model, engine, count):
    """One optimizer step of Accelerate's accumulation idiom: every call inside `accumulate`, once per micro-batch."""
    accelerator = Accelerator(cpu=True, gradient_accumulation_steps=count)
    optimizer = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=LR)
    model, optimizer = accelerator.prepare(model, optimizer)
    engine.bind(optimizer)
    for inputs in micro_batches(count):
        with accelerator.accumulate(model):
            accelerator.backward(model(**inputs).loss)
            optimizer.step()
            optimizer.zero_grad()
            engine.step(optimizer)


def after_one_step(kind, penalty, run):
    """The penalised tensors after `run(model, engine)` takes one optimizer step, and the reference contribution
    computed before it."""
    build, strength = ENGINES[kind]
    model, engine = build(penalty)
    expected = expected_contribution(engine, strength)
    run(model, engine)
    assert engine.steps == 1
    return [t.detach().clone() for t in penalised(engine)], expected


def check_penalty_contribution(kind, run):
    """(θ without penalty − θ with penalty) / lr is the reference contribution, for each penalised tensor."""
    penalised_, expected = after_one_step(kind, ENGINES[kind][1], run)
    free, _ = after_one_step(kind, 0.0, run)
    assert any(bool(e.abs().max() > 1e-3) for e in expected)  # the check can see a doubled penalty
    for with_penalty, without, want in zip(penalised_, free, expected):
        assert_close((without - with_penalty) / LR, want, rtol=1e-3, atol=1e-6)


@pytest.mark.parametrize("kind", ENGINES)
@pytest.mark.parametrize("loop", [torch_step, scaled_step, accelerate_step], ids=["torch", "scaled", "accelerate"])
@pytest.mark.parametrize("count", [1, 3])
def test_penalty_enters_one_step_once_whatever_the_accumulation(kind, loop, count):
    check_penalty_contribution(kind, lambda model, engine: loop(model, engine, count))


@pytest.mark.parametrize("kind", ENGINES)
def test_a_step_over_n_copies_of_a_batch_is_a_step_over_the_batch(kind):
    one, _ = after_one_step(kind, ENGINES[kind][1], lambda model, engine: torch_step(model, engine, 1))
    three, _ = after_one_step(kind, ENGINES[kind][1], lambda model, engine: torch_step(model, engine, 3))
    for a, b in zip(one, three):
        assert_close(a, b, rtol=1e-5, atol=1e-6)


def trainer_step(model, engine, accumulation, tmp_path):
    """One Trainer step over `accumulation` micro-batches of 2 examples each."""
    batch = example_inputs("bert", batch=2 * accumulation, seed=0)
    data = [{key: value[i] for key, value in batch.items()} for i in range(2 * accumulation)]
    args = TrainingArguments(
        output_dir=str(tmp_path), per_device_train_batch_size=2, gradient_accumulation_steps=accumulation,
        max_steps=1, learning_rate=LR, optim="sgd", lr_scheduler_type="constant", report_to=[], save_strategy="no",
        use_cpu=True, disable_tqdm=True,
    )
    Trainer(model=model, args=args, train_dataset=data, callbacks=[SparseTrainingCallback(engine)]).train()
    assert engine.steps == 1


@pytest.mark.parametrize("kind", ENGINES)
def test_penalty_enters_a_trainer_step_once_with_gradient_accumulation(kind, tmp_path):
    check_penalty_contribution(kind, lambda model, engine: trainer_step(model, engine, 2, tmp_path))


def test_backward_alone_carries_no_penalty():
    """The penalty is the optimizer step's business: gradients after backward (which clipping and logging see) are
    the loss's alone."""
    model, engine = network_engine(0.5)
    (model(**micro_batches(1)[0]).loss * 0).backward()
    assert all(bool((w.parameter.grad == 0).all()) for w in engine.weights)


def test_an_exported_network_trains_without_the_penalty():
    model, engine = network_engine(0.5)
    optimizer = torch.optim.SGD(model.parameters(), lr=LR)
    engine.bind(optimizer)
    dense = engine.export_dense()
    before = [p.detach().clone() for p in dense.parameters()]
    (dense(**micro_batches(1)[0]).loss * 0).backward()
    optimizer.step()
    assert all(torch.equal(p, b) for p, b in zip(dense.parameters(), before))
