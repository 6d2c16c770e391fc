"""The data of an SFT recipe: a Hub dataset or local JSON lines / parquet, with conversations (`messages`: a list of
{role, content}) or prompt/completion pairs (strings, or lists of messages, as TRL takes them). Loaded, checked row
by row and renamed to TRL's own field names before any model is built, so bad data stops a run at once."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import datasets

from fish_peft.cli.sft_recipe import SFTRecipe

FILE_BUILDERS = {".json": "json", ".jsonl": "json", ".parquet": "parquet"}
MESSAGES, PROMPT, COMPLETION = "messages", "prompt", "completion"  # TRL's field names
ANSWERED = ("assistant", "last_turn")  # loss_on values that learn from assistant turns only


@dataclass
class SFTData:
    """The train and validation splits in TRL's field names, and what they hold."""

    splits: datasets.DatasetDict  # "train" and "validation"
    format: str  # "messages" or "prompt_completion" (after loss_on: last_turn, conversations are pairs)
    conversational: bool  # messages, or pairs of message lists: rendered with the tokenizer's chat template
    source: str  # the data as a card names it: a Hub id, or a file's name

    def prompts(self, count: int) -> list[dict[str, Any]]:
        """The first `count` validation examples as {prompt, reference}: what a model is asked, and the answer the
        data gives (a conversation's last assistant turn, or the completion)."""
        rows = self.splits["validation"].select(range(min(count, len(self.splits["validation"]))))
        return [split_answer(row) for row in rows]


def load_sft_data(recipe: SFTRecipe) -> SFTData:
    """The recipe's train and validation splits, checked and in TRL's field names (see the module's docstring)."""
    raw, source = _raw_splits(recipe)
    if "validation" not in raw:
        raw = _hold_out(raw["train"], recipe.validation_size, recipe.seed)
    kind = data_format(raw, recipe)
    fields = (recipe.messages_field,) if kind == MESSAGES else (recipe.prompt_field, recipe.completion_field)
    canonical = (MESSAGES,) if kind == MESSAGES else (PROMPT, COMPLETION)
    splits, shapes = datasets.DatasetDict(), set()
    for split, dataset in raw.items():
        dataset = dataset.select_columns(list(fields))
        dataset = dataset.rename_columns({f: c for f, c in zip(fields, canonical) if f != c})
        shapes.add(_check_rows(split, dataset, kind, fields, recipe.loss_on))
        splits[split] = dataset
    if len(shapes) > 1:
        raise ValueError("The train and validation data differ in shape (plain-text and conversational prompt/completion pairs); use one.")
    conversational = shapes.pop()
    if kind == MESSAGES and recipe.loss_on == "last_turn":
        splits = datasets.DatasetDict({split: d.map(_last_turn_pair, remove_columns=[MESSAGES]) for split, d in splits.items()})
        kind = "prompt_completion"
    if recipe.max_train_samples:
        train = splits["train"].shuffle(seed=recipe.seed)
        splits["train"] = train.select(range(min(recipe.max_train_samples, len(train))))
    if recipe.max_eval_samples:
        splits["validation"] = splits["validation"].select(range(min(recipe.max_eval_samples, len(splits["validation"]))))
    return SFTData(splits, kind, conversational, source)


def _raw_splits(recipe: SFTRecipe) -> tuple[datasets.DatasetDict, str]:
    """{"train": ..., and "validation" when the data has one}, and the name of the data."""
    if recipe.dataset:
        hub = datasets.load_dataset(recipe.dataset, recipe.dataset_config)
        splits = {"train": recipe.train_split, **({"validation": recipe.validation_split} if recipe.validation_split else {})}
        missing = [name for name in splits.values() if name not in hub]
        if missing:
            raise ValueError(f"Dataset {recipe.dataset!r} has no split {missing[0]!r}; its splits are {', '.join(hub)}.")
        raw = datasets.DatasetDict({ours: hub[theirs] for ours, theirs in splits.items()})
        for ours, theirs in splits.items():
            _check_not_empty(raw[ours], f"split {theirs!r} of {recipe.dataset}")
        return raw, recipe.dataset
    raw = datasets.DatasetDict({"train": load_file(recipe.train_file)})
    if recipe.validation_file:
        raw["validation"] = load_file(recipe.validation_file)
    return raw, f"{Path(recipe.train_file).name} (local file)"


def load_file(path: str) -> datasets.Dataset:
    """A JSON lines or parquet file as one dataset; an empty or unreadable file is a clear error."""
    builder = FILE_BUILDERS.get(Path(path).suffix.lower())
    if builder is None:
        raise ValueError(f"Cannot read {path}: SFT data files are JSON lines or parquet ({', '.join(FILE_BUILDERS)}).")
    if not Path(path).is_file():
        raise FileNotFoundError(f"Data file not found: {path}")
    if _no_rows(Path(path), builder):
        raise ValueError(f"{path} is empty: it holds no examples.")
    try:
        dataset = datasets.load_dataset(builder, data_files=str(path), split="train")
    except Exception as err:  # datasets wraps arrow's reasons in its own error types
        cause = err.__cause__ or err
        raise ValueError(f"Cannot read {path} as {builder}: {type(cause).__name__}: {cause}") from None
    _check_not_empty(dataset, path)
    return dataset


