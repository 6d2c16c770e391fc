"""The Hugging Face Hub model card of a model trained with fish-peft: a `huggingface_hub.ModelCard` rendered from a
Jinja2 template in model_cards/, its metadata and model-index results from `ModelCardData` and `EvalResult`."""

from __future__ import annotations

import json
import math
import os
from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

from huggingface_hub.utils import HFValidationError, validate_repo_id

if TYPE_CHECKING:
    from huggingface_hub import ModelCard, ModelCardData

# fish_peft/model_cards is a link to the top-level model_cards/, so the wheel ships the template (package data).
DEFAULT_TEMPLATE = Path(__file__).resolve().parents[1] / "model_cards" / "fish_adapter.md.j2"

MASK_METHODS = ("fish", "random", "magnitude")  # the methods whose card shows the mask (rule, statistics, table, plot)
SPARSE_DIFF_METHODS = MASK_METHODS + ("bitfit",)  # saved as fish-peft sparse-diff adapters
# PEFT's own tuners at a FISH mask's budget (fish_peft.cli.peft_baselines); shira_fish is SHiRA on a FISH mask
BUDGET_METHODS = ("lora_matched", "shira", "supertuning", "shira_fish")
FISHER_METHODS = ("fish", "shira_fish")  # the methods whose support is a Fisher mask
ADAPTER_METHODS = SPARSE_DIFF_METHODS + ("lora",) + BUDGET_METHODS  # saved as PEFT adapters (the rest: a whole model)
CARD_METHODS = ADAPTER_METHODS + ("full",)  # every method a card can describe


# Recipe keys that apply to some runs only, with the test of a recipe (dict) they apply to; every other key applies
# to every run. The comparison's own keys never apply: the run's learning rate and batch size are already in effect.
RECIPE_KEY_APPLIES = {
    "keep_ratio": lambda recipe: recipe.get("method") in MASK_METHODS + BUDGET_METHODS,
    **dict.fromkeys(("selection", "eligible"), lambda recipe: recipe.get("method") in MASK_METHODS + ("shira_fish",)),
    **dict.fromkeys(("num_samples", "fisher"), lambda recipe: recipe.get("method") in FISHER_METHODS),
    **dict.fromkeys(("update_every", "prune_rate"), lambda recipe: recipe.get("mask_update") is not None),
    **dict.fromkeys(("exploration", "penalty"), lambda recipe: recipe.get("mask_update") == "topkast"),
    **dict.fromkeys(
        ("merge_reduction", "recompute_every", "mask_sharing"), lambda recipe: recipe.get("merge_every") is not None
    ),
    **dict.fromkeys(
        ("lora_r", "lora_alpha", "lora_targets"), lambda recipe: recipe.get("method") in ("lora", "lora_matched")
    ),
    "save_dtype": lambda recipe: recipe.get("method") in SPARSE_DIFF_METHODS,
    **dict.fromkeys(("methods", "lr_by_method", "batch_size_by_method", "output_dir"), lambda recipe: False),
}

OPTIONAL_DEFAULTS = {
    "mask_rule": None,
    "mask_update": None,
    "adapters": [],
    "main_adapter": None,
    "pipeline_tag": "text-classification",
    "auto_class": "AutoModelForSequenceClassification",
    "extra_tags": [],
    "adapter_settings": None,
    "label_names": None,
    "train_examples": None,
    "validation_examples": None,
    "eval_split": "validation",
}


def render_model_card(context: Mapping[str, Any], template: str | os.PathLike | None = None) -> str:
    """The model card's Markdown (YAML front matter first); see `model_card`."""
    return str(model_card(context, template))


