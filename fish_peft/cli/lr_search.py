"""`fish-peft compare --lr-grid`: each method's learning rate (and, when asked, batch size) chosen from a grid, fairly.
Every grid point is an ordinary run of the recipe with `evaluate_on: tuning`, in its own folder
(OUT/tuning/METHOD/lr=X/): trained on the training examples but a held-out tuning split (`tuning_split`) and scored
on that split, so the evaluation split never takes part in the choice. The point with the best score on the task's
main metric wins; the comparison then trains each method at its point on all the training examples."""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Optional

from fish_peft.cli.recipe import TUNING_SPLIT, Recipe
from fish_peft.cli.tasks import main_metric

# Full fine-tuning needs a far lower learning rate than sparse diffs and low-rank adapters. Grids of methods not
# named here (fish, random, bitfit, shira, supertuning, shira_fish, ...: the sparse ones) are SPARSE_LR_GRID.
DEFAULT_LR_GRIDS: dict[str, tuple[float, ...]] = {
    "full": (2e-5, 5e-5, 1e-4),
    "lora": (5e-4, 1e-3, 2e-3),
    "lora_matched": (5e-4, 1e-3, 2e-3),
}
SPARSE_LR_GRID = (1e-3, 2e-3, 5e-3)
TUNING_FOLDER = "tuning"  # OUT/tuning/METHOD/lr=X/: the grid's runs


def show_lr(lr: float) -> str:
    """A learning rate as one writes it: 0.002, 5e-5 (not 5e-05)."""
    mantissa, _, exponent = f"{lr:g}".partition("e")
    return mantissa + (f"e{int(exponent)}" if exponent else "")


@dataclass(frozen=True)
class GridPoint:
    """One setting a method is tried at: a learning rate, and a batch size when the batch size is on the grid too."""

    lr: float
    batch_size: Optional[int] = None  # None: the method's own batch size

    @property
    def folder(self) -> str:
        """The run's sub-folder of OUT/tuning/METHOD: lr=0.002, or lr=0.002_batch=16."""
        return f"lr={show_lr(self.lr)}" + ("" if self.batch_size is None else f"_batch={self.batch_size}")

    def describe(self) -> str:
        return f"lr {show_lr(self.lr)}" + ("" if self.batch_size is None else f", batch {self.batch_size}")


@dataclass
class Tuning:
    """What one method's grid gave: every point's score on the tuning split, and the point chosen."""

    method: str
    metric: str
    higher_is_better: bool
    scores: list[dict[str, Any]] = field(default_factory=list)  # {lr, batch_size, score, run_dir}, in grid order
    chosen: Optional[GridPoint] = None
    tuning_examples: Optional[int] = None
    train_examples: Optional[int] = None

    def to_dict(self) -> dict[str, Any]:
        return {
            "metric": self.metric, "higher_is_better": self.higher_is_better, "scores": self.scores,
            "chosen_lr": self.chosen.lr, "chosen_batch_size": self.chosen.batch_size,
            "tuning_examples": self.tuning_examples, "train_examples": self.train_examples,
        }


def lr_grid(recipe: Recipe, method: str) -> list[float]:
    """The learning rates `method` is tried at: the recipe's `lr_grid_by_method`, else the default grid for it."""
    return list(recipe.lr_grid_by_method.get(method) or DEFAULT_LR_GRIDS.get(method, SPARSE_LR_GRID))


def grid_points(recipe: Recipe, method: str) -> list[GridPoint]:
    """Every (learning rate, batch size) `method` is tried at, learning rates first."""
    sizes = recipe.batch_size_grid_by_method.get(method) or [None]
    return [GridPoint(lr, size) for lr in lr_grid(recipe, method) for size in sizes]


def at_point(recipe: Recipe, method: str, point: GridPoint) -> Recipe:
    """The recipe for `method` trained at `point` (through its *_by_method tables, which `run` applies), in the
    method's own sub-folder of the comparison."""
    batch = {} if point.batch_size is None else {method: point.batch_size}
    return dataclasses.replace(
        recipe, lr_by_method={**recipe.lr_by_method, method: point.lr},
        batch_size_by_method={**recipe.batch_size_by_method, **batch},
    ).for_method(method)


def tuning_recipe(recipe: Recipe, method: str, point: GridPoint, seed: int) -> Recipe:
    """One grid point's run: scored on the tuning split held out of the training examples, with `seed`, in
    OUT/tuning/METHOD/POINT."""
    out = Path(recipe.output_dir) / TUNING_FOLDER / method / point.folder
    return dataclasses.replace(at_point(recipe, method, point), evaluate_on=TUNING_SPLIT, seed=seed, output_dir=str(out))


def tuning_recipes(recipe: Recipe, method: str, seed: int) -> list[tuple[GridPoint, Recipe]]:
    return [(point, tuning_recipe(recipe, method, point, seed)) for point in grid_points(recipe, method)]


def tune(recipe: Recipe, method: str, seed: int, run_one: Callable[[Recipe, str], dict]) -> Tuning:
    """Run `method` at every point of its grid with `seed` (`run_one(recipe, label)` returns results.json's content)
    and choose the point with the best tuning score on the main metric (the first best in grid order on a tie; a
    NaN score never wins)."""
    tuning = None
    points = tuning_recipes(recipe, method, seed)
    for number, (point, point_recipe) in enumerate(points, 1):
        results = run_one(point_recipe, f"{method} tuning {point.describe()} ({number} of {len(points)})")
        scores = results["metrics"][TUNING_SPLIT]
        if tuning is None:
            tuning = Tuning(method, *main_metric(scores), tuning_examples=results["validation_examples"][TUNING_SPLIT],
                            train_examples=results["train_examples"])
        tuning.scores.append({"lr": point.lr, "batch_size": point.batch_size, "score": scores[tuning.metric],
                              "run_dir": point_recipe.output_dir})
    best = max(range(len(points)), key=lambda i: (_rank(tuning.scores[i]["score"], tuning.higher_is_better), -i))
    tuning.chosen = points[best][0]
    return tuning


def _rank(score: Optional[float], higher_is_better: bool) -> float:
    if score is None or math.isnan(score):
        return -math.inf
    return score if higher_is_better else -score
