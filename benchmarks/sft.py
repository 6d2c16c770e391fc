"""Supervised fine-tuning of a causal LM with TRL's SFTTrainer: FISH 0.5 % against LoRA (all-linear, at the rank
closest to FISH's trainable count; FISH at LoRA's count too) and full fine-tuning, the same steps, data and batches
for each, completion-only loss.

Offline, no Hub: a Llama-architecture causal LM built from a config (hidden 128, 4 layers, 0.73M parameters) and a
word-level tokenizer built here. So that fine-tuning adapts a model that already knows something (a 0.5 % diff of a
random model says little), the script first pretrains it (full training, a plain loop) on three synthetic
instruction tasks over a 16-letter alphabet, prompt -> completion:
  "copy : c a f d ="  -> "c a f d"      "reverse : c a f d =" -> "d f a c"      "shift : c a f d =" -> "d b g e"
(shift: each letter by one, p -> a), and then each method fine-tunes it with TRL's SFTTrainer on a task it never saw,
the composition of two it knows, with the loss on the completion only:
  "rshift : c a f d =" -> "e g b d"     (reverse, then shift)
Each method runs in a fresh process (so the CPU peak resident set is its own; with --quick or --one-process all run
in one), from the same saved base model, at the learning rate of LEARNING_RATES (the best of GRID, `--grid`).
Measured per method: validation loss on the completion tokens of held-out rshift examples, token accuracy and exact
match (every completion token the model's argmax: greedy decoding would produce the completion); the loss on the
pretraining tasks before and after (what the base model knew, kept or forgotten); the median step time (forward,
backward, clipping and optimizer step; from the third step); peak memory (benchmarks/peak_memory.py: CPU VmHWM,
reset through /proc/self/clear_refs after malloc_trim; CUDA torch.cuda.max_memory_allocated), absolute and beyond
the phase's start, FISH's mask computation (FishMaskInitCallback, when training begins) apart from the training steps; the trainable parameter counts.
Prints one JSON object; progress goes to stderr. CPU runs use 1 thread unless --threads says otherwise.

  python benchmarks/sft.py                  # about 2-3 minutes on 2 CPU cores
  python benchmarks/sft.py --grid           # every method at each learning rate of a small grid (longer)
  python benchmarks/sft.py --device cuda    # everything on the GPU
  python benchmarks/sft.py --quick          # a tiny model and a few steps: the smoke test tests/test_sft_benchmark.py
"""

from __future__ import annotations

import argparse
import contextlib
import ctypes
import gc
import json
import math
import os
import random
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SIZES = {
    # model: hidden, intermediate, layers; pretraining: steps, batch, lr; fine-tuning: steps, batch, examples;
    # validation examples; Fisher examples (FishConfig.num_samples)
    "full": dict(hidden=128, intermediate=344, layers=4, pretrain_steps=500, pretrain_batch=32, pretrain_lr=3e-3,
                 steps=200, batch=16, train_examples=3200, val_examples=256, fisher_samples=256),
    "quick": dict(hidden=64, intermediate=128, layers=2, pretrain_steps=8, pretrain_batch=8, pretrain_lr=2e-3,
                  steps=4, batch=4, train_examples=32, val_examples=16, fisher_samples=8),
}
KEEP_RATIO = 0.005
# fish: FISH at KEEP_RATIO; fish_matched: FISH with as many entries as LoRA's rank-r adapter trains (with this small a
# model, rank 1 all-linear is 2.5x KEEP_RATIO); lora: all-linear, the rank closest to FISH's count; full: everything
METHODS = ("fish", "fish_matched", "lora", "full")
LEARNING_RATES = {"fish": 1e-2, "fish_matched": 1e-2, "lora": 1e-2, "full": 1e-3}  # the best of GRID by validation loss
GRID = {
    "fish": [3e-3, 1e-2, 3e-2], "fish_matched": [3e-3, 1e-2, 3e-2], "lora": [3e-3, 1e-2, 3e-2], "full": [3e-4, 1e-3, 3e-3],
}
LETTERS = list("abcdefghijklmnop")
SPECIALS = ["<pad>", "<s>", "</s>", "<unk>"]
WORDS = ["copy", "reverse", "shift", "rshift", ":", "="]
PRETRAINING_TASKS = ("copy", "reverse", "shift")
TASK = "rshift"  # the fine-tuning task: reverse, then shift
TIMED_FROM_STEP = 3  # step times are taken from this step on (the first steps warm caches and allocators up)


