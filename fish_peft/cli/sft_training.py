"""One SFT run from a recipe, as one straight pipeline (`run_sft`): recipe → data (`sft_data`) → tokenizer and causal
LM (`sft_model`) → method (`sft_methods`) → TRL's SFTTrainer, whose loss counts the completions or assistant turns
(`loss_on`) and whose Fisher, for fish, is that same loss on its own training batches when training begins
(`training_loops.LazyMaskLoop`) → evaluation (`sft_evaluation`) → the output folder of every run (`run_output`).

Bad data, a tokenizer that cannot render the data, a keep ratio the model cannot honour and examples that keep no
token to learn from within max_length all stop the run before training. `--resume` continues from the last complete
checkpoint with the mask the run started with, as a classification run does (`resume.py`).
"""

from __future__ import annotations

import time
import warnings
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Optional

import torch
from accelerate import PartialState
from transformers import TrainerCallback, set_seed

from fish_peft.cli.resume import CHECKPOINTS, run_mask
from fish_peft.cli.run_output import training_facts, write_run_folder
from fish_peft.cli.sft_data import MESSAGES, SFTData, load_sft_data
from fish_peft.cli.sft_evaluation import VALIDATION, epoch_rows, generate_answers, validation_metrics
from fish_peft.cli.sft_methods import peft_config, starting_mask
from fish_peft.cli.sft_model import load_causal_lm, load_tokenizer
from fish_peft.cli.sft_recipe import SFT_TASK, SFTRecipe
from fish_peft.cli.training import prepare_run, start_checkpoints
from fish_peft.cli.training_loops import LazyMaskLoop, Trained
from fish_peft.distributed.processes import rank_and_world

SPARSE_METHODS = ("fish", "random")


def require_trl():
    """TRL, which SFT runs train with: an optional dependency, the `trl` extra."""
    try:
        import trl
    except ImportError as err:
        raise ImportError("SFT recipes train with TRL's SFTTrainer, and trl is not installed: pip install fish-peft[trl]") from err
    return trl


def run_sft(recipe: SFTRecipe, overwrite: bool = False, resume: bool = False, callbacks: tuple[TrainerCallback, ...] = ()) -> dict[str, Any]:
    """Fine-tune the recipe's causal LM with its method (at its `lr_by_method` / `batch_size_by_method` values) and
    write the output folder; returns what results.json holds. `resume` continues an interrupted run in the output
    folder; `callbacks` are added to the Trainer's."""
    trl = require_trl()
    recipe, out, checkpoint = prepare_run(recipe, overwrite, resume)
    started = time.perf_counter()
    PartialState()  # under accelerate launch / torch.distributed.run: join the process group first
    set_seed(recipe.seed)
    data = load_sft_data(recipe)
    tokenizer = load_tokenizer(recipe, data)
    args = sft_arguments(trl, recipe, out, data)
    model = load_causal_lm(recipe, tokenizer)
    resumed_mask = checkpoint is not None and recipe.method in SPARSE_METHODS
    mask = run_mask(out) if resumed_mask else starting_mask(recipe, model)
    loop = LazyMaskLoop(recipe, mask, out, *callbacks)
    with _no_folders_left_on_error(out, out / CHECKPOINTS):  # the Trainer makes its checkpoints folder at once
        trainer = trl.SFTTrainer(
            model=model,
            args=args,
            train_dataset=data.splits["train"],
            eval_dataset={VALIDATION: data.splits[VALIDATION]},
            processing_class=tokenizer,
            peft_config=peft_config(recipe, mask),
            callbacks=loop.callbacks,
        )
        check_loss_tokens(trainer, data, args)
    if checkpoint is None and rank_and_world()[0] == 0:
        start_checkpoints(recipe, mask, out)
    trained = loop.train(trainer, checkpoint)
    results = sft_results(recipe, data, trainer, tokenizer, trained, loop.fisher_seconds)
    write_run_folder(out, recipe, SFT_TASK, trainer.model, trained.mask, results, started, tokenizer=tokenizer)
    return results


@contextmanager
def _no_folders_left_on_error(*folders: Path):
    """On an error, remove those of `folders` (innermost last) that did not exist before and are still empty, so
    that a run stopped before training leaves nothing that blocks the corrected retry."""
    new = [folder for folder in folders if not folder.exists()]
    try:
        yield
    except BaseException:
        for folder in reversed(new):
            if folder.is_dir() and not any(folder.iterdir()):
                folder.rmdir()
        raise


