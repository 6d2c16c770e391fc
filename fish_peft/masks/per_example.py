"""Per-example gradients of a batch from one backward pass.

Forward hooks record each call of a module that owns a wanted parameter (its inputs and output). During the
backward of the summed per-example losses, as soon as the output-gradients of all calls of a parameter have arrived,
each example's gradient of it is rebuilt from its own inputs and output-gradient: an outer product for Linear and
Conv1D, token rows for Embedding, a product with the normalised input for LayerNorm, and `torch.func` (vmap of a
vjp) for any other module. Contributions of several calls (shared layers, tied weights) are summed per example
before squaring, so the result is exactly the sum over examples of squared per-example gradients. Each call's
inputs and output-gradient are dropped once used, so the pass never holds every layer's output-gradient at once.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass, field
from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn
from torch.func import functional_call, vjp, vmap
from torch.utils._pytree import tree_flatten, tree_unflatten
from transformers.pytorch_utils import Conv1D

GRADIENT_BLOCK = 1 << 22  # entries of a Linear weight's per-example gradient built at a time


@dataclass
class OuterProducts:
    """Per-example gradient of a Linear/Conv1D weight, kept factored: example b's gradient is `left[b]ᵀ right[b]`."""

    left: torch.Tensor  # (batch, tokens, rows of the gradient)
    right: torch.Tensor  # (batch, tokens, columns of the gradient)
    tokens: torch.Tensor  # (batch, tokens) bool: where the output-gradient is not zero (padding has none)

    def add_square_sum(self, out: torch.Tensor) -> None:
        # One small matmul per example beats a batched matmul here, skips the example's padding, and never holds
        # all examples' gradients at once; a large gradient is built a block of rows at a time.
        rows = max(1, min(out.shape[0], GRADIENT_BLOCK // max(1, out.shape[1])))
        block = torch.empty(rows, out.shape[1], dtype=out.dtype, device=out.device)
        for left, right, tokens in zip(self.left, self.right, self.tokens):
            left, right = left[tokens].T, right[tokens]
            for start in range(0, out.shape[0], rows):
                grad = torch.mm(left[start : start + rows], right, out=block[: min(rows, out.shape[0] - start)])
                out[start : start + rows].addcmul_(grad, grad)

    def add_sum(self, out: torch.Tensor) -> None:
        out.addmm_(self.left[self.tokens].T, self.right[self.tokens])

    def dense(self) -> torch.Tensor:
        return torch.bmm(self.left.transpose(1, 2), self.right)


@dataclass
class EmbeddingRows:
    """Per-example gradient of an embedding table, kept sparse: row `rows[j]` of example `examples[j]`."""

    examples: torch.Tensor
    rows: torch.Tensor
    values: torch.Tensor
    shape: tuple[int, ...]
    batch: int

    def add_square_sum(self, out: torch.Tensor) -> None:
        out.index_add_(0, self.rows, self.values.pow(2))

    def add_sum(self, out: torch.Tensor) -> None:
        out.index_add_(0, self.rows, self.values)

    def dense(self) -> torch.Tensor:
        out = torch.zeros((self.batch, *self.shape), dtype=torch.float32, device=self.values.device)
        out[self.examples, self.rows] = self.values
        return out


@dataclass
class Dense:
    """Per-example gradients as one (batch, *parameter shape) tensor."""

    grads: torch.Tensor

    def add_square_sum(self, out: torch.Tensor) -> None:
        out += self.grads.square().sum(0)

    def add_sum(self, out: torch.Tensor) -> None:
        out += self.grads.sum(0)

    def dense(self) -> torch.Tensor:
        return self.grads


def add_square_sum(contributions: list, out: torch.Tensor) -> None:
    """out += Σ_examples (Σ_calls g)² for one parameter."""
    if len(contributions) == 1:
        contributions[0].add_square_sum(out)
    else:
        out += sum(c.dense() for c in contributions).square_().sum(0)


def add_gradient_sum(contributions: list, out: torch.Tensor) -> None:
    """out += Σ_examples Σ_calls g for one parameter (the gradient of the summed loss)."""
    for contribution in contributions:
        contribution.add_sum(out)


def _first_input(args: tuple, kwargs: dict, batch: int) -> torch.Tensor:
    """The module's input, expanded to the batch where it is shared by all examples (e.g. position ids)."""
    x = (args[0] if args else next(v for v in kwargs.values() if isinstance(v, torch.Tensor))).detach()
    return x.expand(batch, *x.shape[1:]) if x.shape[0] == 1 else x


def _linear(module, attr, args, kwargs, delta):
    batch = delta.shape[0]
    x = _first_input(args, kwargs, batch).float()
    d = delta.float().reshape(batch, -1, delta.shape[-1])
    if attr == "bias":
        return Dense(d.sum(1))
    x = x.reshape(batch, -1, x.shape[-1])
    tokens = d.ne(0).any(-1)
    if isinstance(module, Conv1D):  # y = x @ W, W is (in, out)
        return OuterProducts(x, d, tokens)
    return OuterProducts(d, x, tokens)


def _embedding(module, attr, args, kwargs, delta):
    batch, num_rows = delta.shape[0], module.num_embeddings
    ids = _first_input(args, kwargs, batch).reshape(batch, -1)
    d = delta.float().reshape(batch, ids.shape[1], -1)
    examples = torch.arange(batch, device=ids.device).unsqueeze(1).expand_as(ids)
    keep = torch.ones_like(ids, dtype=torch.bool) if module.padding_idx is None else ids != module.padding_idx
    keys = examples[keep] * num_rows + ids[keep]
    unique, inverse = torch.unique(keys, return_inverse=True)
    values = torch.zeros(unique.numel(), d.shape[-1], device=d.device).index_add_(0, inverse, d[keep])
    return EmbeddingRows(unique // num_rows, unique % num_rows, values, tuple(module.weight.shape), batch)


def _layer_norm(module, attr, args, kwargs, delta):
    batch, shape = delta.shape[0], tuple(module.normalized_shape)
    x = _first_input(args, kwargs, batch).float()
    d = delta.float().reshape(batch, -1, *shape)
    if attr == "bias":
        return Dense(d.sum(1))
    normalised = F.layer_norm(x, shape, eps=module.eps).reshape(batch, -1, *shape)
    return Dense((d * normalised).sum(1))


def _generic(module, attr, args, kwargs, delta):
    """Any module: vmap over examples of the vjp of the module's own forward with respect to `attr`."""
    batch = delta.shape[0]
    leaves, spec = tree_flatten((args, kwargs))
    dims = [0 if isinstance(t, torch.Tensor) and t.dim() > 0 and t.shape[0] == batch > 1 else None for t in leaves]
    leaves = [t.unsqueeze(1) if d == 0 else t for t, d in zip(leaves, dims)]  # each example keeps a batch dim of 1
    param = getattr(module, attr).detach()

    def one_example(example_leaves, example_delta):
        a, k = tree_unflatten(example_leaves, spec)
        _, pullback = vjp(lambda p: functional_call(module, {attr: p}, a, k), param)
        return pullback(example_delta.to(param.dtype))[0]

    return Dense(vmap(one_example, in_dims=(dims, 0))(leaves, delta.unsqueeze(1)).float())


def _rule(module: nn.Module):
    if isinstance(module, (nn.Linear, Conv1D)):
        return _linear
    if isinstance(module, nn.Embedding) and module.max_norm is None and not module.scale_grad_by_freq:
        return _embedding
    if isinstance(module, nn.LayerNorm):
        return _layer_norm
    return _generic


@dataclass
class Call:
    """One recorded forward call of a hooked module."""

    module: nn.Module
    params: list[tuple[str, str]]  # (attribute on the module, canonical parameter name)
    args: tuple
    kwargs: dict
    delta: Optional[torch.Tensor] = field(default=None)  # the output-gradient, once the backward reaches it


class CallRecorder:
    """Hooks every module owning one of `params` and records its calls while `recording(batch)` is active.

    Each recorded output is handed on as `output + anchor`, where `anchor` is a zero scalar leaf: the same values,
    but a backward to the anchor alone reaches every recorded output without computing any parameter's gradient
    (see `backward`). An output shared by all examples (batch dimension 1, e.g. position embeddings) is handed on
    expanded to the batch, which gives each example its own output-gradient. Parameters of a module whose output
    has no batch dimension at all (T5's relative attention bias) are listed in `unbatched`: their per-example
    gradients cannot be had from one backward pass.
    """

    def __init__(self, model: nn.Module, params: dict[str, nn.Parameter]):
        name_of = {id(p): name for name, p in params.items()}
        self.calls: list[Call] = []
        self._batch = 0
        self._anchors: dict[torch.device, torch.Tensor] = {}
        self._arrived = None
        self._handles = []
        self.hooked_parameters: set[str] = set()
        self.unbatched: set[str] = set()
        for module in model.modules():
            owned = [(attr, name_of[id(p)]) for attr, p in module.named_parameters(recurse=False) if id(p) in name_of]
            if owned:
                self.hooked_parameters.update(name for _, name in owned)
                self._handles.append(module.register_forward_hook(self._hook(owned), with_kwargs=True))

    def _hook(self, owned):
        def hook(module, args, kwargs, output):
            if not (self._batch and isinstance(output, torch.Tensor) and output.requires_grad):
                return None
            if output.dim() and output.shape[0] == 1 < self._batch:
                output = output.expand(self._batch, *output.shape[1:])
            if output.dim() == 0 or output.shape[0] != self._batch:
                self.unbatched.update(name for _, name in owned)
                return None
            call = Call(module, owned, args, kwargs)
            self.calls.append(call)
            if output.device not in self._anchors:  # one zero leaf per device, made once per recording
                self._anchors[output.device] = torch.zeros((), device=output.device, requires_grad=True)
            anchored = output + self._anchors[output.device]
            anchored.register_hook(lambda delta: self._arrived(call, delta))
            return anchored

        return hook

    @contextlib.contextmanager
    def recording(self, batch: int):
        self.calls = []
        self._anchors = {}
        self._batch = batch
        try:
            yield
        finally:
            self._batch = 0

    def remove(self) -> None:
        for handle in self._handles:
            handle.remove()

    def backward(self, loss: torch.Tensor, wanted: set[str], accumulate, last: bool) -> None:
        """Backpropagate `loss` through the recorded calls; `accumulate(name, per-example gradients of each call)`
        takes each wanted parameter as soon as all its calls' output-gradients have arrived (a call the loss does
        not reach gives none). On the `last` backward of these calls, each call's inputs are dropped once used."""
        uses: dict[str, list[tuple[Call, str]]] = {}
        for call in self.calls:
            call.delta = None
            for attr, name in call.params:
                if name in wanted:
                    uses.setdefault(name, []).append((call, attr))
        waiting = {name: len(calls) for name, calls in uses.items()}
        open_params = {id(call): sum(name in wanted for _, name in call.params) for call in self.calls}

        def finish(name: str) -> None:
            done = [(call, attr) for call, attr in uses[name] if call.delta is not None]
            del waiting[name]
            if done:
                with torch.no_grad():
                    accumulate(name, [_rule(c.module)(c.module, attr, c.args, c.kwargs, c.delta) for c, attr in done])
            for call, _ in uses[name]:
                open_params[id(call)] -= 1
                if not open_params[id(call)]:
                    call.delta = None
                    if last:
                        call.args, call.kwargs = (), {}

        def arrived(call: Call, delta: torch.Tensor) -> None:
            call.delta = delta
            for _, name in call.params:
                if name in waiting:
                    waiting[name] -= 1
                    if not waiting[name]:
                        finish(name)

        self._arrived = arrived
        try:
            torch.autograd.grad(loss, list(self._anchors.values()), retain_graph=not last, allow_unused=True)
        finally:
            self._arrived = None
        for name in list(waiting):  # parameters some of whose calls the loss does not reach
            finish(name)
