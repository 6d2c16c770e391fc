"""Training recipes: a YAML file of known keys, overridable from the command line (`--lr 1e-3`)."""

from __future__ import annotations

import dataclasses
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

import yaml

from fish_peft.tuner.config import MASK_UPDATES

METHODS = ("fish", "random", "full", "lora", "bitfit")


@dataclass
class Recipe:
    """Everything a run needs. Defaults are the FISH paper's GLUE setup."""

    task: str = "sst2"  # a GLUE task, "rotten_tomatoes" (shipped demo data) or "custom" (train/validation files)
    model: str = "bert-large-cased-whole-word-masking"  # Hub id or local folder
    method: str = "fish"  # fish | random | full | lora | bitfit
    keep_ratio: float = 0.005
    num_samples: int = 1024  # examples for the Fisher
    fisher: str = "empirical"  # empirical | expected
    selection: str = "global"  # global | per_module
    eligible: Optional[str] = None  # regex of the parameter names the mask may pick (default: all)
    mask_update: Optional[str] = None  # None (fixed mask) | topkast | sparse_momentum: the support evolves
    update_every: int = 100  # optimizer steps between support updates (with mask_update)
    prune_rate: float = 0.5  # share of entries replaced at the first update, cosine-decayed (with mask_update)
    exploration: float = 1.0  # Top-KAST diff: exploration entries per forward entry
    penalty: float = 1e-2  # Top-KAST diff: λ of the exploration penalty (λ/D pulls exploration entries to 0)
    merge_every: Optional[int] = None  # the FISH paper's distributed mode: processes train apart, merge every N steps
    merge_reduction: str = "mean"  # mean | sum of the processes' changes at a merge
    recompute_every: Optional[int] = None  # merges between mask recomputations (None: the mask stays)
    mask_sharing: str = "shared"  # shared (one Fisher over every process's data) | individual (each its own)
    lora_r: int = 8
    lora_alpha: int = 16
    lora_targets: list[str] = field(default_factory=lambda: ["query", "value"])
    lr: float = 5e-5
    epochs: float = 7
    batch_size: int = 16
    eval_batch_size: int = 64
    max_length: int = 128
    weight_decay: float = 0.0
    warmup_ratio: float = 0.0
    seed: int = 0
    output_dir: str = "outputs/run"
    train_file: Optional[str] = None
    validation_file: Optional[str] = None
    text_columns: Optional[list[str]] = None  # custom data; GLUE tasks know theirs
    label_column: str = "label"
    num_labels: Optional[int] = None  # custom data: 1 for regression
    max_train_samples: Optional[int] = None
    max_eval_samples: Optional[int] = None
    save_dtype: Optional[str] = None  # float16 | bfloat16 for smaller FISH adapters
    save_steps: Optional[int] = None  # also checkpoint every N optimizer steps (epoch ends always are), for --resume
    methods: list[str] = field(default_factory=lambda: list(METHODS))  # what `fish-peft compare` runs
    lr_by_method: dict[str, float] = field(default_factory=dict)  # each method's own learning rate (beats `lr`)
    batch_size_by_method: dict[str, int] = field(default_factory=dict)  # each method's own batch size

    def __post_init__(self):
        if self.method not in METHODS:
            raise ValueError(f"Recipe: method must be one of {METHODS}, got {self.method!r}.")
        unknown = [m for m in [*self.methods, *self.lr_by_method, *self.batch_size_by_method] if m not in METHODS]
        if unknown:
            raise ValueError(f"Recipe: unknown method(s) {unknown}; choose from {METHODS}.")
        if self.mask_update not in MASK_UPDATES:
            raise ValueError(f"Recipe: mask_update must be one of {MASK_UPDATES}, got {self.mask_update!r}.")
        if self.mask_update is not None and self.method in ("full", "lora"):
            raise ValueError(f"Recipe: mask_update moves a sparse mask; method {self.method!r} has none (use fish or random).")
        for name in ("num_samples", "batch_size", "eval_batch_size", "max_length", "lora_r", "update_every"):
            if getattr(self, name) < 1:
                raise ValueError(f"Recipe: {name} must be at least 1, got {getattr(self, name)}.")
        self._check_merging()
        if self.save_steps is not None and self.save_steps < 1:
            raise ValueError(f"Recipe: save_steps must be at least 1 (or left out), got {self.save_steps}.")
        if self.lr <= 0 or self.epochs <= 0:
            raise ValueError(f"Recipe: lr and epochs must be positive, got lr={self.lr}, epochs={self.epochs}.")
        if any(v <= 0 for v in self.lr_by_method.values()) or any(v < 1 for v in self.batch_size_by_method.values()):
            raise ValueError(
                f"Recipe: lr_by_method values must be positive and batch_size_by_method values at least 1, got "
                f"{self.lr_by_method} and {self.batch_size_by_method}."
            )

    def _check_merging(self) -> None:
        for name in ("merge_every", "recompute_every"):
            if getattr(self, name) is not None and getattr(self, name) < 1:
                raise ValueError(f"Recipe: {name} must be at least 1 (or left out), got {getattr(self, name)}.")
        if self.merge_reduction not in ("mean", "sum") or self.mask_sharing not in ("shared", "individual"):
            raise ValueError(
                f"Recipe: merge_reduction must be mean or sum and mask_sharing shared or individual, got "
                f"{self.merge_reduction!r} and {self.mask_sharing!r}."
            )
        if self.merge_every is None:
            if self.recompute_every is not None or self.mask_sharing != "shared":
                raise ValueError("Recipe: recompute_every and mask_sharing belong to merged training; set merge_every too.")
        elif self.method != "fish" or self.mask_update is not None:
            raise ValueError("Recipe: merged training (merge_every) trains a fixed FISH mask: method fish, no mask_update.")

    def with_method_settings(self) -> "Recipe":
        """This recipe with `method`'s own learning rate and batch size (from the *_by_method tables) in effect."""
        return dataclasses.replace(
            self,
            lr=self.lr_by_method.get(self.method, self.lr),
            batch_size=self.batch_size_by_method.get(self.method, self.batch_size),
        )

    def for_method(self, method: str) -> "Recipe":
        """This recipe for one method of a comparison, in its own sub-folder, with that method's own settings."""
        return dataclasses.replace(self, method=method, output_dir=str(Path(self.output_dir) / method)).with_method_settings()

    def to_yaml(self) -> str:
        return yaml.safe_dump(dataclasses.asdict(self), sort_keys=False)


