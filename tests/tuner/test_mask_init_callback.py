"""FishMaskInitCallback: a Trainer initializes a keep_ratio adapter's mask from its own training data, trains it with
the optimizer it built before, and resumes from its checkpoints."""

import pytest
import torch
from peft import PeftModel, get_peft_model
from torch.utils.data import DataLoader
from transformers import Trainer, TrainerControl, TrainerState, TrainingArguments

import fish_peft  # noqa: F401  (registers FISH with PEFT)
from fish_peft import FishConfig, FishMaskInitCallback, compute_fisher_mask, random_mask
from fish_peft.tuner import mask_init_callback
from tests.models import example_inputs, tiny_llama


def examples(count=16):
    """One-example dicts whose labels ignore a 3-token prompt."""
    out = []
    for seed in range(count // 4):
        batch = example_inputs("llama", batch=4, seq=8, seed=seed)
        batch["labels"][:, :3] = -100
        out += [{key: value[i] for key, value in batch.items()} for i in range(4)]
    return out


def arguments(tmp_path, steps):
    return TrainingArguments(
        str(tmp_path / "out"), max_steps=steps, per_device_train_batch_size=4, learning_rate=1e-2, report_to=[],
        save_strategy="steps", save_steps=2, use_cpu=True, disable_tqdm=True,
    )


def test_the_trainer_initializes_the_mask_from_its_data_trains_it_and_resumes(tmp_path):
    data = examples()
    model = get_peft_model(tiny_llama(), FishConfig(keep_ratio=0.02, target_modules="all-linear", num_samples=16))
    trainer = Trainer(model=model, args=arguments(tmp_path, 2), train_dataset=data, callbacks=[FishMaskInitCallback()])
    trainer.train()

    expected = compute_fisher_mask(
        tiny_llama(), DataLoader(data, batch_size=4), keep_ratio=0.02, num_samples=16, modules_to_save=None,
        eligible=r"_proj\.weight$",
    )
    mask = model.peft_config["default"].mask
    assert mask.keys() == expected.keys() and all(torch.equal(mask[n], expected[n]) for n in mask)
    trained = [p for p in model.parameters() if p.requires_grad]
    assert sum(p.numel() for p in trained) == expected.num_selected and all(p.abs().sum() > 0 for p in trained)
    in_optimizer = [p for group in trainer.optimizer.param_groups for p in group["params"]]
    assert {id(p) for p in in_optimizer} == {id(p) for p in trained}  # the empty ones left it

    checkpoint = tmp_path / "out" / "checkpoint-2"
    lazy = get_peft_model(tiny_llama(), FishConfig(keep_ratio=0.02, target_modules="all-linear"))
    with pytest.raises(RuntimeError, match="no mask yet. To resume from a checkpoint, load it with PeftModel.from_pretrained"):
        lazy.load_adapter(checkpoint, "default", is_trainable=True)  # what Trainer's resume_from_checkpoint does
    again = PeftModel.from_pretrained(tiny_llama(), checkpoint, is_trainable=True)
    resumed = Trainer(model=again, args=arguments(tmp_path, 3), train_dataset=data, callbacks=[FishMaskInitCallback()])
    resumed.train(resume_from_checkpoint=str(checkpoint))
    assert resumed.state.global_step == 3
    assert again.peft_config["default"].sparse_parameters == expected.counts()


def test_in_several_processes_the_callback_refuses_and_says_what_to_do(tmp_path, monkeypatch):
    monkeypatch.setattr(mask_init_callback, "rank_and_world", lambda: (0, 2))
    args, state, control = arguments(tmp_path, 1), TrainerState(), TrainerControl()
    loader = DataLoader(examples(4), batch_size=4)
    eager = get_peft_model(tiny_llama(), FishConfig(mask=random_mask(tiny_llama(), 0.01)))
    FishMaskInitCallback().on_train_begin(args, state, control, model=eager, train_dataloader=loader)  # nothing to do
    lazy = get_peft_model(tiny_llama(), FishConfig(keep_ratio=0.01))
    with pytest.raises(RuntimeError, match="DDP.*before trainer.train\\(\\).*initialize_fish_mask"):
        FishMaskInitCallback().on_train_begin(args, state, control, model=lazy, train_dataloader=loader)
    assert lazy.peft_config["default"].awaits_mask
