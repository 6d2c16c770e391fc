"""Which parameters a `FishConfig`'s `target_modules` / `exclude_modules` let a mask pick, matched as PEFT matches
them, and the budget a `keep_ratio` config asks of them."""

from __future__ import annotations

import copy

from peft.tuners.tuners_utils import _ExcludedModule, _maybe_include_all_linear_layers, check_target_module_exists
from torch import nn

from fish_peft.masks.selection import base_named_parameters, partition_parameters, resolve_modules_to_save
from fish_peft.tuner.config import FishConfig


def eligible_parameters(model: nn.Module, config: FishConfig) -> dict[str, nn.Parameter]:
    """{name in the bare model: parameter} of every parameter a module matched by `target_modules` (or one inside
    it) owns, unless that module or one around it is excluded (`exclude_modules`, `modules_to_save`).
    `target_modules=None` matches every module; "all-linear" is first expanded, as PEFT does, to the names of all
    Linear/Conv1D modules but the output layer. Parameters the root module owns itself cannot be wrapped and are
    left out, and so are the embeddings that `trainable_token_indices` gives to PEFT's TrainableTokens."""
    _maybe_include_all_linear_layers(config, model)
    token_layers = trainable_token_layers(model, config)
    matcher = config if config.target_modules is not None else _matching_nothing_but_exclusions(config)
    verdicts: dict[str, object] = {}

    def verdict(module_name: str):
        if module_name not in verdicts:
            verdicts[module_name] = check_target_module_exists(matcher, module_name)
        return verdicts[module_name]

    eligible = {}
    for name, param in base_named_parameters(model):
        parts = name.split(".")[:-1]
        enclosing = [".".join(parts[:depth]) for depth in range(1, len(parts) + 1)]
        if not enclosing or enclosing[-1] in token_layers or any(isinstance(verdict(m), _ExcludedModule) for m in enclosing):
            continue
        if config.target_modules is None or any(verdict(m) for m in enclosing):
            eligible[name] = param
    return eligible


def trainable_token_layers(model: nn.Module, config: FishConfig) -> dict[str, list[int]]:
    """{name of an embedding module: the token ids whose rows `trainable_token_indices` trains in full there} (PEFT's
    TrainableTokens, which TRL asks for when a chat template adds tokens): the layers it names (a name or a suffix of
    one), or the model's input embedding. A tied output layer shares the embedding's weight, which the mask then
    leaves out too."""
    indices = config.trainable_token_indices
    if indices is None:
        return {}
    if isinstance(indices, dict):
        return {name: rows for name, _ in model.named_modules() for wanted, rows in indices.items()
                if name == wanted or name.endswith(f".{wanted}")}
    embedding = model.get_input_embeddings() if hasattr(model, "get_input_embeddings") else None
    return {name: indices for name, module in model.named_modules() if module is embedding}


def token_row_shapes(model: nn.Module, config: FishConfig) -> dict[str, tuple[int, ...]]:
    """{key in the adapter file: shape} of the embedding rows `trainable_token_indices` trains (PEFT's TrainableTokens
    saves one delta per embedding, tied layers sharing it)."""
    layers = trainable_token_layers(model, config)
    if not layers:
        return {}
    parameters = dict(base_named_parameters(model))
    return {f"base_model.model.{layer}.token_adapter.trainable_tokens_delta": (len(rows), parameters[f"{layer}.weight"].shape[1])
            for layer, rows in layers.items()}


def _matching_nothing_but_exclusions(config: FishConfig) -> FishConfig:
    """A copy of `config` that PEFT's matcher reads as: excluded modules excluded, every other one unmatched."""
    matcher = copy.copy(config)
    matcher.target_modules = []
    return matcher


def default_modules_to_save(model: nn.Module, config: FishConfig) -> None:
    """A `keep_ratio` config without `modules_to_save` keeps the task head (`classifier` / `score`) trainable, as the
    mask functions do by default."""
    if config.modules_to_save is None:
        config.modules_to_save = resolve_modules_to_save(model, "auto") or None


def check_budget(model: nn.Module, config: FishConfig, eligible: dict[str, nn.Parameter]) -> None:
    """The mask's k = int(N_total * keep_ratio) - N_head must be at least 1 and at most the eligible entries."""
    if not eligible:
        raise ValueError(
            f"FishConfig(target_modules={config.target_modules!r}, exclude_modules={config.exclude_modules!r}) leaves "
            "no parameter of this model for the mask; name modules the model has (see model.named_modules())."
        )
    _, num_head, num_total = partition_parameters(model, config.modules_to_save or [], lambda name, _p: name in eligible)
    size = sum(p.numel() for p in eligible.values())
    k = int(num_total * config.keep_ratio) - num_head
    if k < 1:
        head = f" once the head (modules_to_save) takes its {num_head:,}" if num_head else ""
        raise ValueError(
            f"keep_ratio={config.keep_ratio} of this model's {num_total:,} parameters leaves {max(k, 0)} entries for "
            f"the mask{head}; raise keep_ratio."
        )
    if k > size:
        raise ValueError(
            f"keep_ratio={config.keep_ratio} asks for {k:,} trainable entries, but the target modules hold only "
            f"{size:,}; lower keep_ratio or widen target_modules."
        )


def check_mask_in_targets(model: nn.Module, config: FishConfig) -> None:
    """A config with both a mask and `target_modules` (or `exclude_modules`, `trainable_token_indices`) must keep the
    mask inside them."""
    if config.target_modules is None and not config.exclude_modules and config.trainable_token_indices is None:
        return
    eligible = eligible_parameters(model, config)
    outside = [name for name in config.sparse_parameters if name not in eligible]
    if outside:
        raise ValueError(
            f"The mask holds entries of {len(outside)} parameter(s) outside target_modules={config.target_modules!r} "
            f"/ exclude_modules={config.exclude_modules!r}, or in an embedding trainable_token_indices trains in full, "
            f"e.g. '{outside[0]}'; compute the mask for the modules left (eligible=...) or widen target_modules."
        )


def excluded_module(config: FishConfig, module_name: str):
    """PEFT's mark (`_ExcludedModule`, false) for a module `exclude_modules` names, else False."""
    if not config.exclude_modules:
        return False
    verdict = check_target_module_exists(_matching_nothing_but_exclusions(config), module_name)
    return verdict if isinstance(verdict, _ExcludedModule) else False
