"""Base models whose Linear weights are stored quantized (bitsandbytes `Linear4bit`, `Linear8bitLt`): the sparse diff
stays in float32, a term of its own over the weight's dequantized (out, in) shape, never written into the packed
weight. What cannot be done on such a weight is refused with what to do instead:

- merging (`merge_and_unload`, `merge_adapter`): a 4-bit weight cannot hold an update of 1e-4 (requantizing rounds it
  away), so load the adapter onto the base model in bfloat16/float32 and merge there;
- a `FishConfig(keep_ratio=...)` adapter over a quantized weight (and `compute_fisher` on one, refused in
  masks/fisher.py): the Fisher is a gradient of float weights, so compute the mask on the base model in
  bfloat16/float32 and pass `FishConfig(mask=mask)`;
- an evolving diff (`mask_update`), which regrows by the dense gradient of W + Δ;
- any other weight that is not floating point (another quantization library): its logical shape is unknown here.

bitsandbytes is recognised by its class names (`Linear4bit`, its `LinearNF4`/`LinearFP4` subclasses, `Linear8bitLt`),
so nothing here imports it.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Optional

import torch
from peft.tuners.tuners_utils import BaseTunerLayer
from torch import nn
from torch.func import functional_call

from fish_peft.tuner.layer import FishLayer, index_dtype
from fish_peft.tuner.sparse_terms import CsrPattern, csr_pattern

QUANTIZED_LINEAR_CLASSES = {"Linear4bit": "4-bit", "Linear8bitLt": "8-bit"}  # bitsandbytes' class names
QUANTIZED_PARAMETER_CLASSES = ("Params4bit", "Int8Params")

LOAD_IN_FLOAT = (
    "load the base model in bfloat16 or float32 (without quantization_config), or keep these modules out of the adapter "
    "with exclude_modules=[...] / target_modules=[...]"
)


class QuantizedBaseError(ValueError):
    """What a FISH adapter cannot do on a quantized base weight, and what to do instead."""


def quantization_kind(module: nn.Module) -> Optional[str]:
    """"4-bit" or "8-bit" for a bitsandbytes quantized Linear (or one of its subclasses), else None."""
    for cls in type(module).__mro__:
        if cls.__name__ in QUANTIZED_LINEAR_CLASSES:
            return QUANTIZED_LINEAR_CLASSES[cls.__name__]
    return None


def is_quantized_tensor(tensor: torch.Tensor) -> bool:
    """A weight stored quantized: not floating point (packed 4-bit uint8, int8), or a bitsandbytes parameter."""
    return not tensor.is_floating_point() or type(tensor).__name__ in QUANTIZED_PARAMETER_CLASSES


def logical_weight_shape(module: nn.Module) -> tuple[int, int]:
    """The (out, in) shape of a quantized Linear's weight as it computes, whatever shape its storage has."""
    return int(module.out_features), int(module.in_features)


def parameter_shape(model: nn.Module, name: str, param: torch.Tensor) -> tuple[int, ...]:
    """The shape of parameter `name` (as `base_named_parameters` names it) as the module computes with it: the
    dequantized (out, in) of a bitsandbytes Linear's weight, else the parameter's own."""
    owner = _owner(model, name)
    if owner is not None and name.endswith(".weight") and quantization_kind(owner) is not None:
        return logical_weight_shape(owner)
    return tuple(param.shape)


def check_quantized_targets(model: nn.Module, config, names: Iterable[str]) -> None:
    """Refuse, before any module is wrapped, an adapter that would touch a quantized weight in a way fish-peft cannot
    compute correctly (see the module's docstring). `names`: the parameters (bare-model names) the adapter may
    change; names the model lacks are left to the other checks."""
    quantized = {}
    for name in names:
        param = _parameter(model, name)
        if param is None:
            continue
        owner = _owner(model, name)
        kind = quantization_kind(owner)
        if not is_quantized_tensor(param) and (kind is None or not name.endswith(".weight")):
            continue  # a float parameter (a bitsandbytes Linear's bias included)
        if kind is None or not name.endswith(".weight"):
            raise QuantizedBaseError(
                f"'{name}' is stored as {param.dtype} ({type(param).__name__}) by a {type(owner).__name__}, a "
                "quantization fish-peft does not know: a sparse diff needs the weight's float shape. Supported are "
                f"bitsandbytes Linear4bit and Linear8bitLt; otherwise {LOAD_IN_FLOAT}."
            )
        quantized[name] = kind
    if not quantized:
        return
    first, kind = next(iter(quantized.items()))
    shown = f"{len(quantized)} quantized weight(s), e.g. '{first}' ({kind} bitsandbytes)"
    if config.awaits_mask:
        raise QuantizedBaseError(
            f"FishConfig(keep_ratio=...) may put entries in {shown}, but its mask is computed from the Fisher, a "
            "gradient of float weights, which a quantized weight does not have. Compute the mask on the base model "
            "loaded in bfloat16 or float32 (mask = fish_peft.compute_fisher_mask(model, dataloader, keep_ratio, "
            "eligible=...)) and pass FishConfig(mask=mask) to the quantized model; or "
            f"{LOAD_IN_FLOAT}."
        )
    if config.mask_update is not None:
        raise QuantizedBaseError(
            f"FishConfig(mask_update={config.mask_update!r}) regrows entries by the dense gradient of W + Δ, which "
            f"{shown} cannot give. Use a fixed mask (mask_update=None) on a quantized base, or {LOAD_IN_FLOAT}."
        )


