"""The on-disk layout of a sparse diff: every adapted parameter's values and indices packed into three tensors.

Indices are stored as gaps between consecutive sorted indices (the first gap counted from 0): the low 16 bits of
every gap in one uint16 tensor, and the rare gaps of 65,536 or more as (position, high bits) pairs. That costs
about 2 bytes per index instead of 4 or 8, and one small header instead of two tensors per parameter, so a float32
diff takes about 6 bytes per value and a bfloat16 one about 4. Parameters are packed in sorted name order, and
`adapter_config.json` holds the count of each, which is all that unpacking needs. The counts are also stored in
the file (sorted name order), so a file cannot be decoded with another adapter's counts: an evolving diff's counts
change while it trains, and a file loaded into an existing adapter is decoded with that adapter's config. Files
written before the counts were stored load as before.
"""

from __future__ import annotations

import torch

VALUES_KEY = "fish_packed.values"
GAPS_KEY = "fish_packed.index_gaps"
OVERFLOW_KEY = "fish_packed.index_gap_overflow"
COUNTS_KEY = "fish_packed.counts"
REQUIRED_KEYS = (VALUES_KEY, GAPS_KEY, OVERFLOW_KEY)
PACKED_KEYS = (*REQUIRED_KEYS, COUNTS_KEY)


class PackingError(ValueError):
    """A packed sparse diff that cannot be decoded into sorted, in-range indices."""


def pack(entries: dict[str, tuple[torch.Tensor, torch.Tensor]]) -> dict[str, torch.Tensor]:
    """{parameter name: (sorted flat indices, values)} -> the three packed tensors."""
    names = sorted(entries)
    if not names:
        raise ValueError("Nothing to pack: the adapter has no sparse values.")
    gaps = torch.cat([torch.diff(entries[n][0].long().cpu(), prepend=torch.zeros(1, dtype=torch.long)) for n in names])
    high = gaps >> 16
    positions = high.nonzero().squeeze(1)
    return {
        VALUES_KEY: torch.cat([entries[n][1].detach().reshape(-1).cpu() for n in names]),
        GAPS_KEY: (gaps & 0xFFFF).to(torch.uint16),
        OVERFLOW_KEY: torch.stack([positions, high[positions]], dim=1),
        COUNTS_KEY: torch.tensor([entries[n][0].numel() for n in names], dtype=torch.int64),
    }


def stored_counts(tensors: dict[str, torch.Tensor], names) -> dict[str, int] | None:
    """The per-parameter counts a packed file stores, keyed by `names` in sorted order (None for a file from
    before counts were stored); a `PackingError` when they cannot belong to that many parameters."""
    if COUNTS_KEY not in tensors:
        return None
    counts, names = tensors[COUNTS_KEY], sorted(names)
    if counts.dtype != torch.int64 or counts.dim() != 1 or counts.numel() != len(names):
        raise PackingError(
            f"Packed counts must be an int64 tensor of one count per adapted parameter ({len(names)}), got {counts.dtype} "
            f"of shape {tuple(counts.shape)}; the file and the config do not belong together."
        )
    return dict(zip(names, (int(c) for c in counts.tolist())))


def unpack(tensors: dict[str, torch.Tensor], counts: dict[str, int], numels: dict[str, int]) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """Inverse of `pack`, checking everything: dtypes, lengths against `counts`, ranges against `numels`."""
    missing = [k for k in REQUIRED_KEYS if k not in tensors]
    if missing:
        raise PackingError(f"The adapter file lacks {missing}; it was not written by fish-peft's save_pretrained.")
    values, low, overflow = (tensors[k] for k in REQUIRED_KEYS)
    if stored_counts(tensors, counts) not in (None, dict(counts)):
        raise PackingError(
            "The adapter file's per-parameter counts differ from those its config gives; the file holds another mask "
            "than the config describes."
        )
    total = sum(counts.values())
    if not values.is_floating_point() or values.dim() != 1:
        raise PackingError(f"Packed values must be a 1-D float tensor, got {values.dtype} of shape {tuple(values.shape)}.")
    if low.dtype != torch.uint16 or low.dim() != 1:
        raise PackingError(f"Packed index gaps must be a 1-D uint16 tensor, got {low.dtype} of shape {tuple(low.shape)}.")
    if overflow.dtype != torch.int64 or overflow.dim() != 2 or overflow.shape[1] != 2:
        raise PackingError(f"Packed gap overflow must be an int64 (n, 2) tensor, got {overflow.dtype} {tuple(overflow.shape)}.")
    if values.numel() != total or low.numel() != total:
        raise PackingError(
            f"The adapter file holds {values.numel()} values and {low.numel()} indices, but adapter_config.json "
            f"counts {total}; the file and the config do not belong together."
        )
    gaps = low.to(torch.int64)
    if overflow.numel():
        positions, high = overflow[:, 0], overflow[:, 1]
        if positions.min() < 0 or positions.max() >= total or high.min() < 1 or high.max() >= 2**47:
            raise PackingError("Packed gap overflow entries are out of range.")
        if torch.unique(positions).numel() != positions.numel():
            raise PackingError("Packed gap overflow lists a position twice.")
        gaps[positions] += high << 16
    result, offset = {}, 0
    for name in sorted(counts):
        count, numel = counts[name], numels[name]
        part = gaps[offset : offset + count]
        if part.max() >= numel:
            raise PackingError(f"Indices of '{name}' fall outside the parameter's {numel} entries.")
        if count > 1 and part[1:].min() < 1:
            raise PackingError(f"Indices of '{name}' are not strictly increasing (a duplicated or unsorted index).")
        indices = torch.cumsum(part, 0)
        if indices[-1] >= numel:
            raise PackingError(f"Indices of '{name}' fall outside the parameter's {numel} entries.")
        result[name] = (indices, values[offset : offset + count])
        offset += count
    return result
