"""Which score should rank a FISH mask's entries? The demo recipe trained with masks from other scores, same budget.

Each score is computed from the same examples the recipe's Fisher uses (its first `num_samples` training examples,
in the seeded order), over the parameters the recipe makes eligible; the recipe's global top-k then picks the
mask. Every run is an ordinary `fish-peft train` of the recipe (method fish) with that mask, scored on the tuning
split (`evaluate_on: tuning`), or with `--evaluate-on validation` on the validation split. With F the Fisher
(mean of g² over the examples) and G the mean gradient, for a weight matrix (rows i, columns j):

    fisher               F (the paper; the recipe's own mask)
    fisher_by_column     F_ij / mean_i F_ij: each input column's scale divided out (the x_j² of (g_i x_j)²)
    fisher_by_matrix     F / mean(F): every matrix on the same scale
    fisher_interaction   F_ij · mean(F) / (mean_j F_ij · mean_i F_ij): what the rows' and columns' means do not explain
    fisher_interaction_by_matrix  the same, then divided by its mean per matrix
    gradient             G²: what one full-batch gradient step would move most
    gradient_by_column   G²_ij / mean_i G²_ij
    gradient_snr         G² / F: how consistently the examples push an entry the same way (the library's
                         `score="gradient_snr"`; it ranks like the gradient's signal-to-noise ratio)
    fisher_sampled_0.5   sampled without replacement with probability ∝ F^0.5 (Gumbel top-k, seeded)

Prints JSON: {score: {lr: {metric: value}, ...}} and each mask's spread (share of the budget in the 3 fullest
matrices, mean share of a matrix's columns touched).

    python benchmarks/mask_scores.py --scores gradient_snr,fisher --lrs 2e-3,5e-3
    python benchmarks/mask_scores.py --scores gradient_snr --lrs 5e-3 --evaluate-on validation --seed 1
    python benchmarks/mask_scores.py --scores gradient,fisher --lrs 1e-3 --max-train-samples 500 --num-samples 32
"""

import argparse
import contextlib
import itertools
import json
import re
import sys
import zlib
from pathlib import Path

import torch

import fish_peft.cli.training as training
from fish_peft.cli.command import main as fish_peft
from fish_peft.masks.fisher import compute_fisher
from fish_peft.masks.selection import base_named_parameters, gradient_snr_scores, mask_from_scores

EPS = 1e-30


def by_columns(s):
    return s / (s.mean(0, keepdim=True) + EPS) if s.dim() == 2 else s


def interaction(s):
    return s * s.mean() / (s.mean(1, keepdim=True) * s.mean(0, keepdim=True) + EPS) if s.dim() == 2 else s


def sampled(s, name, power):
    uniform = torch.rand(s.shape, generator=torch.Generator().manual_seed(zlib.crc32(name.encode())), dtype=torch.float64)
    return (power * torch.log(s.double() + EPS) - torch.log(-torch.log(uniform.clamp_min(1e-300)))).float()


SCORES = {  # (name, Fisher F, mean gradient G) -> score; gradient_snr comes from the library (gradient_snr_scores)
    "fisher": lambda n, f, g: f,
    "fisher_by_column": lambda n, f, g: by_columns(f),
    "fisher_by_matrix": lambda n, f, g: f / (f.mean() + EPS),
    "fisher_interaction": lambda n, f, g: interaction(f),
    "fisher_interaction_by_matrix": lambda n, f, g: interaction(f) / (interaction(f).mean() + EPS),
    "gradient": lambda n, f, g: g.square(),
    "gradient_by_column": lambda n, f, g: by_columns(g.square()),
    "fisher_sampled_0.5": lambda n, f, g: sampled(f, n, 0.5),
}


def spread(mask):
    counts = sorted((mask[name].numel() for name in mask), reverse=True)
    columns = [len(torch.unique(mask[n] % mask.shapes[n][1])) / mask.shapes[n][1] for n in mask if len(mask.shapes[n]) == 2 and mask[n].numel()]
    return {"top3_share": round(sum(counts[:3]) / sum(counts), 3), "mean_column_cover": round(sum(columns) / len(columns), 3)}


def masks_scored_by(score, spreads):
    """A stand-in for the training command's compute_fisher_mask that ranks the entries by `score` instead."""

    def compute_mask(model, loader, keep_ratio, num_samples, *, selection, eligible, fisher, **_):
        params = {n: p for n, p in base_named_parameters(model) if eligible is None or re.search(eligible, n)}
        squares, sums = compute_fisher(model, loader, num_samples, parameters=params, fisher=fisher, gradient_sums=True)
        if score == "gradient_snr":  # the library's own score
            scores = gradient_snr_scores(squares, sums)
        else:
            scores = {n: SCORES[score](n, f / num_samples, sums[n] / num_samples) for n, f in squares.items()}
        mask = mask_from_scores(model, scores, keep_ratio, eligible=eligible, selection=selection)
        spreads[score] = spread(mask)
        return mask

    return compute_mask


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--recipe", default="recipes/demo.yaml")
    parser.add_argument("--scores", default=",".join([*SCORES, "gradient_snr"]))
    parser.add_argument("--lrs", default="2e-3,5e-3")
    parser.add_argument("--evaluate-on", default="tuning", choices=["tuning", "validation"])
    parser.add_argument("--seed", default="0")
    parser.add_argument("--output-dir", default="outputs/mask_scores")
    args, rest = parser.parse_known_args()  # anything else is a recipe key: --max-train-samples 2000, ...
    results, spreads = {}, {}
    for score, lr in itertools.product(args.scores.split(","), args.lrs.split(",")):
        out = Path(args.output_dir) / score / f"lr={lr}"
        training.compute_fisher_mask = masks_scored_by(score, spreads)
        with contextlib.redirect_stdout(sys.stderr):
            status = fish_peft([
                "train", args.recipe, "--method", "fish", "--learning-rate", lr, "--seed", args.seed,
                "--evaluate-on", args.evaluate_on, "--output-dir", str(out), "--overwrite", *rest,
            ])
        if status:
            raise SystemExit(f"the run of {score} at lr {lr} failed ({out})")
        metrics = json.loads((out / "results.json").read_text())["metrics"]
        results.setdefault(score, {})[lr] = metrics[args.evaluate_on if args.evaluate_on in metrics else "validation"]
    print(json.dumps({"recipe": args.recipe, "seed": int(args.seed), "evaluate_on": args.evaluate_on,
                      "accuracy_by_lr": results, "spread": spreads}, indent=2))


if __name__ == "__main__":
    main()
