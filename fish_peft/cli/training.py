"""One fine-tuning run from a recipe, as one straight pipeline (`run`): recipe → data → model (`run_setup`) → mask →
adapter → Trainer, with the training loop chosen once (`training_loops`: Trainer's, an evolving mask's, periodic diff
averaging's) → results and output folder (`run_output`). Resume enters at the start: it picks the checkpoint and
the mask the interrupted run started with, and each loop continues from its own kind of checkpoint.

The output folder ends up with the adapter (`save_pretrained` format; the whole model for `full`), `results.json`,
`recipe.yaml`, the mask plot `mask.png` (sparse methods) and a model card `README.md`. Final files are written
atomically, so an interrupted run never leaves a half-written adapter; Trainer's epoch checkpoints live in
`checkpoints/` and are removed once the best one has been saved. A run writes into a new or empty folder or replaces
an earlier run's own files (`output_folders.RUN`); the user's files there stay, and any other folder is refused.
"""

from __future__ import annotations

import tempfile
import time
from pathlib import Path
from typing import Any, Optional

import torch
from torch.utils.data import DataLoader
from transformers import AutoModelForSequenceClassification, Trainer, TrainingArguments

from fish_peft.cli.averaged_training import own_share
from fish_peft.cli.output_folders import RUN, check_output_folder, remove_owned
from fish_peft.cli.peft_baselines import budget_matched_model, linear_mask, prepare_to_save
from fish_peft.cli.recipe import Recipe, load_recipe
from fish_peft.cli.resume import CHECKPOINTS, interrupted, remember_mask, remember_recipe, resume_point, run_mask
from fish_peft.cli.run_output import run_results, strip_prefix, write_run_folder
from fish_peft.cli.run_setup import Setup
from fish_peft.cli.tasks import Task
from fish_peft.cli.training_loops import AveragedDiffLoop, EvolvingDiffLoop, TrainerLoop
from fish_peft.distributed.processes import rank_and_world
from fish_peft.dynamic import evolving_diff_engine
from fish_peft.hub.model_card import BUDGET_METHODS, FISHER_METHODS, SPARSE_DIFF_METHODS
from fish_peft.masks.fish_mask import FishMask
from fish_peft.masks.selection import base_named_parameters, bias_mask, compute_fisher_mask, random_mask, resolve_modules_to_save
from fish_peft.tuner.config import FishConfig


FINISHED_RUN = ("results.json", "adapter_config.json", "recipe.yaml")  # any of them: the folder holds a finished run
MASKED_METHODS = (*SPARSE_DIFF_METHODS, "shira_fish")  # the methods a run starts from a mask (None for the others)


def prepare_run(recipe, overwrite: bool, resume: bool):
    """(the recipe with its method's own settings, its output folder, checked unless resuming, the checkpoint to
    resume from or None)."""
    recipe = recipe.with_method_settings()
    out = Path(recipe.output_dir)
    checkpoint = resume_point(recipe, out) if resume else None
    if not resume:
        check_output_dir(out, overwrite, elsewhere=f"{out}-{recipe.method}")
    return recipe, out, checkpoint


def run(recipe: Recipe, overwrite: bool = False, resume: bool = False) -> dict[str, Any]:
    """Train and evaluate one method as the recipe says (at its `lr_by_method` / `batch_size_by_method` values);
    returns what `results.json` holds. `resume` continues an interrupted run in the output folder from its last
    complete checkpoint (see `resume.py`)."""
    recipe, out, checkpoint = prepare_run(recipe, overwrite, resume)
    started = time.perf_counter()
    setup = Setup.from_recipe(recipe)
    args = training_arguments(recipe, out, setup.task)
    setup.model.to(args.device)  # the Fisher runs on the accelerator the Trainer trains on
    mask, fisher_seconds = starting_mask(recipe, setup, out, checkpoint)
    model = apply_method(recipe, setup.model, mask)
    loop = training_loop(recipe, model, mask, setup)
    if checkpoint is None and rank_and_world()[0] == 0:
        start_checkpoints(recipe, mask, out)
    trainer = Trainer(
        model=model,
        args=args,
        train_dataset=setup.tokenized["train"],
        eval_dataset=setup.evaluation_splits(),
        data_collator=setup.collator,
        compute_metrics=setup.metric_fn(),
        callbacks=loop.callbacks,
    )
    trained = loop.train(trainer, checkpoint)
    results = run_results(recipe, setup, model, trainer, trained, fisher_seconds)
    prepare_to_save(recipe, model)
    write_run_folder(out, recipe, setup.task.name, model, trained.mask, results, started)
    return results


