"""`fish-peft train` with an SFT recipe, offline: recipes/sft/tiny_offline.yaml (a tiny Llama built from a config, a
word-level tokenizer made from the data, tests/data/instructions.jsonl) end to end through the command, the other
methods through `fish-peft compare`, plain-text pairs without a chat template, and every bad input stopped with a
clear error before any training."""

import json
import math
from pathlib import Path

import pytest
import torch
import transformers
import trl
import yaml
from peft import PeftModel
from transformers import AutoTokenizer

from torch.utils.data import DataLoader

from fish_peft.cli.command import main
from fish_peft.cli.recipe import load_recipe
from fish_peft.cli.sft_data import load_sft_data
from fish_peft.cli.sft_model import load_causal_lm, word_level_tokenizer
from fish_peft.cli.sft_training import sft_arguments
from fish_peft.masks.selection import compute_fisher_mask
from fish_peft.tuner.adapter_files import read_adapter_mask

ROOT = Path(__file__).resolve().parents[2]
RECIPE = ROOT / "recipes" / "sft" / "tiny_offline.yaml"
DATA = ROOT / "tests" / "data" / "instructions.jsonl"


def conversations():
    return [json.loads(line) for line in DATA.read_text().splitlines()]


def run_cli(*args):
    return main([str(a) for a in args])


@pytest.fixture
def no_training(monkeypatch):
    """Fail the test if training starts: every error below must come before it."""

    def train(*args, **kwargs):
        raise AssertionError("training started")

    monkeypatch.setattr(transformers.Trainer, "train", train)


def generate(model, tokenizer, messages, max_new_tokens):
    inputs = tokenizer.apply_chat_template(messages, add_generation_prompt=True, return_tensors="pt", return_dict=True)
    with torch.no_grad():
        output = model.generate(**inputs, max_new_tokens=max_new_tokens, do_sample=False, pad_token_id=tokenizer.pad_token_id)
    return tokenizer.decode(output[0, inputs["input_ids"].shape[1]:], skip_special_tokens=True).strip()


def test_the_offline_recipe_trains_end_to_end_through_the_command(tmp_path, monkeypatch):
    monkeypatch.chdir(ROOT)  # the recipe names its data file from the repository's root
    out = tmp_path / "run"
    assert run_cli("train", RECIPE, "--output-dir", out) == 0

    results = json.loads((out / "results.json").read_text())
    validation = results["metrics"]["validation"]
    assert validation["perplexity"] == pytest.approx(math.exp(validation["loss"]))
    epochs = [row["validation"]["loss"] for row in results["epochs"]]
    assert len(epochs) == 6 and epochs[-1] < epochs[0] - 0.3  # the sparse diff learned
    assert validation["loss"] == pytest.approx(min(epochs))  # the best epoch is the one kept
    assert (results["data_format"], results["conversational"], results["loss_on"]) == ("messages", True, "assistant")
    assert (results["train_examples"], results["validation_examples"]) == (32, {"validation": 8})
    assert results["dataset"] == "instructions.jsonl (local file)" and results["fisher_seconds"] > 0

    # the budget: 5 % of all parameters, in the linear layers only (TRL computes the logits from lm_head itself)
    config = json.loads((out / "adapter_config.json").read_text())
    assert config["peft_type"] == "FISH" and config["task_type"] == "CAUSAL_LM"
    assert sum(config["sparse_parameters"].values()) == results["trainable_parameters"] == results["mask"]["selected"]
    assert results["trainable_parameters"] == int(results["total_parameters"] * 0.05)
    assert all(name.endswith("_proj.weight") for name in config["sparse_parameters"])

    # greedy generations of held-out prompts, and the saved adapter + tokenizer + rebuilt base give the same ones
    generations = results["generations"]
    assert len(generations) == 3 and all(g["reference"] and isinstance(g["generation"], str) for g in generations)
    assert any(g["generation"] for g in generations)
    tokenizer = AutoTokenizer.from_pretrained(out)
    base = load_causal_lm(load_recipe(out / "recipe.yaml"), tokenizer)  # the same seed: the same weights
    model = PeftModel.from_pretrained(base, out).eval()
    for g in generations:
        assert generate(model, tokenizer, g["prompt"], 12) == g["generation"]
    with model.disable_adapter():
        assert [generate(model, tokenizer, g["prompt"], 12) for g in generations] != [g["generation"] for g in generations]

    # the mask is the Fisher of the training loss (assistant tokens only, as TRL's collator labels them) on the first
    # num_samples training examples, among the linear layers' weights
    recipe = load_recipe(out / "recipe.yaml")
    data = load_sft_data(recipe)
    args = sft_arguments(trl, recipe, tmp_path / "scratch", data)
    plain = trl.SFTTrainer(model=model.get_base_model(), args=args, train_dataset=data.splits["train"],  # not trained
                           eval_dataset={"validation": data.splits["validation"]}, processing_class=tokenizer)
    loader = DataLoader(plain.train_dataset, batch_size=8, collate_fn=plain.data_collator)
    assert all((batch["labels"] != -100).sum() < batch["attention_mask"].sum() / 2 for batch in loader)  # prompts are left out
    with model.disable_adapter():
        expected = compute_fisher_mask(model.get_base_model(), loader, 0.05, 32, modules_to_save=None, eligible=r"_proj\.weight$")
    assert read_adapter_mask(out).digest() == expected.digest()

    assert {"adapter_model.safetensors", "tokenizer.json", "recipe.yaml", "mask.png", "README.md"} <= {p.name for p in out.iterdir()}
    assert not (out / "checkpoints").exists()
    card = (out / "README.md").read_text()
    metadata = yaml.safe_load(card.split("---")[1])
    assert metadata["pipeline_tag"] == "text-generation" and metadata["library_name"] == "peft"
    assert {"fish", "sft", "trl"} <= set(metadata["tags"])
    assert "AutoModelForCausalLM" in card and "classif" not in card


