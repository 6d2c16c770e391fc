"""Top-KAST and sparse momentum on whole networks: the papers' rules, checked against plain computations."""

import json
import math
from pathlib import Path

import pytest
import torch
from accelerate import Accelerator
from torch import nn
from transformers import Trainer, TrainingArguments

from fish_peft.dynamic import SparseMomentum, SparseTrainingError, TopKAST, layer_densities
from fish_peft.dynamic.callback import SparseTrainingCallback
from fish_peft.dynamic.checkpoint import SparseCheckpointError, load_sparse_model, save_sparse_model
from fish_peft.dynamic.sparse_momentum import allocate
from tests.models import example_inputs, tiny_gpt2

RECIPES = Path(__file__).resolve().parents[2] / "recipes"


def mlp(seed=0, width=40):
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(12, width), nn.ReLU(), nn.LayerNorm(width), nn.Linear(width, 4))


def cnn(seed=0):
    torch.manual_seed(seed)
    return nn.Sequential(nn.Conv2d(1, 6, 3), nn.ReLU(), nn.Flatten(), nn.Linear(6 * 6 * 6, 4))


def batch(seed=0, n=16, image=False):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 1, 8, 8, generator=g) if image else torch.randn(n, 12, generator=g)
    return x, torch.randint(0, 4, (n,), generator=g)


def train(model, engine, optimizer, steps, image=False):
    for step in range(steps):
        x, y = batch(step, image=image)
        optimizer.zero_grad()
        nn.functional.cross_entropy(model(x), y).backward()
        optimizer.step()
        engine.step()


@pytest.mark.parametrize("builder, image", [(mlp, False), (cnn, True)])
def test_topkast_forward_is_a_dense_layer_with_the_a_masked_weights(builder, image):
    model, reference = builder(), builder()
    engine = TopKAST(model, forward_density=0.2, backward_density=0.4)
    masks = engine.masks()
    with torch.no_grad():
        for weight in engine.weights:
            reference.get_parameter(weight.name).mul_(masks[weight.name])
    x, _ = batch(image=image)
    torch.testing.assert_close(model(x), reference(x), rtol=0, atol=0)
    for weight in engine.weights:  # A is the top 20 % of |θ| of each layer, B the top 40 %
        magnitude = weight.parameter.detach().abs()
        kept = magnitude[masks[weight.name]]
        assert kept.numel() == round(0.2 * magnitude.numel())
        assert kept.min() >= magnitude[~masks[weight.name]].max()
        assert bool((engine.backward_masks()[weight.name] >= masks[weight.name]).all())


def test_topkast_gradients_reach_b_only_and_the_step_adds_the_exploration_penalty():
    model, reference = mlp(), mlp()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    engine = TopKAST(model, optimizer, forward_density=0.1, backward_density=0.3, penalty=0.01)
    masks, backward = engine.masks(), engine.backward_masks()
    with torch.no_grad():
        for weight in engine.weights:
            reference.get_parameter(weight.name).mul_(masks[weight.name])
    x, y = batch()
    nn.functional.cross_entropy(model(x), y).backward()
    nn.functional.cross_entropy(reference(x), y).backward()
    penalty_grads = {}
    for weight in engine.weights:
        torch.testing.assert_close(weight.parameter.grad, reference.get_parameter(weight.name).grad * backward[weight.name])
        theta = weight.parameter.detach().clone().requires_grad_(True)
        a, b, d = masks[weight.name], backward[weight.name], engine.densities[weight.name]
        penalty = 0.01 / 2 * ((theta[a] ** 2).sum() + (theta[b & ~a] ** 2).sum() / d)
        (penalty_grads[weight.name],) = torch.autograd.grad(penalty, theta)
    optimizer.step()  # the penalty's gradient joins just before the step
    for weight in engine.weights:
        expected = reference.get_parameter(weight.name).grad * backward[weight.name] + penalty_grads[weight.name]
        torch.testing.assert_close(weight.parameter.grad, expected)
        assert bool((weight.parameter.grad[~backward[weight.name]] == 0).all())