def check_output_dir(out: Path, overwrite: bool, elsewhere: str) -> None:
    """Refuse, before any work, a folder that is not a run (see `output_folders`), and a run there that would be
    replaced or ended without --overwrite. What a run that never trained left is no run: a new one starts there."""
    check_output_folder(out, RUN, elsewhere)
    if overwrite:
        return
    if any((out / marker).exists() for marker in FINISHED_RUN):
        raise FileExistsError(
            f"{out} already holds a run; pass --overwrite to replace it (files you added there stay) or choose "
            f"another --output-dir, e.g. {elsewhere}."
        )
    if interrupted(out):
        raise FileExistsError(
            f"{out} holds an interrupted run: --resume continues it from its last checkpoint, --overwrite starts again."
        )


def starting_mask(recipe: Recipe, setup: Setup, out: Path, checkpoint: Optional[Path]) -> tuple[Optional[FishMask], Optional[float]]:
    """The mask the run starts with (None for lora and full), and the seconds its Fisher took (fish). A resumed run
    takes the mask its interrupted run started with: the checkpoint's adapter loads onto it."""
    if checkpoint is not None and recipe.method in MASKED_METHODS:
        return run_mask(out), None
    started = time.perf_counter()
    mask = method_mask(recipe, setup.model, setup.tokenized["train"], setup.collator)
    return mask, time.perf_counter() - started if recipe.method in FISHER_METHODS else None


def method_mask(recipe: Recipe, model, train_dataset, collator) -> Optional[FishMask]:
    """The sparse support of the sparse methods (None for lora and full); shira_fish's is FISH's on Linear weights."""
    if recipe.method in FISHER_METHODS:
        mask = compute_fisher_mask(
            model, fisher_loader(recipe, train_dataset, collator), recipe.keep_ratio, recipe.num_samples,
            selection=recipe.selection, eligible=recipe.eligible, fisher=recipe.fisher, score=recipe.score, progress=True,
            per_process=recipe.merge_every is not None and recipe.mask_sharing == "individual",
        )
        return linear_mask(model, mask) if recipe.method == "shira_fish" else mask
    if recipe.method == "random":
        return random_mask(model, recipe.keep_ratio, seed=recipe.seed, selection=recipe.selection, eligible=recipe.eligible)
    if recipe.method == "bitfit":
        return bias_mask(model)
    return None


def fisher_loader(recipe: Recipe, train_dataset, collator) -> DataLoader:
    """The shuffled (seeded) training examples the Fisher is scored on; with individual masks under diff averaging,
    only this process's share of them."""
    generator = torch.Generator().manual_seed(recipe.seed)
    dataset = own_share(train_dataset, recipe) if recipe.merge_every else train_dataset
    return DataLoader(dataset, batch_size=recipe.batch_size, shuffle=True, collate_fn=collator, generator=generator)


def apply_method(recipe: Recipe, model, mask: Optional[FishMask]):
    """Wrap the model for its method: a FISH sparse diff, a LoRA adapter, a PEFT baseline at FISH's budget
    (`peft_baselines`), or plain full fine-tuning."""
    from peft import LoraConfig, get_peft_model

    if recipe.method in BUDGET_METHODS:
        return budget_matched_model(recipe, model, mask)
    if mask is not None:
        config = FishConfig(
            mask=mask, save_dtype=recipe.save_dtype, mask_update=recipe.mask_update, update_every=recipe.update_every,
            prune_rate=recipe.prune_rate, exploration=recipe.exploration, penalty=recipe.penalty,
        )
        return get_peft_model(model, config)
    if recipe.method == "lora":
        heads = resolve_modules_to_save(model, "auto")
        config = LoraConfig(r=recipe.lora_r, lora_alpha=recipe.lora_alpha, target_modules=recipe.lora_targets, modules_to_save=heads)
        return get_peft_model(model, config)
    return model


def training_loop(recipe: Recipe, model, mask: Optional[FishMask], setup: Setup):
    """How the adapter trains, chosen once: periodic diff averaging (`merge_every`), an evolving mask's engine in
    Trainer's loop (`mask_update`), or Trainer's loop alone."""
    if recipe.merge_every:
        fisher_data = lambda: fisher_loader(recipe, setup.tokenized["train"], setup.collator)  # noqa: E731
        return AveragedDiffLoop(recipe, mask, fisher_data, Path(recipe.output_dir) / CHECKPOINTS)
    if recipe.mask_update:
        return EvolvingDiffLoop(recipe, mask, evolving_diff_engine(model))
    return TrainerLoop(recipe, mask)


