"""Quality of FISH against the methods users would pick instead, on the demo data, over several seeds.

Runs `fish-peft compare` on a recipe (default recipes/demo.yaml: all-MiniLM-L6-v2, shipped Rotten Tomatoes
sentences; fish, full, lora, random) once per seed and prints JSON with each method's mean ± std of every metric,
its learning rate and trainable parameters. Targets on the demo data: FISH within 1 accuracy point of full
fine-tuning, above the random mask at the same budget, at least as good as LoRA r=8 on query/value.
"""

import argparse
import contextlib
import dataclasses
import json
import statistics
import sys
from pathlib import Path

from fish_peft.cli.comparison import compare
from fish_peft.cli.recipe import load_recipe, parse_overrides


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--recipe", default="recipes/demo.yaml")
    parser.add_argument("--seeds", default="0,1,2")
    parser.add_argument("--output-dir", default="outputs/quality")
    args, rest = parser.parse_known_args()
    base = load_recipe(args.recipe, parse_overrides(rest))
    runs = {}
    for seed in (int(s) for s in args.seeds.split(",")):
        recipe = dataclasses.replace(base, seed=seed, output_dir=str(Path(args.output_dir) / f"seed{seed}"))
        with contextlib.redirect_stdout(sys.stderr):  # Trainer logs to stdout; keep stdout for the JSON
            compare(recipe, overwrite=True)
        rows = json.loads((Path(recipe.output_dir) / "comparison.json").read_text())["rows"]
        for row in rows:
            runs.setdefault(row["method"], []).append(row)
    summary = {}
    for method, rows in runs.items():
        metrics = {}
        for name in rows[0]["metrics"]:
            values = [r["metrics"][name] for r in rows]
            metrics[name] = {"mean": statistics.mean(values), "std": statistics.stdev(values) if len(values) > 1 else 0.0, "runs": values}
        summary[method] = {"lr": rows[0]["lr"], "trainable_parameters": rows[0]["trainable_parameters"], "metrics": metrics}
    print(json.dumps({"recipe": args.recipe, "seeds": args.seeds, "methods": summary}, indent=2))


if __name__ == "__main__":
    main()
