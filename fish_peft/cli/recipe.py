"""Training recipes, read the way TRL and the alignment handbook read theirs: a dataclass of known keys (each with its
meaning, default and allowed values in the field's metadata), a YAML file, and `--key value` overrides on top, turned
into the dataclass by `transformers.HfArgumentParser`. Importing this module loads neither torch nor transformers, so
`fish-peft --help` can describe every key quickly."""

from __future__ import annotations

import copy
import dataclasses
import textwrap
import typing
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional

METHODS = ("fish", "random", "full", "lora", "bitfit")
SPARSE_TRAINING_METHODS = ("dense", "static", "sparse_momentum", "topkast")
# The library's own choices, written out so that --help needs no torch; tests/cli/test_recipes.py checks they agree.
MASK_UPDATES = (None, "topkast", "sparse_momentum")  # fish_peft.tuner.config.MASK_UPDATES
FISHER_TYPES = ("empirical", "expected")  # fish_peft.masks.fisher.FISHER_TYPES
SELECTIONS = ("global", "per_module")  # fish_peft.masks.selection.SELECTIONS
SAVE_DTYPES = (None, "float32", "float16", "bfloat16")  # fish_peft.tuner.config.SAVE_DTYPES, or None
DISTRIBUTIONS = ("uniform", "erk")  # fish_peft.dynamic.densities.DISTRIBUTIONS


def key(default: Any, help: str, choices: Optional[tuple] = None) -> Any:
    """A recipe key: its default, what it means and, when limited, its allowed values (items or keys for a list or
    a dict). `--help` and `check_choices` read them from the field's metadata."""
    metadata = {"help": help, **({"choices": choices} if choices else {})}
    if isinstance(default, (list, dict)):
        return dataclasses.field(default_factory=lambda: copy.deepcopy(default), metadata=metadata)
    return dataclasses.field(default=default, metadata=metadata)


def check_choices(recipe: Any, error: type[Exception] = ValueError) -> None:
    """Refuse a value outside its key's allowed values (each item of a list key, each key of a dict key)."""
    for f in dataclasses.fields(recipe):
        value, choices = getattr(recipe, f.name), f.metadata.get("choices")
        if choices and any(v not in choices for v in (value if isinstance(value, (list, dict)) else [value])):
            allowed = ", ".join(_show(c) for c in choices)
            raise error(f"{type(recipe).__name__}: {f.name} must be one of {allowed}, got {value!r}.")


def check_at_least(recipe: Any, minimum: float, *names: str, error: type[Exception] = ValueError) -> None:
    """Refuse a key below `minimum` (keys left at None are fine)."""
    for name in names:
        value = getattr(recipe, name)
        if value is not None and value < minimum:
            raise error(f"{type(recipe).__name__}: {name} must be at least {minimum}, got {value}.")


@dataclass
class Seeded:
    """The key every recipe has with the same meaning and default; both recipes below build on it."""

    seed: int = key(0, "seed of the data order, the initialisation and random masks")


