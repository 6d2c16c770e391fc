"""Training recipes, read the way TRL and the alignment handbook read theirs: a YAML file and `--key value` overrides
on top, turned by `transformers.HfArgumentParser` into the dataclass of fish-peft's own keys (`Recipe`) and the fields
of transformers' `TrainingArguments` (kept in `Recipe.training`, written at the top level of the file). Importing this
module loads neither torch nor transformers, so `fish-peft --help` can describe every key quickly."""

from __future__ import annotations

import dataclasses
import typing
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional

from fish_peft.cli.recipe_base import (
    COMPARED_BY_DEFAULT, DISTRIBUTIONS, FISHER_TYPES, MASK_UPDATE_METHODS, MASK_UPDATES, METHODS, SAVE_DTYPES, SCORES,
    SELECTIONS, SET_BY_RUN, SPARSE_TRAINING_METHODS, TRAINING_ALIASES, TRAINING_DEFAULTS, Seeded, TrainedByMethod,
)
from fish_peft.cli.recipe_keys import check_at_least, check_choices, convert_value, key
from fish_peft.cli.sft_recipe import SFT_TASK, SFTRecipe

TUNING_SPLIT = "tuning"  # the split `evaluate_on: tuning` holds out of the training examples (tuning_split.py)
EVALUATED_ON = ("validation", TUNING_SPLIT)


