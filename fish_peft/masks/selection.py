"""Turn per-parameter scores into a `FishMask` under the FISH paper's budget.

The budget counts the task head against the keep ratio, as the paper does: k = int(N_total * keep_ratio) - N_head,
and the k entries are picked by one global top-k over every eligible parameter (or, as an option, per parameter in
proportion to its size). Ties are broken towards the lower (parameter order, flat index), so the same scores always
give the same mask.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Iterable, Iterator, Sequence
from typing import Optional, TypedDict, Union, Unpack

import torch
from torch import nn

from fish_peft.distributed.processes import check_same_everywhere
from fish_peft.masks.fisher import compute_fisher
from fish_peft.masks.fish_mask import FishMask
from fish_peft.masks.top_k import top_k

HEAD_MODULE_NAMES = ("classifier", "score")  # the heads PEFT keeps trainable for sequence classification
SELECTIONS = ("global", "per_module")
SCORES = ("fisher", "gradient_snr")  # what ranks the entries of compute_fisher_mask
# gradient_snr: entries whose mean squared gradient is below this share of the largest one's (gradients 1e-5 the
# size) carry only rounding noise, e.g. an attention key's bias, which softmax ignores; they score 0
NO_SIGNAL = 1e-10
# what PEFT wrappers add to a model's parameter names (FISH, LoRA, SHiRA, Super-Tuning values; copies of the head)
ADDED_BY_PEFT = (
    ".fish_values.", ".fish_explore_values.", ".modules_to_save.", ".lora_", ".shira_weight.", ".supertuning_",
    ".trainable_tokens_delta",
)

Eligible = Optional[Union[str, Callable[[str, nn.Parameter], bool]]]
ModulesToSave = Union[str, Sequence[str], None]


class MaskOptions(TypedDict, total=False):
    """The keyword options every mask function takes: `modules_to_save` ("auto": the task head; kept fully trainable
    and counted in the budget), `selection` ("global" or "per_module") and `eligible` (a regex on parameter names or a
    `(name, param) -> bool` callable narrowing the candidates)."""

    modules_to_save: ModulesToSave
    selection: str
    eligible: Eligible


def resolve_modules_to_save(model: nn.Module, modules_to_save: ModulesToSave) -> list[str]:
    """`"auto"` finds the task head (a module named `classifier` or `score`); a list is taken as given."""
    if modules_to_save is None:
        return []
    if isinstance(modules_to_save, str):
        if modules_to_save != "auto":
            return [modules_to_save]
        names = {name.rpartition(".")[2] for name, _ in model.named_modules()}
        return [head for head in HEAD_MODULE_NAMES if head in names]
    return list(modules_to_save)


def in_modules(param_name: str, modules: Iterable[str]) -> bool:
    """Whether the parameter's owning module is, or lies inside, one of `modules` (matched by name suffix): the one
    `modules_to_save` matcher, for names in the bare model or in PEFT's (`base_model.model.` prefixed) files."""
    owner = f".{param_name.rpartition('.')[0]}."
    return any(f".{m}." in owner for m in modules)


def partition_parameters(
    model: nn.Module, modules_to_save: Sequence[str], eligible: Eligible = None
) -> tuple[dict[str, nn.Parameter], int, int]:
    """The parameters the mask may pick from, the number of head parameters, and the model's total."""
    if isinstance(eligible, str):
        pattern = re.compile(eligible)
        eligible = lambda name, _param: bool(pattern.search(name))  # noqa: E731
    candidates, num_head, num_total = {}, 0, 0
    for name, param in base_named_parameters(model):
        num_total += param.numel()
        if in_modules(name, modules_to_save):
            num_head += param.numel()
        elif eligible is None or eligible(name, param):
            candidates[name] = param
    return candidates, num_head, num_total


def base_named_parameters(model: nn.Module) -> Iterator[tuple[str, nn.Parameter]]:
    """(name in the bare base model, parameter), also when `model` is wrapped by PEFT; what the wrapper added
    (adapter values, LoRA matrices, SHiRA and Super-Tuning values, trainable copies of the head) is left out."""
    for name, param in model.named_parameters():
        if any(added in name for added in ADDED_BY_PEFT):
            continue
        yield base_name(name), param


def base_name(name: str) -> str:
    """A parameter's name in the bare base model, without what PEFT's wrappers put into it."""
    for wrapper in (".token_adapter.", ".base_layer.", ".original_module."):
        name = name.replace(wrapper, ".")
    return name.removeprefix("base_model.model.")