@dataclass
class Recipe(Seeded):
    """Everything a fine-tuning run needs (`fish-peft train`, `mask`, `eval`, `compare`). Defaults are the FISH
    paper's GLUE setup."""

    task: str = key("sst2", "a GLUE task (cola, sst2, mrpc, qqp, stsb, mnli, qnli, rte, wnli), rotten_tomatoes (the "
                    "shipped demo data) or custom (your train_file and validation_file)")
    model: str = key("bert-large-cased-whole-word-masking", "Hub id or local folder of the pretrained model")
    method: str = key("fish", "what trains: a FISH mask, a random mask of the same size, every weight, LoRA, or "
                      "the biases (BitFit)", METHODS)
    keep_ratio: float = key(0.005, "share of all parameters the mask may change, the task head included")
    num_samples: int = key(1024, "examples whose per-example gradients make the Fisher scores")
    fisher: str = key("empirical", "Fisher at the gold label (empirical) or weighted by the model's predictions "
                      "(expected)", FISHER_TYPES)
    selection: str = key("global", "one top-k over all parameters, or one per module", SELECTIONS)
    eligible: Optional[str] = key(None, "regex of the parameter names the mask may pick (none: all)")
    mask_update: Optional[str] = key(None, "none keeps the mask fixed; topkast or sparse_momentum let it evolve "
                                     "while training", MASK_UPDATES)
    update_every: int = key(100, "optimizer steps between mask updates (with mask_update)")
    prune_rate: float = key(0.5, "share of entries replaced at the first mask update, cosine-decayed (with mask_update)")
    exploration: float = key(1.0, "Top-KAST: exploration entries per forward entry")
    penalty: float = key(1e-2, "Top-KAST: strength of the penalty that pulls exploration entries to 0")
    merge_every: Optional[int] = key(None, "the FISH paper's distributed mode: processes train apart and average "
                                     "their diffs every N steps (none: off)")
    merge_reduction: str = key("mean", "how the processes' diffs combine at a merge", ("mean", "sum"))
    recompute_every: Optional[int] = key(None, "merges between mask recomputations (none: the mask stays)")
    mask_sharing: str = key("shared", "one Fisher over every process's data, or each process its own",
                            ("shared", "individual"))
    lora_r: int = key(8, "LoRA rank")
    lora_alpha: int = key(16, "LoRA scaling alpha")
    lora_targets: list[str] = key(["query", "value"], "module names LoRA adapts")
    lr: float = key(5e-5, "learning rate")
    epochs: float = key(7, "training epochs (fractions allowed)")
    batch_size: int = key(16, "training batch size per process")
    eval_batch_size: int = key(64, "evaluation batch size")
    max_length: int = key(128, "tokens per example, longer ones truncated")
    weight_decay: float = key(0.0, "AdamW weight decay (entries outside the mask never move)")
    warmup_ratio: float = key(0.0, "share of the steps with a linearly rising learning rate")
    output_dir: str = key("outputs/run", "folder of the run: adapter, results.json, mask plot, model card")
    train_file: Optional[str] = key(None, "CSV or JSON lines training data instead of the Hub's")
    validation_file: Optional[str] = key(None, "CSV or JSON lines validation data instead of the Hub's")
    text_columns: Optional[list[str]] = key(None, "text column(s) of custom data (GLUE tasks know theirs)")
    label_column: str = key("label", "label column of the data")
    num_labels: Optional[int] = key(None, "classes of custom data; 1 for regression (none: counted from the data)")
    max_train_samples: Optional[int] = key(None, "use only the first N training examples")
    max_eval_samples: Optional[int] = key(None, "use only the first N validation examples")
    save_dtype: Optional[str] = key(None, "dtype of the saved FISH diff values (none: the model's)", SAVE_DTYPES)
    save_steps: Optional[int] = key(None, "also checkpoint every N optimizer steps, for --resume (epoch ends "
                                    "always are)")
    methods: list[str] = key(list(METHODS), "the methods `fish-peft compare` runs", METHODS)
    lr_by_method: dict[str, float] = key({}, "each method's own learning rate (beats lr unless --lr is given)", METHODS)
    batch_size_by_method: dict[str, int] = key({}, "each method's own batch size (beats batch_size unless "
                                               "--batch-size is given)", METHODS)

    def __post_init__(self):
        check_choices(self)
        if self.mask_update is not None and self.method in ("full", "lora"):
            raise ValueError(f"Recipe: mask_update moves a sparse mask; method {self.method!r} has none (use fish or random).")
        check_at_least(self, 1, "num_samples", "batch_size", "eval_batch_size", "max_length", "lora_r", "update_every",
                       "merge_every", "recompute_every", "save_steps")
        self._check_merging()
        if self.lr <= 0 or self.epochs <= 0:
            raise ValueError(f"Recipe: lr and epochs must be positive, got lr={self.lr}, epochs={self.epochs}.")
        if any(v <= 0 for v in self.lr_by_method.values()) or any(v < 1 for v in self.batch_size_by_method.values()):
            raise ValueError(
                f"Recipe: lr_by_method values must be positive and batch_size_by_method values at least 1, got "
                f"{self.lr_by_method} and {self.batch_size_by_method}."
            )

    def _check_merging(self) -> None:
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
        import yaml

        return yaml.safe_dump(dataclasses.asdict(self), sort_keys=False)


@dataclass
class SparseRecipe(Seeded):
    """A from-scratch sparse training run (`fish-peft sparse-train`). Defaults follow the sparse momentum paper's
    MNIST setup, scaled to scikit-learn's bundled digits."""

    method: str = key("sparse_momentum", "dense, a static random mask, sparse momentum or Top-KAST", SPARSE_TRAINING_METHODS)
    model: str = key("mlp", "LeNet-300-100-shaped MLP or a small CNN (other models: use the engines in Python)", ("mlp", "cnn"))
    dataset: str = key("digits", "scikit-learn's bundled 8x8 handwritten digits (offline)", ("digits",))
    density: float = key(0.05, "share of each layer's weights that are nonzero (Top-KAST: the forward density)")
    backward_density: Optional[float] = key(None, "Top-KAST's D+M (none: twice the density, at most 1)")
    penalty: float = key(1e-4, "Top-KAST's exploration penalty")
    update_every: Optional[int] = key(None, "steps between mask updates (none: one epoch; 1 for topkast)")
    prune_rate: float = key(0.5, "sparse momentum's initial prune rate")
    distribution: str = key("uniform", "density per layer: the same everywhere, or Erdos-Renyi-Kernel", DISTRIBUTIONS)
    optimizer: str = key("sgd", "optimizer", ("sgd", "adam"))
    lr: float = key(0.1, "learning rate")
    momentum: float = key(0.9, "SGD momentum")
    epochs: int = key(30, "training epochs")
    batch_size: int = key(64, "training batch size per process")
    output_dir: str = key("outputs/sparse", "folder of the run: results.json and sparse_model.safetensors")

    def __post_init__(self):
        from fish_peft.dynamic.targets import SparseTrainingError

        check_choices(self, SparseTrainingError)
        check_at_least(self, 1, "epochs", "batch_size", error=SparseTrainingError)
        if self.lr <= 0:
            raise SparseTrainingError(f"SparseRecipe: lr must be positive, got {self.lr}.")


