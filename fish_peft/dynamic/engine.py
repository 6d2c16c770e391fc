"""What every mask engine shares: the optimizer, the step count and the schedule of mask updates. Call
`engine.step()` after every `optimizer.step()` (inside Accelerate's `accumulate`, after every micro-batch's: the
engine counts only the steps the optimizer really takes). `NetworkMaskEngine` adds the sparse weights of a whole
network and their densities (Top-KAST, sparse momentum, the static control); the evolving FISH diffs build on
`MaskEngine`."""

from __future__ import annotations

import time
from abc import ABC, abstractmethod
from typing import Optional, Sequence

import torch
from torch import nn

from fish_peft.distributed.processes import check_same_everywhere, tensors_digest
from fish_peft.dynamic.densities import layer_densities
from fish_peft.dynamic.optimizer_state import groups_of, unwrap_optimizer
from fish_peft.dynamic.targets import DEFAULT_SPARSE_MODULES, SparseTrainingError, find_sparse_weights


class MaskEngine(ABC):
    """Base class; subclasses bind an optimizer given to their constructor once their masks exist, define `masks`
    and `trained_parameters`, and may refine `_check_optimizer`, `_before_optimizer_step`, `_after_optimizer_step`,
    `_should_update` and `update_masks`."""

    def __init__(self, model: nn.Module, *, update_every: int):
        if not isinstance(update_every, int) or update_every < 1:
            raise SparseTrainingError(f"update_every must be a whole number of steps >= 1, got {update_every!r}.")
        self.model = model
        self.update_every = update_every
        self.steps = 0
        self.update_seconds = 0.0  # time spent in mask updates, for measuring their overhead
        self.optimizer: Optional[torch.optim.Optimizer] = None
        self._wrapper = None  # the optimizer as bound (Accelerate's wrapper knows whether a step is taken)

    @abstractmethod
    def trained_parameters(self) -> list[torch.Tensor]:
        """The tensors the optimizer must train for the engine to work."""

    def bind(self, optimizer) -> None:
        """Use `optimizer` (a torch optimizer, or Accelerate's / Trainer's wrapper around one) from now on."""
        wrapper, optimizer = optimizer, unwrap_optimizer(optimizer)
        groups_of(optimizer, self.trained_parameters())
        self._check_optimizer(optimizer)
        self.optimizer, self._wrapper = optimizer, wrapper

    def step(self, optimizer=None) -> bool:
        """Call after `optimizer.step()`. Keeps the sparsity and, every `update_every` steps, updates the masks;
        returns whether it did. A call while Accelerate accumulates (its `optimizer.step()` did nothing) does
        nothing."""
        if accumulating(optimizer if optimizer is not None else self._wrapper):
            return False
        if optimizer is not None and unwrap_optimizer(optimizer) is not self.optimizer:
            self.bind(optimizer)
        if self.optimizer is None:
            raise SparseTrainingError("The engine has no optimizer: pass it to the constructor, to bind() or to step().")
        self.steps += 1
        self._after_optimizer_step()
        if self.steps % self.update_every == 0 and self._should_update():
            started = time.perf_counter()
            self.update_masks()
            check_same_everywhere(self.mask_digest(), f"mask after update at step {self.steps}")
            self.update_seconds += time.perf_counter() - started
            return True
        return False

    @abstractmethod
    def masks(self) -> dict[str, torch.Tensor]:
        """{weight name: bool mask of the weights the forward pass uses}."""

    @abstractmethod
    def state_dict(self) -> dict:
        """What continuing a run needs besides the model, optimizer and schedule (Accelerate's
        `register_for_checkpointing`, `SparseTrainingCallback`'s checkpoints)."""

    @abstractmethod
    def load_state_dict(self, state: dict) -> None:
        """Continue from `state_dict()`."""

    def density(self) -> float:
        """The fraction of sparse-layer weights the forward pass uses."""
        masks = self.masks()
        return sum(int(m.sum()) for m in masks.values()) / sum(m.numel() for m in masks.values())

    def mask_digest(self) -> str:
        """A hash of every mask: equal on every process when the masks agree."""
        return tensors_digest(self.masks())

    def _should_update(self) -> bool:
        return True

    def _check_optimizer(self, optimizer: torch.optim.Optimizer) -> None:
        pass

    def _before_optimizer_step(self) -> None:
        """Runs just before each step of the engine's optimizer, once per step however many backwards it sums, in
        engines that `step_hook.watch` themselves once built."""

    def _after_optimizer_step(self) -> None:
        pass

    def update_masks(self) -> None:
        """Move the masks by the engine's rule (none here: a fixed mask)."""


def accumulating(optimizer) -> bool:
    """Whether `optimizer` is Accelerate's wrapper in the middle of gradient accumulation, so its step is skipped."""
    state = getattr(optimizer, "gradient_state", None)
    return state is not None and not state.sync_gradients


class NetworkMaskEngine(MaskEngine):
    """An engine over the sparse weights of a whole network, each layer at its share of the `density` budget."""

    def __init__(
        self,
        model: nn.Module,
        *,
        density: float,
        distribution: str,
        update_every: int,
        module_types: Sequence[type] = DEFAULT_SPARSE_MODULES,
        exclude: Optional[str] = None,
    ):
        super().__init__(model, update_every=update_every)
        self.weights = find_sparse_weights(model, module_types, exclude)
        self.densities = layer_densities({w.name: w.parameter.shape for w in self.weights}, density, distribution)
        self.density_target = density

    def trained_parameters(self) -> list[torch.Tensor]:
        return [w.parameter for w in self.weights]

    def state_dict(self) -> dict:
        """The step count and every mask, to continue a run (`accelerator.register_for_checkpointing(engine)`)."""
        return {
            "engine": type(self).__name__, "steps": self.steps, "update_seconds": self.update_seconds,
            "masks": {name: mask.detach().cpu().clone() for name, mask in self.masks().items()},
        }

    def load_state_dict(self, state: dict) -> None:
        """Continue from `state_dict()` of the same engine on the same network."""
        if state.get("engine") != type(self).__name__:
            raise SparseTrainingError(f"The engine state was saved by {state.get('engine')}, not {type(self).__name__}.")
        current = self.masks()
        if {n: tuple(m.shape) for n, m in state["masks"].items()} != {n: tuple(m.shape) for n, m in current.items()}:
            raise SparseTrainingError("The engine state's masks are for other weights than this network's sparse weights.")
        self.steps, self.update_seconds = state["steps"], state["update_seconds"]
        self._load_masks(state)

    @abstractmethod
    def _load_masks(self, state: dict) -> None:
        """Put the masks of `state` in place."""

    def export_dense(self) -> nn.Module:
        """The model as an ordinary dense model, zeros where weights are pruned (`save_pretrained` as usual)."""
        return self.model
