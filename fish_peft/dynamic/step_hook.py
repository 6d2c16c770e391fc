"""Engines that act just before optimizer steps (Top-KAST's penalty), through one process-wide step pre-hook.

A hook on the optimizer alone would miss the steps taken before the engine learns of it: scripts build the engine
before the optimizer and hand the optimizer to `engine.step()` after its first step (and again after a resume).
So the hook watches every optimizer step: an engine with no optimizer yet binds the first one that trains its
tensors, and each engine acts before the steps of its own optimizer only, once per step however many backwards
the step sums. Engines are held weakly: a dropped engine stops acting.
"""

from __future__ import annotations

import weakref

import torch
from torch.optim.optimizer import register_optimizer_step_pre_hook

_ENGINES: weakref.WeakSet = weakref.WeakSet()
_HOOK: list = []  # the one registered hook's handle, once an engine exists


def watch(engine) -> None:
    """Call `engine._before_optimizer_step()` before each step of its optimizer from now on (once it is built)."""
    if not _HOOK:
        _HOOK.append(register_optimizer_step_pre_hook(_before_step))
    _ENGINES.add(engine)


def unwatch(engine) -> None:
    """Stop acting for `engine` (it is spent)."""
    _ENGINES.discard(engine)


def _before_step(optimizer: torch.optim.Optimizer, args, kwargs) -> None:
    """Bind engines that have no optimizer to this one if it trains their tensors (a binding error surfaces here, at
    the first step, as `engine.step(optimizer)` would raise it just after); then let this optimizer's engines act."""
    for engine in list(_ENGINES):
        if engine.optimizer is None and any(_trains(optimizer, p) for p in engine.trained_parameters()[:1]):
            engine.bind(optimizer)
        if engine.optimizer is optimizer:
            engine._before_optimizer_step()


def _trains(optimizer: torch.optim.Optimizer, parameter: torch.Tensor) -> bool:
    return any(p is parameter for group in optimizer.param_groups for p in group["params"])
