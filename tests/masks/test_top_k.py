"""The top-k that never concatenates the scores picks exactly what the old concatenating top-k picked, ties included."""

import pytest
import torch

from fish_peft.masks import top_k as top_k_module
from fish_peft.masks.selection import select_top_k


def old_top_k_flat(flat, k):
    """fish-peft's former rule, kept as the reference: top-k of the concatenation, ties to the lower index."""
    if k >= flat.numel():
        return torch.arange(flat.numel())
    if k <= 0:
        return torch.empty(0, dtype=torch.int64)
    threshold = torch.topk(flat, k, sorted=False).values.min()
    above = flat > threshold
    ties = (flat == threshold).nonzero().squeeze(1)[: k - int(above.sum())]
    above[ties] = True
    return above.nonzero().squeeze(1)


def old_select_top_k(scores, k, selection):
    if selection == "global":
        flat = old_top_k_flat(torch.cat([s.reshape(-1).float() for s in scores.values()]), k)
        result, offset = {}, 0
        for name, s in scores.items():
            result[name] = flat[(flat >= offset) & (flat < offset + s.numel())] - offset
            offset += s.numel()
        return result
    sizes = torch.tensor([s.numel() for s in scores.values()], dtype=torch.float64)
    shares = sizes * (k / sizes.sum())
    quotas = shares.floor().long()
    missing = k - int(quotas.sum())
    if missing > 0:
        quotas[torch.argsort(shares - quotas, descending=True, stable=True)[:missing]] += 1
    return {n: old_top_k_flat(s.reshape(-1).float(), int(q)) for (n, s), q in zip(scores.items(), quotas.tolist())}


def tied_scores(seed, num_tensors=40):
    """Many tensors of mixed shapes, sizes (empty, one entry) and dtypes whose scores tie often: small integers,
    zeros of both signs, negatives, infinities, and float64 values that become equal in float32."""
    g = torch.Generator().manual_seed(seed)
    scores = {}
    for i in range(num_tensors):
        shape = [(0,), (1,), (7,), (5, 9), (3, 4, 6), (130,)][int(torch.randint(0, 6, (1,), generator=g))]
        values = torch.randint(-3, 6, shape, generator=g).float()
        if i % 5 == 0:
            values[values == 0] = -0.0
        if i % 7 == 3 and values.numel():
            values.view(-1)[0] = float("inf") if i % 2 else float("-inf")
        if i % 6 == 1:
            values = values.double() + torch.rand(shape, generator=g, dtype=torch.float64) * 1e-12
        if i % 6 == 2:
            values = values.bfloat16()
        if i % 4 == 0 and values.dim() > 1:
            values = values.transpose(0, 1)  # not contiguous
        scores[f"p{i}"] = values
    return scores


@pytest.mark.parametrize("seed", range(3))
@pytest.mark.parametrize("selection", ["global", "per_module"])
def test_matches_the_concatenating_top_k_exactly(seed, selection, monkeypatch):
    monkeypatch.setattr(top_k_module, "BLOCK", 29)  # ties and thresholds straddle block boundaries
    scores = tied_scores(seed)
    total = sum(s.numel() for s in scores.values())
    for k in [0, 1, 2, 17, total // 3, total // 2, total - 1, total, total + 5]:
        new, old = select_top_k(scores, k, selection), old_select_top_k(scores, k, selection)
        assert list(new) == list(scores)
        for name in scores:
            assert torch.equal(new[name], old[name]), (seed, selection, k, name)
        assert sum(i.numel() for i in new.values()) == min(k, total)


def test_continuous_scores_and_large_blocks():
    g = torch.Generator().manual_seed(0)
    scores = {f"w{i}": torch.rand(50, 40, generator=g) * 10 ** (i - 3) for i in range(8)}
    scores["zeros"] = torch.zeros(3000)
    for k in [5, 999, 16000, 16500]:
        new, old = select_top_k(scores, k), old_select_top_k(scores, k, "global")
        assert all(torch.equal(new[n], old[n]) for n in scores)


def test_nan_scores_are_refused():
    with pytest.raises(ValueError, match="NaN"):
        select_top_k({"a": torch.tensor([1.0, float("nan"), 0.0])}, 1)
