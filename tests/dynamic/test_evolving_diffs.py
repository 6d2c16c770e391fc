"""Evolving FISH diffs: the support moves by Top-KAST's or sparse momentum's rule, k stays, the adapter stays FISH."""

import copy

import pytest
import torch
from peft import PeftModel, get_peft_model
from safetensors.torch import load_file
from torch.testing import assert_close
from transformers import Trainer, TrainingArguments

import fish_peft  # noqa: F401  (registers FISH with PEFT)
from fish_peft import FishConfig, random_mask
from fish_peft.tuner.packing import unpack
from fish_peft.dynamic.sparse_momentum import allocate
from fish_peft.dynamic import (
    SparseMomentumDiff,
    SparseTrainingCallback,
    SparseTrainingError,
    TopKASTDiff,
    evolving_diff_engine,
)
from tests.models import example_inputs, tiny_bert

RULES = ["topkast", "sparse_momentum"]


def dynamic_model(rule, seed=0, keep_ratio=0.02, **config):
    model = tiny_bert(seed=seed).eval()  # eval: no dropout, so runs are comparable
    mask = random_mask(model, keep_ratio, seed=seed)
    return get_peft_model(model, FishConfig(mask=mask, mask_update=rule, **{"update_every": 2, **config}))


def trainable(model):
    return [p for p in model.parameters() if p.requires_grad]


def train(model, engine, optimizer, steps, keep_graph=False):
    """A plain loop; `keep_graph` keeps the last loss (and its graph) alive into the next forward, as many do."""
    updates, loss = [], None
    for step in range(steps):
        loss = model(**example_inputs("bert", batch=4, seed=step)).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        if not keep_graph:
            loss = None
        updates.append(engine.step())
    return updates


def stored(entry, engine):
    """Indices of an entry: (forward set, exploration set or empty)."""
    explore = engine.stored_indices(entry)[1:] or [torch.zeros(0, dtype=torch.long)]
    return entry.indices.long(), explore[0].long()


@pytest.mark.parametrize("rule", RULES)
@pytest.mark.parametrize("keep_graph", [False, True])
def test_budget_exact_after_every_update_and_config_in_step(rule, keep_graph):
    model = dynamic_model(rule)
    config = model.peft_config["default"]
    k = sum(config.sparse_parameters.values())
    engine = evolving_diff_engine(model, total_steps=12)
    optimizer = torch.optim.AdamW(trainable(model), lr=1e-2, weight_decay=0.0)
    engine.bind(optimizer)
    before = engine.mask_digest()
    for step in range(12):
        model(**example_inputs("bert", batch=4, seed=step)).loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        engine.step()
        assert sum(e.values.numel() for e in engine.entries) == k
        for entry in engine.entries:
            forward, explore = stored(entry, engine)
            assert config.sparse_parameters[entry.name] == forward.numel() == entry.values.numel()
            assert forward.unique().numel() == forward.numel() and bool((forward[1:] > forward[:-1]).all())
            assert not bool(torch.isin(explore, forward).any())  # regrowth never picks an entry already held
            assert int(forward.max()) < entry.numel
    assert engine.updates == 5  # steps 2, 4, 6, 8, 10 (none at the last step)
    assert engine.mask_digest() != before
    if rule == "sparse_momentum":  # redistribution moved budget between parameters
        assert config.sparse_parameters != random_mask(tiny_bert(), 0.02, seed=0).counts()


@pytest.mark.parametrize("rule", RULES)
def test_parameters_with_no_free_position_left(rule):
    """At a high keep ratio small parameters are fully covered (Top-KAST: by A and B); nothing may be grown twice."""
    model = dynamic_model(rule, keep_ratio=0.3, exploration=3.0, update_every=1)
    engine = evolving_diff_engine(model, total_steps=6)
    optimizer = torch.optim.AdamW(trainable(model), lr=1e-2)
    engine.bind(optimizer)
    train(model, engine, optimizer, 6)
    assert any(sum(i.numel() for i in engine.stored_indices(e)) == e.numel for e in engine.entries)
    for entry in engine.entries:
        pool = torch.cat(stored(entry, engine))
        assert pool.unique().numel() == pool.numel()


def test_trains_with_the_last_graph_alive():
    """Changing a parameter's length while an old graph holds it would break autograd; the engine swaps it."""
    model = dynamic_model("sparse_momentum")
    optimizer = torch.optim.AdamW(trainable(model), lr=1e-2)
    engine = evolving_diff_engine(model, optimizer, total_steps=10)
    assert any(train(model, engine, optimizer, 10, keep_graph=True))
    assert {id(p) for p in engine.trained_parameters()} <= {id(p) for g in optimizer.param_groups for p in g["params"]}


