"""`fish-peft` end to end on local files in GLUE's own schema, with a tiny checkpoint on disk."""

import json
import re
from pathlib import Path

import pytest
import yaml

from fish_peft.cli.command import main
from fish_peft.masks.fish_mask import FishMask
from fish_peft.cli.recipe import load_recipe, parse_overrides
from tests.glue_files import GLUE_SCHEMA, WORDS, write_glue_files
from tests.models import save_tiny_checkpoint

RECIPES = Path(__file__).resolve().parents[2] / "recipes"
FAST = ["--epochs", "1", "--batch-size", "8", "--num-samples", "8", "--max-length", "32", "--eval-batch-size", "16"]


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    return save_tiny_checkpoint(tmp_path_factory.mktemp("tiny-bert"), WORDS)


def run_cli(*args):
    return main([str(a) for a in args])


def local_data(task, directory, fmt="csv"):
    train, validation = write_glue_files(task, directory, fmt=fmt)
    return ["--train-file", train, "--validation-file", validation]


@pytest.mark.parametrize("task", sorted(GLUE_SCHEMA))
def test_every_glue_recipe_trains_end_to_end_on_local_files(task, checkpoint, tmp_path):
    out = tmp_path / "run"
    assert run_cli("train", RECIPES / "glue" / f"{task}.yaml", "--model", checkpoint, "--output-dir", out, *FAST, *local_data(task, tmp_path)) == 0
    results = json.loads((out / "results.json").read_text())
    split = "validation_matched" if task == "mnli" else "validation"
    expected_metrics = {"cola": {"matthews_correlation"}, "mrpc": {"accuracy", "f1"}, "qqp": {"accuracy", "f1"}, "stsb": {"pearson", "spearmanr"}}
    assert expected_metrics.get(task, {"accuracy"}) <= set(results["metrics"][split])
    assert results["epochs"] and split in results["epochs"][-1]
    assert results["trainable_parameters"] < results["total_parameters"]
    assert results["adapter_bytes"] == (out / "adapter_model.safetensors").stat().st_size
    for key in ("wall_seconds", "fisher_seconds", "mean_step_seconds", "peak_memory_bytes"):
        assert results[key] > 0, key
    assert {"adapter_config.json", "adapter_model.safetensors", "results.json", "recipe.yaml", "mask.png", "README.md"} <= {p.name for p in out.iterdir()}
    assert not (out / "checkpoints").exists()
    card = (out / "README.md").read_text()
    assert yaml.safe_load(card.split("---")[1])["library_name"] == "peft"


@pytest.mark.parametrize("rule", ["topkast", "sparse_momentum"])
def test_train_with_an_evolving_mask_saves_an_ordinary_fish_adapter(rule, checkpoint, tmp_path):
    out = tmp_path / "run"
    args = ["--mask-update", rule, "--update-every", "1", "--lr", "1e-2"]
    assert run_cli("train", RECIPES / "glue" / "sst2.yaml", "--model", checkpoint, "--output-dir", out, *FAST, *args, *local_data("sst2", tmp_path)) == 0
    results = json.loads((out / "results.json").read_text())
    assert results["mask"]["mask_update"] == rule and results["mask"]["mask_updates"] >= 1
    assert results["mask"]["update_seconds"] > 0 and 0 < results["mask"]["jaccard_with_initial"] < 1
    config = json.loads((out / "adapter_config.json").read_text())
    assert sum(config["sparse_parameters"].values()) == results["mask"]["selected"]
    assert config["mask_update"] == rule and config["update_every"] == 1
    assert run_cli("eval", out) == 0  # loads as an ordinary FISH adapter