# ---- data and tokenizer (no torch needed) -------------------------------------------------------------------------


def example(task: str, rng: random.Random) -> dict:
    """One prompt/completion pair of `task` over 3 to 8 letters."""
    letters = [rng.choice(LETTERS) for _ in range(rng.randint(3, 8))]
    if task in ("reverse", "rshift"):
        letters_out = letters[::-1]
    else:
        letters_out = letters
    if task in ("shift", "rshift"):
        answer = [LETTERS[(LETTERS.index(c) + 1) % len(LETTERS)] for c in letters_out]
    else:
        answer = letters_out
    return {"prompt": f"{task} : {' '.join(letters)} =", "completion": " " + " ".join(answer)}


def examples(task: str, count: int, seed: int) -> list[dict]:
    rng = random.Random(f"{task}-{seed}")
    return [example(task, rng) for _ in range(count)]


def tokenizer():
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    backend = Tokenizer(models.WordLevel({t: i for i, t in enumerate(SPECIALS + WORDS + LETTERS)}, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.Whitespace()
    return PreTrainedTokenizerFast(
        tokenizer_object=backend, pad_token="<pad>", bos_token="<s>", eos_token="</s>", unk_token="<unk>"
    )


# ---- the base model ----------------------------------------------------------------------------------------------


def build_model(size: dict, vocab: int, device):
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(
        vocab_size=vocab, hidden_size=size["hidden"], intermediate_size=size["intermediate"],
        num_hidden_layers=size["layers"], num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
        pad_token_id=0, bos_token_id=1, eos_token_id=2, tie_word_embeddings=False,
    )
    torch.manual_seed(0)
    with torch.device(device):
        return LlamaForCausalLM(config)


def encode(tok, rows: list[dict], device) -> dict:
    """Right-padded batch of prompt + completion + eos, labels on the completion and eos only."""
    import torch

    ids, labels = [], []
    for row in rows:
        prompt = tok(row["prompt"])["input_ids"]
        full = tok(row["prompt"] + row["completion"] + tok.eos_token)["input_ids"]
        ids.append(full)
        labels.append([-100] * len(prompt) + full[len(prompt):])
    width = max(map(len, ids))
    pad = lambda seqs, value: torch.tensor([s + [value] * (width - len(s)) for s in seqs], device=device)  # noqa: E731
    input_ids, labels = pad(ids, tok.pad_token_id), pad(labels, -100)
    return {"input_ids": input_ids, "attention_mask": (input_ids != tok.pad_token_id).long(), "labels": labels}


def pretrain(size: dict, device, folder: Path) -> dict:
    """Train the base model on copy and reverse (completion-only loss), save it and the tokenizer to `folder`."""
    import torch

    tok = tokenizer()
    model = build_model(size, len(tok), device).train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=size["pretrain_lr"], weight_decay=0.0)
    steps = size["pretrain_steps"]
    warmup_cosine = lambda s: min(1.0, (s + 1) / 20) * 0.5 * (1 + math.cos(math.pi * s / steps))  # noqa: E731
    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, warmup_cosine)
    rng = random.Random("pretrain")
    start, losses = time.perf_counter(), []
    for step in range(steps):
        rows = [example(rng.choice(PRETRAINING_TASKS), rng) for _ in range(size["pretrain_batch"])]
        loss = model(**encode(tok, rows, device)).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        schedule.step()
        optimizer.zero_grad()
        losses.append(loss.item())
        if (step + 1) % 100 == 0:
            print(f"pretraining step {step + 1}/{steps}: loss {statistics.mean(losses[-100:]):.3f}", file=sys.stderr)
    model.eval()
    result = {"steps": steps, "batch": size["pretrain_batch"], "lr": size["pretrain_lr"],
              "seconds": round(time.perf_counter() - start, 1), "last_loss": round(statistics.mean(losses[-10:]), 4),
              "parameters": sum(p.numel() for p in model.parameters())}
    with torch.no_grad():
        for task in (*PRETRAINING_TASKS, TASK):
            batch = encode(tok, examples(task, 64, seed=99), device)
            result[f"{task}_loss"] = round(model(**batch).loss.item(), 4)
    model.save_pretrained(folder)
    tok.save_pretrained(folder)
    return result


