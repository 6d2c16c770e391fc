"""Resuming FISH training in the user's own loops: transformers' Trainer (`resume_from_checkpoint`) and an
Accelerate loop (`save_state` / `load_state`) end with the adapter of an uninterrupted run, for fixed masks and
for evolving diffs (whose engine state is checkpointed with the run, and whose counts move: the resumed script
builds its model from the initial mask, as the interrupted one did); whole-network Top-KAST and sparse momentum
continue in a Trainer too."""

import copy

import pytest
import torch
from accelerate import Accelerator
from accelerate.utils import set_seed
from datasets import Dataset
from peft import get_peft_model
from transformers import Trainer, TrainerCallback, TrainingArguments

import fish_peft  # noqa: F401  (registers FISH with PEFT)
from fish_peft import FishConfig, compute_fisher_mask
from fish_peft.dynamic import SparseMomentum, SparseTrainingCallback, TopKAST, evolving_diff_engine
from fish_peft.dynamic.callback import ENGINE_STATE
from tests.models import tiny_bert

STEPS = 12
MASK_UPDATES = [None, "topkast", "sparse_momentum"]


def examples(n=48, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [{"input_ids": torch.randint(1, 100, (8,), generator=g), "labels": int(torch.randint(0, 3, (), generator=g))} for _ in range(n)]


def fish_model(base, mask_update=None):
    """A FISH model whose mask is the Fisher mask of the same examples: recomputing it gives the same mask. An
    evolving diff updates its support every 3 steps (at steps 3, 6 and 9 of 12)."""
    batches = [{"input_ids": torch.stack([e["input_ids"] for e in examples()[:8]]),
                "labels": torch.tensor([e["labels"] for e in examples()[:8]])}]
    mask = compute_fisher_mask(base, batches, keep_ratio=0.05, num_samples=8)
    config = FishConfig(mask=mask, mask_update=mask_update, update_every=3, prune_rate=0.5, penalty=1e-3)
    model = get_peft_model(copy.deepcopy(base), config)
    return model, (evolving_diff_engine(model, total_steps=STEPS) if mask_update else None)


def callbacks_for(engine):
    return [SparseTrainingCallback(engine)] if engine else []


def adapter_tensors(model):
    return {k: v.detach().clone() for k, v in model.state_dict().items() if ".fish_" in k or "modules_to_save" in k}


def assert_same(a, b):
    assert sorted(a) == sorted(b)
    for key in a:
        assert torch.equal(a[key], b[key]), key


class StopAt(TrainerCallback):
    """Ends training after `step` steps, as a crash right after that step's checkpoint would."""

    def __init__(self, step):
        self.step = step

    def on_step_end(self, args, state, control, **kwargs):
        if state.global_step == self.step:
            control.should_training_stop = True


def trainer(model, out, max_steps, callbacks=()):
    args = TrainingArguments(
        output_dir=str(out), max_steps=max_steps, per_device_train_batch_size=4, learning_rate=1e-3,
        save_strategy="steps", save_steps=4, logging_strategy="no", report_to=[], use_cpu=True, seed=0,
        data_seed=0, warmup_steps=2, lr_scheduler_type="linear",
    )
    return Trainer(model=model, args=args, callbacks=list(callbacks), train_dataset=Dataset.from_list([{k: v.tolist() if torch.is_tensor(v) else v for k, v in e.items()} for e in examples()]))


@pytest.mark.parametrize("mask_update", MASK_UPDATES)
def test_trainer_resume_from_checkpoint_gives_the_uninterrupted_adapter(tmp_path, mask_update):
    base = tiny_bert()
    whole, engine = fish_model(base, mask_update)
    trainer(whole, tmp_path / "whole", STEPS, callbacks_for(engine)).train()

    first, engine = fish_model(base, mask_update)
    trainer(first, tmp_path / "cut", STEPS, callbacks=[StopAt(8), *callbacks_for(engine)]).train()
    assert (tmp_path / "cut" / "checkpoint-8").is_dir() and not (tmp_path / "cut" / "checkpoint-12").exists()
    assert (tmp_path / "cut" / "checkpoint-8" / ENGINE_STATE).is_file() == (mask_update is not None)
    resumed, engine = fish_model(base, mask_update)
    trainer(resumed, tmp_path / "cut", STEPS, callbacks_for(engine)).train(resume_from_checkpoint=str(tmp_path / "cut" / "checkpoint-8"))
    assert_same(adapter_tensors(resumed), adapter_tensors(whole))
    if engine:
        assert engine.steps == STEPS and engine.updates == 3
        assert resumed.peft_config["default"].sparse_parameters == whole.peft_config["default"].sparse_parameters


def accelerate_run(base, state_dir, steps, save_at=None, load=False, mask_update=None):
    """Train with an Accelerate loop; save the state after `save_at` steps, or start from the saved state."""
    set_seed(0)
    accelerator = Accelerator(cpu=True)
    model, engine = fish_model(base, mask_update)
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-3)
    scheduler = torch.optim.lr_scheduler.LinearLR(optimizer, start_factor=1.0, end_factor=0.1, total_iters=steps)
    data = examples()
    loader = torch.utils.data.DataLoader(data, batch_size=4, shuffle=True, generator=torch.Generator().manual_seed(0),
                                         collate_fn=lambda b: {"input_ids": torch.stack([e["input_ids"] for e in b]),
                                                               "labels": torch.tensor([e["labels"] for e in b])})
    model, optimizer, loader, scheduler = accelerator.prepare(model, optimizer, loader, scheduler)
    if engine:
        accelerator.register_for_checkpointing(engine)
    done = 0
    if load:
        accelerator.load_state(str(state_dir))
        done = save_at
        loader = accelerator.skip_first_batches(loader, done)
    model.train()
    for batch in loader:
        if done == steps:
            break
        loss = model(**batch).loss
        accelerator.backward(loss)
        optimizer.step()
        if engine:
            engine.step(optimizer)
        scheduler.step()
        optimizer.zero_grad()
        done += 1
        if save_at is not None and not load and done == save_at:
            accelerator.save_state(str(state_dir))
            return model
    return model


