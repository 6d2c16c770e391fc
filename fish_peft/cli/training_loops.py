"""How a run's adapter trains, chosen once per run (`training.training_loop`): Trainer's own loop; the same with an
evolving mask's engine as a Trainer callback, or with the FISH mask computed when training begins (SFT); or periodic
diff averaging's loop, which uses the Trainer only for its dataloader, optimizer and schedule. Each resumes from its
own kind of checkpoint and reports the same `Trained`."""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Optional

from torch.utils.data import DataLoader
from transformers import ProgressCallback, Trainer, TrainerCallback

from fish_peft.cli.averaged_training import averaged_mask, train_averaged
from fish_peft.cli.recipe import Recipe
from fish_peft.cli.resume import StepCheckpoints, remember_mask
from fish_peft.distributed.processes import rank_and_world
from fish_peft.dynamic import SparseTrainingCallback
from fish_peft.masks.fish_mask import FishMask
from fish_peft.tuner.mask_init_callback import FishMaskInitCallback
from fish_peft.tuner.mask_initialization import adapters_awaiting_masks, initialize_fish_mask


@dataclass
class Trained:
    """What a loop reports for results.json."""

    train_seconds: float
    mean_step_seconds: Optional[float]
    steps: int
    mask: Optional[FishMask]  # the support the adapter ends with
    mask_facts: dict[str, Any] = field(default_factory=dict)  # added to results["mask"]
    facts: dict[str, Any] = field(default_factory=dict)  # added to results


class StepTimer(TrainerCallback):
    """Wall time of every optimisation step."""

    def __init__(self):
        self.durations: list[float] = []
        self._start = 0.0

    def on_step_begin(self, args, state, control, **kwargs):
        self._start = time.perf_counter()

    def on_step_end(self, args, state, control, **kwargs):
        self.durations.append(time.perf_counter() - self._start)

    def mean(self) -> Optional[float]:
        return sum(self.durations) / len(self.durations) if self.durations else None


class NamedProgress(ProgressCallback):
    """Trainer's progress bar with the run's name (TrainingArguments' run_name: `compare` names each run by its
    method, and its learning rate or seed) as its description."""

    def on_train_begin(self, args, state, control, **kwargs):
        super().on_train_begin(args, state, control, **kwargs)
        if self.training_bar is not None:
            self.training_bar.set_description(args.run_name)


def name_progress_bar(trainer: Trainer) -> None:
    """Trainer's own progress bar replaced by one that shows `run_name`, when the run has one."""
    if trainer.args.run_name and trainer.pop_callback(ProgressCallback) is not None:
        trainer.add_callback(NamedProgress)


class TrainerLoop:
    """`Trainer.train`, timed, with a checkpoint every `save_steps` as well as every epoch; resumes from Trainer's
    checkpoints."""

    def __init__(self, recipe: Recipe, mask: Optional[FishMask], *extra_callbacks: TrainerCallback):
        self.mask = mask
        self.timer = StepTimer()
        self.callbacks = [self.timer, *extra_callbacks] + ([StepCheckpoints(recipe.save_steps)] if recipe.save_steps else [])

    def train(self, trainer: Trainer, checkpoint: Optional[Path]) -> Trained:
        name_progress_bar(trainer)
        output = trainer.train(resume_from_checkpoint=str(checkpoint) if checkpoint else None)
        mask = self.final_mask()
        seconds = output.metrics["train_runtime"]
        return Trained(seconds, self.timer.mean(), trainer.state.global_step, mask, self.mask_facts(mask))

    def final_mask(self) -> Optional[FishMask]:
        return self.mask

    def mask_facts(self, mask: Optional[FishMask]) -> dict[str, Any]:
        return {}


