"""Read a sparse diff from an adapter file, checking everything before a single value reaches the model."""

from __future__ import annotations

import json
import math
import os
from pathlib import Path

import torch
from safetensors import safe_open

from .config import FishConfig
from .masks import FishMask
from .packing import PACKED_KEYS, PackingError, unpack

ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_WEIGHTS = "adapter_model.safetensors"


class AdapterFileError(ValueError):
    """An adapter file that does not match its `adapter_config.json` or the model it is loaded onto."""


def unpack_adapter_state_dict(
    state_dict: dict[str, torch.Tensor], model_keys: set[str], config: FishConfig, adapter_name: str
) -> dict[str, torch.Tensor]:
    """Checkpoint tensors -> model-keyed tensors for `load_state_dict`, or `AdapterFileError`.

    The packed diff must decode into exactly the counts of `adapter_config.json`, with sorted, unique, in-range
    indices and finite values; every other tensor must be one the model has (the head in `modules_to_save`).
    """
    numels = {name: math.prod(shape) for name, shape in config.parameter_shapes.items()}
    try:
        entries = unpack(state_dict, config.sparse_parameters, numels)
    except PackingError as err:
        raise AdapterFileError(str(err)) from None
    prefix = "base_model.model." if any(k.startswith("base_model.model.") for k in model_keys) else ""
    result = {}
    for name, (indices, values) in entries.items():
        if not bool(torch.isfinite(values).all()):
            raise AdapterFileError(f"Values of '{name}' contain NaN or inf; refusing to load a corrupt adapter.")
        module, _, attr = name.rpartition(".")
        result[f"{prefix}{module}.fish_indices.{adapter_name}.{attr}"] = indices
        result[f"{prefix}{module}.fish_values.{adapter_name}.{attr}"] = values
    for key, tensor in state_dict.items():
        if key in PACKED_KEYS:
            continue
        if key not in model_keys or ".fish_" in key:
            raise AdapterFileError(
                f"The adapter file holds a tensor '{key}' that its adapter_config.json does not describe; the file "
                "was altered or belongs to another model. Re-save the adapter with save_pretrained."
            )
        result[key] = tensor
    return result


def read_adapter_config(folder: Path):
    """The PEFT config saved in `folder` (a `FishConfig` for FISH adapters)."""
    from peft import PeftConfig

    try:
        config = PeftConfig.from_pretrained(str(folder))
    except (ValueError, TypeError, KeyError, json.JSONDecodeError) as err:
        raise AdapterFileError(f"{folder / ADAPTER_CONFIG} cannot be read as a PEFT config: {err}") from None
    if config.peft_type is None:
        raise AdapterFileError(f"{folder / ADAPTER_CONFIG} does not say which PEFT method it belongs to (peft_type).")
    return config


def read_adapter_mask(folder: str | os.PathLike) -> FishMask:
    """The entries a saved FISH adapter changes, decoded (and checked) from its `adapter_model.safetensors`."""
    folder = Path(folder)
    config = read_adapter_config(folder)
    if not isinstance(config, FishConfig):
        raise AdapterFileError(f"{folder} holds a {config.peft_type} adapter, not a FISH sparse diff.")
    try:
        with safe_open(str(folder / ADAPTER_WEIGHTS), framework="pt") as file:
            packed = {key: file.get_tensor(key) for key in PACKED_KEYS if key in file.keys()}
    except Exception as err:  # safetensors' own error type for damaged files; missing files too
        raise AdapterFileError(f"{folder / ADAPTER_WEIGHTS} cannot be read as safetensors: {err}") from None
    numels = {name: math.prod(shape) for name, shape in config.parameter_shapes.items()}
    try:
        entries = unpack(packed, config.sparse_parameters, numels)
    except PackingError as err:
        raise AdapterFileError(f"{folder / ADAPTER_WEIGHTS}: {err}") from None
    return FishMask(
        {name: indices for name, (indices, _) in entries.items()},
        config.parameter_shapes,
        modules_to_save=config.modules_to_save or (),
        info=config.mask_info,
    )
