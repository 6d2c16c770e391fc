"""Fixed FISH mask against evolving ones (Top-KAST and sparse momentum diffs) at the same budget, on the demo data.

Trains `--method fish` from a recipe (default recipes/demo.yaml: all-MiniLM-L6-v2 on the shipped Rotten Tomatoes
sentences, 0.5 %) once per seed and mask rule, all from the same Fisher mask, and prints JSON: each rule's mean ±
std of every metric, how far the support moved (Jaccard of final and initial mask), and the share of training time
spent in mask updates.
"""

import argparse
import contextlib
import dataclasses
import json
import statistics
import sys
from pathlib import Path

from fish_peft.cli.recipe import load_recipe, parse_overrides
from fish_peft.cli.training import run

RULES = {"fixed": None, "topkast": "topkast", "sparse_momentum": "sparse_momentum"}


def mean_std(values):
    return {"mean": statistics.mean(values), "std": statistics.stdev(values) if len(values) > 1 else 0.0, "runs": values}


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--recipe", default="recipes/demo.yaml")
    parser.add_argument("--seeds", default="0,1,2")
    parser.add_argument("--rules", default=",".join(RULES))
    parser.add_argument("--output-dir", default="outputs/evolving_diffs")
    args, rest = parser.parse_known_args()
    base = load_recipe(args.recipe, parse_overrides(["--method", "fish", *rest]))
    summary = {}
    for rule in args.rules.split(","):
        runs = []
        for seed in (int(s) for s in args.seeds.split(",")):
            out = Path(args.output_dir) / rule / f"seed{seed}"
            recipe = dataclasses.replace(base, seed=seed, mask_update=RULES[rule], output_dir=str(out))
            with contextlib.redirect_stdout(sys.stderr):  # Trainer logs to stdout; keep stdout for the JSON
                runs.append(run(recipe, overwrite=True))
        split = next(iter(runs[0]["metrics"]))
        mask = [r["mask"] for r in runs]
        summary[rule] = {
            "lr": runs[0]["recipe"]["learning_rate"],
            "update_every": runs[0]["recipe"]["update_every"] if RULES[rule] else None,
            "selected": mask[0]["selected"],
            "metrics": {name: mean_std([r["metrics"][split][name] for r in runs]) for name in runs[0]["metrics"][split]},
            "mask_updates": mask[0].get("mask_updates"),
            "jaccard_with_initial": mean_std([m["jaccard_with_initial"] for m in mask]) if RULES[rule] else None,
            "update_share": mean_std([m["update_seconds"] / r["train_seconds"] for m, r in zip(mask, runs)]) if RULES[rule] else None,
            "train_seconds": mean_std([r["train_seconds"] for r in runs]),
        }
    print(json.dumps({"recipe": args.recipe, "seeds": args.seeds, "split": split, "rules": summary}, indent=2))


if __name__ == "__main__":
    main()
