"""`fish-peft train` with periodic diff averaging, the FISH paper's distributed mode (a recipe with `merge_every`:
average every N steps): under `accelerate launch` each process trains the FISH adapter on its own share of the
batches and the `DiffAverager` averages the diffs. The
Trainer is used for its dataloader, optimizer and schedule (the recipe's settings), not for its training loop,
which would wrap the model in DDP and average every step's gradients."""

from __future__ import annotations

import math
import time
from pathlib import Path
from typing import Any, Callable, Iterator, Optional

import torch
from torch.utils.data import DataLoader
from transformers import Trainer

from fish_peft.dynamic.diff_averaging import DiffAverager
from fish_peft.distributed.processes import rank_and_world
from fish_peft.masks.fish_mask import FishMask
from fish_peft.dynamic.averaging_checkpoints import AveragingCheckpoints, load_averaging_checkpoint
from fish_peft.cli.recipe import Recipe
from fish_peft.utils.rng_states import capture_rng, restore_rng
from fish_peft.masks.selection import compute_fisher_mask


def train_averaged(
    recipe: Recipe, model, trainer: Trainer, fisher_loader: Callable[[], DataLoader], checkpoints: Path,
    resume_from: Optional[Path] = None,
) -> dict[str, Any]:
    """Train `model` (a PeftModel with a fixed FISH mask) by averaged diffs, checkpointing into `checkpoints` (see
    `dynamic/averaging_checkpoints.py`), or continuing from the checkpoint `resume_from`; returns what results.json
    reports (under its earlier key "merging")."""
    loader = trainer.get_train_dataloader()  # prepared by Accelerate: each process gets its own batches
    steps = max(1, math.ceil(len(loader) * trainer.args.num_train_epochs))
    trainer.create_optimizer_and_scheduler(num_training_steps=steps)
    optimizer, scheduler = trainer.optimizer, trainer.lr_scheduler
    averager = DiffAverager(
        model, optimizer, merge_every=recipe.merge_every, reduction=recipe.merge_reduction,
        recompute_every=recipe.recompute_every, recompute_mask=lambda: recomputed_mask(recipe, model, fisher_loader()),
        total_steps=steps,
    )
    rng = load_averaging_checkpoint(resume_from, averager, scheduler) if resume_from else None
    saver = AveragingCheckpoints(checkpoints, len(loader), recipe.save_steps, last_saved=averager.steps)
    started, first, done = time.perf_counter(), averager.steps, averager.steps
    epoch, skip = divmod(done, len(loader))
    model.train()
    while done < steps:
        batches = epoch_batches(loader, epoch)
        if rng is None:
            epoch_start = capture_rng()
        else:  # resuming: the interrupted epoch's batch order, drawn again, then the RNG as it was at the checkpoint
            epoch_start = rng["epoch_start"] if skip else rng["now"]
            restore_rng(epoch_start)
            for _ in range(skip):
                next(batches)
            restore_rng(rng["now"])
            rng = None
        for batch in batches:
            model(**batch).loss.backward()
            if trainer.args.max_grad_norm:
                torch.nn.utils.clip_grad_norm_([p for p in model.parameters() if p.requires_grad], trainer.args.max_grad_norm)
            optimizer.step()
            scheduler.step()
            optimizer.zero_grad()
            averaged = averager.step()
            done += 1
            if done == steps:
                break
            if averaged and saver.due(done):
                saver.save(averager, scheduler, epoch_start)
        epoch += 1
    averager.finish()
    seconds = time.perf_counter() - started
    return {
        "train_seconds": seconds,
        "mean_step_seconds": seconds / max(1, steps - first),
        "merging": {
            "steps": steps, "merges": averager.rounds, "recomputations": averager.recomputations,
            "processes": rank_and_world()[1], "mask_sharing": recipe.mask_sharing, "reduction": recipe.merge_reduction,
            "bytes_per_process": averager.traffic.total(), "traffic": averager.traffic.as_dict(),
        },
    }


def epoch_batches(loader: DataLoader, epoch: int) -> Iterator:
    """The batches of `epoch`, in the order the epoch number gives them (Accelerate's seedable sampler)."""
    if hasattr(loader, "set_epoch"):
        loader.set_epoch(epoch)
    return iter(loader)


def recomputed_mask(recipe: Recipe, model, loader: DataLoader) -> FishMask:
    """The recipe's FISH mask on the model as averaged so far: over every process's data (shared) or this process's
    own (individual)."""
    return compute_fisher_mask(
        model, loader, recipe.keep_ratio, recipe.num_samples, selection=recipe.selection, eligible=recipe.eligible,
        fisher=recipe.fisher, score=recipe.score, per_process=recipe.mask_sharing == "individual",
    )


def averaged_mask(model, initial: Optional[FishMask]) -> Optional[FishMask]:
    """The support of an averaged run's adapter (the union of every averaged position), for the plot and the card."""
    config = model.peft_config["default"]
    return config.mask if config.mask is not None else initial


def own_share(dataset, recipe: Recipe):
    """This process's contiguous share of a dataset (individual masks are scored on it)."""
    rank, world = rank_and_world()
    return dataset.shard(num_shards=world, index=rank, contiguous=True) if recipe.mask_sharing == "individual" else dataset