def test_topkast_penalty_value_matches_a_hand_computation():
    model = nn.Sequential(nn.Linear(2, 2, bias=False))
    with torch.no_grad():
        model[0].weight.copy_(torch.tensor([[4.0, -3.0], [2.0, 1.0]]))
    engine = TopKAST(model, forward_density=0.25, backward_density=0.5, penalty=0.1)
    # A = {4}, B \ A = {-3}, D = 0.25: 0.1 / 2 * (16 + 9 / 0.25) = 2.6
    assert engine.penalty_value().item() == pytest.approx(2.6)


def test_topkast_keeps_weights_outside_b_fixed_and_densities_exact_with_adam():
    model = mlp()
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-2)
    engine = TopKAST(model, optimizer, forward_density=0.1, backward_density=0.2, update_every=3)
    for step in range(9):
        before = {w.name: w.parameter.detach().clone() for w in engine.weights}
        outside = {name: ~b.clone() for name, b in engine.backward_masks().items()}
        train(model, engine, optimizer, 1)
        for weight in engine.weights:
            assert torch.equal(weight.parameter.detach()[outside[weight.name]], before[weight.name][outside[weight.name]])
            forward, backward = engine.counts(weight.name)
            assert int(engine.masks()[weight.name].sum()) == forward
            assert int(engine.backward_masks()[weight.name].sum()) == backward
    assert engine.steps == 9


def test_topkast_exports_a_dense_model_with_zeros():
    model = mlp()
    engine = TopKAST(model, forward_density=0.1, backward_density=0.2)
    x, _ = batch()
    expected = model(x)
    dense = engine.export_dense()
    assert not any("parametrizations" in name for name in dense.state_dict())
    torch.testing.assert_close(dense(x), expected)
    assert (dense[0].weight != 0).float().mean().item() == pytest.approx(0.1)


def test_topkast_masks_a_tied_weight_everywhere_it_is_used():
    model = tiny_gpt2()
    engine = TopKAST(model, forward_density=0.3, backward_density=0.5)
    tied = next(w for w in engine.weights if w.name == "transformer.wte.weight")
    assert len(tied.holders) == 2  # the embedding and the output layer
    assert torch.equal(model.lm_head.weight, model.transformer.wte.weight)
    assert (model.lm_head.weight != 0).float().mean().item() == pytest.approx(0.3, abs=1e-3)
    model(**example_inputs("gpt2")).loss.backward()


@pytest.mark.parametrize("make_optimizer", [lambda p: torch.optim.SGD(p, lr=0.1, momentum=0.9), lambda p: torch.optim.Adam(p, lr=1e-2)])
def test_sparse_momentum_holds_the_exact_density_and_regrows_only_inactive_weights(make_optimizer, monkeypatch):
    model = mlp()
    optimizer = make_optimizer(model.parameters())
    engine = SparseMomentum(model, optimizer, density=0.1, update_every=2, total_steps=20)
    total = sum(round(0.1 * w.parameter.numel()) for w in engine.weights)
    updates = []
    original_update = engine.update_masks

    def checked_update():
        before = {name: m.clone() for name, m in engine.masks().items()}
        original_update()
        after = engine.masks()
        moved_in = sum(int((after[n] & ~before[n]).sum()) for n in after)
        moved_out = sum(int((before[n] & ~after[n]).sum()) for n in after)
        updates.append((moved_in, moved_out))

    monkeypatch.setattr(engine, "update_masks", checked_update)
    for step in range(20):
        train(model, engine, optimizer, 1)
        masks = engine.masks()
        assert sum(int(m.sum()) for m in masks.values()) == total
        for weight in engine.weights:
            assert bool((weight.parameter.detach()[~masks[weight.name]] == 0).all())
    assert len(updates) == 9  # steps 2, 4, ..., 18: none at the last step
    assert all(moved_in == moved_out for moved_in, moved_out in updates)
    assert sum(moved_in for moved_in, _ in updates) > 0


