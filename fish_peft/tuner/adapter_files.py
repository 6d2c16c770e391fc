"""Read a sparse diff from an adapter file, checking everything before a single value reaches the model."""

from __future__ import annotations

import contextlib
import json
import math
import os
from contextvars import ContextVar
from pathlib import Path

import torch
from safetensors import safe_open

from peft.config import PeftConfig
from peft.utils.constants import EMBEDDING_LAYER_NAMES

from fish_peft.tuner.peft_type import FISH_PEFT_TYPE
from fish_peft.tuner.layer import storage_key
from fish_peft.masks.fish_mask import FishMask
from fish_peft.tuner.packing import PACKED_KEYS, PackingError, unpack
from fish_peft.masks.selection import base_name, base_named_parameters, in_modules

ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_WEIGHTS = "adapter_model.safetensors"


class AdapterFileError(ValueError):
    """An adapter file that does not match its `adapter_config.json` or the model it is loaded onto."""


_ALLOW_NONFINITE: ContextVar[bool] = ContextVar("fish_peft_allow_nonfinite", default=False)


@contextlib.contextmanager
def allow_nonfinite():
    """Within this block, adapters whose values hold NaN or inf load anyway (e.g. to inspect a diverged run)."""
    token = _ALLOW_NONFINITE.set(True)
    try:
        yield
    finally:
        _ALLOW_NONFINITE.reset(token)


def check_adapter_tensors(tensors: dict[str, torch.Tensor], config: PeftConfig) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """What a file must hold whatever model it meets: the packed diff decoding into exactly the counts of
    `adapter_config.json` (sorted, unique, in-range indices), float values, and float full tensors (the head), all
    finite unless `allow_nonfinite()`. Returns the decoded {parameter: (indices, values)}."""
    numels = {name: math.prod(shape) for name, shape in config.parameter_shapes.items()}
    try:
        entries = unpack(tensors, config.sparse_parameters, numels)
    except PackingError as err:
        raise AdapterFileError(str(err)) from None
    finite_only = not _ALLOW_NONFINITE.get()
    for name, (_, values) in entries.items():
        if finite_only and not bool(torch.isfinite(values).all()):
            raise AdapterFileError(
                f"Values of '{name}' contain NaN or inf; refusing to load a corrupt adapter (wrap the load in "
                "`fish_peft.allow_nonfinite()` to load it anyway)."
            )
    for key, tensor in tensors.items():
        if key in PACKED_KEYS:
            continue
        if not tensor.is_floating_point():
            raise AdapterFileError(f"The adapter file's tensor '{key}' is {tensor.dtype}; a trained module holds floats.")
        if finite_only and not bool(torch.isfinite(tensor).all()):
            raise AdapterFileError(f"The adapter file's tensor '{key}' contains NaN or inf; refusing to load it.")
    return entries


def check_adapter_file(path: str | os.PathLike, config: PeftConfig) -> dict[str, tuple[int, ...]]:
    """`check_adapter_tensors` on a safetensors file, any damage to the file itself reported as `AdapterFileError`;
    returns the shapes of its full tensors (the head), for `check_head_shapes`."""
    tensors = read_safetensors(path)
    check_adapter_tensors(tensors, config)
    return {key: tuple(t.shape) for key, t in tensors.items() if key not in PACKED_KEYS}


def check_head_shapes(
    given: dict[str, tuple[int, ...]], model, config: PeftConfig, token_rows: dict[str, tuple[int, ...]]
) -> None:
    """The file's full tensors must be exactly the parameters of the model's `modules_to_save` (the head) and the
    rows `trainable_token_indices` trains (`token_rows`, from `target_modules.token_row_shapes`), with their shapes:
    PEFT itself fails with a bare KeyError on a missing one, after it has changed the model. Copies of the embedding
    layers, which PEFT saves when the vocabulary was resized, may come too."""
    heads = tuple(config.modules_to_save or ())
    parameters = dict(base_named_parameters(model))
    expected = {f"base_model.model.{name}": tuple(p.shape) for name, p in parameters.items() if in_modules(name, heads)}
    expected.update(token_rows)
    base_shapes = {f"base_model.model.{name}": tuple(p.shape) for name, p in parameters.items()}
    resized_copies = {key for key in given.keys() - expected.keys() if _embedding_copy(key, given[key], base_shapes)}
    if given.keys() - resized_copies != expected.keys():
        missing, unknown = sorted(expected.keys() - given.keys()), sorted(given.keys() - expected.keys() - resized_copies)
        raise AdapterFileError(
            f"The adapter file's full tensors do not match the model's modules_to_save {list(heads)} and "
            f"trainable_token_indices: missing {missing}, not in the model {unknown}. The file was altered or belongs "
            "to another model."
        )
    for key, shape in expected.items():
        if given[key] != shape:
            raise AdapterFileError(
                f"The adapter file's '{key}' has shape {given[key]} but the model's has {shape}; the adapter belongs "
                "to a model with another head (e.g. another num_labels) or other trainable tokens."
            )


