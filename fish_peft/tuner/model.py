"""`FishModel`: the PEFT tuner that injects sparse-diff layers where the mask says."""

from __future__ import annotations

import copy
import weakref
from collections.abc import Iterable
from typing import Optional

import torch
from peft.tuners.tuners_utils import BaseTuner, BaseTunerLayer
from peft.utils.other import AuxiliaryTrainingWrapper
from torch import nn
from torch.nn.parallel import DistributedDataParallel

from fish_peft.tuner.config import SAVE_DTYPES, FishConfig
from fish_peft.distributed.processes import check_same_everywhere, tensors_digest
from fish_peft.tuner.layer import FishLayer, parameter_name
from fish_peft.tuner.tied_layer import FishTiedLayer, wrap_tied_modules
from fish_peft.tuner.packing import PACKED_KEYS, VALUES_KEY, PackingError, pack, stored_counts
from fish_peft.masks.selection import base_named_parameters, in_modules
from fish_peft.tuner.adapter_files import AdapterFileError, check_head_shapes, unpack_adapter_state_dict
from fish_peft.tuner.quantized_bases import (
    check_mergeable,
    check_quantized_plan,
    check_quantized_targets,
    fish_layer_class,
    parameter_shape,
)
from fish_peft.tuner.target_modules import (
    check_budget,
    check_mask_in_targets,
    default_modules_to_save,
    eligible_parameters,
    excluded_module,
    token_row_shapes,
)


