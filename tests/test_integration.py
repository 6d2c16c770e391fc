"""End to end on the real all-MiniLM-L6-v2 and real sentences, and training through transformers.Trainer."""

import copy
import os

import torch
from peft import PeftModel, get_peft_model
from transformers import AutoModelForSequenceClassification, AutoTokenizer, Trainer, TrainingArguments

import fish_peft  # noqa: F401
from fish_peft import FishConfig, FishLayer, compute_fisher, compute_fisher_mask, random_mask
from fish_peft.cli.demo_data import minilm_path, sentence_loader, split_rotten_tomatoes
from tests.models import tiny_bert
from tests.masks.test_fisher import assert_scores_close, reference_fisher


def test_real_minilm_fisher_mask_adapter_round_trip(tmp_path):
    path = minilm_path()
    torch.manual_seed(0)
    model = AutoModelForSequenceClassification.from_pretrained(path, num_labels=2)
    train, validation = split_rotten_tomatoes()
    loader = sentence_loader(AutoTokenizer.from_pretrained(path), train[:8], batch_size=4, shuffle=False)

    assert_scores_close(compute_fisher(model, loader, num_samples=8), reference_fisher(model, list(loader)))
    mask = compute_fisher_mask(model, loader, keep_ratio=0.005, num_samples=8)
    total = sum(p.numel() for p in model.parameters())
    assert mask.num_selected == int(total * 0.005) - sum(p.numel() for p in model.classifier.parameters())

    peft_model = get_peft_model(copy.deepcopy(model), FishConfig(mask=mask))
    with torch.no_grad():
        for p in peft_model.parameters():
            if p.requires_grad:
                p.normal_(0, 0.01)
    batch = next(iter(loader))
    batch.pop("labels")
    expected = peft_model.eval()(**batch).logits
    peft_model.save_pretrained(tmp_path)
    trainable, _ = peft_model.get_nb_trainable_parameters()
    assert os.path.getsize(tmp_path / "adapter_model.safetensors") / trainable <= 8
    again = PeftModel.from_pretrained(AutoModelForSequenceClassification.from_pretrained(path, num_labels=2), tmp_path)
    assert torch.equal(again(**batch).logits, expected)
    merged = again.merge_and_unload()
    assert torch.allclose(merged(**batch).logits, expected, atol=1e-5)


class ListDataset(torch.utils.data.Dataset):
    def __init__(self, items):
        self.items = items

    def __len__(self):
        return len(self.items)

    def __getitem__(self, i):
        return self.items[i]


def test_trainer_trains_only_the_sparse_diff_and_checkpoints_it(tmp_path):
    base = tiny_bert(num_labels=2)
    mask = random_mask(base, keep_ratio=0.05, seed=0)
    model = get_peft_model(copy.deepcopy(base), FishConfig(mask=mask))
    g = torch.Generator().manual_seed(0)
    data = ListDataset([
        {"input_ids": torch.randint(1, 100, (8,), generator=g), "labels": torch.tensor(i % 2)} for i in range(32)
    ])
    args = TrainingArguments(
        output_dir=str(tmp_path), per_device_train_batch_size=8, max_steps=6, learning_rate=1e-2,
        weight_decay=0.1, save_steps=3, report_to=[], use_cpu=True, logging_steps=100,
    )
    Trainer(model=model, args=args, train_dataset=data).train()

    checkpoint = tmp_path / "checkpoint-6"
    assert (checkpoint / "adapter_model.safetensors").exists() and (checkpoint / "adapter_config.json").exists()
    reloaded = PeftModel.from_pretrained(copy.deepcopy(base), checkpoint)
    probe = {"input_ids": torch.randint(1, 100, (2, 8), generator=g)}
    assert torch.equal(reloaded(**probe).logits, model.eval()(**probe).logits)

    merged = model.merge_and_unload()
    original = dict(base.named_parameters())
    changed = 0
    for name, param in merged.named_parameters():
        if name.startswith("classifier"):
            continue
        moved = (param != original[name]).flatten().nonzero().flatten()
        assert set(moved.tolist()) <= set(mask[name].tolist() if name in mask else []), name
        changed += moved.numel()
    assert changed > 0
    assert not any(isinstance(m, FishLayer) for m in merged.modules())