def _field_types(recipe_cls: type) -> dict[str, Any]:
    hints = typing.get_type_hints(recipe_cls)
    return {f.name: hints[f.name] for f in dataclasses.fields(recipe_cls)}


def load_recipe(path: str, overrides: Optional[dict[str, str]] = None, recipe_cls: type = Recipe):
    """Read a recipe file and apply `--key value` overrides (strings, converted to each key's type); `recipe_cls`
    is the dataclass of known keys (fine-tuning `Recipe` by default)."""
    file = Path(path)
    if not file.is_file():
        raise FileNotFoundError(f"Recipe file not found: {path}")
    data = yaml.safe_load(file.read_text()) or {}
    if not isinstance(data, dict):
        raise ValueError(f"{path}: a recipe is a YAML mapping of keys to values.")
    types_ = _field_types(recipe_cls)
    for key, raw in (overrides or {}).items():
        data[key] = _convert(key, raw, types_.get(key))
    for key in ("lr", "batch_size"):  # an explicit --lr / --batch-size applies to every method
        if key in (overrides or {}) and f"{key}_by_method" in types_ and f"{key}_by_method" not in overrides:
            data[f"{key}_by_method"] = {}
    unknown = sorted(set(data) - set(types_))
    if unknown:
        raise ValueError(f"{path}: unknown recipe key(s) {unknown}. Known keys: {', '.join(types_)}.")
    return recipe_cls(**data)


def _convert(key: str, raw: str, annotation: Any) -> Any:
    """'1e-3' -> 1e-3 for a float key, 'a,b' -> ['a', 'b'] for a list key, 'none' -> None for an optional one."""
    if annotation is None:
        return raw  # reported as unknown by the caller
    args = [a for a in typing.get_args(annotation) if a is not type(None)]
    optional = type(None) in typing.get_args(annotation)
    if optional and raw.lower() in ("none", "null"):
        return None
    target = args[0] if optional else annotation
    origin = typing.get_origin(target)
    try:
        if origin is list:
            return [item.strip() for item in raw.split(",") if item.strip()]
        if origin is dict:
            value_type = typing.get_args(target)[1]
            return {k.strip(): value_type(v) for k, v in (pair.split("=") for pair in raw.split(",") if pair)}
        if target is bool:
            return raw.lower() in ("1", "true", "yes")
        if target is int:
            return int(raw)
        if target is float:
            return float(raw)
    except ValueError:
        raise ValueError(f"--{key.replace('_', '-')}: cannot read {raw!r} as {getattr(target, '__name__', target)}.") from None
    return raw


def parse_overrides(args: list[str]) -> dict[str, str]:
    """['--lr', '1e-3', '--output-dir=x'] -> {'lr': '1e-3', 'output_dir': 'x'}."""
    overrides, i = {}, 0
    while i < len(args):
        arg = args[i]
        if not arg.startswith("--"):
            raise ValueError(f"Expected --key value, got {arg!r}.")
        key, has_value, value = arg[2:].partition("=")
        if not has_value:
            if i + 1 >= len(args) or args[i + 1].startswith("--"):
                raise ValueError(f"--{key} needs a value.")
            value, i = args[i + 1], i + 1
        overrides[key.replace("-", "_")] = value
        i += 1
    return overrides