class FishModel(BaseTuner):
    """Adds FISH sparse diffs to a model: every module that owns a masked parameter is wrapped in a `FishLayer`.

    Created by `get_peft_model(model, FishConfig(mask=...))` or `PeftModel.from_pretrained(model, path)` after
    `import fish_peft`; merging, unloading, disabling and several adapters behave as for LoRA. A
    `FishConfig(keep_ratio=...)` adapter awaits its mask: every module that may hold entries is wrapped with none, and
    `initialize_fish_mask` fills them in; until then training or saving it raises.
    """

    prefix: str = "fish_"
    tuner_layer_cls = FishLayer
    target_module_mapping: dict = {}
    _injection_plan: Optional[dict[str, list[str]]] = None

    def _prepare_adapter_config(self, peft_config: FishConfig, model_config: dict) -> FishConfig:
        return peft_config  # targets come from the mask, not from an architecture table

    def inject_adapter(self, model: nn.Module, adapter_name: str, **kwargs) -> None:
        """PEFT's injection, with FISH's checks first and tied modules wrapped after, for the first adapter
        (`get_peft_model`, `from_pretrained`) and for every later one (`add_adapter`, `load_adapter`) alike."""
        config = self.peft_config[adapter_name]
        if config.awaits_mask:  # a keep_ratio config: every module that may hold entries, wrapped with none yet
            default_modules_to_save(model, config)
            eligible = eligible_parameters(model, config)
            check_quantized_targets(model, config, eligible)  # bitsandbytes weights: see quantized_bases.py
            check_budget(model, config, eligible)
        else:
            check_quantized_targets(model, config, config.sparse_parameters)
            check_model_matches_config(model, config)
            check_mask_in_targets(model, config)
            eligible = config.sparse_parameters
        if getattr(config, "_head_shapes", None) is not None:
            check_head_shapes(config._head_shapes, model, config, token_row_shapes(model, config))
        if not any(isinstance(m, FishLayer) for m in model.modules()):  # so a failed load hands the model back as it came
            self.base_requires_grad = {name: p.requires_grad for name, p in model.named_parameters()}
        if config.mask is None and not config.awaits_mask:  # injected to be loaded: placeholders until the file's entries arrive
            self.__dict__.setdefault("awaiting_weights", set()).add(adapter_name)
        plan = adapted_modules(model, eligible)
        check_quantized_plan(model, plan)
        self._injection_plan = plan
        try:
            super().inject_adapter(model, adapter_name, **kwargs)
        finally:
            self._injection_plan = None
        wrap_tied_modules(model)
        layer = next(m for m in model.modules() if isinstance(m, FishLayer))
        self.__dict__["_fsdp_probe"] = weakref.ref(next(layer.get_base_layer().parameters()))

    def _check_target_module_exists(self, peft_config: FishConfig, key: str):
        """Whether `key` is wrapped (the injection plan decides), or PEFT's mark of a module `exclude_modules` excludes
        (PEFT reports on exclusions that matched nothing)."""
        plan = self._injection_plan or adapted_modules(self.model, peft_config.sparse_parameters)
        return key in plan or excluded_module(peft_config, key)

    def _create_and_replace(self, peft_config, adapter_name, target, target_name, parent, current_key, **kwargs):
        plan = self._injection_plan or adapted_modules(self.model, peft_config.sparse_parameters)
        indices = _module_indices(peft_config, current_key, plan[current_key])
        evolving = peft_config.mask_update is not None
        if isinstance(target, FishLayer):
            target.update_layer(adapter_name, indices, evolving, peft_config.init_weights)
        elif isinstance(target, FishTiedLayer):
            raise ValueError(
                f"'{current_key}' shares its weights with another adapted module; put the shared parameter in the "
                "mask once, under the name model.named_parameters() gives it."
            )
        else:
            new_module = fish_layer_class(target)(target, adapter_name, indices, evolving, peft_config.init_weights)
            if adapter_name not in self.active_adapters:
                new_module.requires_grad_(False)
            self._replace_module(parent, target_name, new_module, target)

    def _replace_module(self, parent: nn.Module, child_name: str, new_module: nn.Module, child: nn.Module) -> None:
        """Unloading puts the wrapped module back as it is: PEFT's default would copy `child.weight` into it, which
        modules without a `weight` (MultiheadAttention, GRU) do not have and wrapped modules do not need; nor do the
        embeddings that PEFT's TrainableTokens wrapped."""
        if isinstance(child, AuxiliaryTrainingWrapper) or (isinstance(child, BaseTunerLayer) and new_module is child.get_base_layer()):
            setattr(parent, child_name, new_module)
            return
        super()._replace_module(parent, child_name, new_module, child)

    def __init__(self, model: nn.Module, config, adapter_name: str, **kwargs):
        super().__init__(model, config, adapter_name, **kwargs)
        # on the wrapped model: PeftModel's forward calls it directly, not this tuner
        self._forward_checks = self.model.register_forward_pre_hook(self._before_forward)

    def _unload_and_optionally_merge(self, *args, **kwargs):
        if (args[0] if args else kwargs.get("merge", True)):  # before anything is unwrapped: no merge into a quantized weight
            check_mergeable(self.model, args[3] if len(args) > 3 else kwargs.get("adapter_names"))
        self._forward_checks.remove()
        return super()._unload_and_optionally_merge(*args, **kwargs)

    def _check_merge_allowed(self) -> None:
        super()._check_merge_allowed()
        check_mergeable(self.model)

    def _before_forward(self, *_) -> None:
        self._refuse_fsdp()
        self._refuse_training_without_mask()
        self._check_masks_agree_under_ddp()

    def _refuse_training_without_mask(self) -> None:
        """A training forward pass (training mode, gradients on) of a keep_ratio adapter before its mask exists would
        silently train nothing; the base model's inference is fine."""
        if self.model.training and torch.is_grad_enabled():
            waiting = [name for name in self.active_adapters if self.peft_config[name].awaits_mask]
            if waiting:
                raise RuntimeError(mask_missing_message(waiting[0], "train"))

    def _refuse_fsdp(self) -> None:
        """FSDP (with `use_orig_params=True`; without it FSDP refuses the frozen base itself) hands modules its own
        views of the parameters in forward, so calling a module with W + Δ changes nothing there: training would
        silently leave the model as it was. FSDP marks the parameters it takes over, which inside forward are
        already replaced by views, so an adapted base parameter is kept aside to be asked."""
        probe = self.__dict__.get("_fsdp_probe", lambda: None)()
        if getattr(probe, "_fsdp_flattened", False):
            raise ShardedParametersError(
                "FISH adapters cannot train under FSDP: FSDP substitutes its own views of the parameters in forward, "
                "so the sparse diff would be ignored. Train in several processes with DDP instead (`accelerate "
                "launch` with a multi-GPU config without FSDP, or Trainer without `fsdp=`); the adapter's values and "
                "optimizer state are a small fraction of the model, so only the frozen base model must fit on a device."
            )

    def _check_masks_agree_under_ddp(self) -> None:
        """The first time DDP runs this model to train, every process is in the same forward, so that is where
        the processes check that they hold the same masks (DDP is told not to sync the index buffers). Done once
        per DDP wrapper; never in attribute access, which one process alone may do."""
        ddp = DistributedDataParallel._get_active_ddp_module()
        if ddp is None or not (torch.is_grad_enabled() and self.model.training) or self.__dict__.get("_masks_checked_for") is ddp:
            return
        self.check_masks_agree()
        self.__dict__["_masks_checked_for"] = ddp

    def check_masks_agree(self) -> None:
        """Raise `ProcessMismatchError` on every process unless all hold the same adapters' indices. A collective:
        call it on every process at once (done for you the first time DDP trains the model)."""
        check_same_everywhere(tensors_digest(self._index_buffers()), "FISH mask (the adapters' indices)")

    def _index_buffers(self) -> dict[str, torch.Tensor]:
        return {name: b for name, b in self.named_buffers() if ".fish_indices." in name or ".fish_explore_indices." in name}

    @property
    def _ddp_params_and_buffers_to_ignore(self) -> list[str]:
        """What DDP, when it wraps the PeftModel (it finds this attribute through PeftModel's forwarding), must leave
        alone: the index buffers, which would otherwise be broadcast before every forward though they never change
        in a step, and the values an evolving diff averages itself."""
        ignored = list(self._index_buffers())
        for module_name, module in self.named_modules():
            if isinstance(module, FishLayer) and module.gradient_traffic is not None:
                ignored += [f"{module_name}.{name}" for name, _ in module.named_parameters() if name.startswith("fish_")]
        return [f"base_model.{name}" for name in ignored]

    @classmethod
    def _get_adapter_state_dict(cls, model, config, adapter_name, state_dict, unwanted_adapter_names):
        """The head as PEFT saves it, plus the sparse diff packed into three tensors (see `packing.py`)."""
        if config.awaits_mask:
            raise RuntimeError(mask_missing_message(adapter_name, "save"))
        selected = super()._get_adapter_state_dict(model, config, adapter_name, state_dict, unwanted_adapter_names)
        entries, rest = {}, {}
        for key, tensor in selected.items():
            if ".fish_explore_" in key:
                continue  # a Top-KAST diff's exploration entries are training state, not part of the adapter
            module, kind, attr = _split_fish_key(key, adapter_name)
            if kind is None:
                rest[key] = tensor
            else:
                entries.setdefault(f"{module}.{parameter_name(attr)}", [None, None])[kind == "values"] = tensor
        entries = {name.removeprefix("base_model.model."): tuple(pair) for name, pair in entries.items()}
        if config.mask_update is not None:  # an evolving diff's counts move; the config saved next says where they are
            config.sparse_parameters.update({name: int(indices.numel()) for name, (indices, _) in entries.items()})
        packed = pack(entries)
        if config.save_dtype is not None:
            dtype = SAVE_DTYPES[config.save_dtype]
            packed[VALUES_KEY] = packed[VALUES_KEY].to(dtype)
            rest = {k: v.to(dtype) if v.is_floating_point() else v for k, v in rest.items()}
        return {**rest, **packed}

    @classmethod
    def _remap_adapter_state_dict_for_load(cls, model, config, adapter_name, state_dict):
        """Unpack and validate the whole adapter file before anything is copied into the model. A file loaded into
        an adapter the model already holds (Trainer's `resume_from_checkpoint`) must hold its mask, except that an
        evolving adapter takes the file's counts (its support moved while it trained). A failed load takes a
        just-injected adapter out again and leaves an existing one as it was."""
        if config.awaits_mask:
            raise RuntimeError(mask_missing_message(adapter_name, "load a saved adapter into"))
        packed = {k: state_dict[k] for k in PACKED_KEYS if k in state_dict}
        rest = {k: v for k, v in state_dict.items() if k not in PACKED_KEYS}
        rest = super()._remap_adapter_state_dict_for_load(model, config, adapter_name, rest)
        tuner = getattr(model, "base_model", model)
        awaiting = getattr(tuner, "awaiting_weights", set())
        try:
            counts = _counts_to_load(packed, config, adapter_name, loaded_before=adapter_name not in awaiting)
            shapes = {key: tuple(value.shape) for key, value in model.state_dict().items()}
            decoding = copy.copy(config)
            decoding.sparse_parameters = counts
            result = unpack_adapter_state_dict({**rest, **packed}, shapes, decoding, adapter_name, _entry_owners(model))
        except AdapterFileError:
            if adapter_name in awaiting:
                _discard_adapter(model, adapter_name)
            raise
        config.sparse_parameters = counts
        awaiting.discard(adapter_name)
        return result