def model_card(context: Mapping[str, Any], template: str | os.PathLike | None = None) -> ModelCard:
    """A `huggingface_hub.ModelCard` whose metadata is `card_data(context)` and whose text is rendered from a Jinja2
    template (by default `model_cards/fish_adapter.md.j2`; the template writes the metadata as `{{ card_data }}`).

    Every variable the template uses must be in `context` (else `jinja2.UndefinedError`, naming them), apart from
    the optional keys in `OPTIONAL_DEFAULTS`. The default template's keys (pass None / empty where the text says so):

    - `base_model` (str): Hub id or path of the base model, e.g. "bert-large-cased-whole-word-masking".
    - `task` (str or None): the task, e.g. "sst2".
    - `dataset` (str or None): the data: a Hub dataset id (e.g. "nyu-mll/glue", with `task` as its configuration),
      or a description that is not one (e.g. "train.csv (local file)"), which the metadata does not list.
    - `method` (str): one of `CARD_METHODS`. The mask sections appear for `MASK_METHODS`; "full" is described as a
      full fine-tune, loaded without PEFT.
    - `keep_ratio` (float or None): the mask's share of all parameters (head included), e.g. 0.005.
    - `num_labels` (int or None): classes of the head (1 for regression), used in the loading snippet.
    - `trainable_parameters` (int): parameters trained (sparse-diff values plus the head, or LoRA weights, ...).
    - `total_parameters` (int or None): parameters of the base model with its head.
    - `adapter_bytes` (int or None): size of the saved adapter (or model) files.
    - `metrics` (dict[str, float]): best validation results, e.g. {"accuracy": 0.93}; a leading "eval_" is dropped.
      May be empty (no results section, no model-index).
    - `mask_table` (list of dicts): `FishMask.report()` rows (parameter, shape, selected, size, density), or [].
      The card lists the 15 rows with most entries selected and says how many more there are.
    - `plot_file` (str or None): file name of the `plot_mask` PNG, relative to the card.
    - `recipe_yaml` (str or None): the training recipe as YAML (e.g. `Recipe.to_yaml()`), of which the card shows
      the keys that apply to the run (`RECIPE_KEY_APPLIES`) and are set; None shows `adapter_settings` instead.
    - `license` (str): the card's license, e.g. "apache-2.0".
    - `repo_id` (str or None): where the model will live on the Hub, used in the loading snippet; None gives
      "path/to/adapter".

    Optional keys: `mask_rule` (how the mask was chosen, `describe_mask_rule`), `mask_update` ({"rule",
    "update_every", "prune_rate"} when the support evolved), `adapters` (one dict per adapter in the repository:
    name, folder, selected, mask_rule), `main_adapter` ((name, sub-folder) of the adapter the card describes when none
    lies at the top level), `pipeline_tag`, `auto_class`, `extra_tags`, `adapter_settings` (shown when there is no
    recipe), `label_names` (class names in id order, which the snippet gives the base model, since an adapter does
    not keep them), `train_examples` and `validation_examples` (data sizes), `eval_split` (the split of `metrics`).
    """
    import jinja2
    import jinja2.meta
    from huggingface_hub import ModelCard

    path = Path(template) if template is not None else DEFAULT_TEMPLATE
    context = {**OPTIONAL_DEFAULTS, **context}
    values = {**context, **TEMPLATE_FUNCTIONS, **_derived(context)}
    environment = jinja2.Environment()
    used = jinja2.meta.find_undeclared_variables(environment.parse(path.read_text(encoding="utf-8")))
    missing = sorted(used - set(values) - set(environment.globals) - {"card_data"})
    if missing:
        raise jinja2.UndefinedError(f"model card: the context lacks {', '.join(missing)}.")
    return ModelCard.from_template(card_data(context), template_path=str(path), **values)


def card_data(context: Mapping[str, Any]) -> ModelCardData:
    """The card's metadata: library, base model and datasets (when they are Hub ids), tags, license and the
    validation results as model-index `EvalResult`s."""
    from huggingface_hub import EvalResult, ModelCardData

    method = context["method"]
    if method not in CARD_METHODS:
        raise ValueError(f"model card: method must be one of {CARD_METHODS}, got {method!r}.")
    task, dataset = context.get("task"), context.get("dataset")
    pipeline_tag = context.get("pipeline_tag") or OPTIONAL_DEFAULTS["pipeline_tag"]
    dataset_id = _hub_id(dataset)
    mask_update = context.get("mask_update")
    tags = [
        "fish-peft",
        *(["peft"] if method in ADAPTER_METHODS else []),
        *(["sparse-fine-tuning"] if method in SPARSE_DIFF_METHODS else []),
        method,
        *([task] if task else []),
        *([mask_update["rule"].replace("_", "-")] if mask_update else []),
        *context.get("extra_tags", []),
    ]
    split = context.get("eval_split") or "validation"
    results = [
        EvalResult(
            task_type=pipeline_tag,
            task_name=pipeline_tag.replace("-", " ").title(),
            dataset_type=dataset_id or dataset,
            dataset_name=f"{dataset} {task}" if dataset_id and task else dataset,
            dataset_config=task if dataset_id else None,
            dataset_split=split,
            metric_type=_metric_name(key),
            metric_name=f"{split} {_metric_name(key)}",
            metric_value=float(value),
        )
        for key, value in (context.get("metrics") or {}).items()
    ] if dataset else []
    return ModelCardData(
        library_name="peft" if method in ADAPTER_METHODS else "transformers",
        base_model=_hub_id(context.get("base_model")),
        pipeline_tag=pipeline_tag,
        tags=list(dict.fromkeys(tags)),
        datasets=[dataset_id] if dataset_id else None,
        license=context.get("license"),
        model_name=card_name(context),
        eval_results=results or None,
    )


def card_name(context: Mapping[str, Any]) -> str:
    """The card's title: the repository id, else "<base model>-<method>[-<task>]"."""
    if context.get("repo_id"):
        return context["repo_id"]
    base = str(context["base_model"]).rstrip("/").split("/")[-1]
    return "-".join([base, context["method"], *([context["task"]] if context.get("task") else [])])