def test_topkast_forward_uses_only_its_k_entries_and_gradients_reach_the_exploration_set():
    model = dynamic_model("topkast", penalty=0.0)
    engine = TopKASTDiff(model, total_steps=10)
    reference = copy.deepcopy(tiny_bert(seed=0).eval())
    with torch.no_grad():
        for entry in engine.entries:
            entry.values.normal_(0, 0.05)
            engine.exploration_values(entry).normal_(0, 0.05)
            reference.get_parameter(entry.name).view(-1)[entry.indices.long()] += entry.values
    for p in reference.parameters():
        p.requires_grad_(True)
    inputs = example_inputs("bert", seed=3)
    out, expected = model(**inputs), reference(**inputs)
    assert_close(out.logits, expected.logits, rtol=1e-5, atol=1e-6)
    out.loss.backward()
    expected.loss.backward()
    for entry in engine.entries:
        dense = reference.get_parameter(entry.name).grad.view(-1)
        forward, explore = stored(entry, engine)
        assert_close(entry.values.grad, dense[forward], rtol=1e-5, atol=1e-7)
        assert_close(engine.exploration_values(entry).grad, dense[explore], rtol=1e-5, atol=1e-7)


def test_topkast_update_promotes_largest_entries_and_moves_optimizer_state():
    model = dynamic_model("topkast", update_every=1, exploration=1.0)
    engine = TopKASTDiff(model, total_steps=100)  # before the optimizer: it adds the exploration values
    optimizer = torch.optim.Adam(trainable(model), lr=1e-2)
    engine.bind(optimizer)
    model(**example_inputs("bert", seed=0)).loss.backward()
    optimizer.step()
    entry = max(engine.entries, key=lambda e: e.values.numel())
    explore = engine.exploration_values(entry)
    with torch.no_grad():  # make one exploration entry the largest of all
        explore[0] = 10.0
    promoted = int(stored(entry, engine)[1][0])
    old_state = {
        int(i): float(m)
        for i, m in zip(torch.cat(stored(entry, engine)), torch.cat([optimizer.state[entry.values]["exp_avg"], optimizer.state[explore]["exp_avg"]]))
    }
    pool = set(old_state)
    optimizer.zero_grad()
    assert engine.step()
    forward, new_explore = stored(entry, engine)
    assert promoted in forward.tolist()
    assert float(entry.values.detach()[forward.tolist().index(promoted)]) == 10.0
    moments = torch.cat([optimizer.state[entry.values]["exp_avg"], optimizer.state[engine.exploration_values(entry)]["exp_avg"]])
    for index, moment in zip(torch.cat([forward, new_explore]).tolist(), moments.tolist()):
        assert moment == (old_state[index] if index in pool else 0.0)  # moved entries keep state, new ones start at 0
    assert any(i not in pool for i in new_explore.tolist())


def test_topkast_penalty_matches_hand_computation():
    model = dynamic_model("topkast", penalty=0.01)
    engine = TopKASTDiff(model, total_steps=10)
    with torch.no_grad():
        for entry in engine.entries:
            entry.values.fill_(0.5)
            engine.exploration_values(entry).fill_(0.25)
    k = sum(e.values.numel() for e in engine.entries)
    m = sum(engine.exploration_values(e).numel() for e in engine.entries)
    density = k / sum(e.numel for e in engine.entries)
    assert engine.forward_density == pytest.approx(density)
    assert float(engine.penalty_value()) == pytest.approx(0.01 / 2 * (k * 0.25 + m * 0.0625 / density), rel=1e-5)
    entry = engine.entries[0]
    explore = engine.exploration_values(entry)
    engine.bind(torch.optim.SGD(trainable(model), lr=0.1))
    (entry.values.sum() * 0 + explore.sum() * 0).backward()  # zero loss: gradients are the penalty's alone
    assert not entry.values.grad.any() and not explore.grad.any()  # ... which joins at the optimizer step
    engine.optimizer.step()
    assert_close(entry.values.grad, torch.full_like(entry.values, 0.01 * 0.5))
    assert_close(explore.grad, torch.full_like(explore, 0.01 * 0.25 / density))


