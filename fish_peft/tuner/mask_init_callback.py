"""`FishMaskInitCallback`: a Trainer computes the mask of a `FishConfig(keep_ratio=...)` adapter from its own training
data when training begins."""

from __future__ import annotations

from torch import nn
from torch.utils.data import DataLoader
from transformers import TrainerCallback

from fish_peft.distributed.processes import rank_and_world
from fish_peft.tuner.mask_initialization import adapters_awaiting_masks, initialize_fish_mask


class FishMaskInitCallback(TrainerCallback):
    """When training begins, initializes the mask of every FISH adapter of the Trainer's model that awaits one (made
    from `FishConfig(keep_ratio=...)`, as `SFTTrainer(peft_config=...)` makes it), with `initialize_fish_mask` on the
    Trainer's training data in order, collated by the Trainer's collator: the labels it builds (-100 outside a
    completion) are the Fisher's labels too.

    The Trainer has built its optimizer by then. It trains the mask's values, which are the Parameter objects the
    adapter was created with, resized; the parameters that got no entries leave it, so its checkpoints hold the same
    parameters as an optimizer built for the adapter loaded from one. In several processes the Trainer has wrapped
    the model in DDP by then, which fixes the parameters' sizes, so this callback refuses; call `initialize_fish_mask`
    on every process before `trainer.train()` instead. Keyword arguments go to `compute_fisher`.
    """

    def __init__(self, **fisher_kwargs):
        self.fisher_kwargs = fisher_kwargs

    def on_train_begin(self, args, state, control, model=None, optimizer=None, train_dataloader=None, **kwargs):
        waiting = adapters_awaiting_masks(model)
        if not waiting:
            return
        if rank_and_world()[1] > 1:
            raise RuntimeError(
                "FishMaskInitCallback cannot initialize the FISH mask in several processes: the Trainer has wrapped "
                "the model in DDP, which fixes the size of every parameter. On every process, before trainer.train(), "
                "call fish_peft.initialize_fish_mask(trainer.model, DataLoader(trainer.train_dataset, batch_size=8, "
                "collate_fn=trainer.data_collator)) (the processes share the Fisher's examples)."
            )
        # A loader of its own: the Trainer's is Accelerate's, which a pass cut short would leave marked as running.
        data = DataLoader(train_dataloader.dataset, batch_size=args.per_device_train_batch_size, collate_fn=train_dataloader.collate_fn)
        for adapter_name in waiting:
            initialize_fish_mask(model, data, adapter_name, **self.fisher_kwargs)
        if optimizer is not None:
            _drop_parameters_not_in(optimizer, model)


def _drop_parameters_not_in(optimizer, model: nn.Module) -> None:
    """The optimizer keeps only the model's own parameters, in their order."""
    alive = {id(p) for p in model.parameters()}
    for group in optimizer.param_groups:
        group["params"][:] = [p for p in group["params"] if id(p) in alive]
