"""Checkpoints of periodic diff averaging (`fish-peft train` with `merge_every`), for `--resume` after a crash.

Every process trains its own adapter with its own optimizer, so each keeps its own state. A checkpoint is taken right
after an averaging round, when every adapter holds zeros and the processes share the averaged model: `merge-STEP/`
(the folder names of earlier releases) holds `merged_model.pt` (written once: the base-weight entries the rounds
changed, and the head) and one `process-RANK.pt`
per process (its mask, optimizer, schedule, RNG states and counters). They are written into `.merge-STEP.saving`,
renamed once every process has written its file, so a folder of that name is complete; only the newest is kept.
"""

from __future__ import annotations

import re
import shutil
from pathlib import Path
from typing import Any, Callable, Optional

import torch

from fish_peft.dynamic.diff_averaging import DiffAverager
from fish_peft.distributed.processes import raise_together, rank_and_world
from fish_peft.utils.rng_states import capture_rng

AVERAGED_MODEL = "merged_model.pt"  # file names as earlier releases wrote them


def process_file(rank: int) -> str:
    return f"process-{rank}.pt"


class AveragingCheckpoints:
    """Checkpoints in `folder` at the first averaging round after every epoch end and every `save_steps` steps."""

    def __init__(self, folder: Path, steps_per_epoch: int, save_steps: Optional[int], last_saved: int = 0):
        self.folder, self.last_saved = Path(folder), last_saved
        self.every = [steps_per_epoch] + ([save_steps] if save_steps else [])

    def due(self, steps: int) -> bool:
        return any(steps // n > self.last_saved // n for n in self.every)

    def save(self, averager: DiffAverager, scheduler, rng_at_epoch_start: dict[str, Any]) -> None:
        """Called by every process right after the round at step `averager.steps` (`scheduler`: the LR schedule, or
        None); an error on any process raises on all."""
        rank = rank_and_world()[0]
        steps = averager.steps
        own = {
            "merger": averager.state_dict(),
            "optimizer": named_optimizer_state(averager.model, averager.optimizer),
            "scheduler": None if scheduler is None else scheduler.state_dict(),
            "rng": capture_rng(),
            "rng_at_epoch_start": rng_at_epoch_start,
        }
        staging, final = self.folder / f".merge-{steps}.saving", self.folder / f"merge-{steps}"
        started = _attempt(lambda: _start(staging, averager.averaged_model_state())) if rank == 0 else None
        raise_together(started, "saving a checkpoint")  # no process waits for one that failed
        raise_together(_attempt(lambda: torch.save(own, staging / process_file(rank))), "saving a checkpoint")
        if rank == 0:
            staging.rename(final)
            for older in self.folder.glob("*merge-*"):
                if older != final:
                    shutil.rmtree(older, ignore_errors=True)
        self.last_saved = steps


def numbered_folders(folder: Path, prefix: str) -> list[Path]:
    """The folders `PREFIX-N` in `folder` (Trainer's `checkpoint-N`, `merge-N`), the highest N first."""
    found = [(int(m.group(1)), p) for p in folder.glob(f"{prefix}-*") if (m := re.fullmatch(rf"{prefix}-(\d+)", p.name))]
    return [path for _, path in sorted(found, reverse=True) if path.is_dir()]


def last_averaging_checkpoint(folder: Path) -> Optional[Path]:
    """The newest complete checkpoint of diff averaging in `folder`, if any (an unfinished one is still named
    `.merge-STEP.saving`)."""
    return next(iter(numbered_folders(folder, "merge")), None)


def load_averaging_checkpoint(checkpoint: Path, averager: DiffAverager, scheduler) -> dict[str, Any]:
    """Put this process back where it was at `checkpoint`: averaged model, mask, optimizer, schedule and counters.
    Returns its RNG states then and at the start of that epoch, for the caller to restore around the data."""
    rank, world = rank_and_world()
    path = checkpoint / process_file(rank)
    if not path.is_file():
        saved = len(list(checkpoint.glob("process-*.pt")))
        raise FileNotFoundError(f"{path} is missing: {checkpoint} was saved by {saved} processes; resume with as many (now {world}).")
    state = torch.load(path, map_location="cpu", weights_only=True)
    if (scheduler is None) != (state["scheduler"] is None):
        had = "without" if state["scheduler"] is None else "with"
        raise ValueError(f"The run was checkpointed {had} a learning-rate schedule; resume it the same way.")
    averager.load_state_dict(state["merger"], torch.load(checkpoint / AVERAGED_MODEL, map_location="cpu", weights_only=True))
    load_named_optimizer_state(averager.model, averager.optimizer, state["optimizer"])
    if scheduler is not None:
        scheduler.load_state_dict(state["scheduler"])
    return {"now": state["rng"], "epoch_start": state["rng_at_epoch_start"]}


def named_optimizer_state(model: torch.nn.Module, optimizer: torch.optim.Optimizer) -> dict[str, Any]:
    """The optimizer's state with its parameters named: the adapter's value tensors are replaced when the mask is
    recomputed, so their order in the groups depends on the run's history, which a resumed run does not repeat."""
    names = {id(p): name for name, p in model.named_parameters()}
    return {"state": optimizer.state_dict(), "names": [[names[id(p)] for p in g["params"]] for g in optimizer.param_groups]}


def load_named_optimizer_state(model: torch.nn.Module, optimizer: torch.optim.Optimizer, saved: dict[str, Any]) -> None:
    """Give the optimizer's groups the saved parameters, by name and in the saved order, then their state."""
    parameters = dict(model.named_parameters())
    missing = [name for names in saved["names"] for name in names if name not in parameters]
    if missing or len(saved["names"]) != len(optimizer.param_groups):
        raise ValueError(
            f"The saved optimizer state does not fit this model ({len(missing)} parameters unknown, e.g. "
            f"{missing[:1]}; {len(saved['names'])} groups saved, {len(optimizer.param_groups)} here): resume with the "
            "recipe and model the run started with."
        )
    for group, names in zip(optimizer.param_groups, saved["names"]):
        group["params"] = [parameters[name] for name in names]
    optimizer.load_state_dict(saved["state"])


def _start(staging: Path, averaged_model: dict) -> None:
    shutil.rmtree(staging, ignore_errors=True)
    staging.mkdir(parents=True)
    torch.save(averaged_model, staging / AVERAGED_MODEL)


def _attempt(action: Callable[[], None]) -> Optional[BaseException]:
    """The error `action` raised, if any."""
    try:
        action()
    except Exception as err:  # handed to raise_together, which raises it on this process and stops the others
        return err
    return None


# Their earlier names.
MergeCheckpoints, last_merge_checkpoint, load_merge_checkpoint = (
    AveragingCheckpoints, last_averaging_checkpoint, load_averaging_checkpoint)