def test_sparse_momentum_update_follows_the_rule():
    """Prune smallest |Δ| per parameter, regrow across parameters by mean |momentum|, at the largest |gradient|."""
    model = dynamic_model("sparse_momentum", update_every=1)
    optimizer = torch.optim.SGD(trainable(model), lr=0.1, momentum=0.9)
    engine = SparseMomentumDiff(model, optimizer, total_steps=1000)
    model(**example_inputs("bert", seed=0)).loss.backward()
    optimizer.step()
    optimizer.zero_grad()
    rate = 0.5 * 0.5 * (1 + torch.cos(torch.tensor(torch.pi / 1000))).item()
    expected = {}
    for entry in engine.entries:
        count = entry.values.numel()
        dropped = min(round(rate * count), count - 1)
        order = torch.argsort(entry.values.detach().abs(), descending=True, stable=True)
        momentum = optimizer.state[entry.values]["momentum_buffer"].abs().mean().item()
        expected[entry.name] = (set(entry.indices[order[: count - dropped]].tolist()), momentum, dropped)
    assert engine.step()
    growth = allocate(
        sum(d for _, _, d in expected.values()),
        {name: momentum for name, (_, momentum, _) in expected.items()},
        {e.name: e.numel - len(expected[e.name][0]) for e in engine.entries},
    )
    for entry in engine.entries:
        kept = expected[entry.name][0]
        new = set(entry.indices.tolist())
        assert kept <= new
        grown = sorted(new - kept)
        assert len(grown) == growth[entry.name]
        assert not entry.layer.captured_gradients  # the used gradients are dropped (collection restarts)
        state = optimizer.state[entry.values]["momentum_buffer"]
        for position, index in enumerate(entry.indices.tolist()):
            if index in grown:
                assert float(entry.values.detach()[position]) == 0.0 and float(state[position]) == 0.0


def test_sparse_momentum_regrows_where_the_gradient_is_largest():
    model = dynamic_model("sparse_momentum", update_every=1)
    optimizer = torch.optim.SGD(trainable(model), lr=0.1, momentum=0.9)
    engine = SparseMomentumDiff(model, optimizer, total_steps=1000)
    reference = tiny_bert(seed=0).eval()
    with torch.no_grad():
        for entry in engine.entries:
            entry.values.normal_(0, 0.05)
    inputs = example_inputs("bert", seed=0)
    model(**inputs).loss.backward()
    for entry in engine.entries:  # the dense reference at the same point: W + Δ before the step
        reference.get_parameter(entry.name).data.view(-1)[entry.indices.long()] += entry.values.detach()
    for p in reference.parameters():
        p.requires_grad_(True)
    reference(**inputs).loss.backward()
    before = {e.name: set(e.indices.tolist()) for e in engine.entries}
    optimizer.step()
    optimizer.zero_grad()
    engine.step()
    for entry in engine.entries:
        grown = set(entry.indices.tolist()) - before[entry.name]
        if not grown:
            continue
        gradient = reference.get_parameter(entry.name).grad.abs().view(-1)
        candidates = torch.ones_like(gradient, dtype=torch.bool)
        candidates[list(set(entry.indices.tolist()) - grown)] = False  # kept entries cannot be regrown
        candidates[list(grown)] = False
        if candidates.any():  # (a small parameter may now be fully covered)
            assert min(gradient[list(grown)].tolist()) >= float(gradient[candidates].max()) - 1e-7


@pytest.mark.parametrize("rule", RULES)
def test_same_seed_same_masks(rule):
    digests = []
    for _ in range(2):
        torch.manual_seed(0)
        model = dynamic_model(rule)
        optimizer = torch.optim.AdamW(trainable(model), lr=1e-2)
        engine = evolving_diff_engine(model, optimizer, total_steps=8)
        train(model, engine, optimizer, 8)
        digests.append(engine.mask_digest())
    assert digests[0] == digests[1]


@pytest.mark.parametrize("rule", RULES)
def test_trainer_callback_and_adapter_round_trip(rule, tmp_path):
    model = dynamic_model(rule)
    engine = evolving_diff_engine(model)
    data = [{k: v[0] for k, v in example_inputs("bert", batch=1, seed=s).items()} for s in range(24)]
    args = TrainingArguments(
        output_dir=str(tmp_path / "run"), per_device_train_batch_size=4, max_steps=6, learning_rate=1e-2,
        report_to=[], save_strategy="no", use_cpu=True, optim="adamw_torch",
    )
    trainer = Trainer(model=model, args=args, train_dataset=data, callbacks=[SparseTrainingCallback(engine)])
    trainer.train()
    assert engine.total_steps == 6 and engine.updates == 2  # steps 2 and 4
    model.save_pretrained(tmp_path / "adapter")
    config = model.peft_config["default"]
    saved = load_file(tmp_path / "adapter" / "adapter_model.safetensors")
    assert not any("explore" in key for key in saved)
    numels = {e.name: e.numel for e in engine.entries}
    entries = unpack(saved, config.sparse_parameters, numels)  # the counts in the config fit the file
    for entry in engine.entries:
        assert entries[entry.name][0].tolist() == entry.indices.tolist()
    loaded = PeftModel.from_pretrained(tiny_bert(seed=0).eval(), tmp_path / "adapter")
    assert loaded.peft_config["default"].mask_update == rule
    inputs = example_inputs("bert", seed=11)
    assert_close(loaded(**inputs).logits, model.eval()(**inputs).logits)