# ---- one method, in a process of its own ----------------------------------------------------------------------------


def measured(device):
    """`benchmarks/peak_memory.py`'s PeakMemory for `device`, entered after the garbage is collected and (CPU) glibc has
    handed freed memory back, so that what a phase before left in the allocator does not hide this one's growth."""
    from peak_memory import PeakMemory

    gc.collect()
    if device.type == "cpu":
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    return PeakMemory(str(device)).__enter__()


def mib(peak) -> dict:
    """A finished PeakMemory as {"start_mib", "peak_mib", "over_start_mib"}."""
    start, grown = peak.start / 2**20, peak.bytes / 2**20
    return {"start_mib": start, "peak_mib": start + grown, "over_start_mib": grown}


def measurement_callback(device, mask_init=None):
    """A TrainerCallback timing every step and taking the peak memory of FISH's mask computation (`mask_init`, a
    FishMaskInitCallback run inside it when training begins) apart from that of the training steps."""
    import torch
    from transformers import TrainerCallback

    class Measure(TrainerCallback):
        def __init__(self):
            self.step_seconds, self.result = [], {}

        def _sync(self):
            if device.type == "cuda":
                torch.cuda.synchronize()

        def on_train_begin(self, args, state, control, **kwargs):
            if mask_init is not None:
                peak, start = measured(device), time.perf_counter()
                mask_init.on_train_begin(args, state, control, **kwargs)
                peak.__exit__(None, None, None)
                self.result["mask_init"] = {"seconds": round(time.perf_counter() - start, 2), **mib(peak)}
            self.training_peak = measured(device)

        def on_step_begin(self, args, state, control, **kwargs):
            self._sync()
            self._started = time.perf_counter()

        def on_step_end(self, args, state, control, **kwargs):
            self._sync()
            self.step_seconds.append(time.perf_counter() - self._started)

        def on_train_end(self, args, state, control, **kwargs):
            self.training_peak.__exit__(None, None, None)
            self.result["training"] = mib(self.training_peak)

    return Measure()


def evaluate(model, dataset, collator, device, batch_size: int = 64) -> dict:
    """Loss (mean over completion tokens), token accuracy and exact match (every completion token the argmax) of
    `model` on a dataset tokenized by SFTTrainer, batched by its collator."""
    import torch
    import torch.nn.functional as F
    from torch.utils.data import DataLoader

    total = count = correct = exact = rows = 0
    model.eval()
    with torch.no_grad():
        for batch in DataLoader(dataset, batch_size=batch_size, collate_fn=collator):
            ids, attention, labels = (batch[k].to(device) for k in ("input_ids", "attention_mask", "labels"))
            logits = model(input_ids=ids, attention_mask=attention).logits.float()[:, :-1]
            labels = labels[:, 1:]
            keep = labels != -100
            total += F.cross_entropy(logits[keep], labels[keep], reduction="sum").item()
            right = (logits.argmax(-1) == labels) | ~keep
            correct += int((right & keep).sum())
            count += int(keep.sum())
            exact += int(right.all(1).sum())
            rows += ids.shape[0]
    return {"loss": total / count, "token_accuracy": correct / count, "exact_match": exact / rows}


def lora_rank(model, target_trainable: int) -> tuple[int, int]:
    """The rank of the all-linear LoRA adapter (every Linear but lm_head) whose trainable count is closest to
    `target_trainable`, and that count."""
    from torch import nn

    linears = [m for n, m in model.named_modules() if isinstance(m, nn.Linear) and not n.endswith("lm_head")]
    per_rank = sum(m.in_features + m.out_features for m in linears)
    rank = max(1, round(target_trainable / per_rank))
    return rank, rank * per_rank


