"""Read a sparse diff from an adapter file, checking everything before a single value reaches the model."""

from __future__ import annotations

import math

import torch

from .config import FishConfig
from .packing import PACKED_KEYS, PackingError, unpack


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
