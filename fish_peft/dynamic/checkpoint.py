"""A sparse network on disk: each sparse weight as its kept values and their indices, the rest dense, in one
safetensors file. Loads into the plain (dense) model class, with zeros where weights were pruned."""

from __future__ import annotations

import json
import math

import torch
from safetensors import safe_open
from safetensors.torch import save_file
from torch import nn

from fish_peft.utils.atomic_files import atomic_path
from fish_peft.tuner.packing import PACKED_KEYS, PackingError, pack, unpack
from fish_peft.dynamic.engine import NetworkMaskEngine

FORMAT = "fish-peft-sparse-network"
DENSE_PREFIX = "dense."


class SparseCheckpointError(ValueError):
    """A sparse-network file that is not one, is damaged, or belongs to another model."""


def save_sparse_model(engine: NetworkMaskEngine, path: str) -> None:
    """Write the weights the forward pass uses (values at the mask's indices) and every dense tensor, atomically."""
    masks = engine.masks()
    entries, shapes, sparse_storage = {}, {}, set()
    for weight in engine.weights:
        indices = masks[weight.name].flatten().nonzero().squeeze(1)
        entries[weight.name] = (indices, weight.parameter.detach().flatten()[indices])
        shapes[weight.name] = list(weight.parameter.shape)
        sparse_storage.add(weight.parameter.data_ptr())
    dense = {
        DENSE_PREFIX + name: tensor.detach().contiguous().cpu()
        for name, tensor in engine.model.state_dict().items()
        if "parametrizations." not in name and tensor.data_ptr() not in sparse_storage
    }
    metadata = {"format": FORMAT, "counts": {n: int(e[0].numel()) for n, e in entries.items()}, "shapes": shapes}
    with atomic_path(path) as tmp:
        save_file({**pack(entries), **dense}, tmp, metadata={"fish_peft": json.dumps(metadata)})


def load_sparse_model(model: nn.Module, path: str) -> nn.Module:
    """Fill `model` (the dense architecture the file was saved from) with the file's weights; checks everything
    (format, names, shapes, indices, finite values) before changing the model."""
    with safe_open(path, framework="pt") as f:
        raw = (f.metadata() or {}).get("fish_peft")
        tensors = {key: f.get_tensor(key) for key in f.keys()}
    metadata = json.loads(raw) if raw else {}
    if metadata.get("format") != FORMAT:
        raise SparseCheckpointError(f"{path} is not a sparse network saved by fish-peft's save_sparse_model.")
    state = model.state_dict()
    shapes = metadata["shapes"]
    wrong = [n for n, shape in shapes.items() if n not in state or list(state[n].shape) != shape]
    if wrong:
        raise SparseCheckpointError(f"{path} holds weights {wrong} that this {type(model).__name__} lacks or shapes differently.")
    try:
        entries = unpack(tensors, metadata["counts"], {n: math.prod(s) for n, s in shapes.items()})
    except PackingError as err:
        raise SparseCheckpointError(f"{path}: {err}") from None
    dense = {k[len(DENSE_PREFIX):]: t for k, t in tensors.items() if k.startswith(DENSE_PREFIX)}
    floats = [values for _, values in entries.values()] + [t for t in dense.values() if t.is_floating_point()]
    if not all(bool(torch.isfinite(t).all()) for t in floats):
        raise SparseCheckpointError(f"{path} holds NaN or inf weights; refusing to load it.")
    unknown = [k for k in tensors if k not in PACKED_KEYS and not k.startswith(DENSE_PREFIX)] + [k for k in dense if k not in state]
    sparse_storage = {state[n].data_ptr() for n in shapes}
    missing = [k for k, t in state.items() if k not in dense and t.data_ptr() not in sparse_storage]
    if unknown or missing:
        raise SparseCheckpointError(f"{path} does not match this model: unexpected {unknown}, missing {missing}.")
    with torch.no_grad():
        model.load_state_dict(dense, strict=False)
        for name, (indices, values) in entries.items():
            parameter = model.get_parameter(name)
            parameter.zero_().view(-1)[indices] = values.to(parameter.dtype)
    return model