def start_checkpoints(recipe: Recipe, mask: Optional[FishMask], out: Path) -> None:
    """Just before training: forget what an earlier run of this folder kept for --resume (its own files only), and
    keep this run's recipe and mask. Done no earlier, so that a run that fails before training leaves nothing that
    looks like an interrupted run."""
    remove_owned(out, RUN, CHECKPOINTS)
    remember_recipe(recipe, out)
    if mask is not None:
        remember_mask(mask, out)


def training_arguments(recipe: Recipe, out: Path, task: Task) -> TrainingArguments:
    """The recipe's TrainingArguments fields over fish-peft's defaults, and the fields the run sets itself."""
    first_split = task.validation_splits[0]
    defaults = dict(
        data_seed=recipe.seed,
        eval_strategy="epoch",
        save_strategy="epoch",
        logging_strategy="epoch",
        # a classifier's loss is already a mean over its batch; left on, Trainer multiplies it by the number of
        # processes (meant for token-summed LM losses), so DDP's gradients would be that many times too large
        average_tokens_across_devices=False,
        report_to=[],
        use_cpu=not torch.cuda.is_available(),
        dataloader_num_workers=0,
    )
    return TrainingArguments(
        **{**defaults, **recipe.training},
        output_dir=str(out / CHECKPOINTS),
        seed=recipe.seed,
        # the best checkpoint is kept too; an evolving diff's newest checkpoint is whole only once the engine state
        # follows the Trainer's files (rotation comes between them), so the one before stays until then
        save_total_limit=2 if recipe.mask_update else 1,
        save_only_model=False,  # optimizer, scheduler and RNG states, for --resume
        # an evolving mask's earlier checkpoints hold another support than the model now has: keep the final model
        load_best_model_at_end=recipe.mask_update is None,
        metric_for_best_model=f"{first_split}_{task.metrics[0]}",
        greater_is_better=True,
    )


def build_mask_only(recipe: Recipe) -> tuple[FishMask, dict[str, tuple[int, ...]]]:
    """The recipe's mask without training (`fish-peft mask`), and the shapes of all base parameters (for the plot)."""
    if recipe.method not in MASKED_METHODS:
        raise ValueError(f"method {recipe.method!r} has no mask; use fish, random, bitfit or shira_fish.")
    setup = Setup.from_recipe(recipe)
    with tempfile.TemporaryDirectory() as scratch:
        setup.model.to(training_arguments(recipe, Path(scratch), setup.task).device)
    mask = method_mask(recipe, setup.model, setup.tokenized["train"], setup.collator)
    return mask, {name: tuple(p.shape) for name, p in base_named_parameters(setup.model)}


def evaluate_run(run_dir: Path, overrides: dict[str, str]) -> dict[str, dict[str, float]]:
    """Metrics of a saved run on its validation split(s), or on --validation-file (`fish-peft evaluate`)."""
    from peft import PeftModel

    if not (run_dir / "recipe.yaml").is_file():
        raise FileNotFoundError(f"{run_dir} holds no recipe.yaml; is it the output folder of `fish-peft train`?")
    recipe = load_recipe(str(run_dir / "recipe.yaml"), overrides)
    if not isinstance(recipe, Recipe):
        raise ValueError(
            f"{run_dir} is an SFT run: its results.json already holds its validation loss, perplexity and generations; "
            "`fish-peft eval` re-evaluates classification runs."
        )
    setup = Setup.from_recipe(recipe)
    if (run_dir / "adapter_config.json").is_file():
        model = PeftModel.from_pretrained(setup.model, run_dir)
    else:
        model = AutoModelForSequenceClassification.from_pretrained(run_dir)
    with tempfile.TemporaryDirectory() as scratch:
        args = TrainingArguments(
            output_dir=scratch, per_device_eval_batch_size=recipe.training["per_device_eval_batch_size"], report_to=[],
            use_cpu=not torch.cuda.is_available(),
        )
        trainer = Trainer(model=model, args=args, data_collator=setup.collator, compute_metrics=setup.metric_fn())
        return {
            split: strip_prefix(trainer.evaluate(dataset, metric_key_prefix=split), split)
            for split, dataset in setup.evaluation_splits().items()
        }
