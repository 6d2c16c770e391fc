"""SFT data (`fish_peft/cli/sft_data.py`): local JSON lines and parquet in both shapes (conversations, and
prompt/completion pairs of strings or of message lists), the recipe's field names, held-out validation, TRL's field
names, and a clear error for every kind of bad data. No model, no training: each test takes well under a second."""

import json

import pandas as pd
import pytest

from fish_peft.cli.recipe import load_recipe, parse_overrides
from fish_peft.cli.sft_data import load_sft_data
from tests.cli.test_sft import RECIPE, conversations


def recipe_for(*flags):
    return load_recipe(RECIPE, parse_overrides([str(f) for f in flags]))


def write(path, rows):
    """JSON lines or parquet, as the suffix says."""
    if path.suffix == ".parquet":
        pd.DataFrame(rows).to_parquet(path)
    else:
        path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    return path


def pairs(n=10, conversational=False):
    rows = []
    for i in range(n):
        question, answer = f"what is {i} plus one", f"{i} plus one is {i + 1}"
        if conversational:
            rows.append({"question": [{"role": "user", "content": question}], "answer": [{"role": "assistant", "content": answer}]})
        else:
            rows.append({"question": question + " ?", "answer": " " + answer})
    return rows


@pytest.mark.parametrize("suffix", [".jsonl", ".parquet"])
def test_conversations_load_with_a_held_out_validation_split(tmp_path, suffix):
    rows = [{"id": i, **row} for i, row in enumerate(conversations())]
    path = write(tmp_path / f"chat{suffix}", rows)
    data = load_sft_data(recipe_for("--train-file", path, "--validation-size", 5))
    assert (data.format, data.conversational) == ("messages", True)
    assert data.source == f"chat{suffix} (local file)"
    assert {split: d.column_names for split, d in data.splits.items()} == {"train": ["messages"], "validation": ["messages"]}
    assert (len(data.splits["train"]), len(data.splits["validation"])) == (len(rows) - 5, 5)
    seen = [json.dumps(m) for split in ("train", "validation") for m in data.splits[split]["messages"]]
    assert sorted(seen) == sorted(json.dumps(r["messages"]) for r in rows)  # a split of the rows, nothing lost or altered
    first = data.prompts(1)[0]
    assert first["prompt"][-1]["role"] == "user" and first["reference"] == data.splits["validation"][0]["messages"][-1]["content"]


@pytest.mark.parametrize("suffix", [".jsonl", ".parquet"])
@pytest.mark.parametrize("conversational", [False, True], ids=["strings", "message-lists"])
def test_prompt_completion_pairs_load_under_the_recipe_s_field_names(tmp_path, suffix, conversational):
    train = write(tmp_path / f"train{suffix}", pairs(10, conversational))
    validation = write(tmp_path / f"validation{suffix}", pairs(3, conversational))
    flags = ["--train-file", train, "--validation-file", validation, "--prompt-field", "question", "--completion-field", "answer"]
    data = load_sft_data(recipe_for(*flags))
    assert (data.format, data.conversational) == ("prompt_completion", conversational)
    assert data.splits["train"].column_names == ["prompt", "completion"]
    assert (len(data.splits["train"]), len(data.splits["validation"])) == (10, 3)
    assert data.splits["validation"][2] == {"prompt": pairs(3, conversational)[2]["question"], "completion": pairs(3, conversational)[2]["answer"]}
    reference = data.prompts(1)[0]["reference"]
    assert reference.strip() == "0 plus one is 1"


def test_last_turn_makes_each_conversation_a_prompt_and_its_last_assistant_turn(tmp_path):
    chat = [{"role": "system", "content": "be brief"}, {"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"},
            {"role": "user", "content": "what colour is snow"}, {"role": "assistant", "content": "white"}]
    path = write(tmp_path / "chat.jsonl", [{"messages": chat}] * 4)
    data = load_sft_data(recipe_for("--train-file", path, "--validation-size", 1, "--loss-on", "last_turn"))
    assert (data.format, data.conversational) == ("prompt_completion", True)
    assert data.splits["train"][0] == {"prompt": chat[:4], "completion": chat[4:]}


def test_max_train_and_eval_samples_cut_the_splits(tmp_path):
    path = write(tmp_path / "chat.jsonl", conversations())
    data = load_sft_data(recipe_for("--train-file", path, "--validation-size", 10, "--max-train-samples", 7, "--max-eval-samples", 2))
    assert (len(data.splits["train"]), len(data.splits["validation"])) == (7, 2)