def run_method(spec: dict) -> dict:
    """Fine-tune the saved base with one method at one learning rate; the result as a dict."""
    import datasets
    import torch
    import transformers
    from peft import LoraConfig
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from trl import SFTConfig, SFTTrainer

    from fish_peft import FishConfig, FishMaskInitCallback

    transformers.logging.set_verbosity_error()
    datasets.disable_progress_bars()
    size, method, device = spec["size"], spec["method"], torch.device(spec["device"])
    base = Path(spec["base"])
    tok = AutoTokenizer.from_pretrained(base)
    model = AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32).to(device)
    total = sum(p.numel() for p in model.parameters())
    budget = int(total * KEEP_RATIO)
    callbacks, peft_config = [], None
    rank, lora_trainable = lora_rank(model, budget)
    if method in ("fish", "fish_matched"):
        keep_ratio = KEEP_RATIO if method == "fish" else (lora_trainable + 0.5) / total
        peft_config = FishConfig(keep_ratio=keep_ratio, target_modules="all-linear", num_samples=size["fisher_samples"])
        measure = measurement_callback(device, mask_init=FishMaskInitCallback())
    else:
        measure = measurement_callback(device)
        if method == "lora":
            peft_config = LoraConfig(
                r=rank, lora_alpha=2 * rank, lora_dropout=0.0, target_modules="all-linear", task_type="CAUSAL_LM"
            )
    callbacks.append(measure)
    args = SFTConfig(
        output_dir=spec["output_dir"], max_steps=size["steps"], per_device_train_batch_size=size["batch"],
        gradient_checkpointing=False,  # TRL's default recomputes activations in backward: not for a model this small
        learning_rate=spec["lr"], lr_scheduler_type="cosine", warmup_steps=min(10, size["steps"] // 10), weight_decay=0.0,
        logging_steps=max(1, size["steps"] // 10), report_to=[], save_strategy="no", disable_tqdm=True,
        use_cpu=device.type == "cpu", bf16=False, fp16=False, seed=0, data_seed=0, dataloader_num_workers=0,
        max_length=64,
    )
    train = datasets.Dataset.from_list(examples(TASK, size["train_examples"], seed=0))
    val = {
        task: datasets.Dataset.from_list(examples(task, size["val_examples"], seed=1)) for task in (TASK, *PRETRAINING_TASKS)
    }
    trainer = SFTTrainer(model=model, args=args, train_dataset=train, eval_dataset=val, processing_class=tok,
                         peft_config=peft_config, callbacks=callbacks)
    before = {task: evaluate(trainer.model, trainer.eval_dataset[task], trainer.data_collator, device) for task in val}
    start = time.perf_counter()
    output = trainer.train()
    seconds = time.perf_counter() - start
    after = {task: evaluate(trainer.model, trainer.eval_dataset[task], trainer.data_collator, device) for task in val}
    trainable = sum(p.numel() for p in trainer.model.parameters() if p.requires_grad)
    timed = measure.step_seconds[TIMED_FROM_STEP - 1:] or measure.step_seconds
    result = {
        "lr": spec["lr"],
        "trainable": trainable,
        "trainable_share": trainable / total,
        "val_loss": after[TASK]["loss"],
        "val_token_accuracy": after[TASK]["token_accuracy"],
        "val_exact_match": after[TASK]["exact_match"],
        "val_loss_before": before[TASK]["loss"],
        "pretraining_tasks_loss": {task: after[task]["loss"] for task in PRETRAINING_TASKS},
        "pretraining_tasks_loss_before": {task: before[task]["loss"] for task in PRETRAINING_TASKS},
        "train_loss": output.training_loss,
        "step_ms_median": 1000 * statistics.median(timed),
        "steps": len(measure.step_seconds),
        "train_seconds": round(seconds, 2),
        "memory": measure.result,
    }
    if method == "lora":
        result["lora_rank"] = peft_config.r
    if method in ("fish", "fish_matched"):
        config = trainer.model.peft_config["default"]
        result["keep_ratio"] = config.keep_ratio
        result["mask_entries"] = sum(config.sparse_parameters.values())
        result["mask_parameters"] = len(config.sparse_parameters)
    return result


# ---- the driver ----------------------------------------------------------------------------------------------------


def launch(specs: list[dict]) -> list[dict]:
    """Run `specs` one after the other in a fresh process; their results."""
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]),
           "TOKENIZERS_PARALLELISM": "false", "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1",
           "HF_DATASETS_OFFLINE": "1"}
    env.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
    command = [sys.executable, __file__, "--worker", json.dumps(specs)]
    done = subprocess.run(command, stdout=subprocess.PIPE, text=True, env=env)
    if done.returncode != 0:
        raise RuntimeError(f"{', '.join(s['method'] for s in specs)} failed with exit status {done.returncode}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    parser.add_argument("--quick", action="store_true", help="tiny model, a few steps (smoke test)")
    parser.add_argument("--grid", action="store_true", help="every method at each learning rate of GRID")
    parser.add_argument("--methods", default=",".join(METHODS))
    parser.add_argument("--one-process", action="store_true", help="all methods in one process, one after the "
                        "other (quicker; the peak memory of each then includes what the ones before it left); default "
                        "with --quick")
    parser.add_argument("--threads", type=int, default=1, help="torch threads on CPU (default 1: on a small machine "
                        "shared with other work, 2 threads spin against each other and step times scatter by 10x)")
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        import torch

        torch.set_num_threads(int(os.environ.get("SFT_BENCHMARK_THREADS", "1")))
        with contextlib.redirect_stdout(sys.stderr):  # the Trainer prints its logs; stdout is for the result
            results = [run_method(spec) for spec in json.loads(args.worker)]
        print(json.dumps(results))
        return 0

    import torch

    if args.device == "cpu":
        torch.set_num_threads(args.threads)
    os.environ["SFT_BENCHMARK_THREADS"] = str(args.threads if args.device == "cpu" else torch.get_num_threads())
    device = torch.device(args.device, 0) if args.device == "cuda" else torch.device("cpu")
    size = SIZES["quick" if args.quick else "full"]
    methods = args.methods.split(",")
    started = time.perf_counter()
    with tempfile.TemporaryDirectory() as folder:
        base = Path(folder) / "base"
        print("pretraining the base model", file=sys.stderr)
        pretraining = pretrain(size, device, base)
        runs = [(m, lr) for m in methods for lr in (GRID[m] if args.grid else [LEARNING_RATES[m]])]
        specs = [{"size": size, "method": m, "lr": lr, "device": str(device), "base": str(base),
                  "output_dir": str(Path(folder) / f"{m}-{lr}")} for m, lr in runs]
        one_process = args.one_process or args.quick
        if one_process:
            print(f"{', '.join(methods)} in one process", file=sys.stderr)
            outcomes = launch(specs)
        else:
            outcomes = []
            for (m, lr), spec in zip(runs, specs):
                print(f"{m} at lr {lr}", file=sys.stderr)
                outcomes += launch([spec])
        results = {}
        for (m, lr), outcome in zip(runs, outcomes):
            results.setdefault(m, {})[lr] = outcome
    best = {m: min(by_lr.values(), key=lambda r: r["val_loss"]) for m, by_lr in results.items()}
    report = {
        "device": str(device),
        "device_name": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
        "torch_threads": torch.get_num_threads(),
        "fresh_process_per_method": not one_process,
        "size": size,
        "keep_ratio": KEEP_RATIO,
        "task": f"{TASK} (fine-tuning) after {' + '.join(PRETRAINING_TASKS)} (pretraining); completion-only loss",
        "pretraining": pretraining,
        "methods": best,
        "seconds": round(time.perf_counter() - started, 1),
    }
    if args.grid:
        shown = ("val_loss", "val_exact_match", "train_loss", "pretraining_tasks_loss")
        report["grid"] = {m: {str(lr): {k: r[k] for k in shown} for lr, r in by_lr.items()} for m, by_lr in results.items()}
    print(json.dumps(report, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
