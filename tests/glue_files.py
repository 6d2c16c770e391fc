"""Small local train/validation files in the schema of the Hub dataset ``nyu-mll/glue``, for offline tests.

The schema is written out here rather than taken from ``fish_peft.cli.tasks``, so the tests check the task table against
it. Each class has its own cue words, so a model can learn the labels from the text.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd

# Text columns and number of classes (1: regression scores 0-5); every task also has "label" and "idx".
GLUE_SCHEMA: dict[str, tuple[tuple[str, ...], int]] = {
    "cola": (("sentence",), 2),
    "sst2": (("sentence",), 2),
    "mrpc": (("sentence1", "sentence2"), 2),
    "qqp": (("question1", "question2"), 2),
    "stsb": (("sentence1", "sentence2"), 1),
    "mnli": (("premise", "hypothesis"), 3),
    "qnli": (("question", "sentence"), 2),
    "rte": (("sentence1", "sentence2"), 2),
    "wnli": (("sentence1", "sentence2"), 2),
}
FILLER = "the a cat dog man woman house car park city saw liked took found near with under over today slowly".split()
CUES = (("good", "great", "happy", "bright"), ("bad", "awful", "sad", "dark"), ("maybe", "perhaps", "odd", "strange"))
WORDS = (*FILLER, *(word for cue in CUES for word in cue))
WRITERS = {
    "csv": lambda frame, path: frame.to_csv(path, index=False),
    "jsonl": lambda frame, path: frame.to_json(path, orient="records", lines=True),
    "parquet": lambda frame, path: frame.to_parquet(path, index=False),
}


def _sentence(rng: np.random.Generator, cue: tuple[str, ...]) -> str:
    words = [*rng.choice(FILLER, size=rng.integers(4, 8)), *rng.choice(cue, size=2)]
    return " ".join(rng.permutation(words))


def _rows(task_name: str, n: int, rng: np.random.Generator) -> pd.DataFrame:
    text_columns, num_classes = GLUE_SCHEMA[task_name]
    if num_classes == 1:
        labels = np.round(rng.uniform(0, 5, size=n), 2)
        cues = np.minimum(labels // 2, 2).astype(int)
    else:
        labels = cues = rng.integers(num_classes, size=n)
    columns = {column: [_sentence(rng, CUES[cue]) for cue in cues] for column in text_columns}
    return pd.DataFrame({**columns, "label": labels, "idx": np.arange(n)})


def write_glue_files(
    task_name: str, directory: Path, n_train: int = 24, n_val: int = 12, fmt: str = "csv", seed: int = 0
) -> tuple[Path, Path]:
    """Write ``{task_name}_train.{fmt}`` and ``{task_name}_validation.{fmt}`` into ``directory``; return their paths."""
    if fmt not in WRITERS:
        raise ValueError(f"fmt must be one of {', '.join(WRITERS)}, not {fmt!r}.")
    rng = np.random.default_rng(seed)
    paths = []
    for split, n in (("train", n_train), ("validation", n_val)):
        paths.append(Path(directory) / f"{task_name}_{split}.{fmt}")
        WRITERS[fmt](_rows(task_name, n, rng), paths[-1])
    return paths[0], paths[1]