def test_compare_trains_random_lora_and_full_at_their_own_learning_rates(tmp_path, monkeypatch):
    monkeypatch.chdir(ROOT)
    out = tmp_path / "comparison"
    fast = ["--epochs", "1", "--generations", "1", "--max-new-tokens", "4"]
    assert run_cli("compare", RECIPE, "--methods", "random,lora,full", "--output-dir", out, *fast) == 0
    rows = {row["method"]: row for row in json.loads((out / "comparison.json").read_text())["rows"]}
    assert {m: rows[m]["lr"] for m in rows} == {"random": 3e-2, "lora": 1e-2, "full": 3e-3}  # the recipe's lr_by_method
    assert all(rows[m]["metrics"]["loss"] > 0 and "perplexity" in rows[m]["metrics"] for m in rows)

    random_run = json.loads((out / "random" / "results.json").read_text())
    assert random_run["mask"]["method"] == "random" and random_run["fisher_seconds"] is None
    assert random_run["trainable_parameters"] == int(random_run["total_parameters"] * 0.05)  # fish's budget
    assert all(n.endswith("_proj.weight") for n in json.loads((out / "random" / "adapter_config.json").read_text())["sparse_parameters"])
    lora = json.loads((out / "lora" / "adapter_config.json").read_text())
    assert lora["peft_type"] == "LORA" and lora["task_type"] == "CAUSAL_LM" and lora["r"] == 16
    assert {name.rpartition(".")[2] for name in lora["target_modules"]} == {"q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"}
    full = json.loads((out / "full" / "results.json").read_text())
    assert full["trainable_parameters"] == full["total_parameters"] and (out / "full" / "model.safetensors").is_file()
    full_card = yaml.safe_load((out / "full" / "README.md").read_text().split("---")[1])
    assert full_card["pipeline_tag"] == "text-generation" and full_card["library_name"] == "transformers"
    assert "AutoModelForCausalLM.from_pretrained" in (out / "full" / "README.md").read_text()


def test_plain_text_pairs_train_on_their_completions_without_a_chat_template(tmp_path):
    import pandas as pd

    rows = [{"prompt": f"{c['messages'][-2]['content']} answer :", "completion": " " + c["messages"][-1]["content"]} for c in conversations()]
    pd.DataFrame(rows).to_parquet(tmp_path / "pairs.parquet")
    tokenizer = word_level_tokenizer(__import__("datasets").Dataset.from_list(rows))
    tokenizer.chat_template = None
    tokenizer.save_pretrained(tmp_path / "tokenizer")
    out = tmp_path / "run"
    flags = ["--train-file", tmp_path / "pairs.parquet", "--tokenizer", tmp_path / "tokenizer", "--epochs", "1",
             "--num-samples", "8", "--generations", "2", "--max-new-tokens", "4", "--output-dir", out]
    assert run_cli("train", RECIPE, *flags) == 0
    results = json.loads((out / "results.json").read_text())
    assert (results["data_format"], results["conversational"]) == ("prompt_completion", False)
    assert [g["prompt"] for g in results["generations"]] and all(isinstance(g["prompt"], str) for g in results["generations"])
    assert results["metrics"]["validation"]["loss"] > 0


def refused(capsys, *args) -> str:
    """Run the command, expect it to stop with exit status 2, return what it printed as the error."""
    assert run_cli(*args) == 2
    return capsys.readouterr().err


def test_data_without_the_fields_the_recipe_names_stops_before_training(tmp_path, capsys, no_training):
    err = refused(capsys, "train", RECIPE, "--train-file", DATA, "--data-format", "messages", "--messages-field", "dialogue",
                  "--output-dir", tmp_path / "run")
    assert "fish-peft train: error: The train data has no field(s) named by the recipe's messages_field 'dialogue'" in err
    assert "its fields are messages" in err
    assert not (tmp_path / "run").exists()


