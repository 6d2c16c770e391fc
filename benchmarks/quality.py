"""Quality of FISH against the methods users would pick instead, each at its own tuned learning rate, over seeds.

Runs `fish-peft compare RECIPE --lr-grid --seeds 0,1,2` (default recipes/demo.yaml: all-MiniLM-L6-v2 on the shipped
Rotten Tomatoes sentences): every method first chooses its learning rate from its grid on a tuning split held out of
the training data (the validation split takes no part), then trains at it on all the training data once per seed.
Prints JSON: per method the mean ± std of every metric and each seed's, the chosen learning rate and the grid's
tuning scores, trainable parameters, saved bytes, step time and peak memory; the targets below, checked; and the
markdown report (also on stderr, with the training logs).

Targets on the demo data, on the main metric (accuracy), means over the seeds:
- the default FISH recipe at least as good as the best of LoRA / SHiRA / Super-Tuning at its parameter count
  (lora_matched, shira, supertuning);
- within 0.5 point of full fine-tuning;
- at least 2 points above the random mask of the same budget.

    python benchmarks/quality.py                                   # fish, full, random and the three baselines
    python benchmarks/quality.py --methods fish,lora,full --seeds 0 --max-train-samples 2000
"""

import argparse
import contextlib
import dataclasses
import json
import sys
from pathlib import Path

from fish_peft.cli.comparison import compare
from fish_peft.cli.recipe import load_recipe, parse_overrides

METHODS = "fish,full,random,lora_matched,shira,supertuning"
BASELINES = ("lora_matched", "shira", "supertuning")  # PEFT's tuners at FISH's parameter count


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--recipe", default="recipes/demo.yaml")
    parser.add_argument("--methods", default=METHODS, help=f"comma-separated (default {METHODS})")
    parser.add_argument("--seeds", default="0,1,2")
    parser.add_argument("--output-dir", default="outputs/quality")
    parser.add_argument("--no-lr-grid", action="store_true", help="each method at its lr_by_method value instead")
    args, rest = parser.parse_known_args()  # anything else is a recipe key: --max-train-samples 2000, ...
    recipe = dataclasses.replace(
        load_recipe(args.recipe, parse_overrides(rest)), methods=[m.strip() for m in args.methods.split(",")],
        seeds=[int(s) for s in args.seeds.split(",")], lr_grid=not args.no_lr_grid, output_dir=args.output_dir,
    )
    with contextlib.redirect_stdout(sys.stderr):  # Trainer logs to stdout; keep stdout for the JSON
        report = compare(recipe, overwrite=True)
    print(report, file=sys.stderr)
    comparison = json.loads((Path(args.output_dir) / "comparison.json").read_text())
    methods = {row["method"]: method_summary(row) for row in comparison["rows"]}
    metric = comparison["main_metric"]
    print(json.dumps({
        "recipe": args.recipe, "seeds": comparison["seeds"], "main_metric": metric, "lr_grid": comparison["lr_grid"],
        "tuning": comparison["tuning"], "evaluation_examples": comparison["evaluation_examples"],
        "lead": comparison["lead"], "targets": targets(methods, metric), "methods": methods, "report": report,
    }, indent=2))


def method_summary(row: dict) -> dict:
    """One method's numbers: every metric's mean, std and per-seed values, its learning rate and how it was chosen,
    size and cost."""
    metrics = {
        name: {"mean": mean, "std": row["metrics_std"].get(name), "runs": [run["metrics"].get(name) for run in row["runs"]]}
        for name, mean in row["metrics"].items()
    }
    tuning = row["tuning"]
    return {
        "metrics": metrics, "lr": row["lr"], "batch_size": row["batch_size"], "lr_chosen_by": row["lr_chosen_by"],
        "grid": [{"lr": p["lr"], "batch_size": p["batch_size"], "tuning_score": p["score"]} for p in tuning["scores"]]
        if tuning else None,
        **{key: row[key] for key in ("trainable_parameters", "trainable_percent", "adapter_bytes", "mean_step_seconds",
                                     "peak_memory_bytes", "train_seconds", "fisher_seconds")},
    }


def targets(methods: dict, metric: str) -> dict:
    """The docstring's targets, each with FISH's mean, the other side's and whether it is met (None: a method is
    missing from the comparison)."""
    def mean(method):
        return methods[method]["metrics"][metric]["mean"] if method in methods else None

    fish = mean("fish")
    baselines = [mean(m) for m in BASELINES if m in methods]
    checks = {
        "at_least_best_baseline": (max(baselines) if baselines else None, 0.0),
        "within_half_point_of_full": (mean("full"), -0.005),
        "two_points_above_random": (mean("random"), 0.02),
    }
    return {
        name: None if fish is None or other is None else
        {"fish": fish, "other": other, "margin_points": 100 * (fish - other), "met": fish >= other + offset}
        for name, (other, offset) in checks.items()
    }


if __name__ == "__main__":
    main()
