"""Mask engines inside `transformers.Trainer`, including its checkpoints and `resume_from_checkpoint`."""

from __future__ import annotations

import os

import torch
from transformers import TrainerCallback

from fish_peft.utils.atomic_files import atomic_path
from fish_peft.dynamic.engine import MaskEngine
from fish_peft.dynamic.targets import SparseTrainingError

ENGINE_STATE = "fish_engine_state.pt"


class SparseTrainingCallback(TrainerCallback):
    """Runs `engine.step()` after each optimizer step of a Trainer, with the Trainer's optimizer: once per step
    whatever `gradient_accumulation_steps` (Top-KAST's penalty, too, enters each step once).

    Build the engine on the model before creating the Trainer; `Trainer(..., callbacks=[SparseTrainingCallback(engine)])`.
    The engine's state is written into every checkpoint as `fish_engine_state.pt`; when
    `trainer.train(resume_from_checkpoint=...)` continues at step N, the engine takes it back from the checkpoint of
    step N in `output_dir` (or call `engine.load_state_dict(load_engine_state(folder))` first for one elsewhere).
    """

    def __init__(self, engine: MaskEngine):
        self.engine = engine

    def on_train_begin(self, args, state, control, optimizer=None, **kwargs):
        self.engine.bind(optimizer)
        if getattr(self.engine, "total_steps", 0) is None:
            self.engine.total_steps = state.max_steps
        if state.global_step != self.engine.steps:
            self.engine.load_state_dict(load_engine_state(checkpoint_folder(args, state)))

    def on_step_end(self, args, state, control, optimizer=None, **kwargs):
        self.engine.step(optimizer)

    def on_save(self, args, state, control, **kwargs):
        if state.is_world_process_zero:
            with atomic_path(os.path.join(checkpoint_folder(args, state), ENGINE_STATE)) as tmp:
                torch.save(self.engine.state_dict(), tmp)


def checkpoint_folder(args, state) -> str:
    """Where the Trainer keeps the checkpoint of the current step."""
    return os.path.join(args.output_dir, f"checkpoint-{state.global_step}")


def load_engine_state(folder: str) -> dict:
    """The engine state `SparseTrainingCallback` saved in the checkpoint `folder`."""
    path = os.path.join(folder, ENGINE_STATE)
    if not os.path.isfile(path):
        raise SparseTrainingError(
            f"Training resumes at the checkpoint {folder}, which holds no {ENGINE_STATE}: the mask engine's state (step, "
            "schedule, exploration entries) is saved there by SparseTrainingCallback. Resume from a checkpoint written "
            "with it, or call engine.load_state_dict(load_engine_state(folder)) before trainer.train()."
        )
    return torch.load(path, map_location="cpu", weights_only=True)