@dataclass
class Recipe(Seeded, TrainedByMethod):
    """Everything a fine-tuning run needs (`fish-peft train`, `mask`, `eval`, `compare`). Defaults are the FISH
    paper's GLUE setup."""

    task: str = key("sst2", "a GLUE task (cola, sst2, mrpc, qqp, stsb, mnli, qnli, rte, wnli), rotten_tomatoes (the "
                    "shipped demo data), custom (your train_file and validation_file), or sft: a causal LM's supervised "
                    "fine-tuning, whose keys `fish-peft train --help` lists")
    model: str = key("bert-large-cased-whole-word-masking", "Hub id or local folder of the pretrained model")
    method: str = key("fish", "what trains: a FISH mask, a random mask of the same size, every weight, LoRA, "
                      "the biases (BitFit), or at FISH's budget LoRA (lora_matched), PEFT's SHiRA (shira) and "
                      "Super-Tuning (supertuning) on every Linear layer, or SHiRA on FISH's mask (shira_fish)", METHODS)
    keep_ratio: float = key(0.005, "share of all parameters the mask may change, the task head included")
    num_samples: int = key(1024, "examples whose per-example gradients make the Fisher scores")
    fisher: str = key("empirical", "Fisher at the gold label (empirical) or weighted by the model's predictions "
                      "(expected)", FISHER_TYPES)
    score: str = key("fisher", "what ranks the fish mask's entries: the Fisher, or the gradient's signal-to-noise "
                     "ratio over the same examples (gradient_snr; empirical Fisher only)", SCORES)
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
    max_length: int = key(128, "tokens per example, longer ones truncated")
    output_dir: str = key("outputs/run", "folder of the run: adapter, results.json, mask plot, model card")
    train_file: Optional[str] = key(None, "CSV or JSON lines training data instead of the Hub's")
    validation_file: Optional[str] = key(None, "CSV or JSON lines validation data instead of the Hub's")
    text_columns: Optional[list[str]] = key(None, "text column(s) of custom data (GLUE tasks know theirs)")
    label_column: str = key("label", "label column of the data")
    num_labels: Optional[int] = key(None, "classes of custom data; 1 for regression (none: counted from the data)")
    max_train_samples: Optional[int] = key(None, "use only the first N training examples")
    max_eval_samples: Optional[int] = key(None, "use only the first N validation examples")
    save_dtype: Optional[str] = key(None, "dtype of the saved FISH diff values (none: the model's)", SAVE_DTYPES)
    methods: list[str] = key(list(COMPARED_BY_DEFAULT), "the methods `fish-peft compare` runs", METHODS)
    lr_grid: bool = key(False, "compare: each method first chooses its learning rate from its grid "
                        "(lr_grid_by_method, else a default grid for the method), each trained on the training "
                        "examples but a held-out tuning split (tuning_share) and scored there, never on the validation "
                        "split; then it trains at the chosen one on all the training examples")
    lr_grid_by_method: dict[str, list[float]] = key({}, "each method's learning rates to choose from with lr_grid, as "
                                                    "fish=1e-3:2e-3:5e-3,full=2e-5:5e-5 (a method not named: its "
                                                    "default grid)", METHODS)
    batch_size_grid_by_method: dict[str, list[int]] = key({}, "each method's batch sizes to choose from with lr_grid, "
                                                          "each tried at every learning rate of its grid, as "
                                                          "fish=16:32 (a method not named: its batch size)", METHODS)
    tuning_share: float = key(0.1, "share of the training examples (after max_train_samples) held out as the tuning "
                              "split, drawn with the seed and stratified by label, that lr_grid scores on")
    evaluate_on: str = key("validation", "what a run is scored on: the task's validation split(s), or tuning: the "
                           "tuning split, with the rest of the training examples trained on (what lr_grid's tuning "
                           "runs do)", EVALUATED_ON)
    seeds: Optional[list[int]] = key(None, "compare: the seeds every method runs with, as 0,1,2; the table shows the "
                                     "mean and std over them, and lr_grid chooses once, on the first (none: just seed)")
    lr_by_method: dict[str, float] = key({}, "each method's own learning rate (beats learning_rate unless "
                                         "--learning-rate or --lr is given)", METHODS)
    batch_size_by_method: dict[str, int] = key({}, "each method's own batch size (beats "
                                               "per_device_train_batch_size unless --batch-size or "
                                               "--per-device-train-batch-size is given)", METHODS)
    training: dict[str, Any] = key(
        TRAINING_DEFAULTS, "any field of transformers' TrainingArguments, written at the top level of the recipe "
        "(learning_rate: 2.0e-3, lr_scheduler_type: cosine, bf16: true, ...) or as --learning-rate 2e-3; "
        f"{', '.join(f'{a} = {f}' for a, f in TRAINING_ALIASES.items())}; save_steps adds checkpoints every N steps "
        f"to those at each epoch's end; the run sets {', '.join(SET_BY_RUN)} itself (its checkpoints go to a folder "
        "in the recipe's output_dir), seed from the recipe's seed, and data_seed too unless given", shown_type="TrainingArguments fields",
    )

    def __post_init__(self):
        check_choices(self)
        if self.mask_update is not None and self.method not in MASK_UPDATE_METHODS:
            raise ValueError(
                f"Recipe: mask_update moves a FISH sparse diff's mask; method {self.method!r} has none to move (use "
                "fish or random)."
            )
        check_at_least(self, 1, "num_samples", "max_length", "lora_r", "update_every", "merge_every", "recompute_every")
        self._check_merging()
        if self.score == "gradient_snr" and self.fisher != "empirical":
            raise ValueError(
                "Recipe: score gradient_snr ranks the gradients at the gold labels; it needs fisher: empirical."
            )
        self.training = {**TRAINING_DEFAULTS, **self.training}
        for name in ("per_device_train_batch_size", "per_device_eval_batch_size", "save_steps"):
            if self.training.get(name) is not None and self.training[name] < 1:
                raise ValueError(f"Recipe: {name} must be at least 1, got {self.training[name]}.")
        if self.learning_rate <= 0 or self.training["num_train_epochs"] <= 0:
            raise ValueError(
                f"Recipe: learning_rate and num_train_epochs must be positive, got {self.learning_rate} and "
                f"{self.training['num_train_epochs']}."
            )
        if any(v <= 0 for v in self.lr_by_method.values()) or any(v < 1 for v in self.batch_size_by_method.values()):
            raise ValueError(
                f"Recipe: lr_by_method values must be positive and batch_size_by_method values at least 1, got "
                f"{self.lr_by_method} and {self.batch_size_by_method}."
            )
        self._check_tuning()

    def _check_tuning(self) -> None:
        """lr_grid's grids, tuning split and seeds, refused before any data loads."""
        for name, kind in (("lr_grid_by_method", float), ("batch_size_grid_by_method", int)):
            grids = getattr(self, name)
            for method, grid in grids.items():
                grids[method] = grid = [_read(v, kind) for v in grid] if isinstance(grid, (list, tuple)) else grid
                if not isinstance(grid, list) or not grid or not all(_number(v, kind) and v > 0 for v in grid):
                    what = "positive learning rates" if kind is float else "batch sizes of at least 1"
                    raise ValueError(f"Recipe: {name} gives {method} the grid {grid!r}; a grid is a non-empty list of {what}.")
        if not 0 < self.tuning_share < 1:
            raise ValueError(f"Recipe: tuning_share is the share of the training examples held out, between 0 and 1 (both "
                             f"excluded), got {self.tuning_share}.")
        if self.seeds is not None:
            if not self.seeds or not all(_number(s, int) for s in self.seeds) or len(set(self.seeds)) != len(self.seeds):
                raise ValueError(f"Recipe: seeds is a list of distinct whole numbers, such as 0,1,2; got {self.seeds!r}.")

    def _check_merging(self) -> None:
        if self.merge_every is None:
            if self.recompute_every is not None or self.mask_sharing != "shared":
                raise ValueError("Recipe: recompute_every and mask_sharing belong to merged training; set merge_every too.")
        elif self.method != "fish" or self.mask_update is not None:
            raise ValueError("Recipe: merged training (merge_every) trains a fixed FISH mask: method fish, no mask_update.")