def check_keep_ratio(keep_ratio: float) -> float:
    if isinstance(keep_ratio, bool) or not isinstance(keep_ratio, (int, float)):
        raise TypeError(f"keep_ratio must be a number in (0, 1], e.g. 0.005 for 0.5 %; got {keep_ratio!r}.")
    if not 0 < keep_ratio <= 1:
        raise ValueError(f"keep_ratio must be in (0, 1] (a fraction, e.g. 0.005 for 0.5 %); got {keep_ratio}.")
    return float(keep_ratio)


def sparse_budget(num_total: int, num_head: int, num_eligible: int, keep_ratio: float) -> int:
    """k = int(N_total * keep_ratio) - N_head, capped at the number of eligible entries."""
    k = int(num_total * check_keep_ratio(keep_ratio)) - num_head
    if k < 1:
        raise ValueError(
            f"keep_ratio={keep_ratio} allows {int(num_total * keep_ratio):,} trainable values, but the head "
            f"(modules_to_save) alone has {num_head:,}; raise keep_ratio or pass modules_to_save=None."
        )
    return min(k, num_eligible)


def select_top_k(scores: dict[str, torch.Tensor], k: int, selection: str = "global") -> dict[str, torch.Tensor]:
    """The k highest-scoring entries, globally or per parameter (proportional to size), as sorted flat indices on the
    scores' device; ties go to the lower (parameter order, flat index)."""
    if selection not in SELECTIONS:
        raise ValueError(f"selection must be one of {SELECTIONS}, got {selection!r}.")
    if selection == "global":
        return top_k(scores, k)
    sizes = torch.tensor([s.numel() for s in scores.values()], dtype=torch.float64)
    quotas = _largest_remainder(sizes * (k / sizes.sum()), k)
    return {name: top_k({name: score}, int(q))[name] for (name, score), q in zip(scores.items(), quotas.tolist())}


def _largest_remainder(shares: torch.Tensor, total: int) -> torch.Tensor:
    quotas = shares.floor().long()
    missing = total - int(quotas.sum())
    if missing > 0:
        order = torch.argsort(shares - quotas, descending=True, stable=True)
        quotas[order[:missing]] += 1
    return quotas


def build_mask(
    model: nn.Module,
    score_fn: Callable[[dict[str, nn.Parameter]], dict[str, torch.Tensor]],
    keep_ratio: float,
    info: dict,
    *,
    modules_to_save: ModulesToSave = "auto",
    selection: str = "global",
    eligible: Eligible = None,
) -> FishMask:
    """Shared path of every mask: budget → scores of the eligible parameters → top-k → FishMask."""
    heads = resolve_modules_to_save(model, modules_to_save)
    candidates, num_head, num_total = partition_parameters(model, heads, eligible)
    if not candidates:
        raise ValueError("No parameter is eligible for the mask; loosen `eligible` or check `modules_to_save`.")
    k = sparse_budget(num_total, num_head, sum(p.numel() for p in candidates.values()), keep_ratio)
    scores = score_fn(candidates)
    indices = select_top_k({name: scores[name] for name in candidates}, k, selection)
    info = {**info, "keep_ratio": keep_ratio, "selection": selection, "num_total_parameters": num_total}
    shapes = {name: tuple(p.shape) for name, p in candidates.items()}
    mask = FishMask(indices, shapes, modules_to_save=heads, info=info)
    if not info.get("per_process"):
        check_same_everywhere(mask.digest(), "mask")
    return mask


