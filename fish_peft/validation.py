"""Check an adapter file against its config and the model before a single value is copied into the model."""

from __future__ import annotations

import math

import torch
from torch import nn

from .config import FishConfig

_INDEX_DTYPES = (torch.int32, torch.int64)


class AdapterFileError(ValueError):
    """An adapter file that does not match its `adapter_config.json` or the model it is loaded onto."""


def validate_adapter_state_dict(
    state_dict: dict[str, torch.Tensor], model: nn.Module, config: FishConfig, adapter_name: str
) -> None:
    """Raise `AdapterFileError` unless every FISH tensor is present, well-typed, in range, sorted and finite.

    `state_dict` is keyed like the model (adapter name inserted), as PEFT hands it to `load_state_dict`.
    """
    model_keys = set(model.state_dict().keys())
    prefix = "base_model.model." if any(k.startswith("base_model.model.") for k in model_keys) else ""
    expected = set()
    for name, count in config.sparse_parameters.items():
        module, _, attr = name.rpartition(".")
        values_key = f"{prefix}{module}.fish_values.{adapter_name}.{attr}"
        indices_key = f"{prefix}{module}.fish_indices.{adapter_name}.{attr}"
        expected.update((values_key, indices_key))
        if values_key not in state_dict or indices_key not in state_dict:
            raise AdapterFileError(
                f"The adapter file has no values/indices for '{name}', which adapter_config.json lists: the weights "
                "file and the config do not belong together. Re-save the adapter with save_pretrained."
            )
        _check_pair(name, state_dict[indices_key], state_dict[values_key], count, math.prod(config.parameter_shapes[name]))
    for key in state_dict:
        if key in expected:
            continue
        if ".fish_values." in key or ".fish_indices." in key or key not in model_keys:
            raise AdapterFileError(
                f"The adapter file holds a tensor '{key}' that its adapter_config.json does not describe; the file "
                "was altered or belongs to another adapter. Re-save the adapter with save_pretrained."
            )


def _check_pair(name: str, indices: torch.Tensor, values: torch.Tensor, count: int, numel: int) -> None:
    if indices.dtype not in _INDEX_DTYPES:
        raise AdapterFileError(f"Indices of '{name}' have dtype {indices.dtype}; a FISH adapter stores int32/int64 indices.")
    if not values.is_floating_point():
        raise AdapterFileError(f"Values of '{name}' have dtype {values.dtype}; a FISH adapter stores floating-point values.")
    if indices.dim() != 1 or values.dim() != 1 or indices.numel() != count or values.numel() != count:
        raise AdapterFileError(
            f"'{name}' has {indices.numel()} indices and {values.numel()} values (shapes {tuple(indices.shape)}, "
            f"{tuple(values.shape)}), but adapter_config.json says {count} entries."
        )
    idx = indices.long()
    if idx.min() < 0 or idx.max() >= numel:
        raise AdapterFileError(f"Indices of '{name}' fall outside the parameter's {numel} entries [0, {numel}).")
    if not bool((idx[1:] > idx[:-1]).all()):
        raise AdapterFileError(f"Indices of '{name}' are not strictly increasing (unsorted or duplicated).")
    if not bool(torch.isfinite(values).all()):
        raise AdapterFileError(f"Values of '{name}' contain NaN or inf; refusing to load a corrupt adapter.")