def _no_rows(path: Path, builder: str) -> bool:
    if builder == "parquet":
        import pyarrow.parquet as pq

        try:
            return pq.ParquetFile(path).metadata.num_rows == 0
        except Exception:  # not parquet at all: load_dataset says so
            return False
    with path.open("rb") as file:
        return not any(line.strip() for line in file)


def _check_not_empty(dataset: datasets.Dataset, where: str) -> None:
    if len(dataset) == 0:
        raise ValueError(f"{where} is empty: it holds no examples.")


def _hold_out(train: datasets.Dataset, size: float, seed: int) -> datasets.DatasetDict:
    """Training data without a validation split: `size` of its examples (a share, or a count) held out."""
    count = int(size) if size >= 1 else max(1, round(len(train) * size))
    if count >= len(train):
        raise ValueError(
            f"validation_size={size} holds out {count} of the {len(train)} training examples, leaving none to train on; "
            "lower it or give validation data (validation_file or validation_split)."
        )
    parts = train.train_test_split(test_size=count, seed=seed, shuffle=True)
    return datasets.DatasetDict({"train": parts["train"], "validation": parts["test"]})


def data_format(raw: datasets.DatasetDict, recipe: SFTRecipe) -> str:
    """"messages" or "prompt_completion": as the recipe says, else whichever fields every split has; a split without
    the fields the recipe names is an error that lists its own."""
    wanted = {MESSAGES: (recipe.messages_field,), "prompt_completion": (recipe.prompt_field, recipe.completion_field)}
    if recipe.data_format != "auto":
        wanted = {recipe.data_format: wanted[recipe.data_format]}
    for split, dataset in raw.items():
        wanted = {kind: fields for kind, fields in wanted.items() if set(fields) <= set(dataset.column_names)}
        if not wanted:
            names = {MESSAGES: f"messages_field {recipe.messages_field!r}",
                     "prompt_completion": f"prompt_field {recipe.prompt_field!r} and completion_field {recipe.completion_field!r}"}
            asked = names[recipe.data_format] if recipe.data_format != "auto" else " or ".join(names.values())
            raise ValueError(
                f"The {split} data has no field(s) named by the recipe's {asked}; its fields are "
                f"{', '.join(dataset.column_names)}. Name the data's own fields in the recipe (messages_field, "
                "prompt_field, completion_field)."
            )
    return next(iter(wanted))


def _check_rows(split: str, dataset: datasets.Dataset, kind: str, fields: tuple[str, ...], loss_on: str) -> bool:
    """Every row of a split in the shape its format needs; returns whether the split is conversational."""
    if kind == MESSAGES:
        for i, messages in enumerate(dataset[MESSAGES]):
            where = f"{split} row {i}, field {fields[0]!r}"
            _check_messages(messages, where)
            if loss_on in ANSWERED and not any(m["role"] == "assistant" for m in messages):
                raise ValueError(f"{where}: the conversation has no assistant turn, so it holds nothing to learn (loss_on: {loss_on}).")
        return True
    kinds = set()
    for i, (prompt, completion) in enumerate(zip(dataset[PROMPT], dataset[COMPLETION])):
        where = f"{split} row {i}"
        if isinstance(prompt, str) and isinstance(completion, str):
            if not completion:
                raise ValueError(f"{where}: the completion ({fields[1]!r}) is empty, so it holds nothing to learn.")
            kinds.add("text")
        elif isinstance(prompt, list) and isinstance(completion, list):
            _check_messages(prompt, f"{where}, field {fields[0]!r}")
            _check_messages(completion, f"{where}, field {fields[1]!r}")
            kinds.add("conversation")
        else:
            raise ValueError(
                f"{where}: prompt ({fields[0]!r}) and completion ({fields[1]!r}) must both be strings or both be lists "
                f"of {{role, content}} messages, got {type(prompt).__name__} and {type(completion).__name__}."
            )
    if len(kinds) > 1:
        raise ValueError(f"The {split} data mixes plain-text and conversational prompt/completion rows; use one shape.")
    return kinds == {"conversation"}


def _check_messages(messages: Any, where: str) -> None:
    if not isinstance(messages, list) or not messages:
        raise ValueError(f"{where}: expected a non-empty list of {{role, content}} messages, got {_shown(messages)}.")
    for turn, message in enumerate(messages):
        if not isinstance(message, dict) or not isinstance(message.get("role"), str) or not isinstance(message.get("content"), str):
            raise ValueError(f"{where}, message {turn}: expected {{role: str, content: str}}, got {_shown(message)}.")


def _shown(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 80 else text[:77] + "..."


def _last_turn_pair(row: dict[str, Any]) -> dict[str, Any]:
    """A conversation as a prompt (every turn before its last assistant turn) and that turn as the completion."""
    messages = row[MESSAGES]
    last = max(i for i, m in enumerate(messages) if m["role"] == "assistant")
    return {PROMPT: messages[:last], COMPLETION: [messages[last]]}


def split_answer(row: dict[str, Any]) -> dict[str, Any]:
    """{prompt, reference} of one example: a conversation up to its last assistant turn and that turn's text, or a
    pair's prompt and its completion's text."""
    if MESSAGES in row:
        pair = _last_turn_pair(row) if any(m["role"] == "assistant" for m in row[MESSAGES]) else {PROMPT: row[MESSAGES], COMPLETION: []}
    else:
        pair = row
    completion = pair[COMPLETION]
    reference = completion if isinstance(completion, str) else "".join(m["content"] for m in completion)
    return {"prompt": pair[PROMPT], "reference": reference}