def test_compare_runs_every_method_on_the_same_data(checkpoint, tmp_path):
    out = tmp_path / "compare"
    code = run_cli(
        "compare", RECIPES / "glue" / "sst2.yaml", "--methods", "fish,random,lora,full,bitfit", "--model", checkpoint,
        "--output-dir", out, "--lr-by-method", "fish=1e-3,random=1e-3,lora=1e-3", *FAST, "--batch-size-by-method", "fish=4",
        *local_data("sst2", tmp_path),
    )
    assert code == 0
    rows = {row["method"]: row for row in json.loads((out / "comparison.json").read_text())["rows"]}
    assert list(rows) == ["fish", "random", "lora", "full", "bitfit"]
    assert rows["fish"]["trainable_parameters"] == rows["random"]["trainable_parameters"]  # same budget
    assert rows["fish"]["lr"] == 1e-3 and rows["full"]["lr"] == 5e-5
    assert rows["fish"]["batch_size"] == 4 and rows["full"]["batch_size"] == 8
    total = json.loads((out / "full" / "results.json").read_text())["total_parameters"]
    assert rows["full"]["trainable_parameters"] == total
    assert rows["fish"]["trainable_parameters"] == int(total * 0.005)  # k plus the head: the paper's budget
    assert rows["bitfit"]["trainable_parameters"] < total
    table = (out / "comparison.md").read_text()
    assert all(re.search(rf"^\| {method} +\|", table, re.M) for method in rows)  # padded: the table is aligned
    # the sparse diffs' masks side by side (fish, random, bitfit save FISH adapters; lora and full do not)
    assert (out / "masks.png").read_bytes().startswith(b"\x89PNG") and str(out / "masks.png") in table
    assert json.loads((out / "comparison.json").read_text())["files"]["masks_plot"] == str(out / "masks.png")


def test_each_method_trains_at_its_own_settings_unless_the_command_line_says_otherwise():
    demo = load_recipe(RECIPES / "demo.yaml", parse_overrides(["--method", "full"]))
    assert demo.with_method_settings().learning_rate == demo.lr_by_method["full"]
    explicit = load_recipe(RECIPES / "demo.yaml", parse_overrides(["--method", "fish", "--lr", "3e-4", "--batch-size", "7"]))
    assert (explicit.with_method_settings().learning_rate, explicit.with_method_settings().batch_size) == (3e-4, 7)
    table = load_recipe(RECIPES / "demo.yaml", parse_overrides(["--batch-size-by-method", "fish=12"]))
    assert table.for_method("fish").batch_size == 12 and isinstance(table.for_method("fish").batch_size, int)
    canonical = load_recipe(RECIPES / "demo.yaml", parse_overrides(["--learning-rate", "3e-4"]))
    assert canonical.lr_by_method == {} and canonical.for_method("fish").learning_rate == 3e-4
    with pytest.raises(ValueError, match="batch_size_by_method"):
        load_recipe(RECIPES / "demo.yaml", parse_overrides(["--batch-size-by-method", "fish=0"]))


