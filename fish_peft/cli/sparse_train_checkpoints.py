"""Epoch checkpoints of `fish-peft sparse-train`, for `--resume` after a crash.

After every epoch but the last, `accelerator.save_state` writes the model, optimizer, schedule, RNG states and the
mask engine (registered for checkpointing) into `.epoch-N.saving`, with the run's progress (per-epoch accuracy,
counters); the folder is renamed to `epoch-N` only when all of it is there, so a folder of that name is complete.
The recipe the run started with is kept beside them and `--resume` refuses another.
"""

from __future__ import annotations

import dataclasses
import json
import re
import shutil
from pathlib import Path
from typing import Any, Optional

from accelerate import Accelerator

from fish_peft.utils.atomic_files import atomic_path
from fish_peft.distributed.processes import rank_and_world
from fish_peft.cli.resume import check_same_recipe

CHECKPOINTS = "checkpoints"
RUN_RECIPE = "run_recipe.json"
PROGRESS = "progress.json"


class EpochCheckpoints:
    """The checkpoints of one run in `OUTPUT_DIR/checkpoints`; only the newest is kept."""

    def __init__(self, output_dir: str):
        self.folder = Path(output_dir) / CHECKPOINTS

    def interrupted(self) -> bool:
        return (self.folder / RUN_RECIPE).is_file()

    def start(self, recipe) -> None:
        """A new run: forget an earlier one's checkpoints, keep this recipe."""
        shutil.rmtree(self.folder, ignore_errors=True)
        with atomic_path(str(self.folder / RUN_RECIPE)) as tmp:
            Path(tmp).write_text(json.dumps(dataclasses.asdict(recipe), indent=2))

    def resume_point(self, recipe) -> Optional[Path]:
        """The newest complete checkpoint of the interrupted run (None if it ended before its first epoch), after
        checking that `recipe` is the one it started with."""
        if not self.interrupted():
            raise FileNotFoundError(f"Nothing to resume in {self.folder.parent}: no interrupted `fish-peft sparse-train` run is there.")
        saved = json.loads((self.folder / RUN_RECIPE).read_text())
        check_same_recipe(saved, dataclasses.asdict(recipe), free_keys=("output_dir",))
        found = [(int(m.group(1)), p) for p in self.folder.glob("epoch-*") if (m := re.fullmatch(r"epoch-(\d+)", p.name))]
        return max(found)[1] if found else None

    def save(self, accelerator: Accelerator, epochs_done: int, progress: dict[str, Any]) -> None:
        """Every process the Accelerator knows takes part (each saves its RNG state); the main one names the folder
        when it is whole. Processes it does not know (torch.distributed.run on CPU without MPI: each trains a whole
        replica) leave the saving to the first."""
        writer = writes_files(accelerator)
        if accelerator.num_processes == 1 and not writer:
            return
        staging, final = self.folder / f".epoch-{epochs_done}.saving", self.folder / f"epoch-{epochs_done}"
        if writer:
            shutil.rmtree(staging, ignore_errors=True)
            staging.mkdir(parents=True)
        accelerator.wait_for_everyone()
        accelerator.save_state(str(staging))
        accelerator.wait_for_everyone()
        if writer:
            (staging / PROGRESS).write_text(json.dumps(progress))
            staging.rename(final)
            for older in self.folder.glob("*epoch-*"):
                if older != final:
                    shutil.rmtree(older, ignore_errors=True)
        accelerator.wait_for_everyone()

    def finish(self) -> None:
        """The run ended and its results are saved: the checkpoints are no longer needed."""
        shutil.rmtree(self.folder, ignore_errors=True)


def writes_files(accelerator: Accelerator) -> bool:
    """Whether this process writes the run's files: the main process, and the first of the process group."""
    return accelerator.is_main_process and rank_and_world()[0] == 0


def load_progress(checkpoint: Path) -> dict[str, Any]:
    return json.loads((checkpoint / PROGRESS).read_text())
