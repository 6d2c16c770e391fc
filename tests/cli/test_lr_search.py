"""`fish-peft compare --lr-grid --seeds`: each method's learning rate chosen on a tuning split held out of the training
data (never the evaluation split), then trained at it on all the training data once per seed; the table says which
method is best, how large the noise is, what the columns mean and where the files went."""

import contextlib
import io
import json
import math
import statistics
from collections import Counter
from pathlib import Path

import pytest

from fish_peft.cli.command import main
from fish_peft.cli.comparison_table import lead, render
from fish_peft.cli.lr_search import SPARSE_LR_GRID, lr_grid, tune
from fish_peft.cli.output_folders import COMPARISON, kinds_in
from fish_peft.cli.recipe import load_recipe, parse_overrides
from fish_peft.cli.run_setup import load_task_splits
from fish_peft.cli.tuning_split import tuning_indices
from tests.glue_files import WORDS, write_glue_files
from tests.models import save_tiny_checkpoint

RECIPES = Path(__file__).resolve().parents[2] / "recipes"
MRPC = RECIPES / "glue" / "mrpc.yaml"
FAST = ["--epochs", "1", "--batch-size", "16", "--num-samples", "8", "--max-length", "32", "--eval-batch-size", "32"]
GRIDS = {"lora": [1e-3, 2e-2], "full": [1e-5, 1e-3]}
TUNING = ["--lr-grid", "--lr-grid-by-method", "lora=1e-3:2e-2,full=1e-5:1e-3", "--tuning-share", "0.25"]
N_TRAIN, N_EVAL = 40, 16


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    return save_tiny_checkpoint(tmp_path_factory.mktemp("tiny-bert"), WORDS)


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    train, validation = write_glue_files("mrpc", tmp_path_factory.mktemp("mrpc"), n_train=N_TRAIN, n_val=N_EVAL)
    return ["--train-file", str(train), "--validation-file", str(validation)]


def compare_args(checkpoint, data, out, *extra):
    return ["compare", str(MRPC), "--methods", "lora,full", "--model", str(checkpoint), "--output-dir", str(out), *FAST,
            *data, *extra]


@pytest.fixture(scope="module")
def tuned(checkpoint, data, tmp_path_factory):
    """One tuned comparison, two methods, two seeds: (its folder, what it printed, its stderr)."""
    out = tmp_path_factory.mktemp("tuned") / "compare"
    printed, progress = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(printed), contextlib.redirect_stderr(progress):
        code = main(compare_args(checkpoint, data, out, *TUNING, "--seeds", "0,1"))
    assert code == 0, progress.getvalue()[-3000:]
    return out, printed.getvalue(), progress.getvalue()


def read(path):
    return json.loads(Path(path).read_text())


def rows_of(split):
    return Counter(zip(split["sentence1"], split["sentence2"], split["labels"]))