class EvolvingDiffLoop(TrainerLoop):
    """Trainer's loop with an evolving mask: its engine moves the entries from a callback (which also keeps its state
    in Trainer's checkpoints); the run ends with the engine's mask."""

    def __init__(self, recipe: Recipe, mask: FishMask, engine):
        super().__init__(recipe, mask, SparseTrainingCallback(engine))
        self.engine = engine

    def final_mask(self) -> FishMask:
        return self.engine.current_mask()

    def mask_facts(self, mask: FishMask) -> dict[str, Any]:
        return {"update_seconds": self.engine.update_seconds, "jaccard_with_initial": mask.jaccard(self.mask)}


class AveragedDiffLoop:
    """Periodic diff averaging (`merge_every`): every process trains apart and the diffs are averaged every N steps
    (`averaged_training.train_averaged`), with checkpoints of its own in `checkpoints`."""

    callbacks: list[TrainerCallback] = []  # its loop is not Trainer's, so Trainer's callbacks would never be called

    def __init__(self, recipe: Recipe, mask: FishMask, fisher_data: Callable[[], DataLoader], checkpoints: Path):
        self.recipe, self.mask, self.fisher_data, self.checkpoints = recipe, mask, fisher_data, checkpoints

    def train(self, trainer: Trainer, checkpoint: Optional[Path]) -> Trained:
        report = train_averaged(self.recipe, trainer.model, trainer, self.fisher_data, self.checkpoints, resume_from=checkpoint)
        mask = averaged_mask(trainer.model, self.mask)
        steps = report["merging"]["steps"]
        return Trained(report["train_seconds"], report["mean_step_seconds"], steps, mask, facts={"merging": report["merging"]})


class FisherAtTrainBegin(FishMaskInitCallback):
    """`FishMaskInitCallback` (the mask of a `FishConfig(keep_ratio=...)` adapter, from the Fisher of the Trainer's own
    loss on its own training batches, when training begins), timed, and its mask kept in the run's checkpoints
    folder for --resume."""

    def __init__(self, out: Path):
        super().__init__(progress=True)
        self.out = out
        self.mask: Optional[FishMask] = None
        self.seconds: Optional[float] = None

    def on_train_begin(self, args, state, control, model=None, **kwargs):
        if not adapters_awaiting_masks(model):
            return
        started = time.perf_counter()
        super().on_train_begin(args, state, control, model=model, **kwargs)
        self._done(model, started)

    def initialize_before_training(self, trainer: Trainer) -> None:
        """What the callback does, done before `trainer.train()`: in several processes, where DDP's wrapping fixes
        the parameters' sizes before the callback would run (every process then sums its share of the Fisher)."""
        started = time.perf_counter()
        data = DataLoader(trainer.train_dataset, batch_size=trainer.args.per_device_train_batch_size, collate_fn=trainer.data_collator)
        initialize_fish_mask(trainer.model, data, progress=True)
        self._done(trainer.model, started)

    def _done(self, model, started: float) -> None:
        self.seconds = time.perf_counter() - started
        self.mask = model.peft_config[model.active_adapter].mask
        if rank_and_world()[0] == 0:
            remember_mask(self.mask, self.out)


class LazyMaskLoop(TrainerLoop):
    """Trainer's loop for an adapter whose FISH mask the Trainer computes when training begins (`FisherAtTrainBegin`:
    SFT's fish); with a mask known beforehand (random, a resumed run) or none (lora, full), Trainer's loop alone."""

    def __init__(self, recipe, mask: Optional[FishMask], out: Path, *extra_callbacks: TrainerCallback):
        self.fisher = FisherAtTrainBegin(out) if recipe.method == "fish" and mask is None else None
        super().__init__(recipe, mask, *([self.fisher] if self.fisher else []), *extra_callbacks)

    def train(self, trainer: Trainer, checkpoint: Optional[Path]) -> Trained:
        if self.fisher and rank_and_world()[1] > 1:
            self.fisher.initialize_before_training(trainer)
        return super().train(trainer, checkpoint)

    @property
    def fisher_seconds(self) -> Optional[float]:
        return self.fisher.seconds if self.fisher else None

    def final_mask(self) -> Optional[FishMask]:
        return self.fisher.mask if self.fisher else self.mask
