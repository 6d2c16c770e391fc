"""Baselines at FISH's parameter budget, int(keep_ratio * N_total) with the task head counted, built from PEFT's own
tuners: LoRA at the closest rank (`lora_matched`), SHiRA's random support at the closest r (`shira`), Super-Tuning's
magnitude support at the closest sparsity (`supertuning`), and SHiRA on FISH's own mask (`shira_fish`: is the gain
the mask or the tuner?). Each method's size is checked against the count PEFT then makes trainable.

SHiRA gives every layer r(m+n) entries for one r, and `ShiraConfig.mask_fn` must return a 0/1 mask of exactly that
many, so FISH's mask (any count per layer) cannot go through the hook: `shira_fish` builds SHiRA's layers, then puts
FISH's entries of each Linear weight in place of the random ones. Its saved folder is still an ordinary SHiRA adapter
that `PeftModel.from_pretrained` loads: before saving, each layer's entries are padded up to the r(m+n) of the
config's r with copies of one of its own entries whose values are 0, which changes neither W + Δ nor the support.
"""

from __future__ import annotations

import math
from typing import Optional

import torch
from torch import nn

from fish_peft.masks.fish_mask import FishMask
from fish_peft.masks.selection import base_named_parameters, in_modules, resolve_modules_to_save


def fish_budget(model: nn.Module, keep_ratio: float) -> int:
    """What a `fish` run trains: int(keep_ratio * all base parameters), the head included."""
    return int(sum(p.numel() for _, p in base_named_parameters(model)) * keep_ratio)


def head_size(model: nn.Module, heads: list[str]) -> int:
    return sum(p.numel() for name, p in base_named_parameters(model) if in_modules(name, heads))


def linear_layers(model: nn.Module, heads: list[str]) -> dict[str, tuple[int, int]]:
    """{module name: (out, in)} of every Linear layer outside the task head, the layers SHiRA and Super-Tuning adapt."""
    layers = {
        name: (module.out_features, module.in_features)
        for name, module in model.named_modules()
        if isinstance(module, nn.Linear) and not in_modules(f"{name}.weight", heads)
    }
    if not layers:
        raise ValueError("SHiRA and Super-Tuning adapt torch.nn.Linear layers, and this model has none outside its head.")
    return layers


def closest_rank(per_rank: int, fixed: int, budget: int, most: Optional[int] = None) -> int:
    """The r in [1, most] whose r * per_rank + fixed is the closest to `budget` (the smaller r on a tie)."""
    ideal = (budget - fixed) / per_rank
    candidates = {max(1, math.floor(ideal)), max(1, math.ceil(ideal))}
    if most is not None:
        candidates = {min(r, most) for r in candidates}
    return min(sorted(candidates), key=lambda r: abs(r * per_rank + fixed - budget))


def supertuning_count(sizes: list[int], sparsity: float) -> int:
    """Entries Super-Tuning trains at `sparsity`, computed as its layers do (int(numel * (1 - sparsity)) each)."""
    return sum(int(n * (1 - sparsity)) for n in sizes)


def closest_sparsity(sizes: list[int], wanted: int) -> float:
    """The sparsity whose Super-Tuning count is the closest to `wanted` (the smaller count on a tie), every layer
    keeping at least one entry."""
    if wanted < len(sizes):
        raise ValueError(
            f"supertuning: FISH's budget leaves {wanted:,} entries beside the head, fewer than the {len(sizes)} Linear "
            "layers it adapts (each needs one); raise keep_ratio."
        )
    low, high = 0.0, 1.0  # the count at `low` is >= wanted, at `high` (sparsity 1) below it
    if supertuning_count(sizes, low) <= wanted:
        return low
    while math.nextafter(low, 1.0) < high:
        middle = (low + high) / 2
        if supertuning_count(sizes, middle) >= wanted:
            low = middle
        else:
            high = middle
    if high < 1.0 and min(int(n * (1 - high)) for n in sizes) >= 1:
        if abs(supertuning_count(sizes, high) - wanted) <= abs(supertuning_count(sizes, low) - wanted):
            return high
    return low


def linear_mask(model: nn.Module, mask: FishMask) -> FishMask:
    """FISH's mask on the weights of the Linear layers outside the head only (what `shira_fish` trains); its biases,
    norms and embeddings are dropped."""
    weights = {f"{name}.weight" for name in linear_layers(model, list(mask.modules_to_save))}
    kept = {name: idx for name, idx in mask.items() if name in weights and idx.numel() > 0}
    if not kept:
        raise ValueError("shira_fish: FISH's mask has no entry on a Linear weight; raise keep_ratio.")
    dropped = mask.num_selected - sum(idx.numel() for idx in kept.values())
    info = {**mask.info, "linear_weights_only": True, "dropped_entries": dropped}
    return FishMask(kept, {name: mask.shapes[name] for name in kept}, modules_to_save=mask.modules_to_save, info=info)


def budget_matched_model(recipe, model: nn.Module, mask: Optional[FishMask]):
    """The PEFT model of a budget method (`hub.model_card.BUDGET_METHODS`), at FISH's budget (shira_fish: on `mask`,
    its `linear_mask`)."""
    from peft import get_peft_model

    heads = resolve_modules_to_save(model, "auto")
    budget, head = fish_budget(model, recipe.keep_ratio), head_size(model, heads)
    if recipe.method == "shira_fish":
        config, expected = shira_fish_config(recipe, model, mask, heads)
    else:
        config, expected = _BUILDERS[recipe.method](recipe, model, heads, budget, head)
    peft_model = get_peft_model(model, config)
    if recipe.method == "shira_fish":
        install_mask(peft_model, mask)
    trainable = peft_model.get_nb_trainable_parameters()[0]
    if trainable != expected + head:
        raise RuntimeError(
            f"{recipe.method}: expected {expected + head:,} trainable parameters, PEFT made {trainable:,}."
        )
    return peft_model