@pytest.mark.parametrize(
    "rows, flags, message",
    [
        (pairs(4), [], "no field(s) named by the recipe's messages_field 'messages' or prompt_field 'prompt' and completion_field 'completion'; its fields are question, answer"),
        (conversations(), ["--data-format", "messages", "--messages-field", "conversation"], "no field(s) named by the recipe's messages_field 'conversation'; its fields are messages"),
        (conversations(), ["--data-format", "prompt_completion"], "prompt_field 'prompt' and completion_field 'completion'; its fields are messages"),
        ([{"messages": [{"role": "user", "content": "hi"}]}] * 4, [], "train row 0, field 'messages': the conversation has no assistant turn"),
        ([{"messages": [{"role": "user", "text": "hi"}]}] * 4, [], "message 0: expected {role: str, content: str}"),
        ([{"prompt": "q", "completion": ""}] * 4, [], "the completion ('completion') is empty"),
    ],
    ids=["no-known-fields", "renamed-messages-field", "pairs-asked-for", "no-assistant-turn", "no-content", "empty-completion"],
)
def test_bad_data_is_refused_naming_what_is_wrong(tmp_path, rows, flags, message):
    path = write(tmp_path / "data.jsonl", rows)
    with pytest.raises(ValueError) as err:
        load_sft_data(recipe_for("--train-file", path, "--validation-size", 1, *flags))
    assert message in str(err.value)


def test_pairs_of_a_string_and_a_message_list_are_refused(tmp_path):
    rows = [{"prompt": [{"role": "user", "content": "hi"}], "completion": "hello"}] * 3
    path = write(tmp_path / "data.parquet", rows)
    with pytest.raises(ValueError, match="must both be strings or both be lists"):
        load_sft_data(recipe_for("--train-file", path, "--validation-size", 1))


@pytest.mark.parametrize("suffix", [".jsonl", ".parquet"])
def test_an_empty_file_is_refused(tmp_path, suffix):
    path = tmp_path / f"empty{suffix}"
    if suffix == ".parquet":
        pd.DataFrame({"messages": pd.Series([], dtype=object)}).to_parquet(path)
    else:
        path.write_text("\n")
    with pytest.raises(ValueError, match=r"empty\.(jsonl|parquet) is empty: it holds no examples"):
        load_sft_data(recipe_for("--train-file", path))


def test_a_validation_split_larger_than_the_data_is_refused(tmp_path):
    path = write(tmp_path / "chat.jsonl", conversations()[:4])
    with pytest.raises(ValueError, match="holds out 4 of the 4 training examples, leaving none"):
        load_sft_data(recipe_for("--train-file", path, "--validation-size", 4))


def test_other_file_types_and_missing_files_are_refused(tmp_path):
    with pytest.raises(ValueError, match="JSON lines or parquet"):
        load_sft_data(recipe_for("--train-file", tmp_path / "data.csv"))
    with pytest.raises(FileNotFoundError, match="Data file not found"):
        load_sft_data(recipe_for("--train-file", tmp_path / "missing.jsonl"))


def test_a_hub_dataset_is_read_with_load_dataset_by_name_and_its_splits(monkeypatch):
    """The online recipes' path, with `datasets.load_dataset` replaced: its arguments and the splits taken."""
    import datasets

    calls = []

    def load_dataset(*args, **kwargs):
        calls.append((args, kwargs))
        chats = [{"messages": row["messages"], "category": "qa"} for row in conversations()]
        return datasets.DatasetDict({"train": datasets.Dataset.from_list(chats[:30]), "test": datasets.Dataset.from_list(chats[30:])})

    monkeypatch.setattr(datasets, "load_dataset", load_dataset)
    online = ["--train-file", "none", "--dataset", "HuggingFaceH4/no_robots"]
    data = load_sft_data(recipe_for(*online, "--validation-split", "test"))
    assert calls == [(("HuggingFaceH4/no_robots", None), {})]
    assert (len(data.splits["train"]), len(data.splits["validation"]), data.source) == (30, 10, "HuggingFaceH4/no_robots")
    assert data.splits["train"].column_names == ["messages"]
    with pytest.raises(ValueError, match="has no split 'validation'; its splits are train, test"):
        load_sft_data(recipe_for(*online, "--validation-split", "validation"))
