"""Which entries a sparse diff may change: `FishMask`, Fisher scores from per-example gradients and the loss they
are taken of, and the selection under the paper's budget (global top-k) with its data-free baselines."""

from fish_peft.masks.fish_mask import FishMask
from fish_peft.masks.fisher import compute_fisher
from fish_peft.masks.selection import bias_mask, compute_fisher_mask, magnitude_mask, mask_from_scores, random_mask

__all__ = ["FishMask", "bias_mask", "compute_fisher", "compute_fisher_mask", "magnitude_mask", "mask_from_scores", "random_mask"]
