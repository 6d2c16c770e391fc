"""`fish-peft compare`: the same recipe once per method (and per seed of `seeds`), side by side; with `lr_grid`, each
method at the learning rate it chose on a tuning split held out of the training data (`lr_search`)."""

from __future__ import annotations

import dataclasses
import statistics
import sys
from pathlib import Path
from typing import Any, Callable, Optional

import torch

from fish_peft.utils.atomic_files import atomic_path
from fish_peft.distributed.processes import rank_and_world
from fish_peft.cli.comparison_table import lead, render
from fish_peft.cli.lr_search import TUNING_FOLDER, Tuning, at_point, tune, tuning_recipes
from fish_peft.cli.output_folders import COMPARISON, MASKS_PLOT, check_output_folder
from fish_peft.cli.recipe import Recipe
from fish_peft.cli.run_output import reset_peak_memory, write_json
from fish_peft.cli.sft_recipe import SFTRecipe
from fish_peft.cli.tasks import main_metric
from fish_peft.cli.training import check_output_dir, run


def compare(recipe: Recipe | SFTRecipe, overwrite: bool = False) -> str:
    """Run every method of `recipe.methods` (an SFT recipe's with `run_sft`) once per seed, each first choosing its
    learning rate with `lr_grid`; write comparison.json and comparison.md; return comparison.md's text (the table,
    the findings, the columns explained, the files). In several processes (`accelerate launch`) every process
    trains and the first writes and returns the comparison (the others return "")."""
    seeds = comparison_seeds(recipe)
    check_comparison_folder(recipe, overwrite)
    if isinstance(recipe, SFTRecipe):
        from fish_peft.cli.sft_training import run_sft as run_method
    else:
        run_method = run
    run_one = lambda sub_recipe, label: run_named(run_method, sub_recipe, label, overwrite)  # noqa: E731
    writer = rank_and_world()[0] == 0  # the others' results lack what saving adds (adapter_bytes, wall_seconds)
    rows = []
    for method in recipe.methods:
        tuning = tune(recipe, method, seeds[0], run_one) if tuned(recipe) else None
        runs = []
        for seed in seeds:
            final = final_recipe(recipe, method, seed, tuning)
            runs.append((final, run_one(final, f"{method}" + (f" seed {seed}" if len(seeds) > 1 else ""))))
        if writer:
            rows.append(summary_row(method, runs, tuning))
    if not writer:
        return ""
    out = Path(recipe.output_dir)
    masks_plot = out / MASKS_PLOT if plot_compared_masks(rows, out / MASKS_PLOT) else None
    summary = comparison_summary(recipe, rows, seeds, masks_plot)
    text = render(summary)
    write_json(out / "comparison.json", summary)
    with atomic_path(str(out / "comparison.md")) as tmp:
        Path(tmp).write_text(text)
    return text


def plot_compared_masks(rows: list[dict], path: Path) -> bool:
    """The masks of the methods whose (first seed's) run saved a FISH adapter, in one PNG on shared colour scales
    (where each method's budget went); False when no method has one."""
    from fish_peft.tuner.adapter_files import read_adapter_config, read_adapter_mask
    from fish_peft.tuner.peft_type import FISH_PEFT_TYPE

    masks = {}
    for row in rows:
        folder = Path(row["runs"][0]["run_dir"])
        if (folder / "adapter_config.json").is_file() and read_adapter_config(folder).peft_type == FISH_PEFT_TYPE:
            masks[row["method"]] = read_adapter_mask(folder)
    if not masks:
        return False
    from fish_peft.hub.mask_plot import plot_masks

    plot_masks(masks, str(path))
    return True


def comparison_seeds(recipe) -> list[int]:
    """The seeds every method runs with: the recipe's `seeds`, else its `seed`."""
    return list(getattr(recipe, "seeds", None) or [recipe.seed])


def tuned(recipe) -> bool:
    return bool(getattr(recipe, "lr_grid", False))


def final_recipe(recipe, method: str, seed: int, tuning: Optional[Tuning]):
    """A method's reported run for one seed: at its chosen grid point (else its *_by_method settings), in OUT/METHOD
    (one seed) or OUT/seed=SEED/METHOD (several)."""
    method_recipe = at_point(recipe, method, tuning.chosen) if tuning else recipe.for_method(method)
    out = Path(recipe.output_dir) / (method if len(comparison_seeds(recipe)) == 1 else Path(f"seed={seed}") / method)
    return dataclasses.replace(method_recipe, seed=seed, output_dir=str(out))


def run_named(run_method: Callable, recipe, label: str, overwrite: bool) -> dict[str, Any]:
    """One run of the comparison, announced by a line on stderr and named in Trainer's progress bar (run_name, unless
    the recipe names it), its peak memory its own."""
    if rank_and_world()[0] == 0:
        print(f"\nfish-peft compare: {label} -> {recipe.output_dir}", file=sys.stderr, flush=True)
    if not recipe.training.get("run_name"):
        recipe = dataclasses.replace(recipe, training={**recipe.training, "run_name": label})
    reset_peak_memory()
    return run_method(recipe, overwrite=overwrite)