def test_conversations_with_a_tokenizer_without_a_chat_template_stop_before_training(tmp_path, capsys, no_training):
    tokenizer = word_level_tokenizer(__import__("datasets").Dataset.from_list(conversations()))
    tokenizer.chat_template = None
    tokenizer.save_pretrained(tmp_path / "tokenizer")
    err = refused(capsys, "train", RECIPE, "--train-file", DATA, "--tokenizer", tmp_path / "tokenizer", "--output-dir", tmp_path / "run")
    assert "The data is conversational (messages)" in err and "has none" in err and "chat_template_path" in err


def test_a_chat_template_trl_cannot_mark_stops_assistant_only_loss_before_training(tmp_path, capsys, no_training):
    tokenizer = word_level_tokenizer(__import__("datasets").Dataset.from_list(conversations()))
    tokenizer.chat_template = "{% for m in messages %}{{ m['role'] }} : {{ m['content'] }} {% endfor %}"
    tokenizer.save_pretrained(tmp_path / "tokenizer")
    err = refused(capsys, "train", RECIPE, "--train-file", DATA, "--tokenizer", tmp_path / "tokenizer", "--output-dir", tmp_path / "run")
    assert "{% generation %} markers" in err and "loss_on: last_turn" in err


def test_an_empty_dataset_stops_before_training(tmp_path, capsys, no_training):
    (tmp_path / "empty.jsonl").write_text("")
    err = refused(capsys, "train", RECIPE, "--train-file", tmp_path / "empty.jsonl", "--output-dir", tmp_path / "run")
    assert "empty.jsonl is empty: it holds no examples" in err


@pytest.mark.parametrize(
    "keep_ratio, message",
    [("1e-7", "leaves 0 entries for the mask; raise keep_ratio"), ("0.9", "but the target modules hold only")],
    ids=["below-one-entry", "more-than-the-targets-hold"],
)
@pytest.mark.parametrize("method", ["fish", "random"])
def test_a_keep_ratio_the_model_cannot_honour_stops_before_training(tmp_path, capsys, no_training, keep_ratio, message, method, monkeypatch):
    monkeypatch.chdir(ROOT)
    err = refused(capsys, "train", RECIPE, "--method", method, "--keep-ratio", keep_ratio, "--output-dir", tmp_path / "run")
    assert message in err
    assert not (tmp_path / "run" / "checkpoints").exists()


def test_prompts_that_fill_max_length_stop_before_training(tmp_path, capsys, no_training, monkeypatch):
    monkeypatch.chdir(ROOT)
    err = refused(capsys, "train", RECIPE, "--max-length", "5", "--output-dir", tmp_path / "run")
    assert "No train example keeps a token of its assistant turns within max_length=5" in err
    assert not (tmp_path / "run").exists()  # the Trainer's checkpoints folder is gone: nothing blocks the retry


def test_without_trl_the_error_says_which_extra_to_install(capsys, monkeypatch):
    monkeypatch.setitem(__import__("sys").modules, "trl", None)  # `import trl` raises ImportError
    err = refused(capsys, "train", RECIPE)
    assert "pip install fish-peft[trl]" in err


def test_mask_and_eval_say_what_they_take_for_sft(tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(ROOT)
    assert "computed when its training starts" in refused(capsys, "mask", RECIPE, "--output-dir", tmp_path / "mask")
    (tmp_path / "run").mkdir()
    (tmp_path / "run" / "recipe.yaml").write_text(RECIPE.read_text())
    assert "is an SFT run" in refused(capsys, "eval", tmp_path / "run")


class Killed(Exception):
    pass


class KillAtStep(transformers.TrainerCallback):
    def __init__(self, step):
        self.step = step

    def on_step_end(self, args, state, control, **kwargs):
        if state.global_step == self.step:
            raise Killed(f"killed at step {self.step}")


def test_resume_continues_an_interrupted_fish_run_to_the_same_adapter(tmp_path, monkeypatch):
    from safetensors.torch import load_file

    from fish_peft.cli.sft_training import run_sft

    monkeypatch.chdir(ROOT)
    fast = {"epochs": "2", "num_samples": "8", "generations": "1", "max_new_tokens": "2"}
    whole = run_sft(load_recipe(RECIPE, {**fast, "output_dir": str(tmp_path / "whole")}))
    with pytest.raises(Killed):  # after the first epoch's checkpoint (4 steps), before the end (8)
        run_sft(load_recipe(RECIPE, {**fast, "output_dir": str(tmp_path / "resumed")}), callbacks=(KillAtStep(6),))
    assert not (tmp_path / "resumed" / "results.json").exists()
    assert run_cli("train", RECIPE, *(f"--{k}={v}" for k, v in fast.items()), "--output-dir", tmp_path / "resumed", "--resume") == 0
    resumed = json.loads((tmp_path / "resumed" / "results.json").read_text())
    assert resumed["metrics"] == whole["metrics"] and resumed["steps"] == whole["steps"] == 8
    assert resumed["fisher_seconds"] is None  # the mask the run started with, read back rather than computed again
    a, b = load_file(tmp_path / "whole" / "adapter_model.safetensors"), load_file(tmp_path / "resumed" / "adapter_model.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