class ShardedParametersError(RuntimeError):
    """FISH adapters on parameters that FSDP shards."""


def mask_missing_message(adapter_name: str, action: str) -> str:
    """What to do when a keep_ratio adapter is used before `initialize_fish_mask`."""
    advice = (
        "To resume from a checkpoint, load it with PeftModel.from_pretrained(base_model, checkpoint, "
        "is_trainable=True) and give that model to the Trainer instead of a peft_config."
        if action.startswith("load")
        else "Compute it first: fish_peft.initialize_fish_mask(model, dataloader) on the training data, or pass "
        "callbacks=[fish_peft.FishMaskInitCallback()] to the Trainer, which does it when training begins."
    )
    return f"Cannot {action} FISH adapter '{adapter_name}': it was made from FishConfig(keep_ratio=...) and has no mask yet. {advice}"


def _counts_to_load(packed: dict[str, torch.Tensor], config: FishConfig, adapter_name: str, loaded_before: bool) -> dict[str, int]:
    """The per-parameter counts to decode the file with: its config's, or, for an evolving adapter already in the
    model, those the file stores."""
    try:
        stored = stored_counts(packed, config.sparse_parameters)
    except PackingError as err:
        raise AdapterFileError(str(err)) from None
    if stored is None or stored == config.sparse_parameters:
        return dict(config.sparse_parameters)
    if loaded_before and config.mask_update is None:
        changed = [name for name in stored if stored[name] != config.sparse_parameters[name]]
        raise AdapterFileError(
            f"The adapter file holds another mask than adapter '{adapter_name}' in the model ({len(changed)} parameter(s) "
            f"with other counts, e.g. {changed[0]}: {config.sparse_parameters[changed[0]]} -> {stored[changed[0]]}). Load "
            "it under a new adapter name (load_adapter(path, adapter_name='other')) or onto a fresh base model."
        )
    return stored if loaded_before else dict(config.sparse_parameters)  # a new adapter: its own config decides


