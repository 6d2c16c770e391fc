"""Output folders of `fish-peft train`, `compare` and `mask`: a command writes into a new or empty folder or one of
its own kind, refuses any other before doing work, never deletes a file it did not write, gives files and folders
the usual modes; a run that failed before training does not block the next; a run's label names come back."""

import hashlib
import json
import os
import re
import stat
from pathlib import Path

import pytest

from fish_peft.cli.command import main
from fish_peft.cli.resume import CHECKPOINTS, RUN_RECIPE
from tests.glue_files import WORDS, write_glue_files
from tests.models import save_tiny_checkpoint

RECIPE = Path(__file__).resolve().parents[2] / "recipes" / "glue" / "sst2.yaml"
FAST = ["--epochs", "1", "--batch-size", "8", "--num-samples", "8", "--max-length", "32", "--eval-batch-size", "16"]


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    root = tmp_path_factory.mktemp("folders")
    train, validation = write_glue_files("sst2", root)
    return ["--model", save_tiny_checkpoint(root / "tiny-bert", WORDS), "--train-file", train, "--validation-file", validation, *FAST]


@pytest.fixture
def umask_022():
    previous = os.umask(0o022)
    yield
    os.umask(previous)


def run_cli(*args):
    return main([str(a) for a in args])


def train(data, out, *extra):
    return run_cli("train", RECIPE, *data, "--output-dir", out, *extra)


def snapshot(folder: Path) -> dict[str, str]:
    return {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(folder.rglob("*")) if p.is_file()}


def user_files(folder: Path) -> None:
    """What a user keeps next to fish-peft's files: notes and an earlier experiment's sub-folder."""
    (folder / "old-experiment").mkdir(parents=True, exist_ok=True)
    (folder / "old-experiment" / "adapter_model.safetensors").write_bytes(b"an earlier experiment")
    (folder / "notes.md").write_text("lr 1e-3 looked best\n")


def mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


def fake_comparison(folder: Path) -> None:
    """The files `fish-peft compare` leaves (their content does not matter to the folder checks)."""
    (folder / "fish").mkdir(parents=True)
    for name in ("recipe.yaml", "adapter_config.json", "results.json"):
        (folder / "fish" / name).write_text("{}")
    (folder / "comparison.json").write_text("{}")
    (folder / "comparison.md").write_text("| method |\n")


@pytest.mark.parametrize("overwrite", [[], ["--overwrite"]])
def test_train_refuses_a_comparison_and_leaves_it_whole(data, tmp_path, capsys, overwrite):
    """The README's `fish-peft compare recipes/demo.yaml` then `fish-peft train recipes/demo.yaml --method fish`."""
    out = tmp_path / "demo"
    fake_comparison(out)
    user_files(out)
    before = snapshot(out)
    assert train(data, out, *overwrite) == 2
    err = capsys.readouterr().err
    assert "holds a comparison of `fish-peft compare`" in err and "comparison.json" in err and "fish/" in err
    assert "not a run of `fish-peft train`" in err and f"--output-dir, e.g. {out}-fish" in err
    assert snapshot(out) == before


@pytest.mark.parametrize("overwrite", [[], ["--overwrite"]])
def test_train_refuses_a_folder_of_files_it_did_not_write(data, tmp_path, capsys, overwrite):
    out = tmp_path / "mine"
    user_files(out)
    before = snapshot(out)
    assert train(data, out, *overwrite) == 2
    err = capsys.readouterr().err
    assert "files that fish-peft did not write (notes.md, old-experiment/)" in err and "--output-dir" in err
    assert snapshot(out) == before


def test_compare_refuses_a_single_run_before_training(data, tmp_path, capsys):
    out = tmp_path / "run"
    for name in ("recipe.yaml", "adapter_config.json", "results.json"):
        out.mkdir(exist_ok=True)
        (out / name).write_text("{}")
    before = snapshot(out)
    assert run_cli("compare", RECIPE, "--methods", "fish,lora", *data, "--output-dir", out, "--overwrite") == 2
    err = capsys.readouterr().err
    assert "holds a run of `fish-peft train`" in err and "not a comparison" in err and snapshot(out) == before


def test_compare_refuses_a_method_folder_that_is_not_a_run_before_the_first_method_trains(data, tmp_path, capsys):
    out = tmp_path / "comparison"
    fake_comparison(out)
    (out / "lora").mkdir()
    (out / "lora" / "notes.md").write_text("mine")
    assert run_cli("compare", RECIPE, "--methods", "fish,lora", *data, "--output-dir", out, "--overwrite") == 2
    assert "lora holds files that fish-peft did not write (notes.md)" in capsys.readouterr().err
    assert (out / "fish" / "results.json").read_text() == "{}"  # fish was not trained again first


def test_overwrite_replaces_a_runs_own_files_and_keeps_the_users(data, tmp_path, umask_022):
    out = tmp_path / "run"
    assert train(data, out) == 0
    assert (out / "mask.png").is_file()
    user_files(out)
    (out / "checkpoints").mkdir()
    (out / "checkpoints" / "why.txt").write_text("a user's file in fish-peft's sub-folder")
    notes_inode = (out / "notes.md").stat().st_ino
    assert train(data, out, "--method", "lora", "--overwrite") == 0

    assert (out / "notes.md").read_text() == "lr 1e-3 looked best\n" and (out / "notes.md").stat().st_ino == notes_inode
    assert (out / "old-experiment" / "adapter_model.safetensors").read_bytes() == b"an earlier experiment"
    assert (out / "checkpoints" / "why.txt").is_file() and [p.name for p in (out / "checkpoints").iterdir()] == ["why.txt"]
    assert json.loads((out / "results.json").read_text())["method"] == "lora"
    assert not (out / "mask.png").exists()  # the fish run's plot, which a LoRA run does not have
    assert mode(out) == 0o755 and mode(out / "old-experiment") == 0o755
    for name in ("results.json", "README.md", "adapter_model.safetensors", "recipe.yaml"):
        assert mode(out / name) == 0o644, name