def load_recipe(path: str, overrides: Optional[dict[str, str]] = None, recipe_cls: type = Recipe):
    """Read a recipe file, apply `--key value` overrides (strings, converted to each key's type) and build
    `recipe_cls` (fine-tuning `Recipe` by default) through `HfArgumentParser`, as the alignment handbook does."""
    import yaml
    from transformers import HfArgumentParser

    file = Path(path)
    if not file.is_file():
        raise FileNotFoundError(f"Recipe file not found: {path}")
    data = yaml.safe_load(file.read_text()) or {}
    if not isinstance(data, dict):
        raise ValueError(f"{path}: a recipe is a YAML mapping of keys to values.")
    overrides = overrides or {}
    types_ = typing.get_type_hints(recipe_cls)
    unknown = sorted(set(data) - set(types_)) or sorted(set(overrides) - set(types_))
    if unknown:
        raise ValueError(f"{path}: unknown recipe key(s) {unknown}. Known keys: {', '.join(recipe_keys(recipe_cls))}.")
    data.update({name: _convert(name, raw, types_[name]) for name, raw in overrides.items()})
    for name in ("lr", "batch_size"):  # an explicit --lr / --batch-size applies to every method
        if name in overrides and f"{name}_by_method" in types_ and f"{name}_by_method" not in overrides:
            data[f"{name}_by_method"] = {}
    (recipe,) = HfArgumentParser(recipe_cls).parse_dict(data)
    return recipe


def recipe_keys(recipe_cls: type = Recipe) -> list[str]:
    return [f.name for f in dataclasses.fields(recipe_cls)]


def _convert(name: str, raw: str, annotation: Any) -> Any:
    """'1e-3' -> 1e-3 for a float key, 'a,b' -> ['a', 'b'] for a list key, 'none' -> None for an optional one."""
    optional, target = _unwrap(annotation)
    if optional and raw.lower() in ("none", "null"):
        return None
    origin = typing.get_origin(target)
    try:
        if origin is list:
            return [item.strip() for item in raw.split(",") if item.strip()]
        if origin is dict:
            value_type = typing.get_args(target)[1]
            return {k.strip(): value_type(v) for k, v in (pair.split("=") for pair in raw.split(",") if pair)}
        if target is bool:
            return raw.lower() in ("1", "true", "yes")
        if target in (int, float):
            return target(raw)
    except ValueError:
        raise ValueError(f"--{name.replace('_', '-')}: cannot read {raw!r} as {_type_name(target)}.") from None
    return raw


def _unwrap(annotation: Any) -> tuple[bool, Any]:
    """(whether None is allowed, the type without None) of a key's annotation."""
    args = typing.get_args(annotation)
    if type(None) in args:
        return True, next(a for a in args if a is not type(None))
    return False, annotation


def _type_name(annotation: Any) -> str:
    optional, target = _unwrap(annotation)
    origin, args = typing.get_origin(target), typing.get_args(target)
    if origin is list:
        name = f"comma-separated {args[0].__name__}s"
    elif origin is dict:
        name = f"method={args[1].__name__},..."
    else:
        name = getattr(target, "__name__", str(target))
    return f"{name} or none" if optional else name


def _show(value: Any) -> str:
    """A value as one types it on the command line: none, a,b or fish=2e-3."""
    if value is None:
        return "none"
    if isinstance(value, dict):
        return ",".join(f"{k}={v}" for k, v in value.items()) or "(empty)"
    if isinstance(value, (list, tuple)):
        return ",".join(_show(v) for v in value)
    return str(value)


def describe_keys(recipe_cls: type = Recipe, width: int = 100) -> str:
    """--help's list of `recipe_cls`'s keys: for each, its type, what it means, its default and its allowed values."""
    hints = typing.get_type_hints(recipe_cls)
    lines = []
    for f in dataclasses.fields(recipe_cls):
        default = f.default_factory() if f.default is dataclasses.MISSING else f.default
        text = f"({_type_name(hints[f.name])}) {f.metadata['help']}. Default: {_show(default)}."
        if f.metadata.get("choices"):
            text += f" Allowed: {' | '.join(_show(c) for c in f.metadata['choices'])}."
        lines.append(textwrap.fill(
            text, width, initial_indent=f"  {f.name:<21} ", subsequent_indent=" " * 24, break_on_hyphens=False))
    return "\n".join(lines)


def parse_overrides(args: list[str]) -> dict[str, str]:
    """['--lr', '1e-3', '--output-dir=x'] -> {'lr': '1e-3', 'output_dir': 'x'}."""
    overrides, i = {}, 0
    while i < len(args):
        arg = args[i]
        if not arg.startswith("--"):
            raise ValueError(f"Expected --key value, got {arg!r}.")
        name, has_value, value = arg[2:].partition("=")
        if not has_value:
            if i + 1 >= len(args) or args[i + 1].startswith("--"):
                raise ValueError(f"--{name} needs a value.")
            value, i = args[i + 1], i + 1
        overrides[name.replace("-", "_")] = value
        i += 1
    return overrides