def _split_fish_key(key: str, adapter_name: str):
    """'m.fish_values.<adapter>.weight' -> ('m', 'values', 'weight'); (None, None, None) for other keys."""
    for kind in ("values", "indices"):
        marker = f".fish_{kind}.{adapter_name}."
        if marker in key:
            module, _, attr = key.partition(marker)
            return module, kind, attr
    return None, None, None


def check_model_matches_config(model: nn.Module, config: FishConfig) -> None:
    """Every adapted parameter must exist with the shape the adapter was made for, and not belong to the head."""
    params = dict(base_named_parameters(model))
    missing = [name for name in config.sparse_parameters if name not in params]
    if missing:
        shown = ", ".join(missing[:5]) + (" ..." if len(missing) > 5 else "")
        raise ValueError(
            f"The mask/adapter names {len(missing)} parameter(s) this model does not have ({shown}). Use the base "
            "model the mask was computed on (see base_model_name_or_path in adapter_config.json)."
        )
    for name, shape in config.parameter_shapes.items():
        own = list(parameter_shape(model, name, params[name]))  # a quantized weight: its dequantized shape
        if own != list(shape):
            raise ValueError(
                f"The adapter was made for a base model whose '{name}' has shape {list(shape)}, but this model's has "
                f"{own}. Load the adapter onto the base model it was trained on."
            )
    at_root = [name for name in config.sparse_parameters if "." not in name]
    if at_root:
        raise ValueError(
            f"'{at_root[0]}' is owned directly by the root model, which cannot be wrapped; exclude it from the mask."
        )
    heads = config.modules_to_save or []
    in_head = [n for n in config.sparse_parameters if in_modules(n, heads)]
    if in_head:
        raise ValueError(
            f"{in_head[0]} is both in the sparse mask and in modules_to_save={heads}; a head module is trained in "
            "full, so leave it out of the mask (compute_fisher_mask does this when told the same modules_to_save)."
        )


