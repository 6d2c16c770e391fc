"""Load, check and tokenize GLUE (or GLUE-shaped user) data, failing on bad data before any training starts."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import datasets
import numpy as np
import pyarrow as pa

from fish_peft.cli.tasks import GLUE_TASKS, Task

FILE_BUILDERS = {".csv": "csv", ".json": "json", ".jsonl": "json", ".parquet": "parquet"}


def load_raw_splits(
    task: Task, train_file: str | None = None, validation_file: str | None = None
) -> datasets.DatasetDict:
    """The task's train and validation splits, from local files when given, else from the Hub's ``nyu-mll/glue``.

    A validation file becomes the split ``task.validation_splits[0]`` (for MNLI: ``validation_matched``). The Hub's
    test splits are left out: they have no gold labels.
    """
    if train_file is None and validation_file is None:
        if task.name not in GLUE_TASKS:
            raise ValueError(f"Task {task.name!r} is not a GLUE task: give train_file and validation_file.")
        hub = datasets.load_dataset("nyu-mll/glue", task.name)
        return datasets.DatasetDict({split: hub[split] for split in ("train", *task.validation_splits)})
    if train_file is None or validation_file is None:
        raise ValueError("Give both train_file and validation_file (or neither, to download the GLUE task).")
    return datasets.DatasetDict(
        {"train": _load_file(train_file), task.validation_splits[0]: _load_file(validation_file)}
    )


def _load_file(path: str) -> datasets.Dataset:
    builder = FILE_BUILDERS.get(Path(path).suffix.lower())
    if builder is None:
        raise ValueError(f"Cannot read {path}: supported file extensions are {', '.join(FILE_BUILDERS)}.")
    if not Path(path).is_file():
        raise FileNotFoundError(f"Data file not found: {path}")
    return datasets.load_dataset(builder, data_files=str(path), split="train")


def prepare_splits(
    raw: datasets.DatasetDict, task: Task, label_column: str = "label", text_columns: Sequence[str] | None = None
) -> datasets.DatasetDict:
    """Each split reduced to its text columns plus ``labels``, after checking every value.

    Classification labels become a ``ClassLabel`` column (int64 values; ``features["labels"].names`` says what each id
    means, which matters for string labels), regression labels a float32 column. String labels map through
    ``task.label_names`` when the task has them, else through the sorted distinct training labels.
    """
    text_columns = tuple(text_columns or task.text_columns)
    if len(text_columns) not in (1, 2):
        raise ValueError(f"Give 1 text column (single sentence) or 2 (pair), not {text_columns}.")
    if not raw:
        raise ValueError("No data splits to prepare.")
    for split, dataset in raw.items():
        _check_split(split, dataset, text_columns, label_column)
    names = None if task.is_regression else _label_names(raw, task, label_column)
    feature = datasets.Value("float32") if names is None else datasets.ClassLabel(names=names)
    return datasets.DatasetDict({
        split: dataset.select_columns(list(text_columns)).add_column(
            "labels", _labels(split, dataset, task, label_column, names), feature=feature
        )
        for split, dataset in raw.items()
    })


def _check_split(split: str, dataset: datasets.Dataset, text_columns: tuple[str, ...], label_column: str) -> None:
    for column in (*text_columns, label_column):
        if column not in dataset.column_names:
            kind = "Label" if column == label_column else "Text"
            available = ", ".join(dataset.column_names)
            raise ValueError(f"{kind} column {column!r} is not in split {split!r}; its columns are: {available}.")
        missing = _column(dataset, column).null_count
        if missing:
            raise ValueError(f"Split {split!r}: {missing} rows have no {column!r} value; fill or drop them.")
    if len(dataset) == 0:
        raise ValueError(f"Split {split!r} is empty.")


def _column(dataset: datasets.Dataset, column: str) -> pa.ChunkedArray:
    """The column as arrow, respecting any row selection (``dataset.data`` would not)."""
    return dataset.with_format("arrow")[column]


def _label_names(raw: datasets.DatasetDict, task: Task, label_column: str) -> list[str]:
    """Class names in id order: the task's, else the sorted distinct string labels of training, else the ids."""
    if task.label_names:
        return list(task.label_names)
    if not any(_is_string(_column(dataset, label_column)) for dataset in raw.values()):
        return [str(i) for i in range(task.num_labels)]
    if "train" not in raw or not _is_string(_column(raw["train"], label_column)):
        raise ValueError("String labels take their ids from the string labels of a 'train' split, and there is none.")
    names = sorted(set(_column(raw["train"], label_column).to_pylist()))
    if len(names) != task.num_labels:
        raise ValueError(
            f"Split 'train' has {len(names)} distinct labels {names[:10]}, but num_labels={task.num_labels}; "
            "fix num_labels or the data."
        )
    return names


def _is_string(column: pa.ChunkedArray) -> bool:
    return pa.types.is_string(column.type) or pa.types.is_large_string(column.type)


def _labels(
    split: str, dataset: datasets.Dataset, task: Task, label_column: str, names: list[str] | None
) -> np.ndarray:
    """The split's labels as class ids (or float scores), with an error naming any value that cannot be one."""
    column = _column(dataset, label_column)
    where = f"Split {split!r}, label column {label_column!r}"
    if _is_string(column):
        if names is None:
            raise ValueError(f"{where}: a regression task needs numeric labels, not strings.")
        ids = {name: i for i, name in enumerate(names)}
        values = column.to_pylist()
        unseen = sorted(set(values) - ids.keys())
        if unseen:
            known = "the task's label names" if task.label_names else "labels seen in training"
            raise ValueError(f"{where}: unseen labels {unseen[:10]}; {known} are {names}.")
        return np.array([ids[value] for value in values], dtype=np.int64)
    if not (pa.types.is_integer(column.type) or pa.types.is_floating(column.type)):
        raise ValueError(f"{where}: labels must be numbers or strings, not {column.type}.")
    values = column.to_numpy()
    if np.all(values == -1):
        raise ValueError(f"{where}: the split has no gold labels (all are -1, as in GLUE test splits).")
    if names is None:
        if not np.all(np.isfinite(values)):
            raise ValueError(f"{where}: regression labels must be finite numbers.")
        return values.astype(np.float32)
    bad = np.unique(values[(values != np.round(values)) | (values < 0) | (values >= len(names))])
    if bad.size:
        hint = " (-1 marks rows without a gold label, as in GLUE test splits)" if -1 in bad else ""
        raise ValueError(f"{where}: labels must be integers in [0, {len(names)}); found {bad[:10].tolist()}{hint}.")
    return values.astype(np.int64)


def tokenize_splits(
    splits: datasets.DatasetDict, tokenizer, text_columns: Sequence[str], max_length: int
) -> datasets.DatasetDict:
    """Token ids of single sentences or pairs, truncated, unpadded (the collator pads per batch); keeps ``labels``."""
    text_columns = list(text_columns)
    if len(text_columns) not in (1, 2):
        raise ValueError(f"Give 1 text column (single sentence) or 2 (pair), not {text_columns}.")
    if max_length < 1:
        raise ValueError(f"max_length must be a positive number of tokens, not {max_length}.")
    return splits.map(
        lambda batch: tokenizer(*(batch[column] for column in text_columns), truncation=True, max_length=max_length),
        batched=True,
        remove_columns=text_columns,
    )