def check_quantized_plan(model: nn.Module, plan: dict[str, list[str]]) -> None:
    """A quantized weight's diff is applied only as its own Linear's term: refuse a plan (`adapted_modules`: {module
    wrapped: parameters relative to it}) that would apply it around an enclosing module."""
    for module_name, attrs in plan.items():
        for attr in attrs:
            param = _parameter(model, f"{module_name}.{attr}")
            if "." in attr and param is not None and is_quantized_tensor(param):
                raise QuantizedBaseError(
                    f"The diff of the quantized weight '{module_name}.{attr}' would be applied around '{module_name}', "
                    "which also holds adapted parameters of its own; fish-peft adds a quantized weight's diff only "
                    f"as its Linear's own term. Leave '{module_name}''s own parameters out of the mask, or "
                    f"{LOAD_IN_FLOAT}."
                )


def check_mergeable(model: nn.Module, adapter_names: Optional[Iterable[str]] = None) -> None:
    """Refuse to merge a diff into a quantized weight (before anything is merged or unwrapped)."""
    for module_name, module in model.named_modules():
        if isinstance(module, QuantizedFishLayer):
            module.check_mergeable(adapter_names, module_name)


def fish_layer_class(module: nn.Module) -> type[FishLayer]:
    """The FishLayer class that wraps `module`: `QuantizedFishLayer` around a bitsandbytes quantized Linear."""
    return QuantizedFishLayer if quantization_kind(module) is not None else FishLayer