def _module_indices(config: FishConfig, module_name: str, param_names: list[str]) -> dict[str, torch.Tensor]:
    """The indices of each parameter `module_name` adapts (names relative to it): from the mask, placeholders that
    the adapter file's entries replace (validated there), or none for an adapter awaiting its mask."""
    indices = {}
    for attr in param_names:
        name = f"{module_name}.{attr}"
        if config.mask is not None:
            indices[attr] = config.mask[name]
        else:  # loaded next, or (a keep_ratio config) none until the mask is initialized
            indices[attr] = torch.arange(config.sparse_parameters.get(name, 0))
    return indices


# Modules whose forward reads a submodule's parameters instead of calling the submodule: the diff of such a parameter
# is applied around the parent's forward.
READS_CHILD_PARAMETERS: dict[type, tuple[str, ...]] = {nn.MultiheadAttention: ("out_proj",)}


def adapted_modules(model: nn.Module, parameter_names: Iterable[str]) -> dict[str, list[str]]:
    """Around which module's forward each parameter's diff is applied: {module name: [parameter names relative to
    it]}. Usually the module owning the parameter; its parent where the parent reads it directly
    (`READS_CHILD_PARAMETERS`); and the outermost of nested candidates (ViT's embeddings own `cls_token` and contain
    the patch projection), including modules that other adapters already wrap, so that layers never nest."""
    existing = {name for name, module in model.named_modules() if isinstance(module, FishLayer)}
    owners = {name: _forward_owner(model, name.rpartition(".")[0]) for name in parameter_names}
    candidates = set(owners.values()) | existing
    plan: dict[str, list[str]] = {}
    for name, owner in owners.items():
        outer = min((c for c in candidates if owner == c or owner.startswith(f"{c}.")), key=len)
        plan.setdefault(outer, []).append(name[len(outer) + 1 :])
    for outer in plan.keys() - existing:
        inner = next((layer for layer in existing if layer.startswith(f"{outer}.")), None)
        if inner is not None:
            raise ValueError(
                f"This adapter changes parameters of '{outer}' itself, which contains '{inner}', already adapted by "
                "another adapter; fish-peft does not nest its layers. Add the adapter that touches "
                f"'{outer}' first, or leave '{outer}''s own parameters out of this mask."
            )
    return plan


def _forward_owner(model: nn.Module, module_name: str) -> str:
    """The module whose forward uses the parameters of `module_name`: itself, or a parent that reads them."""
    parent_name, _, child = module_name.rpartition(".")
    if not module_name:
        return module_name
    parent = model.get_submodule(parent_name) if parent_name else model
    if isinstance(parent, BaseTunerLayer):
        parent = parent.get_base_layer()
    readers = [children for cls, children in READS_CHILD_PARAMETERS.items() if isinstance(parent, cls)]
    return parent_name if any(child in children for children in readers) else module_name


def _entry_owners(model: nn.Module) -> dict[str, tuple[str, str]]:
    """{adapted parameter name without PEFT's prefixes: (the FishLayer's module name, name relative to it)}."""
    owners = {}
    for module_name, module in model.named_modules():
        if isinstance(module, FishLayer):
            for adapter_name in module.fish_values:
                for attr in module.adapted_parameters(adapter_name):
                    owners[f"{module_name.removeprefix('base_model.model.')}.{attr}"] = (module_name, attr)
    return owners


def _discard_adapter(model: nn.Module, adapter_name: str) -> None:
    """Take a half-loaded adapter out again so a failed load leaves the base model as it was."""
    tuner = getattr(model, "base_model", None)
    if not isinstance(tuner, FishModel) or adapter_name not in tuner.peft_config:
        return  # layers injected without a PeftModel: the caller owns that model
    if len(tuner.peft_config) > 1:
        model.delete_adapter(adapter_name)
        return
    base = tuner.unload()
    for name, param in base.named_parameters():
        param.requires_grad_(tuner.base_requires_grad.get(name, param.requires_grad))

