"""What each SFT method hands TRL's SFTTrainer as `peft_config`: a FISH adapter that computes its mask from the
Fisher when training begins (fish), a FISH adapter with a random mask at the same budget (random), LoRA, or nothing
(full). The budget is checked here, before the trainer is built."""

from __future__ import annotations

from typing import Optional

from peft import LoraConfig, PeftConfig

from fish_peft.cli.sft_recipe import SFTRecipe
from fish_peft.masks.fish_mask import FishMask
from fish_peft.masks.selection import random_mask
from fish_peft.tuner.config import FishConfig
from fish_peft.tuner.target_modules import check_budget, eligible_parameters

CAUSAL_LM = "CAUSAL_LM"


def fish_config(recipe: SFTRecipe, mask: Optional[FishMask] = None) -> FishConfig:
    """The FISH adapter of a fish or random run: with `mask` (random, or a resumed run's), else awaiting the mask
    that `FishMaskInitCallback` computes from the Fisher of the training loss when training begins."""
    shared = dict(target_modules=recipe.target, exclude_modules=recipe.exclude_modules, save_dtype=recipe.save_dtype,
                  task_type=CAUSAL_LM)
    if mask is not None:
        return FishConfig(mask=mask, **shared)
    return FishConfig(
        keep_ratio=recipe.keep_ratio, num_samples=recipe.num_samples, fisher=recipe.fisher, score=recipe.score, **shared
    )


def check_fish_budget(recipe: SFTRecipe, model) -> dict:
    """The parameters the recipe's target modules let a mask pick; a keep ratio the model cannot honour (below one
    entry, or more than those modules hold) is refused here, before any training."""
    config = fish_config(recipe)
    eligible = eligible_parameters(model, config)
    check_budget(model, config, eligible)
    return eligible


def starting_mask(recipe: SFTRecipe, model) -> Optional[FishMask]:
    """The mask a run can know before training: random's, drawn among the same parameters and at the same budget
    as fish's (whose own mask comes from the Fisher once training begins). None for the other methods."""
    if recipe.method not in ("fish", "random"):
        return None
    eligible = check_fish_budget(recipe, model)
    if recipe.method == "fish":
        return None
    return random_mask(model, recipe.keep_ratio, seed=recipe.seed, modules_to_save=None, eligible=lambda name, _p: name in eligible)


def peft_config(recipe: SFTRecipe, mask: Optional[FishMask]) -> Optional[PeftConfig]:
    """`peft_config` for SFTTrainer: FISH for fish and random, LoRA for lora, None for full fine-tuning."""
    if recipe.method in ("fish", "random"):
        return fish_config(recipe, mask)
    if recipe.method == "lora":
        return LoraConfig(r=recipe.lora_r, lora_alpha=recipe.lora_alpha, lora_dropout=recipe.lora_dropout,
                          target_modules=recipe.lora_target, task_type=CAUSAL_LM)
    return None
