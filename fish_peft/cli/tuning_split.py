"""The tuning split: a share of the training examples held out, drawn with a seed and stratified by label, that a run
is scored on instead of the task's validation split (`evaluate_on: tuning`), so that a learning rate can be chosen
without ever looking at the evaluation data (`fish-peft compare --lr-grid`)."""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence

import numpy as np
from datasets import DatasetDict

from fish_peft.cli.recipe import TUNING_SPLIT
from fish_peft.cli.tasks import Task


def tuning_size(examples: int, share: float) -> int:
    """How many of `examples` training examples the tuning split holds; refused when it or the rest would be empty."""
    size = round(share * examples)
    if size < 1 or size >= examples:
        left = "no example" if size < 1 else "no example to train on"
        raise ValueError(
            f"tuning_share {share:g} of {examples} training examples leaves {left} (a tuning split of {size}); "
            "a learning-rate grid needs more training data (max_train_samples) or another tuning_share."
        )
    return size


def tuning_indices(labels: Sequence, share: float, seed: int, stratify: bool = True) -> np.ndarray:
    """Sorted positions of the tuning split among the training examples whose labels are `labels`: `share` of them,
    drawn with `seed`; with `stratify`, each label keeps (to within one example) its share of the training data."""
    size = tuning_size(len(labels), share)
    order = np.random.default_rng(seed).permutation(len(labels))
    if stratify:  # the labels grouped, in random order within each: evenly spaced picks take each label's share
        order = order[np.argsort(np.asarray(labels)[order], kind="stable")]
    picks = ((np.arange(size) + 0.5) * len(labels) / size).astype(int)
    return np.sort(order[picks])


def hold_out_tuning_split(splits: DatasetDict, task: Task, share: float, seed: int) -> tuple[Task, DatasetDict]:
    """The task scored on the tuning split alone, and the splits: `train` without the tuning examples, and `tuning`
    (the task's validation splits are left out, so that nothing of them is seen)."""
    train = splits["train"]
    held_out = tuning_indices(train["labels"], share, seed, stratify=not task.is_regression)
    rest = np.setdiff1d(np.arange(len(train)), held_out)
    tuned = dataclasses.replace(task, validation_splits=(TUNING_SPLIT,))
    return tuned, DatasetDict({"train": train.select(rest), TUNING_SPLIT: train.select(held_out)})
