"""Mask engines inside `transformers.Trainer`."""

from __future__ import annotations

from transformers import TrainerCallback

from .engine import MaskEngine


class SparseTrainingCallback(TrainerCallback):
    """Runs `engine.step()` after each optimizer step of a Trainer, with the Trainer's optimizer.

    Build the engine on the model before creating the Trainer; `Trainer(..., callbacks=[SparseTrainingCallback(engine)])`.
    """

    def __init__(self, engine: MaskEngine):
        self.engine = engine

    def on_train_begin(self, args, state, control, optimizer=None, **kwargs):
        self.engine.bind(optimizer)
        if getattr(self.engine, "total_steps", 0) is None:
            self.engine.total_steps = state.max_steps

    def on_step_end(self, args, state, control, optimizer=None, **kwargs):
        self.engine.step(optimizer)
