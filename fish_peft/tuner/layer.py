"""The sparse-diff tuner layer: a module's parameters plus, per adapter, a few values at a few flat indices."""

from __future__ import annotations

import warnings
from typing import Any, Optional

import torch
from peft.tuners._buffer_dict import BufferDict
from peft.tuners.tuners_utils import BaseTunerLayer, _get_in_out_features, check_adapters_to_merge
from torch import nn
from torch.func import functional_call
from transformers.pytorch_utils import Conv1D

from fish_peft.distributed.communication import Traffic, with_averaged_gradient
from fish_peft.tuner.decoding_terms import DecodingTerms
from fish_peft.tuner.sparse_terms import CsrPattern, csr_pattern, embedding_term, sparse_term
from fish_peft.tuner.diff_in_place import diff_in_place, diffs_in_place
from fish_peft.tuner.transient_weight import dense_product_pays, transient_weight_linear


def index_dtype(numel: int) -> torch.dtype:
    """int32 indices (4 bytes) wherever they fit, which is every parameter below 2**31 entries."""
    return torch.int32 if numel < 2**31 else torch.int64


def storage_key(param_name: str) -> str:
    """The key under which a parameter's entries are stored in the layer's dicts: PyTorch refuses '.' in names,
    and a layer may adapt parameters of its base module's submodules ('out_proj.weight')."""
    return param_name.replace(".", "/")


def parameter_name(key: str) -> str:
    """Inverse of `storage_key`: the parameter's path relative to the layer's base module."""
    return key.replace("/", ".")


def nan_merge_error(adapter_name: str, param_name: str) -> ValueError:
    """PEFT's own wording for a merge that would write NaN/inf, which tools and users match on."""
    return ValueError(
        f"NaNs detected in the merged weights. The adapter {adapter_name} seems to be broken "
        f"(its diff of '{param_name}' is not finite); nothing was merged."
    )


class _ExplorationGradient(torch.autograd.Function):
    """Identity on the effective weight; in backward, also hands the exploration values the weight's gradient at
    their indices, as if they were in the forward pass (Top-KAST's backward set)."""

    @staticmethod
    def forward(ctx, effective, values, indices):
        ctx.save_for_backward(indices)
        return effective

    @staticmethod
    def backward(ctx, grad):
        (indices,) = ctx.saved_tensors
        return grad, grad[indices.long()], None


class ForwardsAttributesToBaseLayer(nn.Module):
    """A module around `base_layer` that exposes the wrapped module's attributes (`eps`, `padding_idx`, ...)."""

    def __getattr__(self, name: str) -> Any:
        try:
            return super().__getattr__(name)
        except AttributeError:
            if name == "base_layer":
                raise
            return getattr(self.base_layer, name)