def check_comparison_folder(recipe, overwrite: bool) -> None:
    """Refuse, before the first method trains, a folder that is not a comparison, and one whose table or run folders
    (tuning runs included) would be replaced without --overwrite (the last method's refusal would come after hours
    of training)."""
    out = Path(recipe.output_dir)
    check_output_folder(out, COMPARISON, elsewhere=f"{out}-comparison")
    table = [name for name in ("comparison.json", "comparison.md") if (out / name).exists()]
    if table and not overwrite:
        raise FileExistsError(
            f"{out} already holds a comparison ({', '.join(table)}); pass --overwrite to run it again (files you "
            f"added there stay) or choose another --output-dir, e.g. {out}-2."
        )
    seeds = comparison_seeds(recipe)
    for method in recipe.methods:
        folders = [Path(r.output_dir) for _, r in tuning_recipes(recipe, method, seeds[0])] if tuned(recipe) else []
        folders += [Path(final_recipe(recipe, method, seed, None).output_dir) for seed in seeds]
        for folder in folders:
            check_output_dir(folder, overwrite, elsewhere=f"{out}-2")


def summary_row(method: str, runs: list[tuple[Any, dict]], tuning: Optional[Tuning]) -> dict[str, Any]:
    """One method's line: its metrics on the first validation split, per seed and as mean and sample std (None for
    one seed), the learning rate and how it was chosen, size and cost."""
    per_seed = [{"seed": recipe.seed, "run_dir": recipe.output_dir, "metrics": best_metrics(results)} for recipe, results in runs]
    names = list(dict.fromkeys(name for run in per_seed for name in run["metrics"]))
    values = {name: [run["metrics"].get(name, float("nan")) for run in per_seed] for name in names}
    first = runs[0][1]
    split = next(iter(first["metrics"]))
    return {
        "method": method,
        "lr": first["recipe"]["learning_rate"],
        "batch_size": first["recipe"]["per_device_train_batch_size"],
        "lr_chosen_by": "tuning split" if tuning else "recipe",
        "metrics": {name: statistics.fmean(v) for name, v in values.items()},
        "metrics_std": {name: statistics.stdev(v) if len(v) > 1 else None for name, v in values.items()},
        "runs": per_seed,
        "tuning": tuning.to_dict() if tuning else None,
        "trainable_parameters": first["trainable_parameters"],
        "trainable_percent": 100 * first["trainable_parameters"] / first["total_parameters"],
        "adapter_bytes": first["adapter_bytes"],
        "mean_step_seconds": _mean(r.get("mean_step_seconds") for _, r in runs),
        "peak_memory_bytes": max((r["peak_memory_bytes"] for _, r in runs if r.get("peak_memory_bytes") is not None), default=None),
        "train_seconds": _mean(r.get("wall_seconds") for _, r in runs),
        "fisher_seconds": _mean(r.get("fisher_seconds") for _, r in runs),
        "evaluation_split": split,
        "evaluation_examples": first["validation_examples"][split],
    }


def best_metrics(results: dict) -> dict[str, float]:
    """A run's best metrics on its first validation split (an SFT run's loss among them)."""
    first_split = next(iter(results["metrics"]))
    left_out = ("epoch",) if results.get("task") == "sft" else ("loss", "epoch")
    return {k: v for k, v in results["metrics"][first_split].items() if k not in left_out}


def comparison_summary(recipe, rows: list[dict], seeds: list[int], masks_plot: Optional[Path]) -> dict[str, Any]:
    """comparison.json: the rows, the best method and the noise, the tuning split, and where the files went."""
    out = Path(recipe.output_dir)
    metric, higher = main_metric(rows[0]["metrics"]) if rows else ("loss", False)
    evaluation = rows[0]["evaluation_examples"] if rows else None
    tuning = rows[0]["tuning"] if rows and tuned(recipe) else None
    return {
        "task": recipe.task,
        "model": recipe.model,
        "seeds": seeds,
        "main_metric": metric,
        "evaluation_split": rows[0]["evaluation_split"] if rows else None,
        "evaluation_examples": evaluation,
        "lr_grid": tuned(recipe),
        "tuning": {"share": recipe.tuning_share, "seed": seeds[0], "examples": tuning["tuning_examples"],
                   "train_examples": tuning["train_examples"]} if tuning else None,
        "lead": lead(rows, metric, higher, evaluation),
        "device": "cuda" if torch.cuda.is_available() else "cpu",
        "rows": rows,
        "files": {
            "folder": str(out), "table": str(out / "comparison.md"), "json": str(out / "comparison.json"),
            "runs": [run["run_dir"] for row in rows for run in row["runs"]],
            "tuning": str(out / TUNING_FOLDER) if tuned(recipe) else None,
            "masks_plot": str(masks_plot) if masks_plot else None,
        },
    }


def _mean(values) -> Optional[float]:
    known = [v for v in values if v is not None]
    return statistics.fmean(known) if known else None