def test_a_new_run_folder_and_its_files_get_the_usual_modes(data, tmp_path, umask_022):
    out = tmp_path / "new" / "run"
    assert train(data, out) == 0
    assert mode(out) == mode(out.parent) == 0o755
    assert {p.name: mode(p) for p in out.iterdir()} == {p.name: 0o644 for p in out.iterdir()}


def test_a_run_that_fails_before_training_leaves_nothing_and_the_retry_just_works(data, tmp_path, capsys):
    out = tmp_path / "run"
    out.mkdir()
    assert train(data, out, "--num-samples", "1000") == 2  # the data holds 24 examples
    assert "num_samples=1000" in capsys.readouterr().err
    assert list(out.iterdir()) == []
    assert train(data, out) == 0


def test_what_a_run_that_never_trained_left_does_not_block_the_next_and_the_users_files_stay(data, tmp_path, monkeypatch):
    """A run that died in its first step (or one of an earlier fish-peft, which kept the recipe before the Fisher)
    left its recipe and mask but no checkpoint: nothing to resume, so neither --resume nor --overwrite is needed."""
    import transformers

    out = tmp_path / "run"

    def dies_at_once(*args, **kwargs):
        raise MemoryError("out of memory in the first step")

    with monkeypatch.context() as patch:
        patch.setattr(transformers.Trainer, "train", dies_at_once)
        with pytest.raises(MemoryError):
            train(data, out)
    assert (out / CHECKPOINTS / RUN_RECIPE).is_file()
    user_files(out)  # notes on what went wrong
    assert train(data, out) == 0
    assert (out / "notes.md").is_file() and (out / "old-experiment" / "adapter_model.safetensors").is_file()
    assert not (out / CHECKPOINTS).exists()


def test_mask_writes_beside_the_recipes_output_folder_and_refuses_a_comparison(data, tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)  # the recipe's output_dir is outputs/glue/sst2
    comparison = tmp_path / "outputs" / "glue" / "sst2"
    fake_comparison(comparison)
    before = snapshot(comparison)
    assert run_cli("mask", RECIPE, *data) == 0
    written = sorted(p.name for p in (tmp_path / "outputs" / "glue" / "sst2-mask").iterdir())
    assert written == ["mask.png", "mask.safetensors", "mask_report.json"] and snapshot(comparison) == before
    capsys.readouterr()
    assert run_cli("mask", RECIPE, *data, "--output-dir", comparison, "--overwrite") == 2
    assert "holds a comparison" in capsys.readouterr().err and snapshot(comparison) == before
    assert train(data, "outputs/glue/sst2-mask", "--overwrite") == 2  # a mask folder is not a run either
    assert "holds a mask of `fish-peft mask`" in capsys.readouterr().err


def test_string_label_names_survive_the_save_and_come_back_from_the_cards_snippet(data, tmp_path):
    """Labels "neg"/"pos" in the data: results.json and the card keep them, and the card's own snippet, run on the
    saved folder, gives a model whose config and `pipeline` answer with them."""
    rows = [("good great happy film", "pos"), ("bad awful sad film", "neg")] * 8
    for name, part in (("train.csv", rows), ("valid.csv", rows[:6])):
        (tmp_path / name).write_text("review,sentiment\n" + "".join(f"{text},{label}\n" for text, label in part))
    out = tmp_path / "run"
    custom = ["--task", "custom", "--text-columns", "review", "--num-labels", "2", "--label-column", "sentiment",
              "--train-file", tmp_path / "train.csv", "--validation-file", tmp_path / "valid.csv"]
    assert train(data, out, *custom) == 0
    assert json.loads((out / "results.json").read_text())["label_names"] == ["neg", "pos"]
    (code,) = re.findall(r"```python\n(.*?)```", (out / "README.md").read_text(), flags=re.S)
    assert 'id2label = {0: "neg", 1: "pos"}' in code
    scope = {}
    exec(code.replace('"path/to/adapter"', repr(str(out))).replace("print(", "answer = ("), scope)
    assert scope["merged"].config.id2label == {0: "neg", 1: "pos"} and scope["merged"].config.label2id == {"neg": 0, "pos": 1}
    assert scope["answer"][0]["label"] in ("neg", "pos")


def test_a_full_fine_tune_saves_its_label_names_in_its_config(data, tmp_path):
    from transformers import AutoModelForSequenceClassification, AutoTokenizer, pipeline

    out = tmp_path / "full"
    assert train(data, out, "--method", "full") == 0
    model = AutoModelForSequenceClassification.from_pretrained(out)
    assert model.config.id2label == {0: "negative", 1: "positive"}
    classify = pipeline("text-classification", model=model, tokenizer=AutoTokenizer.from_pretrained(data[1]))
    assert classify("good film")[0]["label"] in ("negative", "positive")
    assert "print(classify(" in (out / "README.md").read_text()
