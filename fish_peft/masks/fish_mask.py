"""`FishMask`: which entries of which parameters a sparse diff may change."""

from __future__ import annotations

import hashlib
import json
import math
from collections.abc import Iterator, Mapping, Sequence
from typing import Any

import torch
from safetensors.torch import load_file, save_file

from fish_peft.utils.atomic_files import atomic_path

_METADATA_KEY = "fish_mask"


class FishMask(Mapping[str, torch.Tensor]):
    """A mapping from parameter names (as `model.named_parameters()` spells them) to sorted flat int64 indices.

    Besides the indices it remembers each parameter's shape (so densities and loading can be checked), the head
    modules that were kept fully trainable when the budget was drawn (`modules_to_save`), and free-form `info` on how
    the mask was chosen (method, keep ratio, number of Fisher samples).
    """

    def __init__(
        self,
        indices: Mapping[str, torch.Tensor],
        shapes: Mapping[str, Sequence[int]],
        modules_to_save: Sequence[str] = (),
        info: Mapping[str, Any] | None = None,
    ):
        self._indices: dict[str, torch.Tensor] = {}
        self.shapes: dict[str, tuple[int, ...]] = {}
        for name, idx in indices.items():
            if name not in shapes:
                raise ValueError(f"FishMask: no shape given for parameter '{name}'.")
            shape = tuple(int(s) for s in shapes[name])
            idx = _checked_indices(name, idx, math.prod(shape))
            if idx.numel():
                self._indices[name] = idx
                self.shapes[name] = shape
        self.modules_to_save = tuple(modules_to_save)
        self.info = dict(info or {})

    def __getitem__(self, name: str) -> torch.Tensor:
        return self._indices[name]

    def __iter__(self) -> Iterator[str]:
        return iter(self._indices)

    def __len__(self) -> int:
        return len(self._indices)

    def __repr__(self) -> str:
        return f"FishMask({len(self)} parameters, {self.num_selected:,} entries selected)"

    @property
    def num_selected(self) -> int:
        """Total number of selected entries, i.e. the number of trainable values of the sparse diff."""
        return sum(idx.numel() for idx in self._indices.values())

    def counts(self) -> dict[str, int]:
        """Number of selected entries per parameter."""
        return {name: idx.numel() for name, idx in self._indices.items()}

    def density(self, name: str) -> float:
        """Fraction of the entries of parameter `name` that are selected."""
        return self._indices[name].numel() / math.prod(self.shapes[name])

    def report(self) -> list[dict[str, Any]]:
        """One row per parameter: its name, shape, number selected and density."""
        return [
            {
                "parameter": name,
                "shape": list(self.shapes[name]),
                "selected": self._indices[name].numel(),
                "size": math.prod(self.shapes[name]),
                "density": self.density(name),
            }
            for name in self._indices
        ]

    def to_dense(self, name: str) -> torch.Tensor:
        """The boolean mask of parameter `name`, shaped like the parameter."""
        dense = torch.zeros(math.prod(self.shapes[name]), dtype=torch.bool)
        dense[self._indices[name]] = True
        return dense.view(self.shapes[name])

    def jaccard(self, other: FishMask) -> float:
        """|A ∩ B| / |A ∪ B| over (parameter, index) pairs: 1.0 for identical masks."""
        inter = 0
        for name in set(self) & set(other):
            inter += torch.isin(self[name], other[name], assume_unique=True).sum().item()
        union = self.num_selected + other.num_selected - inter
        return inter / union if union else 1.0

    def digest(self) -> str:
        """A sha256 of the names and indices: equal for equal masks (e.g. on every process of a distributed run)."""
        digest = hashlib.sha256()
        for name in sorted(self._indices):
            digest.update(name.encode())
            digest.update(self._indices[name].cpu().numpy().tobytes())
        return digest.hexdigest()

    def save(self, path: str) -> None:
        """Write the mask as a safetensors file (atomically: an interrupted save leaves any old file intact)."""
        metadata = {
            "shapes": {n: list(s) for n, s in self.shapes.items()},
            "modules_to_save": list(self.modules_to_save),
            "info": self.info,
        }
        with atomic_path(path) as tmp:
            save_file(dict(self._indices), tmp, metadata={_METADATA_KEY: json.dumps(metadata)})

    @classmethod
    def load(cls, path: str) -> FishMask:
        """Read a mask written by `save`; indices are checked (dtype, range, sorted, unique)."""
        from safetensors import safe_open

        with safe_open(path, framework="pt") as f:
            raw = (f.metadata() or {}).get(_METADATA_KEY)
        if raw is None:
            raise ValueError(f"{path} is not a fish-peft mask file (no '{_METADATA_KEY}' metadata).")
        metadata = json.loads(raw)
        return cls(load_file(path), metadata["shapes"], metadata["modules_to_save"], metadata["info"])


def _checked_indices(name: str, idx: torch.Tensor, numel: int) -> torch.Tensor:
    if not isinstance(idx, torch.Tensor) or idx.dtype not in (torch.int32, torch.int64):
        raise TypeError(f"FishMask: indices of '{name}' must be an int32/int64 tensor, got {getattr(idx, 'dtype', type(idx))}.")
    if idx.dim() != 1:
        raise ValueError(f"FishMask: indices of '{name}' must be 1-D flat indices, got shape {tuple(idx.shape)}.")
    idx = idx.detach().to("cpu", torch.int64)
    if idx.numel():
        if idx[0] < 0 or idx[-1] >= numel:
            raise ValueError(f"FishMask: indices of '{name}' must lie in [0, {numel}).")
        if not bool((idx[1:] > idx[:-1]).all()):
            raise ValueError(f"FishMask: indices of '{name}' must be sorted and unique.")
    return idx