def _read(value: Any, kind: type) -> Any:
    """A number YAML left as a string (it reads 1e-3 so) as `kind`; anything else as it is."""
    try:
        return kind(value) if isinstance(value, str) else value
    except ValueError:
        return value


def _number(value: Any, kind: type) -> bool:
    """Whether `value` is a number of `kind` (an int for float too; never a bool)."""
    return not isinstance(value, bool) and isinstance(value, (int, float) if kind is float else int)


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
    `recipe_cls` through `HfArgumentParser`, as the alignment handbook does. `Recipe` (the default) stands for every
    fine-tuning recipe: an `SFTRecipe` when the file (or an override) says `task: sft`. The TrainingArguments fields
    of a recipe class with a `training` key (TrainingArguments, or TRL's SFTConfig for SFT) go to `training`, checked
    by building them."""
    import yaml
    from transformers import HfArgumentParser

    file = Path(path)
    if not file.is_file():
        raise FileNotFoundError(f"Recipe file not found: {path}")
    data = yaml.safe_load(file.read_text()) or {}
    if not isinstance(data, dict):
        raise ValueError(f"{path}: a recipe is a YAML mapping of keys to values.")
    overrides = overrides or {}
    if recipe_cls is Recipe:
        recipe_cls = recipe_class(data, overrides)
    given = {**data, **overrides}
    takes_training = "training" in {f.name for f in dataclasses.fields(recipe_cls)}
    if takes_training:
        set_by_run = getattr(recipe_cls, "SET_BY_RUN", SET_BY_RUN)
        data = _canonical(data, path, set_by_run)
        overrides = _canonical(overrides, f"{path} with its overrides", set_by_run)
        for short, name in (("lr", "learning_rate"), ("batch_size", "per_device_train_batch_size")):
            if name in overrides:  # an explicit --lr / --batch-size applies to every method
                overrides.setdefault(f"{short}_by_method", "")
    types_ = typing.get_type_hints(recipe_cls)
    own = set(recipe_keys(recipe_cls))
    arguments_cls = training_arguments_class(recipe_cls) if takes_training else None
    training_fields = _training_fields(arguments_cls, set_by_run) if takes_training else {}
    unknown = sorted(name for name in {**data, **overrides} if name not in own and name not in training_fields)
    if unknown:
        also = f" and any {arguments_cls.__name__} field" if training_fields else ""
        raise ValueError(f"{path}: unknown recipe key(s) {unknown}. Known keys: {', '.join(recipe_keys(recipe_cls))}{also}.")
    keys = {name: value for name, value in data.items() if name in own}
    keys.update({name: convert_value(name, raw, types_[name]) for name, raw in overrides.items() if name in own})
    training = {**{n: v for n, v in data.items() if n not in own}, **{n: v for n, v in overrides.items() if n not in own}}
    if takes_training:
        keys["training"] = _training_values(training, training_fields, path, given, arguments_cls)
    (recipe,) = HfArgumentParser(recipe_cls).parse_dict(keys)
    return recipe


def recipe_class(data: dict[str, Any], overrides: Optional[dict[str, str]] = None) -> type:
    """The recipe class of a recipe file's keys: `SFTRecipe` for `task: sft`, else `Recipe`."""

    task = (overrides or {}).get("task", data.get("task"))
    return SFTRecipe if task == SFT_TASK else Recipe


def training_arguments_class(recipe_cls: type) -> type:
    """The class whose fields a recipe's `training` holds: transformers' TrainingArguments, or the one a recipe class
    names in `TRAINING_ARGUMENTS` (module, class), such as TRL's SFTConfig, with the extra to install if missing."""
    import importlib

    module, name = getattr(recipe_cls, "TRAINING_ARGUMENTS", ("transformers", "TrainingArguments"))
    try:
        return getattr(importlib.import_module(module), name)
    except ImportError as err:
        raise ImportError(
            f"{recipe_cls.__name__} recipes train with {module}'s {name}, and {module} is not installed: "
            f"pip install fish-peft[{module}]"
        ) from err


def recipe_keys(recipe_cls: type = Recipe) -> list[str]:
    """The keys a recipe file of `recipe_cls` names (a `Recipe`'s TrainingArguments fields aside)."""
    return [f.name for f in dataclasses.fields(recipe_cls) if f.name != "training"]


def _canonical(keys: dict[str, Any], where: str, set_by_run: tuple[str, ...] = SET_BY_RUN) -> dict[str, Any]:
    """`keys` with short names (lr, epochs, ...) replaced by the TrainingArguments fields they stand for."""
    if "training" in keys:
        raise ValueError(f"{where}: write TrainingArguments fields at the top level of the recipe, not under training.")
    for name in set_by_run:
        if name in keys and name != "output_dir":
            why = (" (loss_on says which tokens the loss counts)" if name.endswith("_only_loss") else
                   " (its checkpoints serve --resume and the choice of the best model)")
            raise ValueError(f"{where}: {name} is set by the run itself{why}; leave it out.")
    canonical, spelled = {}, {}
    for name, value in keys.items():
        field = TRAINING_ALIASES.get(name, name)
        if field in canonical:
            raise ValueError(f"{where}: {spelled[field]} and {name} name the same TrainingArguments field; keep one.")
        canonical[field], spelled[field] = value, name
    return canonical


def _training_fields(arguments_cls: type, set_by_run: tuple[str, ...] = SET_BY_RUN) -> dict[str, Any]:
    """The fields of `arguments_cls` (TrainingArguments or a subclass) a recipe may set, each with the argparse action
    that reads it from a string."""
    from transformers import HfArgumentParser

    actions = {action.dest: action for action in HfArgumentParser(arguments_cls)._actions}
    return {f.name: actions[f.name] for f in dataclasses.fields(arguments_cls)
            if f.init and f.name in actions and f.name not in set_by_run}


def _training_values(values: dict[str, Any], fields: dict[str, Any], path: str, given: dict[str, Any],
                     arguments_cls: type) -> dict[str, Any]:
    """TrainingArguments fields from the file and the overrides, strings read as TrainingArguments' own parser reads
    them from a command line with `fields` (`_training_fields`); refused, naming the key, when `arguments_cls`
    refuses them."""
    import tempfile

    read = {}
    for name, value in values.items():
        action = fields[name]
        if isinstance(value, str) and action.type not in (None, str):
            try:
                value = action.type(value)
            except (TypeError, ValueError):
                shown = next((g for g, f in TRAINING_ALIASES.items() if f == name and g in given), name)
                raise ValueError(f"--{shown.replace('_', '-')}: cannot read {value!r} as {getattr(action.type, '__name__', 'its type')}.") from None
        read[name] = value
    # TRL's configs turn bf16 on unless told, which a machine without a GPU refuses; the run decides it (sft_training)
    precision = {} if {"bf16", "fp16"} & read.keys() else {"bf16": False}
    with tempfile.TemporaryDirectory() as scratch:
        try:
            arguments_cls(output_dir=scratch, **precision, **read)
        except (TypeError, ValueError) as err:
            raise ValueError(f"{path}: {arguments_cls.__name__} refuses the recipe's training keys: {err}") from None
    return read


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