def compute_fisher_mask(
    model: nn.Module,
    dataloader: Iterable,
    keep_ratio: float = 0.005,
    num_samples: int = 1024,
    *,
    modules_to_save: ModulesToSave = "auto",
    selection: str = "global",
    eligible: Eligible = None,
    fisher: str = "empirical",
    score: str = "fisher",
    **fisher_kwargs,
) -> FishMask:
    """The FISH mask: the `keep_ratio` share of parameters with the largest Fisher information, or with
    `score="gradient_snr"` the largest `gradient_snr` of the same examples (empirical Fisher only).

    `modules_to_save="auto"` keeps the task head (`classifier`/`score`) fully trainable and counts it inside the
    budget; `eligible` (a regex on parameter names or a `(name, param) -> bool` callable) narrows the candidates,
    which by default are all parameters (embeddings, LayerNorm, biases included). Further keyword arguments go to
    `compute_fisher`.
    """
    check_keep_ratio(keep_ratio)
    if score not in SCORES:
        raise ValueError(f"score must be one of {SCORES}, got {score!r}.")
    if score == "gradient_snr" and fisher != "empirical":
        raise ValueError("score='gradient_snr' ranks the gradients at the gold labels: use it with fisher='empirical'.")

    def score_fn(candidates):
        if score == "fisher":
            return compute_fisher(model, dataloader, num_samples, parameters=candidates, fisher=fisher, **fisher_kwargs)
        squares, sums = compute_fisher(
            model, dataloader, num_samples, parameters=candidates, fisher=fisher, gradient_sums=True, **fisher_kwargs
        )
        return gradient_snr_scores(squares, sums)

    info = {"method": "fisher", "fisher": fisher, "num_samples": num_samples}
    if score != "fisher":
        info["score"] = score
    if fisher_kwargs.get("per_process"):
        info["per_process"] = True  # each process its own mask: not compared across processes
    return build_mask(model, score_fn, keep_ratio, info, modules_to_save=modules_to_save, selection=selection, eligible=eligible)


def gradient_snr_scores(squares: dict[str, torch.Tensor], sums: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Each parameter's `gradient_snr` from the Fisher pass's Σ g² and Σ g, with entries below NO_SIGNAL of the
    largest Σ g² scored 0."""
    floor = NO_SIGNAL * max(float(s.max()) for s in squares.values())
    return {name: gradient_snr(squares[name], sums[name], floor) for name in squares}


def gradient_snr(squares: torch.Tensor, sums: torch.Tensor, floor: float = 0.0) -> torch.Tensor:
    """(Σ g)² / Σ g² over the examples: how consistently they push an entry one way, from 0 to the number of
    examples. It ranks entries like the gradient's signal-to-noise ratio E[g]² / Var(g), and like the size of a first
    Adam step of full fine-tuning; an entry whose Σ g² is not above `floor` scores 0."""
    squares = squares.float()
    return torch.where(squares > floor, sums.float().square() / squares.clamp_min(torch.finfo(torch.float32).tiny), 0.0)


def mask_from_scores(
    model: nn.Module,
    scores: dict[str, torch.Tensor],
    keep_ratio: float = 0.005,
    **options: Unpack[MaskOptions],
) -> FishMask:
    """The mask of precomputed scores (e.g. from `compute_fisher`) under the same budget rules (options:
    `MaskOptions`)."""
    def score_fn(candidates):
        absent = [name for name in candidates if name not in scores]
        if absent:
            raise ValueError(f"No score for {len(absent)} eligible parameter(s), e.g. '{absent[0]}'; score them or narrow `eligible`.")
        return scores

    return build_mask(model, score_fn, keep_ratio, {"method": "scores"}, **options)


def random_mask(model: nn.Module, keep_ratio: float = 0.005, seed: int = 0, **options: Unpack[MaskOptions]) -> FishMask:
    """The paper's control: the same budget as `compute_fisher_mask`, entries drawn uniformly at random (options:
    `MaskOptions`)."""
    generator = torch.Generator().manual_seed(seed)

    def score_fn(candidates):
        return {name: torch.rand(p.numel(), generator=generator) for name, p in candidates.items()}

    return build_mask(model, score_fn, keep_ratio, {"method": "random", "seed": seed}, **options)


def magnitude_mask(model: nn.Module, keep_ratio: float = 0.005, **options: Unpack[MaskOptions]) -> FishMask:
    """Data-free baseline: the same budget, entries with the largest |θ| (options: `MaskOptions`)."""

    def score_fn(candidates):
        return {name: p.detach().abs() for name, p in candidates.items()}

    return build_mask(model, score_fn, keep_ratio, {"method": "magnitude"}, **options)


def bias_mask(model: nn.Module, *, modules_to_save: ModulesToSave = "auto") -> FishMask:
    """BitFit as a sparse diff: every entry of every bias (LayerNorm biases included), the head trained in full."""
    heads = resolve_modules_to_save(model, modules_to_save)
    candidates, _, num_total = partition_parameters(model, heads, lambda name, _p: name.endswith("bias"))
    if not candidates:
        raise ValueError("The model has no bias parameters, so BitFit has nothing to train.")
    indices = {name: torch.arange(p.numel()) for name, p in candidates.items()}
    shapes = {name: tuple(p.shape) for name, p in candidates.items()}
    return FishMask(indices, shapes, modules_to_save=heads, info={"method": "bitfit", "num_total_parameters": num_total})