def sft_arguments(trl, recipe: SFTRecipe, out: Path, data: SFTData):
    """TRL's SFTConfig: the recipe's fields over fish-peft's defaults, the loss `loss_on` asks for, and the fields the
    run sets itself (checkpoints for --resume, the best model by validation loss)."""
    given = recipe.training
    strategy = given.get("eval_strategy", "epoch")
    defaults = dict(
        data_seed=recipe.seed,
        eval_strategy=strategy,
        save_strategy=strategy,  # the best model is chosen among evaluated checkpoints
        logging_strategy=strategy,
        report_to=[],
        use_cpu=not torch.cuda.is_available(),
        dataloader_num_workers=0,
    )
    if strategy == "steps" and "eval_steps" in given:
        defaults.update(save_steps=given["eval_steps"], logging_steps=given["eval_steps"])
    if "bf16" not in given and "fp16" not in given:  # TRL turns bf16 on everywhere; here only where a GPU has it
        defaults["bf16"] = torch.cuda.is_available() and torch.cuda.is_bf16_supported()
    evaluated = strategy != "no"
    return trl.SFTConfig(
        **{**defaults, **given},
        assistant_only_loss=data.format == MESSAGES and recipe.loss_on == "assistant",
        completion_only_loss=data.format != MESSAGES and recipe.loss_on != "all",
        output_dir=str(out / CHECKPOINTS),
        seed=recipe.seed,
        save_total_limit=1,
        save_only_model=False,  # optimizer, scheduler and RNG states, for --resume
        load_best_model_at_end=evaluated,
        metric_for_best_model=f"{VALIDATION}_loss" if evaluated else None,
        greater_is_better=False if evaluated else None,
    )


def check_loss_tokens(trainer, data: SFTData, args) -> None:
    """Refuse, before training, splits where no example keeps a token the loss counts once TRL has truncated it to
    max_length (prompts that fill it; TRL drops such examples); warn when some training examples were dropped."""
    counted = "assistant turns" if args.assistant_only_loss else "completions" if trainer.completion_only_loss else "tokens"
    for split, prepared in ((("train", trainer.train_dataset)), (VALIDATION, trainer.eval_dataset[VALIDATION])):
        kept = _examples_with_loss_tokens(prepared)
        if kept == 0:
            raise ValueError(
                f"No {split} example keeps a token of its {counted} within max_length={args.max_length}, so the loss "
                "counts nothing. Raise max_length or shorten the prompts."
            )
        given = len(data.splits[split])
        if split == "train" and not args.packing and kept < given:
            warnings.warn(f"{given - kept} of {given} training examples keep no token of their {counted} within "
                          f"max_length={args.max_length}: they are left out.", stacklevel=2)


def _examples_with_loss_tokens(dataset) -> int:
    if "labels" not in dataset.column_names:
        return len(dataset)
    return sum(1 for labels in dataset["labels"] if any(label != -100 for label in labels))


def sft_results(recipe: SFTRecipe, data: SFTData, trainer, tokenizer, trained: Trained, fisher_seconds: Optional[float]) -> dict[str, Any]:
    """What results.json holds, but for what saving adds (`adapter_bytes`, `wall_seconds`)."""
    model, mask = trainer.model, trained.mask
    return {
        "task": SFT_TASK,
        "method": recipe.method,
        "model": recipe.model,
        "dataset": data.source,
        "data_format": data.format,
        "conversational": data.conversational,
        "loss_on": recipe.loss_on,
        "metrics": {VALIDATION: validation_metrics(trainer)},
        "epochs": epoch_rows(trainer.state.log_history),
        "generations": generate_answers(model, tokenizer, data.prompts(recipe.generations), recipe.max_new_tokens),
        **training_facts(model, trained, fisher_seconds),
        "mask": None if mask is None else {"selected": mask.num_selected, "parameters": len(mask), **mask.info},
        "recipe": recipe.to_dict(),
        "label_names": None,
        "train_examples": len(data.splits["train"]),
        "validation_examples": {VALIDATION: len(data.splits[VALIDATION])},
        "processes": rank_and_world()[1],
    }