def lora_matched_config(recipe, model, heads, budget, head):
    """LoRA on `lora_targets` at the rank closest to the budget; alpha keeps the recipe's lora_alpha / lora_r."""
    from peft import LoraConfig
    from peft.tuners.tuners_utils import check_target_module_exists

    matcher = LoraConfig(target_modules=recipe.lora_targets)
    targets = [
        m for name, m in model.named_modules() if isinstance(m, nn.Linear) and check_target_module_exists(matcher, name)
    ]
    if not targets:
        raise ValueError(f"lora_matched: no Linear layer matches lora_targets {recipe.lora_targets}.")
    per_rank = sum(m.in_features + m.out_features for m in targets)
    r = closest_rank(per_rank, head, budget)
    alpha = recipe.lora_alpha * r / recipe.lora_r
    config = LoraConfig(r=r, lora_alpha=alpha, target_modules=recipe.lora_targets, modules_to_save=heads)
    return config, r * per_rank


def shira_config(recipe, model, heads, budget, head):
    """SHiRA (random support, seeded by the recipe) on every Linear layer but the head, at the r closest to the
    budget: r(m+n) entries per m x n layer, r at most min(mn / (m+n)), which SHiRA allows."""
    from peft import ShiraConfig

    layers = linear_layers(model, heads)
    per_rank = sum(m + n for m, n in layers.values())
    most = min(m * n // (m + n) for m, n in layers.values())
    r = closest_rank(per_rank, head, budget, most)
    config = ShiraConfig(r=r, target_modules=sorted(layers), modules_to_save=heads, random_seed=recipe.seed)
    return config, r * per_rank


def supertuning_config(recipe, model, heads, budget, head):
    """Super-Tuning (largest-magnitude support, data-free) on every Linear layer but the head, at the sparsity
    whose count is closest to the budget."""
    from peft import SupertuningConfig

    layers = linear_layers(model, heads)
    sizes = [m * n for m, n in layers.values()]
    sparsity = closest_sparsity(sizes, budget - head)
    config = SupertuningConfig(target_modules=sorted(layers), modules_to_save=heads, sparsity=sparsity)
    return config, supertuning_count(sizes, sparsity)


_BUILDERS = {"lora_matched": lora_matched_config, "shira": shira_config, "supertuning": supertuning_config}


def shira_fish_config(recipe, model, mask: FishMask, heads):
    """SHiRA on the Linear layers where `mask` (a `linear_mask`) has entries; its r is the one a saved file pads
    every layer's entries up to (the most entries per (m+n) of any layer), which SHiRA must allow on every layer."""
    from peft import ShiraConfig

    layers = {name.removesuffix(".weight"): mask.shapes[name] for name in mask}
    r = max(math.ceil(mask[f"{name}.weight"].numel() / (m + n)) for name, (m, n) in layers.items())
    too_small = [name for name, (m, n) in layers.items() if r * (m + n) > m * n]
    if too_small:
        raise ValueError(
            f"shira_fish: FISH's mask puts up to {r} x (m+n) entries on a layer, more than SHiRA's file holds on "
            f"{too_small[0]}; lower keep_ratio."
        )
    config = ShiraConfig(r=r, target_modules=sorted(layers), modules_to_save=heads, random_seed=recipe.seed)
    return config, mask.num_selected


def shira_layers(model: nn.Module):
    """(name in the bare model, SHiRA layer) of every SHiRA layer of a PEFT model."""
    from peft.tuners.shira.layer import ShiraLayer

    for name, module in model.named_modules():
        if isinstance(module, ShiraLayer):
            yield name.removeprefix("base_model.model."), module


def install_mask(model, mask: FishMask, adapter: str = "default") -> None:
    """Give each SHiRA layer FISH's entries of its weight (sorted, as SHiRA's mask_fn path orders them), at 0."""
    for name, layer in shira_layers(model):
        flat = mask[f"{name}.weight"]
        old = layer.shira_weight[adapter]
        rows, cols = flat // layer.in_features, flat % layer.in_features
        layer.shira_indices[adapter] = torch.stack([rows, cols]).to(device=old.device, dtype=torch.int)
        layer.shira_weight[adapter] = nn.Parameter(torch.zeros(flat.numel(), dtype=old.dtype, device=old.device))


def prepare_to_save(recipe, model, adapter: str = "default") -> None:
    """shira_fish: pad each layer's entries to the r(m+n) that PEFT's SHiRA loader allocates, with copies of its
    first entry at value 0 (W + Δ and the support unchanged), so the folder loads with `PeftModel.from_pretrained`."""
    if recipe.method != "shira_fish":
        return
    r = model.peft_config[adapter].r
    for _, layer in shira_layers(model):
        values, indices = layer.shira_weight[adapter], layer.shira_indices[adapter]
        missing = r * (layer.in_features + layer.out_features) - values.numel()
        if missing > 0:
            padded = torch.cat([values.detach(), values.new_zeros(missing)])
            layer.shira_weight[adapter] = nn.Parameter(padded, requires_grad=values.requires_grad)
            layer.shira_indices[adapter] = torch.cat([indices, indices[:, :1].expand(-1, missing)], dim=1)