def recipe_for_card(recipe: Mapping[str, Any]) -> dict[str, Any]:
    """The recipe keys that apply to the run and are set (`RECIPE_KEY_APPLIES`)."""
    return {
        key: value
        for key, value in recipe.items()
        if value is not None and RECIPE_KEY_APPLIES.get(key, lambda _: True)(recipe)
    }


def _derived(context: Mapping[str, Any]) -> dict[str, Any]:
    """What the template computes from the context: names, Hub ids, the recipe to show."""
    import yaml

    recipe_yaml = context.get("recipe_yaml")
    recipe = yaml.safe_load(recipe_yaml) if recipe_yaml else None
    if isinstance(recipe, dict):
        recipe_yaml = yaml.safe_dump(recipe_for_card(recipe), sort_keys=False)
    return {
        "name": card_name(context),
        "base_model_id": _hub_id(context.get("base_model")),
        "dataset_id": _hub_id(context.get("dataset")),
        "recipe_yaml": recipe_yaml,
        "mask_methods": MASK_METHODS,
        "sparse_diff_methods": SPARSE_DIFF_METHODS,
    }


def _hub_id(name: str | None) -> str | None:
    return name if is_hub_id(name) else None


def is_hub_id(name: str | None) -> bool:
    """Whether `name` can be a Hub repository id (and is not a local folder)."""
    if not name or os.path.isabs(name) or name.startswith(".") or os.path.exists(name):
        return False
    try:
        validate_repo_id(name)
    except HFValidationError:
        return False
    return True


def describe_mask_rule(info: Mapping[str, Any]) -> str | None:
    """One line naming how a mask was chosen, from `FishMask.info` (kept in `FishConfig.mask_info`)."""
    method = info.get("method")
    whole_model = info.get("selection", "global") == "global"
    keep = info.get("keep_ratio")
    budget = f", keeping {_percent(keep)} of all parameters with the head counted in the budget" if keep is not None else ""
    if method in ("fisher", "scores"):
        if method == "fisher":
            label = "at the gold label" if info.get("fisher", "empirical") == "empirical" else "under the model's own predictions"
            samples = f" over {int(info['num_samples']):,} training examples" if info.get("num_samples") else ""
            what = f"largest Fisher information (squared per-example gradients of the loss {label}, summed{samples})"
        else:
            what = "largest precomputed scores"
        scope = "one top-k over all parameters" if whole_model else "the same share of each parameter tensor"
        return f"{what}, {scope}{budget}"
    if method == "random":
        seed = f" (seed {info['seed']})" if info.get("seed") is not None else ""
        scope = "from the whole model" if whole_model else "the same share of each parameter tensor"
        return f"drawn uniformly at random{seed}, {scope}{budget}"
    if method == "magnitude":
        scope = "one top-k over all parameters" if whole_model else "the same share of each parameter tensor"
        return f"largest magnitude |w| in the base model, {scope}{budget}"
    if method == "bitfit":
        return "every bias entry (BitFit)"
    return None


def _py_str(value: Any) -> str:
    """A double-quoted Python string literal (a JSON string is one)."""
    return json.dumps(str(value))


def _py_id2label(names: Any) -> str:
    """["negative", "positive"] -> '{0: "negative", 1: "positive"}', a Python dict literal."""
    return "{" + ", ".join(f"{i}: {_py_str(name)}" for i, name in enumerate(names)) + "}"


def _percent(fraction: float) -> str:
    """0.005 -> "0.5 %", 0.000123 -> "0.0123 %": three significant digits, no exponent."""
    value = float(fraction) * 100
    if value == 0:
        return "0 %"
    if value >= 10:
        return f"{value:.1f} %"
    decimals = max(0, 2 - math.floor(math.log10(abs(value))))
    return f"{value:.{decimals}f}".rstrip("0").rstrip(".") + " %"


def _human_bytes(n: int) -> str:
    n = int(n)
    for unit, scale in (("GB", 10**9), ("MB", 10**6), ("kB", 10**3)):
        if n >= scale:
            return f"{n / scale:.1f} {unit}"
    return f"{n} bytes"


def _metric_name(key: str) -> str:
    return str(key).removeprefix("eval_")


def _metric_value(value: Any) -> str:
    value = float(value)
    return f"{value:.4f}" if abs(value) < 1000 else f"{value:,.1f}"


TEMPLATE_FUNCTIONS = {
    "thousands": lambda n: f"{int(n):,}",
    "percent": _percent,
    "human_bytes": _human_bytes,
    "py_str": _py_str,
    "py_id2label": _py_id2label,
    "metric_name": _metric_name,
    "metric_value": _metric_value,
}
"""Formatting for the template, called as functions (`ModelCard.from_template` renders with Jinja's own filters)."""
