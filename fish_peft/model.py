"""`FishModel`: the PEFT tuner that injects sparse-diff layers where the mask says."""

from __future__ import annotations

import copy

import torch
from peft.tuners.tuners_utils import BaseTuner, BaseTunerLayer, _get_submodules
from torch import nn

from .config import SAVE_DTYPES, FishConfig
from .distributed import check_same_everywhere, tensors_digest
from .layer import FishLayer, FishTiedLayer
from .packing import PACKED_KEYS, VALUES_KEY, PackingError, pack, stored_counts
from .selection import in_modules
from .validation import AdapterFileError, check_head_shapes, unpack_adapter_state_dict


class FishModel(BaseTuner):
    """Adds FISH sparse diffs to a model: every module that owns a masked parameter is wrapped in a `FishLayer`.

    Created by `get_peft_model(model, FishConfig(mask=...))` or `PeftModel.from_pretrained(model, path)` after
    `import fish_peft`; merging, unloading, disabling and several adapters behave as for LoRA.
    """

    prefix: str = "fish_"
    tuner_layer_cls = FishLayer
    target_module_mapping: dict = {}

    def _prepare_adapter_config(self, peft_config: FishConfig, model_config: dict) -> FishConfig:
        return peft_config  # targets come from the mask, not from an architecture table

    @staticmethod
    def _check_target_module_exists(peft_config: FishConfig, key: str) -> bool:
        return key in peft_config.module_parameters()

    def _pre_injection_hook(self, model: nn.Module, config: FishConfig, adapter_name: str) -> None:
        """Refuse a base model that does not match the adapter (or its file) before any module is replaced."""
        check_model_matches_config(model, config)
        if getattr(config, "_head_shapes", None) is not None:
            check_head_shapes(config._head_shapes, model, config)
        if len(self.peft_config) == 1:  # remembered so that a failed load can hand the model back as it came
            self.base_requires_grad = {name: p.requires_grad for name, p in model.named_parameters()}
        if config.mask is None:  # injected to be loaded: placeholders until the file's entries arrive
            self.__dict__.setdefault("awaiting_weights", set()).add(adapter_name)

    def _create_and_replace(self, peft_config, adapter_name, target, target_name, parent, current_key, **kwargs):
        indices = _module_indices(peft_config, current_key)
        evolving = peft_config.mask_update is not None
        if isinstance(target, FishLayer):
            target.update_layer(adapter_name, indices, evolving)
        elif isinstance(target, FishTiedLayer):
            raise ValueError(
                f"'{current_key}' shares its weights with another adapted module; put the shared parameter in the "
                "mask once, under the name model.named_parameters() gives it."
            )
        else:
            new_module = FishLayer(target, adapter_name, indices, evolving)
            if adapter_name not in self.active_adapters:
                new_module.requires_grad_(False)
            self._replace_module(parent, target_name, new_module, target)

    def _post_injection_hook(self, model: nn.Module, config: FishConfig, adapter_name: str) -> None:
        _wrap_tied_modules(model)

    @property
    def _ddp_params_and_buffers_to_ignore(self) -> list[str]:
        """What DDP, when it wraps the PeftModel (it finds this attribute through PeftModel's forwarding), must leave
        alone: the index buffers, which would otherwise be broadcast before every forward though they never change
        in a step, and the values an evolving diff averages itself. DDP reads it once, in every process at once, so
        this is also where the processes check that they hold the same masks."""
        indices = {name: b for name, b in self.named_buffers() if ".fish_indices." in name or ".fish_explore_indices." in name}
        check_same_everywhere(tensors_digest(indices), "FISH mask (the adapters' indices)")
        ignored = list(indices)
        for module_name, module in self.named_modules():
            if isinstance(module, FishLayer) and module.gradient_traffic is not None:
                ignored += [f"{module_name}.{name}" for name, _ in module.named_parameters() if name.startswith("fish_")]
        return [f"base_model.{name}" for name in ignored]

    @classmethod
    def _get_adapter_state_dict(cls, model, config, adapter_name, state_dict, unwanted_adapter_names):
        """The head as PEFT saves it, plus the sparse diff packed into three tensors (see `packing.py`)."""
        selected = super()._get_adapter_state_dict(model, config, adapter_name, state_dict, unwanted_adapter_names)
        entries, rest = {}, {}
        for key, tensor in selected.items():
            if ".fish_explore_" in key:
                continue  # a Top-KAST diff's exploration entries are training state, not part of the adapter
            module, kind, attr = _split_fish_key(key, adapter_name)
            if kind is None:
                rest[key] = tensor
            elif kind == "values":
                entries.setdefault(f"{module}.{attr}", [None, None])[1] = tensor
            else:
                entries.setdefault(f"{module}.{attr}", [None, None])[0] = tensor
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
            result = unpack_adapter_state_dict({**rest, **packed}, shapes, decoding, adapter_name)
        except AdapterFileError:
            if adapter_name in awaiting:
                _discard_adapter(model, adapter_name)
            raise
        config.sparse_parameters = counts
        awaiting.discard(adapter_name)
        return result


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
    params = dict(model.named_parameters())
    missing = [name for name in config.sparse_parameters if name not in params]
    if missing:
        shown = ", ".join(missing[:5]) + (" ..." if len(missing) > 5 else "")
        raise ValueError(
            f"The mask/adapter names {len(missing)} parameter(s) this model does not have ({shown}). Use the base "
            "model the mask was computed on (see base_model_name_or_path in adapter_config.json)."
        )
    for name, shape in config.parameter_shapes.items():
        if list(params[name].shape) != list(shape):
            raise ValueError(
                f"The adapter was made for a base model whose '{name}' has shape {list(shape)}, but this model's has "
                f"{list(params[name].shape)}. Load the adapter onto the base model it was trained on."
            )
    for module_name in config.module_parameters():
        if module_name == "":
            raise ValueError("Parameters owned directly by the root model cannot be adapted; exclude them from the mask.")
    heads = config.modules_to_save or []
    in_head = [n for n in config.sparse_parameters if in_modules(n, heads)]
    if in_head:
        raise ValueError(
            f"{in_head[0]} is both in the sparse mask and in modules_to_save={heads}; a head module is trained in "
            "full, so leave it out of the mask (compute_fisher_mask does this when told the same modules_to_save)."
        )
    owners = set(config.module_parameters())
    for owner in owners:
        nested = [o for o in owners if o.startswith(owner + ".")]
        if nested:
            raise ValueError(
                f"Module '{owner}' owns adapted parameters and so does its submodule '{nested[0]}'; fish-peft adapts "
                "parameters of modules that contain no other adapted module. Exclude one of them from the mask."
            )


