"""How an SFT run is judged: its validation loss (on the tokens the training loss counts) and perplexity, exp of
that loss, and the greedy continuations of a few validation prompts, shown in results.json next to the answers the
data gives."""

from __future__ import annotations

import math
from typing import Any

import torch

from fish_peft.cli.run_output import strip_prefix

VALIDATION = "validation"
TRL_METRICS = ("mean_token_accuracy", "entropy")  # what TRL's SFTTrainer logs beside an evaluation's loss


def validation_metrics(trainer) -> dict[str, float]:
    """Trainer's evaluation of the validation split (the loss), with perplexity and TRL's token accuracy and entropy
    (which TRL logs rather than returns)."""
    metrics = strip_prefix(trainer.evaluate(trainer.eval_dataset[VALIDATION], metric_key_prefix=VALIDATION), VALIDATION)
    return with_perplexity({**metrics, **trl_metrics(trainer.state.log_history[-1])})


def trl_metrics(entry: dict[str, Any]) -> dict[str, float]:
    """TRL's evaluation metrics in a log entry (logged as eval_<name> whatever the split is called)."""
    return {name: entry[f"eval_{name}"] for name in TRL_METRICS if f"eval_{name}" in entry}


def with_perplexity(metrics: dict[str, Any]) -> dict[str, Any]:
    """`metrics` with `perplexity` = exp(`loss`) after the loss (None where it would overflow a float)."""
    loss = metrics.get("loss")
    if loss is None:
        return metrics
    ordered = {"loss": loss, "perplexity": math.exp(loss) if loss < 700 else None}
    return {**ordered, **{k: v for k, v in metrics.items() if k not in ordered}}


def generate_answers(model, tokenizer, examples: list[dict[str, Any]], max_new_tokens: int) -> list[dict[str, Any]]:
    """Greedy continuations of each example's prompt (a conversation, rendered with the chat template and the
    assistant's turn opened, or a plain string), decoded without special tokens, beside the data's `reference`."""
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    answers = []
    try:
        for example in examples:
            inputs = prompt_inputs(tokenizer, example["prompt"]).to(device)
            with torch.no_grad():
                output = model.generate(
                    **inputs, max_new_tokens=max_new_tokens, do_sample=False, pad_token_id=tokenizer.pad_token_id,
                )
            new_tokens = output[0, inputs["input_ids"].shape[1]:]
            answers.append({**example, "generation": tokenizer.decode(new_tokens, skip_special_tokens=True).strip()})
    finally:
        model.train(was_training)
    return answers


def prompt_inputs(tokenizer, prompt):
    """input_ids and attention_mask of one prompt, a batch of one."""
    if isinstance(prompt, str):
        return tokenizer(prompt, return_tensors="pt")
    return tokenizer.apply_chat_template(prompt, add_generation_prompt=True, return_tensors="pt", return_dict=True)


def epoch_rows(log_history: list[dict]) -> list[dict[str, Any]]:
    """Validation loss and perplexity (and TRL's other evaluation metrics) after every evaluation, with the training
    loss logged at the same epoch."""
    rows: dict[float, dict[str, Any]] = {}
    prefix = f"eval_{VALIDATION}_"
    for entry in log_history:
        epoch = entry.get("epoch")
        if epoch is None:
            continue
        if f"{prefix}loss" in entry:
            metrics = {k.removeprefix(prefix): v for k, v in entry.items() if k.startswith(prefix) and not k.endswith(("_runtime", "per_second"))}
            rows.setdefault(epoch, {"epoch": epoch})[VALIDATION] = with_perplexity({**metrics, **trl_metrics(entry)})
        elif "loss" in entry:
            rows.setdefault(epoch, {"epoch": epoch})["train_loss"] = entry["loss"]
    return [rows[e] for e in sorted(rows)]
