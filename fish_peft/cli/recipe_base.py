"""What every recipe shares, and the library's choices written out so that `--help` needs no torch: the keys' allowed
values, fish-peft's defaults and aliases for training-argument fields, the `seed` key, and what recipes trained
through a Trainer do with their per-method tables."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional

from fish_peft.cli.recipe_keys import key

METHODS = ("fish", "random", "full", "lora", "bitfit", "lora_matched", "shira", "supertuning", "shira_fish")
COMPARED_BY_DEFAULT = METHODS[:5]  # what `compare` runs when a recipe names no methods
MASK_UPDATE_METHODS = ("fish", "random", "bitfit")  # the methods whose support is a FISH sparse diff that can move
SPARSE_TRAINING_METHODS = ("dense", "static", "sparse_momentum", "topkast")
# The library's own choices, written out so that --help needs no torch; tests/cli/test_recipes.py checks they agree.
MASK_UPDATES = (None, "topkast", "sparse_momentum")  # fish_peft.tuner.config.MASK_UPDATES
FISHER_TYPES = ("empirical", "expected")  # fish_peft.masks.fisher.FISHER_TYPES
SELECTIONS = ("global", "per_module")  # fish_peft.masks.selection.SELECTIONS
SCORES = ("fisher", "gradient_snr")  # fish_peft.masks.selection.SCORES
SAVE_DTYPES = (None, "float32", "float16", "bfloat16")  # fish_peft.tuner.config.SAVE_DTYPES, or None
DISTRIBUTIONS = ("uniform", "erk")  # fish_peft.dynamic.densities.DISTRIBUTIONS
# fish-peft's own defaults for TrainingArguments fields (the FISH paper's GLUE setup); every other field keeps
# transformers' default
TRAINING_DEFAULTS = {"learning_rate": 5e-5, "num_train_epochs": 7, "per_device_train_batch_size": 16,
                     "per_device_eval_batch_size": 64}
# short names recipes have used, for the TrainingArguments fields they stand for
TRAINING_ALIASES = {"lr": "learning_rate", "epochs": "num_train_epochs", "batch_size": "per_device_train_batch_size",
                    "eval_batch_size": "per_device_eval_batch_size", "warmup_ratio": "warmup_steps"}
# TrainingArguments fields a run sets itself: its checkpoints serve --resume and the choice of the best model
SET_BY_RUN = ("output_dir", "save_only_model", "save_total_limit", "load_best_model_at_end", "metric_for_best_model",
              "greater_is_better")


@dataclass
class Seeded:
    """The key every recipe has with the same meaning and default; every recipe class builds on it."""

    seed: int = key(0, "seed of the data order, the initialisation and random masks")


class TrainedByMethod:
    """What recipes trained through a Trainer share: each method's own settings from the *_by_method tables, one
    sub-folder per method of a comparison, and the file form (own keys, then the training fields at the top level)."""

    @property
    def learning_rate(self) -> float:
        return self.training["learning_rate"]

    @property
    def batch_size(self) -> int:
        """Training batch size per process."""
        return self.training["per_device_train_batch_size"]

    @property
    def save_steps(self) -> Optional[int]:
        """Optimizer steps between extra checkpoints (None: only at each epoch's end)."""
        return self.training.get("save_steps")

    def with_method_settings(self):
        """This recipe with `method`'s own learning rate and batch size (from the *_by_method tables) in effect."""
        own = {"learning_rate": self.lr_by_method.get(self.method), "per_device_train_batch_size": self.batch_size_by_method.get(self.method)}
        return dataclasses.replace(self, training={**self.training, **{k: v for k, v in own.items() if v is not None}})

    def for_method(self, method: str):
        """This recipe for one method of a comparison, in its own sub-folder, with that method's own settings."""
        return dataclasses.replace(self, method=method, output_dir=str(Path(self.output_dir) / method)).with_method_settings()

    def to_dict(self) -> dict[str, Any]:
        """The recipe as its file writes it: fish-peft's keys, then the training arguments' fields at the top level."""
        keys = dataclasses.asdict(self)
        training = keys.pop("training")
        return {**keys, **training}

    def to_yaml(self) -> str:
        import yaml

        return yaml.safe_dump(self.to_dict(), sort_keys=False)