def test_mask_command_saves_mask_report_and_plot(checkpoint, tmp_path):
    out = tmp_path / "mask"
    assert run_cli("mask", RECIPES / "glue" / "rte.yaml", "--model", checkpoint, "--output-dir", out, *FAST, *local_data("rte", tmp_path)) == 0
    mask = FishMask.load(str(out / "mask.safetensors"))
    report = json.loads((out / "mask_report.json").read_text())
    assert report["selected"] == mask.num_selected and len(report["parameters"]) == len(mask)
    assert (out / "mask.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_eval_reproduces_the_saved_metrics(checkpoint, tmp_path, capsys):
    out = tmp_path / "run"
    data = local_data("mrpc", tmp_path, fmt="jsonl")
    assert run_cli("train", RECIPES / "glue" / "mrpc.yaml", "--model", checkpoint, "--output-dir", out, *FAST, *data) == 0
    capsys.readouterr()
    assert run_cli("eval", out) == 0
    evaluated = json.loads(capsys.readouterr().out)
    saved = json.loads((out / "results.json").read_text())["metrics"]
    assert evaluated["validation"]["accuracy"] == pytest.approx(saved["validation"]["accuracy"])
    assert evaluated["validation"]["f1"] == pytest.approx(saved["validation"]["f1"])


def bad_input_cases(tmp_path):
    train, validation = write_glue_files("sst2", tmp_path)
    data = ["--train-file", train, "--validation-file", validation]
    unknown_key = tmp_path / "unknown.yaml"
    unknown_key.write_text((RECIPES / "glue" / "sst2.yaml").read_text() + "learnig_rate: 0.1\n")
    unseen = tmp_path / "unseen.csv"
    unseen.write_text(validation.read_text().replace(",1,", ",7,"))
    return {
        "unknown recipe key": ([unknown_key, *data], "unknown recipe key"),
        "unknown override": ([RECIPES / "glue" / "sst2.yaml", "--learnig-rate", "0.1", *data], "unknown recipe key"),
        "missing recipe": ([tmp_path / "nope.yaml"], "not found"),
        "missing data file": ([RECIPES / "glue" / "sst2.yaml", "--train-file", tmp_path / "missing.csv", "--validation-file", validation], "missing.csv"),
        "label out of range": ([RECIPES / "glue" / "sst2.yaml", "--train-file", train, "--validation-file", unseen], "label"),
        "text column missing": ([RECIPES / "glue" / "sst2.yaml", *data, "--text-columns", "review"], "review"),
        "not a GLUE task": ([RECIPES / "glue" / "sst2.yaml", *data, "--task", "sst3"], "sst3"),
        "merge_every below 1": ([RECIPES / "glue" / "sst2.yaml", *data, "--merge-every", "0"], "merge_every must be at least 1"),
    }


@pytest.mark.parametrize("case", [
    "unknown recipe key", "unknown override", "missing recipe", "missing data file", "label out of range",
    "text column missing", "not a GLUE task", "merge_every below 1",
])
def test_bad_input_is_refused_before_training(case, checkpoint, tmp_path, capsys):
    args, message = bad_input_cases(tmp_path)[case]
    out = tmp_path / "run"
    assert run_cli("train", *args, "--model", checkpoint, "--output-dir", out, *FAST) == 2
    assert message in capsys.readouterr().err
    assert not out.exists()


def test_an_output_folder_with_a_run_is_kept_unless_overwrite(checkpoint, tmp_path, capsys):
    out = tmp_path / "run"
    args = ["train", RECIPES / "glue" / "sst2.yaml", "--model", checkpoint, "--output-dir", out, *FAST, *local_data("sst2", tmp_path)]
    assert run_cli(*args) == 0
    before = (out / "adapter_model.safetensors").read_bytes()
    assert run_cli(*args, "--seed", "1") == 2
    assert "--overwrite" in capsys.readouterr().err
    assert (out / "adapter_model.safetensors").read_bytes() == before
    assert run_cli(*args, "--seed", "1", "--overwrite") == 0


def test_interrupted_save_leaves_no_half_written_adapter(checkpoint, tmp_path, monkeypatch):
    import fish_peft.tuner.model as fish_model

    def interrupted_pack(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(fish_model, "pack", interrupted_pack)
    out = tmp_path / "run"
    with pytest.raises(KeyboardInterrupt):
        run_cli("train", RECIPES / "glue" / "sst2.yaml", "--model", checkpoint, "--output-dir", out, *FAST, *local_data("sst2", tmp_path))
    assert not (out / "adapter_model.safetensors").exists() and not (out / "results.json").exists()
    assert not [p for p in out.iterdir() if p.name.startswith(".saving-")]


@pytest.mark.parametrize("command", ["train", "mask", "eval", "compare"])
def test_help_of_every_command(command, capsys):
    with pytest.raises(SystemExit) as exit_info:
        main([command, "--help"])
    assert exit_info.value.code == 0
    assert "--key value" in capsys.readouterr().out


def test_custom_data_with_string_labels(checkpoint, tmp_path):
    rows = [("good great happy film", "pos"), ("bad awful sad film", "neg")] * 8
    for name, data in (("train.csv", rows), ("valid.csv", rows[:6])):
        (tmp_path / name).write_text("review,sentiment\n" + "".join(f"{text},{label}\n" for text, label in data))
    out = tmp_path / "run"
    code = run_cli(
        "train", RECIPES / "glue" / "sst2.yaml", "--task", "custom", "--text-columns", "review", "--num-labels", "2",
        "--label-column", "sentiment", "--train-file", tmp_path / "train.csv", "--validation-file", tmp_path / "valid.csv",
        "--model", checkpoint, "--output-dir", out, *FAST,
    )
    assert code == 0
    config = json.loads((out / "results.json").read_text())
    assert {"accuracy", "f1"} <= set(config["metrics"]["validation"])
    from peft import PeftConfig

    assert PeftConfig.from_pretrained(str(out)).peft_type == "FISH"


def test_demo_recipe_runs_on_the_packaged_model_and_data(tmp_path):
    out = tmp_path / "demo"
    code = run_cli(
        "compare", RECIPES / "demo.yaml", "--methods", "fish,lora", "--output-dir", out,
        "--max-train-samples", "64", "--max-eval-samples", "32", "--num-samples", "16",
    )
    assert code == 0
    rows = json.loads((out / "comparison.json").read_text())["rows"]
    assert [row["method"] for row in rows] == ["fish", "lora"] and all("accuracy" in row["metrics"] for row in rows)
    card = (out / "fish" / "README.md").read_text()
    assert "sentence-transformers/all-MiniLM-L6-v2" in card and (out / "fish" / "mask.png").exists()