@pytest.mark.parametrize("mask_update", MASK_UPDATES)
def test_accelerate_save_state_and_load_state_give_the_uninterrupted_adapter(tmp_path, mask_update):
    base = tiny_bert()
    whole = accelerate_run(base, None, STEPS, mask_update=mask_update)
    accelerate_run(base, tmp_path / "state", STEPS, save_at=5, mask_update=mask_update)
    resumed = accelerate_run(base, tmp_path / "state", STEPS, save_at=5, load=True, mask_update=mask_update)
    assert_same(adapter_tensors(resumed), adapter_tensors(whole))


def network_engine(model, rule):
    """A whole-network engine on the Linear and Embedding weights, updating its masks every 3 steps."""
    if rule == "topkast":
        return TopKAST(model, forward_density=0.3, backward_density=0.5, update_every=3)
    return SparseMomentum(model, density=0.3, update_every=3, total_steps=STEPS)


@pytest.mark.parametrize("rule", ["topkast", "sparse_momentum"])
def test_trainer_resume_from_checkpoint_continues_a_whole_network_engine(tmp_path, rule):
    def run(out, resume=None, stop_at=None):
        set_seed(0)
        model = tiny_bert()
        engine = network_engine(model, rule)
        callbacks = [SparseTrainingCallback(engine)] + ([StopAt(stop_at)] if stop_at else [])
        trainer(model, out, STEPS, callbacks).train(resume_from_checkpoint=resume)
        return model, engine

    whole, whole_engine = run(tmp_path / "whole")
    run(tmp_path / "cut", stop_at=8)
    resumed, engine = run(tmp_path / "cut", resume=str(tmp_path / "cut" / "checkpoint-8"))
    assert engine.steps == STEPS and engine.mask_digest() == whole_engine.mask_digest()
    assert_same({k: v.detach() for k, v in resumed.state_dict().items()}, {k: v.detach() for k, v in whole.state_dict().items()})