class QuantizedFishLayer(FishLayer):
    """A `FishLayer` around a bitsandbytes `Linear4bit` / `Linear8bitLt`: the weight's diff is a float32 sparse term
    over the dequantized (out, in) shape, added to the quantized module's own output (rounded once to its dtype);
    the base weight is never read or written. Merging a weight diff is refused (`QuantizedBaseError`)."""

    @property
    def weight_shape(self) -> tuple[int, int]:
        return logical_weight_shape(self.get_base_layer())

    def add_parameters(self, adapter_name: str, indices: dict[str, torch.Tensor], init_weights: bool = True) -> None:
        """As `FishLayer.add_parameters` (values in float32, the weight being no float), with the weight's indices in
        the integer type its dequantized size needs, and test values (`init_weights=False`) of a fixed small scale,
        since the packed storage has no meaningful spread."""
        super().add_parameters(adapter_name, indices, init_weights)
        if "weight" in indices:
            stored = self.fish_indices[adapter_name]["weight"]
            self.fish_indices[adapter_name]["weight"] = stored.to(index_dtype(self.weight_shape[0] * self.weight_shape[1]))
            if not init_weights:
                with torch.no_grad():
                    self.values(adapter_name, "weight").normal_(std=0.02)

    def _csr_pattern(self, key: tuple[str, bool], indices: torch.Tensor) -> CsrPattern:
        """The weight's CSR pattern over its dequantized shape, cached as `FishLayer` caches it."""
        cached = self._csr_patterns.get(key)
        if cached is None or cached[0] is not indices or cached[1] != indices._version:
            cached = (indices, indices._version, csr_pattern(indices, self.weight_shape))
            self._csr_patterns[key] = cached
        return cached[2]

    def forward_with_sparse_term(
        self, module: nn.Module, x: torch.Tensor, tied: Optional[dict[str, str]] = None
    ) -> torch.Tensor:
        """module(x), with the bias's diff if any, plus the weight's diff as its own float32 term, always: the packed
        weight never holds W + Δ, not even for one call (which `FishLayer` does for float weights and many tokens)."""
        others = self.effective_parameters(exclude=("weight",))
        if tied is not None:
            others = {mine: others[theirs] for mine, theirs in tied.items() if theirs in others}
        y = functional_call(module, others, (x,)) if others else module(x)
        return self._add_weight_terms(module, x, y, list(self._weight_entries()))

    def effective_parameters(self, exclude: tuple[str, ...] = ()) -> dict[str, torch.Tensor]:
        """Only the other parameters (the bias): W + Δ of a quantized weight cannot be formed."""
        if "weight" not in exclude and any("weight" in self.adapted_parameters(a) for a in self.active_adapters):
            raise QuantizedBaseError(
                f"The FISH diff of a quantized {type(self.get_base_layer()).__name__} weight is added as a term of "
                "its own to module(x) called with one input tensor; this call passed other arguments or needs the "
                "dense weight (an evolving diff's update step). Call the module as module(x), or load the base "
                "model in bfloat16/float32."
            )
        return super().effective_parameters(exclude)

    def get_delta_weight(self, adapter_name: str) -> dict[str, torch.Tensor]:
        """The dense Δ of every parameter the adapter touches; the weight's in float32 and its dequantized shape."""
        deltas = {}
        for param_name in self.adapted_parameters(adapter_name):
            values, indices = self.values(adapter_name, param_name).detach(), self.indices(adapter_name, param_name)
            if param_name == "weight":
                delta = torch.zeros(self.weight_shape, dtype=torch.float32, device=values.device)
            else:
                delta = torch.zeros_like(self.base_parameter(param_name))
            delta.view(-1)[indices.long()] = values.to(delta.dtype)
            deltas[param_name] = delta
        return deltas

    def check_mergeable(self, adapter_names: Optional[Iterable[str]] = None, module_name: str = "") -> None:
        names = list(self.fish_values.keys()) if adapter_names is None else list(adapter_names)
        if any("weight" in self.adapted_parameters(name) for name in names):
            kind = quantization_kind(self.get_base_layer())
            where = f" '{module_name}'" if module_name else ""
            raise QuantizedBaseError(
                f"Cannot merge the FISH diff into the {kind} quantized weight of{where} "
                f"({type(self.get_base_layer()).__name__}): requantizing W + Δ would round most of the diff's "
                "entries away, and the packed storage cannot hold it exactly. Load the adapter onto the base model "
                "in bfloat16 or float32 (PeftModel.from_pretrained(float_model, adapter)) and merge_and_unload() "
                "there; the adapter file does not depend on the quantization. Nothing was merged."
            )

    def merge(self, safe_merge: bool = False, adapter_names: Optional[list[str]] = None) -> None:
        self.check_mergeable(adapter_names)
        super().merge(safe_merge, adapter_names)

    def __repr__(self) -> str:
        return "fish.quantized." + super(FishLayer, self).__repr__()


def dequantized_weight(module: nn.Module) -> torch.Tensor:
    """A bitsandbytes Linear's weight in float32 and its (out, in) shape (for checks and tests; imports
    bitsandbytes). A module that is no bitsandbytes Linear but defines `dequantized_weight()` is asked for it."""
    if isinstance(module, BaseTunerLayer):
        module = module.get_base_layer()
    if hasattr(module, "dequantized_weight"):
        return module.dequantized_weight().float()
    kind = quantization_kind(module)
    weight = module.weight
    if kind == "4-bit" and getattr(weight, "quant_state", None) is not None:
        import bitsandbytes.functional as bnb_functional

        return bnb_functional.dequantize_4bit(weight.data, weight.quant_state).float().view(logical_weight_shape(module))
    if kind == "8-bit" and not weight.is_floating_point():
        scales = getattr(weight, "SCB", None)
        if scales is None:
            scales = module.state.SCB
        return weight.data.float() * scales.float().view(-1, 1) / 127
    if weight.is_floating_point():
        return weight.detach().float().view(logical_weight_shape(module))
    raise QuantizedBaseError(f"Cannot dequantize the weight of {type(module).__name__}.")


def _owner(model: nn.Module, name: str) -> Optional[nn.Module]:
    """The module owning parameter `name` (bare-model name), itself if a tuner layer wraps it."""
    module_name = name.rpartition(".")[0]
    module = model
    for part in module_name.split(".") if module_name else []:
        module = getattr(module, part, None)
        if isinstance(module, BaseTunerLayer):
            module = module.get_base_layer()
        if module is None:
            return None
    return module


def _parameter(model: nn.Module, name: str) -> Optional[torch.Tensor]:
    owner = _owner(model, name)
    return None if owner is None else getattr(owner, name.rpartition(".")[2], None)