class FishLayer(ForwardsAttributesToBaseLayer, BaseTunerLayer):
    """Wraps any module and adds sparse diffs Δ to parameters of that module: the forward runs with W + Δ.

    Per adapter and adapted parameter it holds a trainable 1-D tensor of values and a non-trainable buffer of sorted
    flat indices (`values(adapter, name)`, `indices(adapter, name)`; stored in `fish_values` / `fish_indices` under
    `storage_key(name)`). A parameter is named by its path relative to the wrapped module: usually its own
    ('weight'), or a submodule's ('out_proj.weight') where the wrapped module's forward reads that submodule's
    parameter directly (`nn.MultiheadAttention`) or where a module and its submodule both hold adapted parameters
    (ViT's embeddings). The base parameters stay frozen, so optimizer state is proportional to the number of values.
    Works for Linear, Embedding, Conv, GPT-2 Conv1D, norms and any other module, because the forward is the wrapped
    module's own forward called with substituted parameters.

    While a Top-KAST diff trains, `fish_explore_values` / `fish_explore_indices` hold its exploration entries: they
    receive gradients but take no part in the forward pass and are not saved. `captured_gradients`, when set to a
    dict, collects the dense gradient of every effective parameter (what evolving diffs regrow by).
    `gradient_traffic`, when set (an evolving diff in several processes), averages the values' gradients across
    processes in backward itself, counting the bytes there; DDP is told to leave those values alone.

    The entry counts of an evolving adapter (`evolving_adapters`) change while it trains, so loading a state dict
    whose values and indices hold another count resizes them in place: the same Parameter objects, which an
    optimizer made earlier still trains (Accelerate's `load_state`, Trainer's `resume_from_checkpoint`).
    """

    adapter_layer_names = ("fish_values", "fish_explore_values")
    other_param_names = ("fish_indices", "fish_explore_indices")

    def __init__(
        self,
        base_layer: nn.Module,
        adapter_name: str,
        indices: dict[str, torch.Tensor],
        evolving: bool = False,
        init_weights: bool = True,
    ):
        super().__init__()
        self.base_layer = base_layer
        self.fish_values = nn.ModuleDict()
        self.fish_indices = nn.ModuleDict()
        self.fish_explore_values = nn.ModuleDict()
        self.fish_explore_indices = nn.ModuleDict()
        self.captured_gradients: Optional[dict[str, torch.Tensor]] = None
        self.gradient_traffic: Optional[Traffic] = None
        self._csr_patterns: dict[tuple[str, bool], tuple[torch.Tensor, int, CsrPattern]] = {}
        self._decoding_terms = DecodingTerms()
        self._disable_adapters = False
        self.merged_adapters = []
        self._merge_backup: dict[str, dict[str, torch.Tensor]] = {}
        self._active_adapter = adapter_name
        self.evolving_adapters: set[str] = set()
        self.in_features, self.out_features = _in_out_features(base_layer)
        self.update_layer(adapter_name, indices, evolving, init_weights)

    def update_layer(
        self, adapter_name: str, indices: dict[str, torch.Tensor], evolving: bool = False, init_weights: bool = True
    ) -> None:
        """Add adapter `adapter_name` with values at `indices` ({parameter name: flat indices}), zero unless
        `init_weights=False` (small random values, for tests that must see the adapter act); `evolving` for an
        adapter whose support moves while it trains (`FishConfig.mask_update`)."""
        if evolving:
            self.evolving_adapters.add(adapter_name)
        else:
            self.evolving_adapters.discard(adapter_name)
        self.fish_values[adapter_name] = nn.ParameterDict()
        self.fish_indices[adapter_name] = BufferDict(persistent=True)
        self.add_parameters(adapter_name, indices, init_weights)

    def base_parameter(self, param_name: str) -> torch.Tensor:
        """The wrapped module's parameter `param_name` ('weight', 'out_proj.weight')."""
        module_name, _, attr = param_name.rpartition(".")
        return getattr(self.get_base_layer().get_submodule(module_name), attr)

    def values(self, adapter_name: str, param_name: str) -> nn.Parameter:
        return self.fish_values[adapter_name][storage_key(param_name)]

    def indices(self, adapter_name: str, param_name: str) -> torch.Tensor:
        return self.fish_indices[adapter_name][storage_key(param_name)]

    def set_entries(self, adapter_name: str, param_name: str, indices: torch.Tensor, values: nn.Parameter) -> None:
        """Replace the entries of one adapted parameter (an evolving diff's update)."""
        weight = self.base_parameter(param_name)
        self.fish_indices[adapter_name][storage_key(param_name)] = indices.to(weight.device, index_dtype(weight.numel()))
        self.fish_values[adapter_name][storage_key(param_name)] = values

    def add_parameters(self, adapter_name: str, indices: dict[str, torch.Tensor], init_weights: bool = True) -> None:
        """Let adapter `adapter_name` also change these parameters, with values at `indices` (see `update_layer`).
        Values take the weight's dtype, as PEFT's methods do; PEFT then upcasts float16/bfloat16 to float32 unless
        `autocast_adapter_dtype=False`."""
        base = self.get_base_layer()
        own = dict(base.named_parameters())
        unknown = [name for name in indices if name not in own]
        if unknown:
            raise ValueError(f"{type(base).__name__} has no parameter '{unknown[0]}' to adapt.")
        existing = list(self.fish_values[adapter_name].values())
        # The module's own parameter order, whatever order the mask lists them in: the optimizer's state is saved
        # and resumed by position, and a mask read back from a file lists its parameters sorted by name.
        for param_name in (name for name in own if name in indices):
            idx, weight = indices[param_name], own[param_name]
            dtype = existing[0].dtype if existing else (weight.dtype if weight.is_floating_point() else torch.float32)
            values = torch.zeros(idx.numel(), dtype=dtype, device=weight.device)
            if not init_weights:
                values.normal_(std=0.1 * float(weight.detach().float().std().nan_to_num()) + 0.02)
            self.fish_values[adapter_name][storage_key(param_name)] = nn.Parameter(values)
            self.fish_indices[adapter_name][storage_key(param_name)] = idx.to(
                device=weight.device, dtype=index_dtype(weight.numel())
            )
        self.set_adapter(self.active_adapters)

    def remove_parameter(self, adapter_name: str, param_name: str) -> None:
        """Adapter `adapter_name` no longer changes `param_name`."""
        del self.fish_values[adapter_name][storage_key(param_name)]
        del self.fish_indices[adapter_name][storage_key(param_name)]

    def set_exploration(self, adapter_name: str, indices: dict[str, torch.Tensor]) -> None:
        """Give adapter `adapter_name` zero-initialised exploration entries at `indices` ({param name: flat
        indices}, disjoint from the adapter's own)."""
        values, buffers = {}, {}
        for param_name, idx in indices.items():
            weight = self.base_parameter(param_name)
            values[storage_key(param_name)] = nn.Parameter(torch.zeros(idx.numel(), dtype=torch.float32, device=weight.device))
            buffers[storage_key(param_name)] = idx.to(device=weight.device, dtype=index_dtype(weight.numel()))
        self.fish_explore_values[adapter_name] = nn.ParameterDict(values)
        self.fish_explore_indices[adapter_name] = BufferDict(buffers, persistent=False)
        self.set_adapter(self.active_adapters)

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):
        """Before the values and indices load (children load after their parent), give an evolving adapter's
        entries the count the state dict holds."""
        for adapter_name in self.evolving_adapters & set(self.fish_values.keys()):
            for key, values in self.fish_values[adapter_name].items():
                new_values = state_dict.get(f"{prefix}fish_values.{adapter_name}.{key}")
                new_indices = state_dict.get(f"{prefix}fish_indices.{adapter_name}.{key}")
                if new_values is None or new_indices is None or new_values.dim() != 1 or new_indices.shape != new_values.shape:
                    continue
                if new_values.numel() != values.numel():
                    values.data = values.data.new_zeros(new_values.numel())
                    values.grad = None
                    old = self.fish_indices[adapter_name][key]
                    self.fish_indices[adapter_name][key] = old.new_zeros(new_indices.numel())
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)

    def adapted_parameters(self, adapter_name: str) -> list[str]:
        """The names (relative to the wrapped module) of the parameters adapter `adapter_name` changes."""
        return [parameter_name(key) for key in self.fish_values[adapter_name]] if adapter_name in self.fish_values else []

    def effective_parameters(self, exclude: tuple[str, ...] = ()) -> dict[str, torch.Tensor]:
        """W + Σ Δ over the active adapters, for every parameter an active adapter touches (but `exclude`)."""
        effective: dict[str, torch.Tensor] = {}
        weights: dict[str, torch.Tensor] = {}
        for adapter_name in self.active_adapters:
            for param_name in self.adapted_parameters(adapter_name):
                if param_name in exclude:
                    continue
                weight = weights.setdefault(param_name, self.base_parameter(param_name))
                flat = effective.get(param_name, weight.reshape(-1))
                values = self._trained(self.values(adapter_name, param_name)).to(weight.dtype)
                effective[param_name] = flat.index_add(0, self.indices(adapter_name, param_name), values)
                explore = self.fish_explore_values[adapter_name] if adapter_name in self.fish_explore_values else {}
                if storage_key(param_name) in explore:
                    effective[param_name] = _ExplorationGradient.apply(
                        effective[param_name],
                        self._trained(explore[storage_key(param_name)]),
                        self.fish_explore_indices[adapter_name][storage_key(param_name)],
                    )
        if self.captured_gradients is not None:
            for name, flat in effective.items():
                if flat.requires_grad:
                    flat.register_hook(self._gradient_collector(name))
        return {name: flat.view_as(weights[name]) for name, flat in effective.items()}

    def _trained(self, values: nn.Parameter) -> torch.Tensor:
        return values if self.gradient_traffic is None else with_averaged_gradient(values, self.gradient_traffic)

    def _gradient_collector(self, param_name: str):
        def collect(grad: torch.Tensor) -> None:
            if self.captured_gradients is not None:
                previous = self.captured_gradients.get(param_name)
                grad = grad.detach().float()
                self.captured_gradients[param_name] = grad if previous is None else previous + grad

        return collect

    def get_delta_weight(self, adapter_name: str) -> dict[str, torch.Tensor]:
        """The dense Δ of every parameter adapter `adapter_name` touches."""
        deltas = {}
        for param_name in self.adapted_parameters(adapter_name):
            weight = self.base_parameter(param_name)
            delta = torch.zeros(weight.numel(), dtype=weight.dtype, device=weight.device)
            delta[self.indices(adapter_name, param_name).long()] = self.values(adapter_name, param_name).detach().to(weight.dtype)
            deltas[param_name] = delta.view_as(weight)
        return deltas

    def merge(self, safe_merge: bool = False, adapter_names: Optional[list[str]] = None) -> None:
        """Write W + Δ into the base parameters. The overwritten entries are kept, so `unmerge` restores W exactly."""
        for adapter_name in check_adapters_to_merge(self, adapter_names):
            if adapter_name not in self.fish_values:
                continue
            backup, merged = {}, {}
            for param_name in self.adapted_parameters(adapter_name):
                flat = self.base_parameter(param_name).data.view(-1)
                idx = self.indices(adapter_name, param_name).long()
                backup[param_name] = flat[idx].clone()
                merged[param_name] = backup[param_name] + self.values(adapter_name, param_name).detach().to(flat.dtype)
                if safe_merge and not torch.isfinite(merged[param_name]).all():
                    raise nan_merge_error(adapter_name, param_name)
            for param_name, new in merged.items():
                self.base_parameter(param_name).data.view(-1)[self.indices(adapter_name, param_name).long()] = new
            self._merge_backup[adapter_name] = backup
            self.merged_adapters.append(adapter_name)

    def unmerge(self) -> None:
        while self.merged_adapters:
            adapter_name = self.merged_adapters.pop()
            for param_name, original in self._merge_backup.pop(adapter_name).items():
                idx = self.indices(adapter_name, param_name).long()
                self.base_parameter(param_name).data.view(-1)[idx] = original

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        if self.disable_adapters and self.merged:
            self.unmerge()
        if self.disable_adapters or self.merged:
            return self.base_layer(*args, **kwargs)
        if len(args) == 1 and not kwargs and self._weight_diff_is_a_sparse_term():
            decoded = None if isinstance(self.base_layer, nn.Embedding) else self._decoding_terms.output(self, args[0])
            return self.forward_with_sparse_term(self.base_layer, args[0]) if decoded is None else decoded
        if not torch.is_grad_enabled() and (diffs := self._diffs_to_write()) is not None:
            with diffs_in_place(diffs):
                return self.base_layer(*args, **kwargs)
        effective = self.effective_parameters()
        if not effective:
            return self.base_layer(*args, **kwargs)
        return functional_call(self.base_layer, effective, args, kwargs)

    def _diffs_to_write(self) -> Optional[list[tuple[torch.Tensor, list]]]:
        """(base parameter, [(values, indices)] of the active adapters) for each parameter they change, for a call
        without autograd (exploration entries take no part); None where one is no float (a quantized weight)."""
        diffs: dict[str, list] = {}
        values_dicts, indices_dicts = self._modules["fish_values"]._modules, self._modules["fish_indices"]._modules
        for adapter_name in self.active_adapters:
            if adapter_name in values_dicts:  # direct dict reads: a norm's decoding step pays for every lookup
                indices = indices_dicts[adapter_name]._buffers
                for key, values in values_dicts[adapter_name]._parameters.items():
                    diffs.setdefault(parameter_name(key), []).append((values, indices[key]))
        weights = [self.base_parameter(name) for name in diffs]
        return list(zip(weights, diffs.values())) if all(w.is_floating_point() for w in weights) else None

    def _weight_diff_is_a_sparse_term(self) -> bool:
        """Whether the weight's diff runs as a term of its own (`sparse_terms`): a Linear, Conv1D or Embedding
        (without max_norm, which rewrites the weight), outside an evolving diff's update step (which wants the
        dense weight gradient)."""
        return self.captured_gradients is None and takes_a_sparse_term(self.base_layer)

    def forward_with_sparse_term(self, module: nn.Module, x: torch.Tensor, tied: Optional[dict[str, str]] = None) -> torch.Tensor:
        """module(x) with the other parameters' diffs (the bias) applied, plus the weight's diffs (x: the input, or
        the ids of an Embedding). `module` is this layer's, or one whose parameters are tied to them (`tied`: {its
        attribute: this layer's parameter})."""
        others = self.effective_parameters(exclude=("weight",))
        if tied is not None:
            others = {mine: others[theirs] for mine, theirs in tied.items() if theirs in others}
        entries = list(self._weight_entries())
        call = (lambda: functional_call(module, others, (x,))) if others else (lambda: module(x))
        dense = not isinstance(module, nn.Embedding) and dense_product_pays(module, x)
        if dense and not torch.is_grad_enabled():
            with diff_in_place(module.weight, [(values, indices) for values, indices, _ in entries]):
                return call()
        if dense:
            return transient_weight_linear(module, x, others.get("bias", module.bias), entries)
        return self._add_weight_terms(module, x, call(), entries)

    def _add_weight_terms(self, module: nn.Module, x: torch.Tensor, y: torch.Tensor, entries) -> torch.Tensor:
        """y plus the term of each (values, indices, pattern) entry set of the weight diff in `module`, summed in
        float32 and rounded to y's dtype once: in a bfloat16 model, an update far below the weights' resolution
        still changes the output."""
        total = None
        for values, indices, pattern in entries:
            if isinstance(module, nn.Embedding):
                added = embedding_term(module, x, values, pattern)
            else:
                added = sparse_term(module, x, values, pattern)
            total = added if total is None else total + added
        return y if total is None else (y.to(total.dtype) + total).to(y.dtype)

    def _weight_entries(self):
        """(values, flat indices, CSR pattern) of the weight, for each active adapter's entries and Top-KAST
        exploration entries (the latter as values - values.detach(): zero in the forward pass, with the values'
        gradient in the backward)."""
        for adapter_name in self.active_adapters:
            dicts = [(self.fish_values, self.fish_indices, False), (self.fish_explore_values, self.fish_explore_indices, True)]
            for values_dict, indices_dict, exploring in dicts:
                if adapter_name not in values_dict or "weight" not in values_dict[adapter_name]:
                    continue
                values = self._trained(values_dict[adapter_name]["weight"])
                indices = indices_dict[adapter_name]["weight"]
                pattern = self._csr_pattern((adapter_name, exploring), indices)
                yield (values - values.detach() if exploring else values), indices, pattern

    def _csr_pattern(self, key: tuple[str, bool], indices: torch.Tensor) -> CsrPattern:
        """The weight's CSR pattern at `indices`, computed again only when the indices change (a new tensor, or
        written in place): decoding a token does not pay for it."""
        cached = self._csr_patterns.get(key)
        if cached is None or cached[0] is not indices or cached[1] != indices._version:
            cached = (indices, indices._version, csr_pattern(indices, tuple(self.base_parameter("weight").shape)))
            self._csr_patterns[key] = cached
        return cached[2]

    def _apply(self, fn, *args, **kwargs):
        self._csr_patterns.clear()  # moved or cast indices are new tensors
        self._decoding_terms.clear()
        return super()._apply(fn, *args, **kwargs)

    def __repr__(self) -> str:
        return "fish." + super().__repr__()


def takes_a_sparse_term(module: nn.Module) -> bool:
    """A Linear, Conv1D, or Embedding without max_norm (which rewrites the weight in the forward pass)."""
    return isinstance(module, (nn.Linear, Conv1D)) or (isinstance(module, nn.Embedding) and module.max_norm is None)


def _in_out_features(module: nn.Module) -> tuple[Optional[int], Optional[int]]:
    """`in_features` / `out_features` as PEFT's layers expose them (None for modules without such sizes)."""
    try:
        with warnings.catch_warnings():  # PEFT warns about module types LoRA does not support (norms): not ours
            warnings.simplefilter("ignore")
            return _get_in_out_features(module)
    except ValueError:  # PEFT refuses MultiheadAttention with different key/value sizes
        return None, None