def test_sparse_momentum_follows_the_paper_on_a_hand_made_case():
    """Layer 1 has the larger mean |momentum| over its active weights, so it regrows what both layers prune."""
    model = nn.Sequential(nn.Linear(4, 1, bias=False), nn.Linear(4, 1, bias=False))
    optimizer = torch.optim.SGD(model.parameters(), lr=0.0, momentum=0.9)
    engine = SparseMomentum(model, optimizer, density=0.5, update_every=1, total_steps=10**6, prune_rate=0.5)
    masks = {n: torch.tensor([[True, True, False, False]]) for n in ("0.weight", "1.weight")}
    engine._masks = masks
    with torch.no_grad():
        model[0].weight.copy_(torch.tensor([[1.0, 2.0, 0.0, 0.0]]))
        model[1].weight.copy_(torch.tensor([[3.0, 4.0, 0.0, 0.0]]))
    optimizer.state[model[0].weight]["momentum_buffer"] = torch.tensor([[0.1, 0.1, 0.5, 0.2]])
    optimizer.state[model[1].weight]["momentum_buffer"] = torch.tensor([[1.0, 1.0, 0.3, 0.9]])
    engine.steps = 0
    engine.update_masks()  # prune rate 0.5 at step 0: each layer drops its smallest active weight
    assert engine.masks()["0.weight"].tolist() == [[False, True, False, False]]
    # both regrown weights go to layer 1, at its inactive positions of largest |momentum|: the just-pruned 0 and 3
    assert engine.masks()["1.weight"].tolist() == [[True, True, False, True]]
    assert model[1].weight.tolist() == [[0.0, 4.0, 0.0, 0.0]]  # grown weights start at zero


def test_allocation_is_exact_and_respects_capacity():
    assert allocate(10, {"a": 3.0, "b": 1.0}, {"a": 100, "b": 100}) == {"a": 8, "b": 2}  # 7.5 / 2.5, ties by name
    assert allocate(10, {"a": 3.0, "b": 1.0}, {"a": 4, "b": 100}) == {"a": 4, "b": 6}
    assert allocate(5, {"a": 0.0, "b": 0.0}, {"a": 2, "b": 9}) == {"a": 2, "b": 3}
    assert sum(allocate(7, {"a": 1.0, "b": 1.0, "c": 1.0}, {"a": 9, "b": 9, "c": 9}).values()) == 7


def test_erk_keeps_the_overall_density_and_favours_small_layers():
    shapes = {"big": torch.Size([512, 512]), "small": torch.Size([10, 512]), "tiny": torch.Size([4, 4])}
    densities = layer_densities(shapes, 0.1, "erk")
    kept = sum(densities[n] * math.prod(s) for n, s in shapes.items())
    assert kept == pytest.approx(0.1 * sum(math.prod(s) for s in shapes.values()))
    assert densities["tiny"] == 1.0 and densities["small"] > densities["big"]
    assert layer_densities(shapes, 0.1) == {n: 0.1 for n in shapes}


def test_the_same_seed_gives_the_same_masks():
    def run(seed):
        model = mlp()
        optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
        engine = SparseMomentum(model, optimizer, density=0.2, update_every=2, total_steps=10, seed=seed)
        train(model, engine, optimizer, 10)
        return engine.mask_digest()

    assert run(0) == run(0)
    assert run(0) != run(1)


def test_callback_runs_the_engine_inside_trainer(tmp_path):
    model = mlp()

    class Wrapped(nn.Module):
        def __init__(self):
            super().__init__()
            self.net = model

        def forward(self, x, labels):
            logits = self.net(x)
            return {"loss": nn.functional.cross_entropy(logits, labels), "logits": logits}

    x, y = batch(n=64)
    data = [{"x": x[i], "labels": y[i]} for i in range(64)]
    wrapped = Wrapped()
    engine = SparseMomentum(wrapped, density=0.2, update_every=2)
    args = TrainingArguments(
        output_dir=str(tmp_path), per_device_train_batch_size=8, num_train_epochs=1, learning_rate=1e-2,
        report_to=[], save_strategy="no", use_cpu=True, disable_tqdm=True,
    )
    start = engine.mask_digest()
    Trainer(model=wrapped, args=args, train_dataset=data, callbacks=[SparseTrainingCallback(engine)]).train()
    assert engine.steps == 8 and engine.total_steps == 8
    assert engine.mask_digest() != start
    assert engine.density() == pytest.approx(0.2, abs=0.01)


def test_engine_works_in_an_accelerate_loop():
    accelerator = Accelerator(cpu=True)
    model = mlp()
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-2)
    engine = TopKAST(model, forward_density=0.1, backward_density=0.2, update_every=2)
    model, optimizer = accelerator.prepare(model, optimizer)
    for step in range(4):
        x, y = batch(step)
        optimizer.zero_grad()
        accelerator.backward(nn.functional.cross_entropy(model(x), y))
        optimizer.step()
        engine.step(optimizer)
    assert engine.steps == 4 and engine.density() == pytest.approx(0.1, abs=0.01)


