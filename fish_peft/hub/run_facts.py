"""What a saved folder says about itself, gathered for its model card.

A folder is the output of `fish-peft train` (adapter or full model, `recipe.yaml`, `results.json`, `mask.png`) or
what `PeftModel.save_pretrained` wrote (one adapter at the top level, others in sub-folders named after them).
Everything the card states is read from these files, so a card written at push time tells the same story as the one
written after training, with the repository's id in the loading snippet.
"""

from __future__ import annotations

import json
import math
import os
from pathlib import Path
from typing import Any, Optional

import yaml
from safetensors import safe_open

from fish_peft.utils.atomic_files import atomic_path
from fish_peft.tuner.config import FishConfig
from fish_peft.hub.model_card import describe_mask_rule, model_card
from fish_peft.tuner.packing import PACKED_KEYS
from fish_peft.masks.selection import in_modules
from fish_peft.tuner.adapter_files import ADAPTER_CONFIG, ADAPTER_WEIGHTS, AdapterFileError, read_adapter_config, read_adapter_mask

MASK_PLOT = "mask.png"
CARD = "README.md"
RECIPE = "recipe.yaml"
RESULTS = "results.json"

MASK_METHOD_TO_CARD = {"fisher": "fish", "scores": "fish", "random": "random", "magnitude": "magnitude", "bitfit": "bitfit"}
# PEFT task type -> (Hub pipeline tag, transformers auto class of the base model)
TASK_TYPES = {
    "SEQ_CLS": ("text-classification", "AutoModelForSequenceClassification"),
    "TOKEN_CLS": ("token-classification", "AutoModelForTokenClassification"),
    "CAUSAL_LM": ("text-generation", "AutoModelForCausalLM"),
    "SEQ_2_SEQ_LM": ("text2text-generation", "AutoModelForSeq2SeqLM"),
    "QUESTION_ANS": ("question-answering", "AutoModelForQuestionAnswering"),
    "FEATURE_EXTRACTION": ("feature-extraction", "AutoModel"),
}


def find_adapters(folder: Path) -> list[tuple[str, str]]:
    """(adapter name, sub-folder) of every adapter saved in `folder`, the top-level one ("default") first."""
    found = [("default", "")] if (folder / ADAPTER_CONFIG).is_file() else []
    for sub in sorted(p for p in folder.iterdir() if p.is_dir() and (p / ADAPTER_CONFIG).is_file()):
        found.append((sub.name, sub.name))
    return found