def _module_indices(config: FishConfig, module_name: str) -> dict[str, torch.Tensor]:
    """The indices of each adapted parameter of `module_name`: from the mask, or placeholders to be loaded."""
    indices = {}
    for attr in config.module_parameters()[module_name]:
        name = f"{module_name}.{attr}"
        if config.mask is not None:
            indices[attr] = config.mask[name]
        else:  # loading: the real indices arrive with the adapter file and are validated there
            indices[attr] = torch.arange(config.sparse_parameters[name])
    return indices


def _wrap_tied_modules(model: nn.Module) -> None:
    """Wrap modules holding a parameter that a FishLayer's module also holds, so the diff reaches every use."""
    owners: dict[int, tuple[FishLayer, str]] = {}
    for module in model.modules():
        if isinstance(module, FishLayer):
            for param_name, param in module.get_base_layer().named_parameters(recurse=False):
                owners[id(param)] = (module, param_name)
    tuners = {name for name, m in model.named_modules() if isinstance(m, BaseTunerLayer)}
    for name, module in list(model.named_modules()):
        ancestors = (name.rsplit(".", depth)[0] for depth in range(1, name.count(".") + 1))
        if name in tuners or any(a in tuners for a in ancestors):
            continue
        tied = {}
        sources = set()
        for param_name, param in module.named_parameters(recurse=False):
            if id(param) in owners:
                source, source_param = owners[id(param)]
                tied[param_name] = source_param
                sources.add(id(source))
        if not tied:
            continue
        if len(sources) > 1:
            raise ValueError(f"'{name}' shares parameters with several adapted modules; fish-peft supports one.")
        parent, _, target_name = _get_submodules(model, name)
        setattr(parent, target_name, FishTiedLayer(module, source, tied))


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

