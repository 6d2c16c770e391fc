"""`fish-peft compare`: the same recipe once per method, side by side."""

from __future__ import annotations

from pathlib import Path

from fish_peft.utils.atomic_files import atomic_path
from fish_peft.distributed.processes import rank_and_world
from fish_peft.cli.output_folders import COMPARISON, check_output_folder
from fish_peft.cli.recipe import Recipe
from fish_peft.cli.run_output import write_json
from fish_peft.cli.sft_recipe import SFTRecipe
from fish_peft.cli.training import check_output_dir, run


def compare(recipe: Recipe | SFTRecipe, overwrite: bool = False) -> str:
    """Run every method of `recipe.methods` (an SFT recipe's with `run_sft`); write comparison.json and
    comparison.md; return the markdown table. In several processes (`accelerate launch`) every process trains and
    the first writes and returns the comparison (the others return "")."""
    check_comparison_folder(recipe, overwrite)
    if isinstance(recipe, SFTRecipe):
        from fish_peft.cli.sft_training import run_sft as run_one
    else:
        run_one = run
    runs = [run_one(recipe.for_method(method), overwrite=overwrite) for method in recipe.methods]
    if rank_and_world()[0] != 0:
        return ""
    rows = [summary_row(results) for results in runs]
    out = Path(recipe.output_dir)
    table = markdown_table(rows)
    write_json(out / "comparison.json", {"task": recipe.task, "model": recipe.model, "rows": rows})
    with atomic_path(str(out / "comparison.md")) as tmp:
        Path(tmp).write_text(table + "\n")
    return table


def check_comparison_folder(recipe: Recipe, overwrite: bool) -> None:
    """Refuse, before the first method trains, a folder that is not a comparison, and one whose table or method
    folders would be replaced without --overwrite (the last method's refusal would come after hours of training)."""
    out = Path(recipe.output_dir)
    check_output_folder(out, COMPARISON, elsewhere=f"{out}-comparison")
    table = [name for name in ("comparison.json", "comparison.md") if (out / name).exists()]
    if table and not overwrite:
        raise FileExistsError(
            f"{out} already holds a comparison ({', '.join(table)}); pass --overwrite to run it again (files you "
            f"added there stay) or choose another --output-dir, e.g. {out}-2."
        )
    for method in recipe.methods:
        check_output_dir(out / method, overwrite, elsewhere=f"{out}-2")


def summary_row(results: dict) -> dict:
    """One method's line: its best metrics on the first validation split (an SFT run's loss among them), size and
    cost."""
    first_split = next(iter(results["metrics"]))
    left_out = ("epoch",) if results.get("task") == "sft" else ("loss", "epoch")
    return {
        "method": results["method"],
        "lr": results["recipe"]["learning_rate"],
        "batch_size": results["recipe"]["per_device_train_batch_size"],
        "metrics": {k: v for k, v in results["metrics"][first_split].items() if k not in left_out},
        "trainable_parameters": results["trainable_parameters"],
        "trainable_percent": 100 * results["trainable_parameters"] / results["total_parameters"],
        "adapter_bytes": results["adapter_bytes"],
        "train_seconds": results["wall_seconds"],
        "fisher_seconds": results["fisher_seconds"],
    }


def markdown_table(rows: list[dict]) -> str:
    metric_names = list(rows[0]["metrics"]) if rows else []
    header = ["method", "lr", "batch", *metric_names, "trainable", "% of model", "saved bytes", "wall s"]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for row in rows:
        cells = [row["method"], f"{row['lr']:g}", str(row["batch_size"]), *(f"{row['metrics'].get(m, float('nan')):.4f}" for m in metric_names)]
        cells += [f"{row['trainable_parameters']:,}", f"{row['trainable_percent']:.3f}", f"{row['adapter_bytes']:,}", f"{row['train_seconds']:.0f}"]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)