def card_context(
    folder: str | os.PathLike,
    *,
    repo_id: Optional[str] = None,
    base_model: Optional[str] = None,
    dataset: Optional[str] = None,
    task: Optional[str] = None,
    metrics: Optional[dict[str, float]] = None,
    license: str = "apache-2.0",
    tags: tuple[str, ...] = (),
    label_names: Optional[list[str]] = None,
) -> dict[str, Any]:
    """The `model_card` context of a saved folder; the keyword arguments fill in or override what the
    folder's files say (a run's own `recipe.yaml` and `results.json` say most of it). `label_names` are the class
    names in id order, which an adapter does not keep: the card's snippet gives them to the base model it loads."""
    folder = Path(folder)
    recipe = _read_yaml(folder / RECIPE)
    results = _read_json(folder / RESULTS)
    adapters = find_adapters(folder)
    full_model = not adapters and (folder / "config.json").is_file() and recipe.get("method") == "full"
    if (folder / "comparison.json").is_file():
        raise ValueError(f"{folder} holds a comparison of several runs: push one method's folder, e.g. {folder / 'fish'}.")
    if not adapters and not full_model:
        raise FileNotFoundError(
            f"{folder} holds no {ADAPTER_CONFIG}: pass the folder that `save_pretrained` or `fish-peft train` wrote."
        )
    config = read_adapter_config(folder / adapters[0][1]) if adapters else None
    fish = isinstance(config, FishConfig)
    if not recipe and not fish:
        raise AdapterFileError(
            f"{folder} holds a {config.peft_type} adapter that fish-peft did not train; push it with PEFT's own "
            "push_to_hub."
        )
    mask_info = config.mask_info if fish else {}
    method = recipe.get("method") or MASK_METHOD_TO_CARD.get(mask_info.get("method"), "fish")
    head = _head_tensors(folder / adapters[0][1], config.modules_to_save or ()) if adapters else {}
    k = sum(config.sparse_parameters.values()) if fish else 0
    base = base_model or recipe.get("model") or _base_model_of(folder, config)
    task_type = getattr(config, "task_type", None) or (_full_model_task_type(folder) if full_model else None) or "SEQ_CLS"
    pipeline_tag, auto_class = TASK_TYPES.get(str(task_type), ("text-classification", "AutoModel"))
    eval_split, split_metrics = next(iter(results.get("metrics", {}).items()), ("validation", {}))
    # an SFT recipe's task names the kind of run, not a configuration of its dataset: tags, not the card's task
    sft = recipe.get("task") == "sft"
    first_task = task or (None if sft else recipe.get("task"))
    return {
        "base_model": base,
        "task": first_task,
        "dataset": dataset or results.get("dataset") or first_task,
        "method": method,
        "keep_ratio": recipe.get("keep_ratio") if recipe else mask_info.get("keep_ratio"),
        "num_labels": _num_labels(folder, head) if task_type == "SEQ_CLS" else None,
        "trainable_parameters": results.get("trainable_parameters", k + sum(math.prod(s) for s in head.values())),
        "total_parameters": results.get("total_parameters", mask_info.get("num_total_parameters")),
        "adapter_bytes": sum(p.stat().st_size for p in (folder / (adapters[0][1] if adapters else "")).glob("*.safetensors")) or None,
        "metrics": metrics if metrics is not None else {k: v for k, v in split_metrics.items() if k not in ("loss", "epoch")},
        "mask_table": _mask_table(config) if fish else [],
        "plot_file": MASK_PLOT if (folder / MASK_PLOT).is_file() else None,
        "recipe_yaml": (folder / RECIPE).read_text() if recipe else None,
        "license": license,
        "repo_id": repo_id,
        "mask_rule": describe_mask_rule(mask_info),
        "mask_update": _mask_update(config) if fish else None,
        "adapters": [_adapter_row(folder, name, sub) for name, sub in adapters] if len(adapters) > 1 else [],
        "main_adapter": adapters[0] if adapters and adapters[0][1] else None,
        "pipeline_tag": pipeline_tag,
        "auto_class": auto_class,
        "extra_tags": [*tags, *(["trl", "sft"] if sft else [])],
        "adapter_settings": _settings(config) if fish else None,
        "label_names": label_names or results.get("label_names") or _config_label_names(folder),
        "train_examples": results.get("train_examples"),
        "validation_examples": _split_size(results.get("validation_examples"), eval_split),
        "eval_split": eval_split,
    }


def write_model_card(folder: str | os.PathLike, **given) -> dict[str, Any]:
    """Write `README.md` into `folder` from its files (see `card_context`), drawing the plot of the first adapter's
    mask first when the folder has none. Each file is replaced atomically; returns the context the card shows."""
    folder = Path(folder)
    adapters = find_adapters(folder)
    if adapters and not (folder / MASK_PLOT).is_file():
        main = folder / adapters[0][1]
        if isinstance(read_adapter_config(main), FishConfig):
            from fish_peft.hub.mask_plot import plot_mask

            plot_mask(read_adapter_mask(main), str(folder / MASK_PLOT))
    context = card_context(folder, **given)
    with atomic_path(str(folder / CARD)) as tmp:
        model_card(context).save(tmp)
    return context


def _split_size(sizes: Any, split: str) -> Optional[int]:
    """The size of `split`, from `results.json`'s validation size (one number, or one per split)."""
    return sizes.get(split) if isinstance(sizes, dict) else sizes


