"""`initialize_fish_mask`: the mask of a `FishConfig(keep_ratio=...)` adapter, computed from the Fisher of the base
weights and installed into the layers the adapter was given without entries."""

from __future__ import annotations

import warnings
from collections.abc import Iterable

from peft.tuners.tuners_utils import _get_submodules
from torch import nn

from fish_peft.masks.fish_mask import FishMask
from fish_peft.masks.selection import base_named_parameters, compute_fisher_mask
from fish_peft.tuner.config import FishConfig
from fish_peft.tuner.layer import FishLayer, storage_key
from fish_peft.tuner.tied_layer import FishTiedLayer
from fish_peft.tuner.model import FishModel
from fish_peft.tuner.target_modules import check_budget


def adapters_awaiting_masks(model: nn.Module) -> list[str]:
    """The FISH adapters of `model` (a PeftModel) made from `FishConfig(keep_ratio=...)` whose mask is not computed
    yet; [] for any other model."""
    tuner = getattr(model, "base_model", None)
    if not isinstance(tuner, FishModel):
        return []
    return [name for name, config in tuner.peft_config.items() if config.awaits_mask]


def initialize_fish_mask(model: nn.Module, dataloader: Iterable, adapter_name: str = "default", **fisher_kwargs) -> FishMask:
    """Compute and install the mask of adapter `adapter_name`, made from `FishConfig(keep_ratio=...)`.

    The Fisher is taken on the base weights (adapters disabled) with the model's own loss on the batches' `labels`,
    so labels of -100 (a prompt, under a completion-only loss) count for nothing, on the first `config.num_samples`
    examples (all of them if `dataloader` holds fewer). The mask is the config's budget among the parameters its
    `target_modules` allow (`compute_fisher_mask`'s global top-k, the head in `modules_to_save` counted against it).

    The values the mask picks go into the Parameter objects the adapter was created with, resized in place, so an
    optimizer built before (a Trainer's) trains them; AdamW makes its state at the first step. Parameters that get no
    entries leave the adapter, and modules left without any are unwrapped. The config then holds the mask's counts
    and shapes, and the adapter saves and loads as one made from a mask. In several processes, call it on every
    process before DDP wraps the model (the Fisher is summed across processes). Keyword arguments go to
    `compute_fisher` (e.g. `chunk_size`, `score_device="cpu"`, `progress=True`). Returns the mask.
    """
    tuner = getattr(model, "base_model", None)
    if not isinstance(tuner, FishModel) or adapter_name not in tuner.peft_config:
        raise ValueError(f"initialize_fish_mask expects a PeftModel holding the FISH adapter '{adapter_name}'.")
    config = tuner.peft_config[adapter_name]
    if not config.awaits_mask:
        raise ValueError(f"FISH adapter '{adapter_name}' already has its mask ({sum(config.sparse_parameters.values()):,} entries).")
    slots = _empty_slots(tuner.model, adapter_name)
    eligible = {name: param for name, param in base_named_parameters(tuner.model) if name in slots}
    check_budget(tuner.model, config, eligible)
    tuner.disable_adapter_layers()
    try:
        mask = compute_fisher_mask(
            tuner.model,
            dataloader,
            config.keep_ratio,
            _num_samples(dataloader, config.num_samples),
            modules_to_save=config.modules_to_save or None,
            eligible=lambda name, _param: name in eligible,
            fisher=config.fisher,
            score=config.score,
            **fisher_kwargs,
        )
    finally:
        tuner.enable_adapter_layers()
    _install(tuner, adapter_name, config, mask, slots)
    return mask


def _empty_slots(model: nn.Module, adapter_name: str) -> dict[str, tuple[str, FishLayer, str]]:
    """{parameter name in the bare model: (its layer's module name, the layer, name relative to the layer)} of every
    parameter the adapter may hold entries in."""
    return {
        f"{module_name}.{attr}": (module_name, module, attr)
        for module_name, module in model.named_modules()
        if isinstance(module, FishLayer)
        for attr in module.adapted_parameters(adapter_name)
    }


def _num_samples(dataloader: Iterable, wanted: int) -> int:
    """`wanted`, or every example of a dataloader that holds fewer (said in a warning); none is an error."""
    try:
        available = len(dataloader.dataset)
    except (AttributeError, TypeError):  # no dataset or no length: the Fisher pass finds out how many there are
        return wanted
    if available == 0:
        raise ValueError("The dataloader holds no examples; the FISH mask is computed from training data.")
    if available < wanted:
        warnings.warn(f"The Fisher is computed on all {available} training examples (FishConfig.num_samples={wanted}).", stacklevel=3)
    return min(available, wanted)


def _install(tuner: FishModel, adapter_name: str, config: FishConfig, mask: FishMask, slots: dict) -> None:
    """Fill the slots the mask names, drop the others (unwrapping modules left with no adapter), and record the mask
    in the config."""
    for name, (_, layer, attr) in slots.items():
        if name in mask:
            _fill(layer, adapter_name, attr, mask[name], config.init_weights)
        else:
            layer.remove_parameter(adapter_name, attr)
    emptied = {module_name: layer for module_name, layer, _ in slots.values() if not layer.adapted_parameters(adapter_name)}
    for module_name, layer in emptied.items():
        if not any(layer.adapted_parameters(other) for other in layer.fish_values if other != adapter_name):
            parent, _, child_name = _get_submodules(tuner.model, module_name)
            tuner._replace_module(parent, child_name, layer.get_base_layer(), layer)
            tuner.targeted_module_names.remove(module_name)
    _unwrap_orphaned_tied_layers(tuner)
    config.sparse_parameters = mask.counts()
    config.parameter_shapes = {name: list(shape) for name, shape in mask.shapes.items()}
    config.mask_info = dict(mask.info)
    config.mask = mask


def _fill(layer: FishLayer, adapter_name: str, attr: str, indices, init_weights: bool) -> None:
    """Give the parameter its entries: new values (zero, or random for tests) and indices made as for any adapter,
    the values moved into the Parameter object the adapter already had."""
    kept = layer.values(adapter_name, attr)
    layer.add_parameters(adapter_name, {attr: indices}, init_weights)
    kept.data = layer.values(adapter_name, attr).data
    kept.grad = None
    layer.fish_values[adapter_name][storage_key(attr)] = kept


def _unwrap_orphaned_tied_layers(tuner: FishModel) -> None:
    """A module tied to one that was unwrapped goes back to being itself."""
    layers = {id(m) for m in tuner.model.modules() if isinstance(m, FishLayer)}
    for module_name, module in list(tuner.model.named_modules()):
        if isinstance(module, FishTiedLayer) and id(module._source) not in layers:
            parent, _, child_name = _get_submodules(tuner.model, module_name)
            tuner._replace_module(parent, child_name, module.get_base_layer(), module)
