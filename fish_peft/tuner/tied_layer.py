"""`FishTiedLayer`: a module sharing a parameter with a `FishLayer`'s module (GPT-2's `lm_head` and `wte`) sees
the same diff; `wrap_tied_modules` finds and wraps such modules."""

from __future__ import annotations

from typing import Any, Optional

from peft.tuners.tuners_utils import BaseTunerLayer, _get_submodules
from torch import nn
from torch.func import functional_call

from fish_peft.tuner.layer import FishLayer, ForwardsAttributesToBaseLayer, takes_a_sparse_term


class FishTiedLayer(ForwardsAttributesToBaseLayer, BaseTunerLayer):
    """Stands in for a module that shares a parameter with a `FishLayer`'s module (GPT-2's `lm_head` and `wte`).

    The diff is applied wherever the tied weight is used, so the adapted model equals a dense model with W + Δ. The
    values live only on the source layer (and are saved once); merging the source updates the shared tensor.
    """

    adapter_layer_names = ()
    other_param_names = ()

    def __init__(self, base_layer: nn.Module, source: FishLayer, tied: dict[str, str]):
        super().__init__()
        self.base_layer = base_layer
        object.__setattr__(self, "_source", source)  # not a submodule: its values must not be saved twice
        self.tied = dict(tied)  # {this module's parameter attribute: the source's parameter attribute}
        self._disable_adapters = False
        self.merged_adapters = []

    def merge(self, safe_merge: bool = False, adapter_names: Optional[list[str]] = None) -> None:
        """Nothing to do: the source layer's merge writes into the shared tensor."""

    def unmerge(self) -> None:
        """Nothing to do: the source layer's unmerge restores the shared tensor."""

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        source = self._source
        if source.disable_adapters and source.merged:
            source.unmerge()
        if source.disable_adapters or source.merged:
            return self.base_layer(*args, **kwargs)
        if len(args) == 1 and not kwargs and self._weight_is_tied_as_a_sparse_term():
            return source.forward_with_sparse_term(self.base_layer, args[0], self.tied)
        effective = source.effective_parameters()
        overrides = {mine: effective[theirs] for mine, theirs in self.tied.items() if theirs in effective}
        if not overrides:
            return self.base_layer(*args, **kwargs)
        return functional_call(self.base_layer, overrides, args, kwargs)

    def _weight_is_tied_as_a_sparse_term(self) -> bool:
        """Whether this module's weight is the source's and both take the weight's diff as a sparse term."""
        source = self._source
        return (
            self.tied.get("weight") == "weight"
            and source._weight_diff_is_a_sparse_term()
            and takes_a_sparse_term(self.base_layer)
            and self.base_layer.weight.shape == source.base_parameter("weight").shape
        )


def wrap_tied_modules(model: nn.Module) -> None:
    """Wrap modules holding a parameter that a FishLayer's module also holds, so the diff reaches every use."""
    owners: dict[int, tuple[FishLayer, str]] = {}
    for module in model.modules():
        if isinstance(module, FishLayer):
            for param_name, param in module.get_base_layer().named_parameters():
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