def _read_yaml(path: Path) -> dict:
    return (yaml.safe_load(path.read_text()) or {}) if path.is_file() else {}


def _read_json(path: Path) -> dict:
    return json.loads(path.read_text()) if path.is_file() else {}


def _head_tensors(folder: Path, heads) -> dict[str, tuple[int, ...]]:
    """Shapes of the fully trained tensors of the `heads` modules (modules_to_save) in an adapter file."""
    path = folder / ADAPTER_WEIGHTS
    if not path.is_file():
        return {}
    with safe_open(str(path), framework="pt") as file:
        return {
            key: tuple(file.get_slice(key).get_shape())
            for key in file.keys()
            if key not in PACKED_KEYS and in_modules(key, heads)
        }


def _num_labels(folder: Path, head: dict[str, tuple[int, ...]]) -> Optional[int]:
    """Classes of the head: rows of the saved head's last weight matrix, or the full model's label count."""
    matrices = [shape for key, shape in head.items() if key.endswith(".weight") and len(shape) == 2]
    if matrices:
        return matrices[-1][0]
    config = _read_json(folder / "config.json")
    return len(config["id2label"]) if "id2label" in config else None


def named_labels(id2label: Optional[dict]) -> Optional[list[str]]:
    """A model config's class names in id order (its keys are ints, or strings in config.json), unless they are
    transformers' placeholders (LABEL_0, ...), which name nothing."""
    id2label = id2label or {}
    names = [id2label.get(i, id2label.get(str(i))) for i in range(len(id2label))]
    if not names or None in names or names == [f"LABEL_{i}" for i in range(len(names))]:
        return None
    return names


def _config_label_names(folder: Path) -> Optional[list[str]]:
    """A full model's class names, which its config.json keeps."""
    return named_labels(_read_json(folder / "config.json").get("id2label"))


def _full_model_task_type(folder: Path) -> str:
    """The PEFT task type of a full model's architecture (config.json): a causal LM's or a sequence classifier's."""
    architectures = _read_json(folder / "config.json").get("architectures") or []
    return "CAUSAL_LM" if any(name.endswith("ForCausalLM") for name in architectures) else "SEQ_CLS"


def _base_model_of(folder: Path, config) -> str:
    if config is not None and config.base_model_name_or_path:
        return config.base_model_name_or_path
    return _read_json(folder / "config.json").get("_name_or_path") or "unknown base model"


def _mask_table(config: FishConfig) -> list[dict[str, Any]]:
    rows = []
    for name, selected in config.sparse_parameters.items():
        shape = list(config.parameter_shapes[name])
        size = math.prod(shape)
        rows.append({"parameter": name, "shape": shape, "selected": selected, "size": size, "density": selected / size})
    return rows


def _mask_update(config: FishConfig) -> Optional[dict[str, Any]]:
    if config.mask_update is None:
        return None
    return {"rule": config.mask_update, "update_every": config.update_every, "prune_rate": config.prune_rate}


def _adapter_row(folder: Path, name: str, sub: str) -> dict[str, Any]:
    config = read_adapter_config(folder / sub)
    fish = isinstance(config, FishConfig)
    return {
        "name": name,
        "folder": sub,
        "selected": sum(config.sparse_parameters.values()) if fish else 0,
        "mask_rule": describe_mask_rule(config.mask_info) if fish else None,
    }


def _settings(config: FishConfig) -> dict[str, Any]:
    """What the card shows of `adapter_config.json` when no recipe says how the adapter was trained."""
    settings = {
        "mask_info": config.mask_info,
        "modules_to_save": config.modules_to_save,
        "save_dtype": config.save_dtype,
        "mask_update": config.mask_update,
    }
    if config.mask_update:
        settings.update(update_every=config.update_every, prune_rate=config.prune_rate)
    return settings
