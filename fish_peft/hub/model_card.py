"""A Hugging Face Hub model card (README.md with YAML front matter) for a model trained with fish-peft."""

from __future__ import annotations

import json
import math
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from huggingface_hub.utils import HFValidationError, validate_repo_id


# fish_peft/model_cards is a link to the top-level model_cards/, so the wheel ships the template (package data).
DEFAULT_TEMPLATE = Path(__file__).resolve().parents[1] / "model_cards" / "fish_adapter.md.j2"

MASK_METHODS = ("fish", "random", "magnitude")  # the methods whose card shows the mask (rule, statistics, table, plot)
SPARSE_METHODS = MASK_METHODS + ("bitfit",)  # stored as fish-peft sparse diffs
CARD_METHODS = SPARSE_METHODS + ("full", "lora")  # every method a card can describe

REQUIRED_KEYS = (
    "base_model",
    "task",
    "dataset",
    "method",
    "keep_ratio",
    "trainable_parameters",
    "total_parameters",
    "adapter_bytes",
    "metrics",
    "mask_table",
    "plot_file",
    "recipe_yaml",
    "license",
    "repo_id",
    "num_labels",
)
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
}


def render_model_card(context: Mapping[str, Any], template: str | os.PathLike | None = None) -> str:
    """The model card's Markdown (YAML front matter first), rendered from a Jinja2 template.

    `template` is the path of a Jinja2 template file; by default `model_cards/fish_adapter.md.j2`. Rendering is
    strict: a key the template uses but `context` lacks raises `jinja2.UndefinedError` (for the default template
    every required key below is checked up front, also those a section for another method skips).

    Required context keys (pass None / empty where the text says so):

    - `base_model` (str): Hub id or path of the base model, e.g. "bert-large-cased-whole-word-masking".
    - `task` (str or None): the task / dataset configuration, e.g. "sst2".
    - `dataset` (str or None): Hub id of the dataset, e.g. "nyu-mll/glue".
    - `method` (str): "fish", "random", "magnitude", "lora", "full" or "bitfit". The mask sections appear for the
      masks ("fish", "random", "magnitude"); "full" is described as a full fine-tune, loaded without PEFT.
    - `keep_ratio` (float or None): the mask's share of all parameters (head included), e.g. 0.005.
    - `num_labels` (int or None): classes of the head (1 for regression), used in the loading snippet.
    - `trainable_parameters` (int): parameters trained (sparse-diff values plus the head, or LoRA weights, ...).
    - `total_parameters` (int or None): parameters of the base model with its head.
    - `adapter_bytes` (int or None): size of the saved adapter files.
    - `metrics` (dict[str, float]): best validation results, e.g. {"accuracy": 0.93}; a leading "eval_" is dropped
      in the card. May be empty (no results section, no model-index).
    - `mask_table` (list of dicts): `FishMask.report()` rows (parameter, shape, selected, size, density), or [].
      The card lists the 15 rows with most entries selected and says how many more there are.
    - `plot_file` (str or None): file name of the `plot_mask` PNG, relative to the card.
    - `recipe_yaml` (str or None): the training recipe as YAML (e.g. `Recipe.to_yaml()`); None shows
      `adapter_settings` instead.
    - `license` (str): the card's license, e.g. "apache-2.0".
    - `repo_id` (str or None): where the adapter will live on the Hub, used in the loading snippet;
      None gives "path/to/adapter".

    The metadata names `base_model` and `dataset` only when they are Hub ids (not local paths). Optional keys (defaults in
    `OPTIONAL_DEFAULTS`): `mask_rule` (one line naming how the mask was chosen, `describe_mask_rule`),
    `mask_update` ({"rule", "update_every", "prune_rate"} when the support evolved), `adapters` (one dict per
    adapter in the repository: name, folder, selected, mask_rule), `main_adapter` ((name, sub-folder) of the adapter
    the card describes when none lies at the top level), `pipeline_tag`, `auto_class`, `extra_tags`,
    `adapter_settings` (what the card shows when there is no recipe), `label_names` (class names in id order: the
    snippet passes them to the base model as `id2label`/`label2id`, since an adapter does not keep them, and shows
    a `pipeline` that answers with them).
    """
    import jinja2

    path = Path(template) if template is not None else DEFAULT_TEMPLATE
    if template is None:
        missing = [key for key in REQUIRED_KEYS if key not in context]
        if missing:
            raise jinja2.UndefinedError(f"render_model_card: the context lacks {', '.join(missing)}.")
    method = context.get("method")
    if method is not None and method not in CARD_METHODS:
        raise ValueError(f"render_model_card: method must be one of {CARD_METHODS}, got {method!r}.")

    env = jinja2.Environment(
        loader=jinja2.FileSystemLoader(str(path.parent)),
        undefined=jinja2.StrictUndefined,
        autoescape=False,
        keep_trailing_newline=True,
    )
    env.filters.update(
        yaml_str=_yaml_str,
        yaml_num=_yaml_num,
        py_str=_py_str,
        thousands=lambda n: f"{int(n):,}",
        percent=_percent,
        human_bytes=_human_bytes,
        py_id2label=_py_id2label,
        metric_name=_metric_name,
        metric_value=_metric_value,
    )
    env.globals.update(mask_methods=MASK_METHODS, sparse_methods=SPARSE_METHODS)
    hub_ids = {f"{key}_id": context.get(key) if is_hub_id(context.get(key)) else None for key in ("base_model", "dataset")}
    return env.get_template(path.name).render(**{**OPTIONAL_DEFAULTS, **context, **hub_ids})


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


def _yaml_str(value: Any) -> str:
    """A double-quoted YAML scalar (JSON strings are valid YAML), safe whatever the text holds."""
    return json.dumps(str(value), ensure_ascii=False)


def _py_str(value: Any) -> str:
    """A double-quoted Python string literal (a JSON string is one)."""
    return json.dumps(str(value))


def _py_id2label(names: Any) -> str:
    """["negative", "positive"] -> '{0: "negative", 1: "positive"}', a Python dict literal."""
    return "{" + ", ".join(f"{i}: {_py_str(name)}" for i, name in enumerate(names)) + "}"


def _yaml_num(value: Any) -> str:
    value = float(value)
    if math.isnan(value):
        return ".nan"
    if math.isinf(value):
        return ".inf" if value > 0 else "-.inf"
    return repr(value)


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
