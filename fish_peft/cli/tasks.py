"""GLUE task table and metrics: GLUE's official metrics through scikit-learn and scipy.

`evaluate` loads its GLUE metric script from the Hugging Face Hub, which fails offline. scikit-learn and scipy load
on the first metric computed, so the task table stays light to import.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import numpy as np

REGRESSION_METRICS = frozenset({"pearson", "spearmanr"})


@dataclass(frozen=True)
class Task:
    """What training and evaluation need to know about a sentence(-pair) classification or regression task."""

    name: str
    text_columns: tuple[str, ...]
    num_labels: int  # 1 means regression
    validation_splits: tuple[str, ...]
    metrics: tuple[str, ...]
    label_names: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        # Checked here so that a bad custom task fails when it is defined, not after training.
        where = f"Task {self.name!r}"
        if len(self.text_columns) not in (1, 2):
            raise ValueError(f"{where}: give 1 text column (single sentence) or 2 (pair), not {self.text_columns}.")
        if self.num_labels < 1:
            raise ValueError(f"{where}: num_labels must be >= 1 (1 means regression), not {self.num_labels}.")
        if not self.validation_splits:
            raise ValueError(f"{where}: give at least one validation split name.")
        if not self.metrics or any(m not in METRICS for m in self.metrics):
            raise ValueError(f"{where}: metrics must be a non-empty subset of {sorted(METRICS)}, not {self.metrics}.")
        wrong_kind = [m for m in self.metrics if (m in REGRESSION_METRICS) != self.is_regression]
        if wrong_kind:
            kind = "regression" if self.is_regression else "classification"
            raise ValueError(f"{where}: metrics {wrong_kind} do not apply to {kind} (num_labels={self.num_labels}).")
        if "f1" in self.metrics and self.num_labels != 2:
            raise ValueError(f"{where}: f1 is binary (positive class 1) and needs num_labels=2, not {self.num_labels}.")
        if self.label_names and len(self.label_names) != self.num_labels:
            raise ValueError(f"{where}: {len(self.label_names)} label_names for num_labels={self.num_labels}.")

    @property
    def is_regression(self) -> bool:
        return self.num_labels == 1


def _check_pair(predictions: np.ndarray, labels: np.ndarray) -> None:
    if predictions.shape != labels.shape or predictions.ndim != 1 or predictions.size == 0:
        raise ValueError(
            f"Metrics need two non-empty 1-D arrays of equal length, got shapes {predictions.shape} and {labels.shape}."
        )


def accuracy(predictions: np.ndarray, labels: np.ndarray) -> float:
    from sklearn.metrics import accuracy_score

    _check_pair(predictions, labels)
    return float(accuracy_score(labels, predictions))


def f1(predictions: np.ndarray, labels: np.ndarray) -> float:
    """Binary F1 of class 1; 0.0 when there are no true or predicted positives."""
    from sklearn.metrics import f1_score

    _check_pair(predictions, labels)
    return float(f1_score(labels, predictions, pos_label=1, zero_division=0))


def matthews_correlation(predictions: np.ndarray, labels: np.ndarray) -> float:
    """Multiclass Matthews correlation; 0.0 when either side is constant."""
    from sklearn.metrics import matthews_corrcoef

    _check_pair(predictions, labels)
    return float(matthews_corrcoef(labels, predictions))


def pearson(predictions: np.ndarray, labels: np.ndarray) -> float:
    """Pearson correlation; NaN when either side is constant."""
    return _correlation("pearsonr", predictions, labels)


def spearmanr(predictions: np.ndarray, labels: np.ndarray) -> float:
    """Spearman rank correlation (ties share their mean rank); NaN when either side is constant."""
    return _correlation("spearmanr", predictions, labels)


def _correlation(name: str, predictions: np.ndarray, labels: np.ndarray) -> float:
    """`scipy.stats.<name>`'s statistic, without its warning on constant input (the NaN says it)."""
    from scipy import stats

    _check_pair(predictions, labels)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", stats.ConstantInputWarning)
        return float(getattr(stats, name)(predictions, labels).statistic)


METRICS: dict[str, Callable[[np.ndarray, np.ndarray], float]] = {
    "accuracy": accuracy,
    "f1": f1,
    "matthews_correlation": matthews_correlation,
    "pearson": pearson,
    "spearmanr": spearmanr,
}