def test_bad_input():
    with pytest.raises(ValueError, match="mask_update must be one of"):
        FishConfig(mask=random_mask(tiny_bert(), 0.01), mask_update="rigl")
    with pytest.raises(ValueError, match="prune_rate"):
        FishConfig(mask=random_mask(tiny_bert(), 0.01), mask_update="topkast", prune_rate=1.0)
    with pytest.raises(ValueError, match="update_every"):
        FishConfig(mask=random_mask(tiny_bert(), 0.01), mask_update="topkast", update_every=0)
    fixed = get_peft_model(tiny_bert(), FishConfig(mask=random_mask(tiny_bert(), 0.01)))
    with pytest.raises(SparseTrainingError, match="mask_update='topkast' or 'sparse_momentum'"):
        evolving_diff_engine(fixed)
    with pytest.raises(SparseTrainingError, match="mask_update='topkast'"):
        TopKASTDiff(dynamic_model("sparse_momentum"))
    model = dynamic_model("sparse_momentum")
    with pytest.raises(SparseTrainingError, match="momentum=0.9"):
        SparseMomentumDiff(model, torch.optim.SGD(trainable(model), lr=0.1))
    with pytest.raises(SparseTrainingError, match="PeftModel"):
        evolving_diff_engine(tiny_bert())


def test_an_evolving_adapter_takes_the_counts_of_the_file_it_loads(tmp_path):
    """Trainer's resume_from_checkpoint loads a checkpoint into the adapter the script built from the initial mask:
    a sparse-momentum diff's counts have moved since, so the entries are resized in place (the same Parameter
    objects an optimizer may hold) and the config follows."""
    trained = dynamic_model("sparse_momentum")
    engine = evolving_diff_engine(trained, total_steps=10)
    engine.bind(torch.optim.AdamW(trainable(trained), lr=1e-2))
    train(trained, engine, engine.optimizer, steps=4)
    trained.save_pretrained(tmp_path)
    counts = trained.peft_config["default"].sparse_parameters
    fresh = dynamic_model("sparse_momentum")
    assert fresh.peft_config["default"].sparse_parameters != counts  # the support moved while it trained
    before = {name: p for name, p in fresh.named_parameters() if p.requires_grad}
    fresh.load_adapter(tmp_path, adapter_name="default", is_trainable=True)
    assert fresh.peft_config["default"].sparse_parameters == counts
    assert {name: p for name, p in fresh.named_parameters() if p.requires_grad} == before  # same objects, resized
    inputs = example_inputs("bert", seed=11)
    assert torch.equal(fresh.eval()(**inputs).logits, trained.eval()(**inputs).logits)


@pytest.mark.parametrize("rule", RULES)
def test_a_keep_ratio_adapter_evolves_from_its_initialized_mask(rule, tmp_path):
    from fish_peft import initialize_fish_mask

    model = get_peft_model(tiny_bert().eval(), FishConfig(keep_ratio=0.02, num_samples=8, mask_update=rule, update_every=2))
    with pytest.raises(SparseTrainingError, match="no mask yet; call fish_peft.initialize_fish_mask"):
        evolving_diff_engine(model)
    mask = initialize_fish_mask(model, [example_inputs("bert", batch=4, seed=s) for s in range(2)])
    engine = evolving_diff_engine(model, total_steps=6)
    engine.bind(torch.optim.AdamW(trainable(model), lr=1e-2))
    assert engine.updates == 0 and sum(train(model, engine, engine.optimizer, steps=4)) == 2
    counts = model.peft_config["default"].sparse_parameters
    assert sum(counts.values()) == mask.num_selected and any(not torch.equal(e.indices.long(), mask[e.name]) for e in engine.entries)
    model.save_pretrained(tmp_path)
    loaded = PeftModel.from_pretrained(tiny_bert().eval(), tmp_path)
    inputs = example_inputs("bert", seed=11)
    assert_close(loaded(**inputs).logits, model.eval()(**inputs).logits)