def _embedding_copy(key: str, shape: tuple[int, ...], base_shapes: dict[str, tuple[int, ...]]) -> bool:
    """Whether `key` is one of the copies of the embedding layers PEFT saves when the vocabulary was resized (as
    `lm_head.modules_to_save.weight`), of a base parameter of that shape; `base_shapes` by base names."""
    base = "base_model.model." + base_name(key.replace(".modules_to_save.", "."))
    return any(part in EMBEDDING_LAYER_NAMES for part in base.split(".")) and base_shapes.get(base) == tuple(shape)


def read_safetensors(path: str | os.PathLike) -> dict[str, torch.Tensor]:
    try:
        with safe_open(str(path), framework="pt") as file:
            return {key: file.get_tensor(key) for key in file.keys()}
    except Exception as err:  # safetensors raises its own error type for damaged files (OSError when missing)
        raise AdapterFileError(f"{path} cannot be read as safetensors ({err}); the file is damaged or incomplete.") from None


def unpack_adapter_state_dict(
    state_dict: dict[str, torch.Tensor],
    model_shapes: dict[str, tuple[int, ...]],
    config: PeftConfig,
    adapter_name: str,
    owners: dict[str, tuple[str, str]],
) -> dict[str, torch.Tensor]:
    """Checkpoint tensors -> model-keyed tensors for `load_state_dict`, or `AdapterFileError`.

    `owners` says where each adapted parameter's entries live: {parameter name: (layer's module name, parameter
    name relative to it)}. Besides `check_adapter_tensors`, every other tensor must be one the model has, with the
    model's shape (the head in `modules_to_save`).
    """
    entries = check_adapter_tensors(state_dict, config)
    result = {}
    base_shapes = {"base_model.model." + base_name(key): shape for key, shape in model_shapes.items() if ".modules_to_save." not in key}
    for name, (indices, values) in entries.items():
        module, attr = owners[name]
        result[f"{module}.fish_indices.{adapter_name}.{storage_key(attr)}"] = indices
        result[f"{module}.fish_values.{adapter_name}.{storage_key(attr)}"] = values
    for key, tensor in state_dict.items():
        if key in PACKED_KEYS or (key not in model_shapes and _embedding_copy(key, tensor.shape, base_shapes)):
            continue  # the packed diff, decoded above; a copy PEFT saves of a resized embedding, which it loads itself
        if key not in model_shapes or ".fish_" in key:
            raise AdapterFileError(
                f"The adapter file holds a tensor '{key}' that its adapter_config.json does not describe; the file "
                "was altered or belongs to another model. Re-save the adapter with save_pretrained."
            )
        if tuple(tensor.shape) != tuple(model_shapes[key]):
            raise AdapterFileError(
                f"The adapter file's '{key}' has shape {tuple(tensor.shape)} but the model's has {tuple(model_shapes[key])}; "
                "the adapter belongs to a model with another head (e.g. another num_labels)."
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
    if config.peft_type != FISH_PEFT_TYPE:
        raise AdapterFileError(f"{folder} holds a {config.peft_type} adapter, not a FISH sparse diff.")
    entries = check_adapter_tensors(read_safetensors(folder / ADAPTER_WEIGHTS), config)
    return FishMask(
        {name: indices for name, (indices, _) in entries.items()},
        config.parameter_shapes,
        modules_to_save=config.modules_to_save or (),
        info=config.mask_info,
    )