_ENTAILMENT = ("entailment", "not_entailment")
GLUE_TASKS: dict[str, Task] = {
    task.name: task
    for task in (
        Task("cola", ("sentence",), 2, ("validation",), ("matthews_correlation",), ("unacceptable", "acceptable")),
        Task("sst2", ("sentence",), 2, ("validation",), ("accuracy",), ("negative", "positive")),
        Task(
            "mrpc", ("sentence1", "sentence2"), 2, ("validation",), ("accuracy", "f1"), ("not_equivalent", "equivalent")
        ),
        Task("qqp", ("question1", "question2"), 2, ("validation",), ("accuracy", "f1"), ("not_duplicate", "duplicate")),
        Task("stsb", ("sentence1", "sentence2"), 1, ("validation",), ("pearson", "spearmanr")),
        Task(
            "mnli", ("premise", "hypothesis"), 3, ("validation_matched", "validation_mismatched"), ("accuracy",),
            ("entailment", "neutral", "contradiction"),
        ),
        Task("qnli", ("question", "sentence"), 2, ("validation",), ("accuracy",), _ENTAILMENT),
        Task("rte", ("sentence1", "sentence2"), 2, ("validation",), ("accuracy",), _ENTAILMENT),
        Task("wnli", ("sentence1", "sentence2"), 2, ("validation",), ("accuracy",), _ENTAILMENT[::-1]),
    )
}
"""The GLUE tasks with the column names, splits and label order of the Hub dataset ``nyu-mll/glue``."""


def get_task(name: str) -> Task:
    """The GLUE task called ``name`` (case-insensitive)."""
    try:
        return GLUE_TASKS[name.lower()]
    except KeyError:
        raise ValueError(f"Unknown GLUE task {name!r}; choose one of {', '.join(GLUE_TASKS)}.") from None


def custom_task(text_columns: Sequence[str], num_labels: int, metrics: Sequence[str] | None = None) -> Task:
    """A task for user data, validated on ``"validation"``; default metrics follow GLUE's choice for the same shape."""
    if metrics is None:
        metrics = {1: ("pearson", "spearmanr"), 2: ("accuracy", "f1")}.get(num_labels, ("accuracy",))
    return Task("custom", tuple(text_columns), num_labels, ("validation",), tuple(metrics))


def compute_metrics(task: Task, predictions: np.ndarray, labels: np.ndarray) -> dict[str, float]:
    """The task's metrics plus ``combined_score``, their mean (as GLUE reports).

    ``predictions`` are logits of shape ``(n, num_labels)`` (or class ids of shape ``(n,)``) for classification,
    and scores of shape ``(n,)`` or ``(n, 1)`` for regression.
    """
    predictions, labels = np.asarray(predictions), np.asarray(labels).reshape(-1)
    if task.is_regression:
        if predictions.ndim == 2 and predictions.shape[1] == 1:
            predictions = predictions[:, 0]
    elif predictions.ndim == 2 and predictions.shape[1] == task.num_labels:
        predictions = predictions.argmax(axis=1)
    elif predictions.ndim != 1 or not np.issubdtype(predictions.dtype, np.integer):
        raise ValueError(
            f"Task {task.name!r}: expected logits of shape (n, {task.num_labels}) or integer class ids of shape (n,), "
            f"got {predictions.dtype} of shape {predictions.shape}."
        )
    scores = {name: METRICS[name](predictions, labels) for name in task.metrics}
    scores["combined_score"] = float(np.mean(list(scores.values())))
    return scores


def main_metric(metrics: Sequence[str]) -> tuple[str, bool]:
    """The metric a comparison ranks runs by, among the names of a run's `metrics`, and whether higher is better: the
    task's first (in GLUE's order: accuracy before F1, Pearson before Spearman), else the loss (an SFT run's)."""
    name = next((name for name in METRICS if name in metrics), None)
    return (name, True) if name else ("loss", False)


DEMO_DATASET = "vaderSentiment 3.3.2 movie-review sentences (shipped with fish-peft)"
"""The data of task ``rotten_tomatoes``: fish_peft/data's copy, not the Hub dataset of the same name."""


def dataset_name(task: str, train_file: Optional[str]) -> str:
    """The data a recipe trained on, as the card names it: a Hub id where there is one, else a description that
    cannot be taken for one (a local file by its name, never its path)."""
    if task in GLUE_TASKS and not train_file:
        return "nyu-mll/glue"
    if task == "rotten_tomatoes":
        return DEMO_DATASET
    return f"{Path(train_file).name} (local file)" if train_file else task