def test_the_tuning_split_is_held_out_of_the_training_data_only_and_reproducibly(tuned, data):
    out, _, _ = tuned
    plain = load_recipe(MRPC, parse_overrides(data))
    _, splits = load_task_splits(plain)
    train, evaluation = rows_of(splits["train"]), rows_of(splits["validation"])
    held_out = []
    for method, grid in GRIDS.items():
        for lr_folder in sorted((out / "tuning" / method).iterdir()):
            recipe = load_recipe(lr_folder / "recipe.yaml")  # each grid run is an ordinary run of this recipe
            assert (recipe.evaluate_on, recipe.seed) == ("tuning", 0)  # chosen once, on the first seed
            task, tuning_splits = load_task_splits(recipe)
            assert task.validation_splits == ("tuning",) and set(tuning_splits) == {"train", "tuning"}
            rest, tuning = rows_of(tuning_splits["train"]), rows_of(tuning_splits["tuning"])
            assert rest + tuning == train  # the training data, split in two disjoint parts
            assert not set(tuning) & set(evaluation)
            held_out.append(tuning)
            results = read(lr_folder / "results.json")
            assert results["validation_examples"] == {"tuning": N_TRAIN // 4} and results["train_examples"] == N_TRAIN * 3 // 4
    assert len(held_out) == 4 and all(split == held_out[0] for split in held_out)  # the same for every method and lr

    labels = list(splits["train"]["labels"])
    first = tuning_indices(labels, 0.25, seed=0)
    assert (first == tuning_indices(labels, 0.25, seed=0)).all()  # reproducible
    assert not (first == tuning_indices(labels, 0.25, seed=1)).all()  # drawn with the seed
    share = Counter(labels[i] for i in first)
    assert all(abs(share[label] - count / 4) <= 1 for label, count in Counter(labels).items())  # stratified


def test_each_method_runs_its_grid_and_every_seed_trains_at_the_best_lr(tuned):
    out, _, progress = tuned
    comparison = read(out / "comparison.json")
    assert comparison["seeds"] == [0, 1] and comparison["lr_grid"] and comparison["tuning"]["examples"] == N_TRAIN // 4
    for row in comparison["rows"]:
        method, tuning = row["method"], row["tuning"]
        assert [point["lr"] for point in tuning["scores"]] == GRIDS[method]
        for point in tuning["scores"]:
            assert point["score"] == read(Path(point["run_dir"]) / "results.json")["metrics"]["tuning"]["accuracy"]
        scores = [point["score"] for point in tuning["scores"]]
        assert tuning["chosen_lr"] == GRIDS[method][scores.index(max(scores))] == row["lr"]
        assert row["lr_chosen_by"] == "tuning split"
        for seed in (0, 1):
            results = read(out / f"seed={seed}" / method / "results.json")
            assert results["recipe"]["learning_rate"] == row["lr"] and results["recipe"]["seed"] == seed
            assert "validation" in results["metrics"] and results["train_examples"] == N_TRAIN  # all the training data
        assert {run["seed"] for run in row["runs"]} == {0, 1}
    # Trainer's progress bars say which run they are for
    assert "full tuning lr 1e-5" in progress and "lora seed 1:" in progress


def test_mean_and_std_over_seeds_are_those_of_the_runs(tuned):
    out, _, _ = tuned
    for row in read(out / "comparison.json")["rows"]:
        runs = [read(out / f"seed={seed}" / row["method"] / "results.json") for seed in (0, 1)]
        for name in ("accuracy", "f1", "combined_score"):
            values = [run["metrics"]["validation"][name] for run in runs]
            assert row["metrics"][name] == pytest.approx(statistics.mean(values))
            assert row["metrics_std"][name] == pytest.approx(statistics.stdev(values))
            assert [run["metrics"][name] for run in row["runs"]] == values
        assert row["trainable_parameters"] == runs[0]["trainable_parameters"]
        assert row["mean_step_seconds"] == pytest.approx(statistics.mean(r["mean_step_seconds"] for r in runs))
        assert row["peak_memory_bytes"] == max(r["peak_memory_bytes"] for r in runs)
        assert row["adapter_bytes"] == runs[0]["adapter_bytes"] > 0


def test_the_table_is_aligned_names_the_best_states_the_noise_and_the_files(tuned):
    out, printed, _ = tuned
    text = (out / "comparison.md").read_text()
    assert text.strip() in printed
    table = [line for line in text.splitlines() if line.startswith("|")]
    assert len(table) == 4 and len({len(line) for line in table}) == 1  # header, rule, two methods: one width
    assert all(column in table[0] for column in ("accuracy", "f1", "combined_score", "lr", "trainable", "saved", "step", "peak memory"))
    assert all(" ± " in line for line in table[2:])
    comparison = read(out / "comparison.json")
    ranked = sorted(comparison["rows"], key=lambda r: -r["metrics"]["accuracy"])
    best = ranked[0]
    assert f"Best on accuracy (the task's main metric; mean over seeds 0, 1): {best['method']}, " in text
    se = math.sqrt(best["metrics"]["accuracy"] * (1 - best["metrics"]["accuracy"]) / N_EVAL)
    assert f"binomial standard error sqrt(p(1-p)/n) of {se:.4f}" in text and f"with {N_EVAL} evaluation examples" in text
    noise = max(se, *(r["metrics_std"]["accuracy"] for r in ranked))
    lead = best["metrics"]["accuracy"] - ranked[1]["metrics"]["accuracy"]
    assert ("are tied" in text or f"tied with {ranked[1]['method']}" in text) == (lead <= noise)
    assert "combined_score: the mean of accuracy and f1" in text and "run_glue.py" in text
    assert f"{out / 'comparison.json'}" in text and f"{out}/seed=<seed>/<method>" in text and f"{out / 'tuning'}/<method>/lr=<lr>" in text


def summary(rows, seeds=(0,), lead=None):
    return {"rows": rows, "seeds": list(seeds), "lead": lead or {"metric": "accuracy", "best": None}, "lr_grid": False,
            "device": "cpu", "files": {"folder": "out", "table": "out/comparison.md", "json": "out/comparison.json",
                                       "runs": ["out/fish", "out/random"], "tuning": None}}


def row(method, accuracy):
    return {"method": method, "metrics": {"accuracy": accuracy, "combined_score": accuracy}, "metrics_std": {},
            "runs": [{}], "lr": 2e-3, "batch_size": 32, "trainable_parameters": 114_049, "trainable_percent": 0.5,
            "adapter_bytes": 471_000, "mean_step_seconds": 0.031, "peak_memory_bytes": 2 ** 30}


@pytest.mark.parametrize("second, verdict", [(0.79, "are tied"), (0.78, "suggestive"), (0.70, "a real difference")])
def test_one_seed_a_single_metric_and_the_verdict_against_the_binomial_noise(second, verdict):
    rows = [row("fish", 0.80), row("random-with-a-long-name", second)]
    found = lead(rows, "accuracy", True, 1000)  # one run's standard error: sqrt(.8 * .2 / 1000) = 0.0126
    text = render(summary(rows, lead=found))
    table = [line for line in text.splitlines() if line.startswith("|")]
    assert len({len(line) for line in table}) == 1 and "±" not in text.split("Best")[0]
    assert "combined_score" not in table[0]  # it only repeats accuracy
    assert "0.0126 (1.26 points)" in text and verdict in text and "fish, 0.8000" in text


def test_a_learning_rate_chosen_at_the_edge_of_its_grid_is_pointed_out():
    def tuned_row(method, chosen, grid):
        return {**row(method, 0.8), "tuning": {"chosen_lr": chosen, "scores": [{"lr": lr} for lr in grid]}}

    rows = [tuned_row("fish", 1e-3, [1e-3, 2e-3, 5e-3]), tuned_row("full", 5e-5, [2e-5, 5e-5, 1e-4]),
            tuned_row("random", 5e-3, [1e-3, 2e-3, 5e-3]), tuned_row("lora", 1e-3, [1e-3]), row("bitfit", 0.7)]
    text = render(summary(rows, lead=lead(rows, "accuracy", True, 1000)))
    assert "At the edge of its grid: fish (lowest, 0.001), random (highest, 0.005). The best learning rate" in text
    assert "At the edge" not in render(summary(rows[1:2], lead=lead(rows[1:2], "accuracy", True, 1000)))


def test_the_best_grid_point_wins_ties_go_to_the_first_and_nan_never_wins():
    recipe = load_recipe(MRPC, parse_overrides(["--lr-grid-by-method", "fish=1e-3:2e-3:5e-3:1e-2", "--output-dir", "o"]))
    scores = {1e-3: 0.5, 2e-3: float("nan"), 5e-3: 0.7, 1e-2: 0.7}
    ran = []

    def fake_run(sub_recipe, label):
        ran.append((sub_recipe.learning_rate, sub_recipe.evaluate_on, sub_recipe.seed, sub_recipe.output_dir))
        return {"metrics": {"tuning": {"accuracy": scores[sub_recipe.learning_rate], "f1": 0.0}},
                "validation_examples": {"tuning": 9}, "train_examples": 81}

    tuning = tune(recipe, "fish", 3, fake_run)
    assert tuning.chosen.lr == 5e-3 and tuning.metric == "accuracy"
    assert ran[0] == (1e-3, "tuning", 3, str(Path("o") / "tuning" / "fish" / "lr=0.001"))
    assert lr_grid(recipe, "full") == [2e-5, 5e-5, 1e-4] and lr_grid(recipe, "lora_matched") == [5e-4, 1e-3, 2e-3]
    batches = load_recipe(MRPC, parse_overrides(["--lr-grid-by-method", "lora=1e-3:2e-3", "--batch-size-grid-by-method",
                                                 "lora=8:16", "--output-dir", "o"]))
    seen = []
    tune(batches, "lora", 0, lambda r, label: seen.append((r.learning_rate, r.batch_size, r.output_dir)) or fake_run(r, label))
    assert seen == [(lr, size, str(Path("o") / "tuning" / "lora" / f"lr={lr:g}_batch={size}"))
                    for lr in (1e-3, 2e-3) for size in (8, 16)]
    assert lr_grid(recipe, "shira") == lr_grid(recipe, "some_new_method") == list(SPARSE_LR_GRID)


@pytest.mark.parametrize("extra, message", [
    (["--lr-grid", "--lr-grid-by-method", "full="], "a grid is a non-empty list of positive learning rates"),
    (["--lr-grid", "--lr-grid-by-method", "full=0:1e-3"], "a grid is a non-empty list of positive learning rates"),
    (["--lr-grid", "--batch-size-grid-by-method", "full=0"], "batch sizes of at least 1"),
    (["--lr-grid", "--tuning-share", "1"], "between 0 and 1"),
    (["--lr-grid", "--tuning-share", "0"], "between 0 and 1"),
    (["--lr-grid", "--max-train-samples", "4", "--tuning-share", "0.1"], "of 4 training examples leaves no example"),
    (["--seeds", "0,one"], "--seeds: cannot read '0,one'"),
    (["--seeds", "1,1"], "seeds is a list of distinct whole numbers"),
    (["--lr-grid", "--lr", "1e-3"], "drop --lr"),
])
def test_bad_input_is_refused_before_training(extra, message, checkpoint, data, tmp_path, capsys):
    out = tmp_path / "compare"
    assert main(compare_args(checkpoint, data, out, *extra)) == 2
    assert message in capsys.readouterr().err
    assert not out.exists()


def test_an_sft_recipe_takes_no_grid(tmp_path, capsys):
    out = tmp_path / "compare"
    assert main(["compare", str(RECIPES / "sft" / "tiny_offline.yaml"), "--lr-grid", "--output-dir", str(out)]) == 2
    assert "take classification recipes" in capsys.readouterr().err and not out.exists()


def test_an_existing_comparison_is_refused_without_overwrite_and_nothing_is_deleted(tuned, checkpoint, data, capsys):
    out, _, _ = tuned
    before = {p: p.stat().st_mtime_ns for p in out.rglob("*")}
    assert main(compare_args(checkpoint, data, out, *TUNING, "--seeds", "0,1")) == 2
    assert "--overwrite" in capsys.readouterr().err
    assert {p: p.stat().st_mtime_ns for p in out.rglob("*")} == before


def test_a_comparison_cut_off_during_its_grid_is_still_a_comparison(tmp_path):
    partial = tmp_path / "compare"
    (partial / "tuning" / "full" / "lr=1e-5").mkdir(parents=True)
    (partial / "tuning" / "full" / "lr=1e-5" / "recipe.yaml").write_text("method: full\n")
    assert kinds_in(partial) == [COMPARISON]  # so --overwrite may run it again
    (partial / "seed=1" / "lora").mkdir(parents=True)
    (partial / "seed=1" / "lora" / "adapter_config.json").write_text("{}")
    assert kinds_in(partial) == [COMPARISON] and COMPARISON.owns("seed=1") and COMPARISON.owns("tuning")