def test_a_sparse_network_saves_compactly_and_loads_into_the_dense_class(tmp_path):
    model = mlp(width=400)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    engine = SparseMomentum(model, optimizer, density=0.1, update_every=2, total_steps=6)
    train(model, engine, optimizer, 6)
    path = tmp_path / "sparse.safetensors"
    save_sparse_model(engine, str(path))
    dense_bytes = sum(p.numel() * 4 for p in model.parameters())
    assert path.stat().st_size < 0.35 * dense_bytes
    restored = load_sparse_model(mlp(seed=5, width=400), str(path))
    x, _ = batch()
    torch.testing.assert_close(restored(x), model(x), rtol=0, atol=0)
    with pytest.raises(SparseCheckpointError, match="lacks or shapes"):
        load_sparse_model(mlp(width=40), str(path))
    raw = bytearray(path.read_bytes())
    raw[-8:] = b"\xff" * 8  # the last bytes are dense data or packed values: corrupt them into NaNs
    (tmp_path / "tampered.safetensors").write_bytes(bytes(raw))
    with pytest.raises(SparseCheckpointError):
        load_sparse_model(mlp(width=400), str(tmp_path / "tampered.safetensors"))


@pytest.mark.parametrize(
    "make, message",
    [
        (lambda m: TopKAST(m, forward_density=0.0, backward_density=0.1), "forward_density must be in"),
        (lambda m: TopKAST(m, forward_density=0.2, backward_density=0.1), "at least forward_density"),
        (lambda m: SparseMomentum(m, density=1.5, update_every=1, total_steps=5), "density must be in"),
        (lambda m: SparseMomentum(m, density=0.1, update_every=0, total_steps=5), "update_every"),
        (lambda m: SparseMomentum(m, torch.optim.SGD(m.parameters(), lr=0.1), density=0.1, update_every=1, total_steps=5), "momentum=0"),
        (lambda m: SparseMomentum(m, torch.optim.Adagrad(m.parameters()), density=0.1, update_every=1, total_steps=5), "Adagrad"),
        (lambda m: TopKAST(m, torch.optim.AdamW(m.parameters()), forward_density=0.1, backward_density=0.2), "weight_decay"),
        (lambda m: TopKAST(nn.Sequential(nn.LayerNorm(4)), forward_density=0.1, backward_density=0.2), "no layer to sparsify"),
    ],
)
def test_bad_settings_are_refused_before_training(make, message):
    with pytest.raises(SparseTrainingError, match=message):
        make(mlp())


@pytest.mark.parametrize("recipe", ["digits_sparse_momentum", "digits_topkast"])
def test_sparse_train_command_runs_a_recipe_and_saves_a_loadable_sparse_model(recipe, tmp_path, capsys):
    from fish_peft.cli.command import main
    from fish_peft.cli.sparse_train import build_model, digits_splits

    out = tmp_path / recipe
    path = RECIPES / "sparse" / f"{recipe}.yaml"
    assert main(["sparse-train", str(path), "--epochs", "2", "--output-dir", str(out)]) == 0
    results = json.loads((out / "results.json").read_text())
    assert results["density"] == pytest.approx(0.1, abs=1e-3) and results["mask_updates"] > 0
    model = load_sparse_model(build_model("mlp"), str(out / "sparse_model.safetensors"))
    _, test_set = digits_splits()
    accuracy = (model(test_set.tensors[0]).argmax(-1) == test_set.tensors[1]).float().mean().item()
    assert accuracy == pytest.approx(results["test_accuracy"])
    sparse_layers = [m.weight for m in model if isinstance(m, nn.Linear)]
    kept = sum(int((w != 0).sum()) for w in sparse_layers) / sum(w.numel() for w in sparse_layers)
    assert 0.05 < kept <= 0.1 + 1e-3  # a kept weight may be zero (a regrown one fed by an always-blank pixel)
    assert main(["sparse-train", str(path), "--epochs", "1", "--output-dir", str(out)]) == 2  # refuses to overwrite
    assert "already holds a run" in capsys.readouterr().err
