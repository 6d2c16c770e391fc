"""Continue a `fish-peft train` run that died (SIGKILL, preemption, Ctrl-C) from its last complete checkpoint.

A run keeps Trainer checkpoints in `OUTPUT_DIR/checkpoints` (every epoch, and every `save_steps` optimizer steps):
the adapter, optimizer, scheduler, RNG states and the Trainer's state, whose `trainer_state.json` is written last.
A checkpoint without it, or whose adapter does not decode, was cut off mid-save and is passed over. The recipe the
run started with is kept next to them; `--resume` refuses a recipe that differs from it, since the result would
then match neither run. So is the mask it started with, which is read back rather than computed again.

An evolving diff (`mask_update`) also needs its engine's state, which `SparseTrainingCallback` writes into each
checkpoint after the Trainer's files: a checkpoint without it is passed over too, and such runs keep the two
newest checkpoints, so the one before stays until the newest is whole. Periodic diff averaging (`merge_every`) runs
its own loop, which keeps checkpoints of its own there (`dynamic/averaging_checkpoints.py`).
"""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import yaml
from transformers import TrainerCallback

from fish_peft.utils.atomic_files import atomic_path
from fish_peft.tuner.config import FishConfig
from fish_peft.masks.fish_mask import FishMask
from fish_peft.dynamic.averaging_checkpoints import last_averaging_checkpoint, numbered_folders
from fish_peft.cli.recipe import TRAINING_ALIASES, Recipe
from fish_peft.dynamic.callback import ENGINE_STATE
from fish_peft.tuner.adapter_files import AdapterFileError, read_adapter_config, read_adapter_mask

CHECKPOINTS = "checkpoints"
RUN_RECIPE = "run_recipe.yaml"
RUN_MASK = "run_mask.safetensors"
COMPLETE_MARKER = "trainer_state.json"
# Keys that may differ between the interrupted run and the resumed one without changing what is computed.
FREE_KEYS = ("output_dir", "methods", "lr_by_method", "batch_size_by_method")


class StepCheckpoints(TrainerCallback):
    """Ask the Trainer for a checkpoint every `every` optimizer steps (epoch ends are checkpointed anyway)."""

    def __init__(self, every: int):
        self.every = every

    def on_step_end(self, args, state, control, **kwargs):
        if state.global_step % self.every == 0:
            control.should_save = True


def remember_recipe(recipe: Recipe, out: Path) -> None:
    """Keep the recipe a run starts with, for `--resume` to compare against."""
    with atomic_path(str(out / CHECKPOINTS / RUN_RECIPE)) as tmp:
        Path(tmp).write_text(recipe.to_yaml())


def remember_mask(mask: FishMask, out: Path) -> None:
    """Keep the mask a run starts with, for `--resume` to build the same adapter without computing it again."""
    mask.save(str(out / CHECKPOINTS / RUN_MASK))


def run_mask(out: Path) -> FishMask:
    """The mask the interrupted run in `out` started with."""
    path = out / CHECKPOINTS / RUN_MASK
    if not path.is_file():
        raise FileNotFoundError(f"{path} is missing, so the run's mask is unknown; start again with --overwrite.")
    return FishMask.load(str(path))


def interrupted(out: Path) -> bool:
    """Whether `out` holds a run that trained and died: its recipe and a checkpoint to continue from. A run that
    stopped before its first checkpoint (an error or a kill in its first steps; before fish-peft kept the recipe
    only once training starts, also bad data or a mask that could not be computed) left nothing worth continuing,
    so a new run simply starts there."""
    folder = out / CHECKPOINTS
    if not (folder / RUN_RECIPE).is_file():
        return False
    return last_complete_checkpoint(folder) is not None or last_averaging_checkpoint(folder) is not None


def resume_point(recipe: Recipe, out: Path) -> Path:
    """The checkpoint to continue from, after checking that resuming `recipe` in `out` is sound."""
    saved_path = out / CHECKPOINTS / RUN_RECIPE
    if not saved_path.is_file():
        raise FileNotFoundError(f"Nothing to resume in {out}: no interrupted run of `fish-peft train` is there.")
    saved = {TRAINING_ALIASES.get(k, k): v for k, v in yaml.safe_load(saved_path.read_text()).items()}  # older runs' short names
    check_same_recipe(saved, recipe.to_dict(), FREE_KEYS)
    if recipe.merge_every is not None:
        checkpoint = last_averaging_checkpoint(out / CHECKPOINTS)
    else:
        checkpoint = last_complete_checkpoint(out / CHECKPOINTS, evolving=recipe.mask_update is not None)
    if checkpoint is None:
        raise FileNotFoundError(
            f"The interrupted run in {out} left no complete checkpoint (they are written at every epoch end and "
            "every save_steps steps), so there is nothing to continue: start again with --overwrite instead of --resume."
        )
    return checkpoint


def check_same_recipe(saved: dict, given: dict, free_keys: tuple[str, ...]) -> None:
    """Refuse to resume a run with a recipe other than the one it started with (but for `free_keys`)."""
    changed = sorted(k for k in {**saved, **given} if k not in free_keys and given.get(k) != saved.get(k))
    if changed:
        details = ", ".join(f"{k}: {saved.get(k)!r} -> {given.get(k)!r}" for k in changed)
        raise ValueError(
            f"--resume needs the recipe the run started with; these keys differ ({details}). Resume with the same "
            "recipe and overrides, or start again with --overwrite."
        )


def last_complete_checkpoint(folder: Path, evolving: bool = False) -> Optional[Path]:
    """The checkpoint with the most steps whose save finished and whose files load (with the engine state, for
    an `evolving` diff)."""
    for path in numbered_folders(folder, "checkpoint"):
        if _complete(path) and (not evolving or (path / ENGINE_STATE).is_file()):
            return path
    return None


def _complete(path: Path) -> bool:
    if not (path / COMPLETE_MARKER).is_file() or not (path / "optimizer.pt").is_file():
        return False
    if not (path / "adapter_config.json").is_file():
        return (path / "model.safetensors").is_file()
    try:
        if isinstance(read_adapter_config(path), FishConfig):
            read_adapter_mask(path)
    except (AdapterFileError, OSError):
        return False
    return True
