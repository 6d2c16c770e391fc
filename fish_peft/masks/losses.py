"""Per-example losses (one value per example, not a batch mean) and labels drawn from the model's prediction.

They match what a transformers model returns as `.loss` for a batch of one example, so the vectorised Fisher equals
a one-example-at-a-time loop over `model(**example).loss`; `check_model_loss` holds the model to that. Whether a
model is a causal LM (next-token loss, labels shifted) is read the way transformers maps models to tasks.
"""

from __future__ import annotations

import functools
import inspect
from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn

IGNORE_INDEX = -100
CAUSAL_TASK_MAPPINGS = ("MODEL_FOR_CAUSAL_LM_MAPPING_NAMES", "MODEL_FOR_IMAGE_TEXT_TO_TEXT_MAPPING_NAMES")
KIND_NAMES = {
    "causal_lm": "causal-LM next-token cross-entropy, labels shifted by one",
    "token": "per-token cross-entropy, labels not shifted",
    "regression": "mean squared error",
    "multi_label": "binary cross-entropy",
    "single_label": "cross-entropy",
}


def unwrap_model(model: nn.Module) -> nn.Module:
    """The model inside PEFT, torch.compile and (Distributed)DataParallel wrappers."""
    *_, inner = _wrappers(model)
    return inner


def _wrappers(model: nn.Module):
    """`model` and each model it wraps, outermost first."""
    while True:
        yield model
        if isinstance(getattr(model, "_orig_mod", None), nn.Module):
            model = model._orig_mod
        elif isinstance(model, (nn.DataParallel, nn.parallel.DistributedDataParallel)):
            model = model.module
        elif hasattr(model, "peft_config") and callable(getattr(model, "get_base_model", None)):
            model = model.get_base_model()
        else:
            return


def is_causal_lm(model: nn.Module) -> bool:
    """Whether transformers trains `model` with the next-token loss: a PEFT wrapper has task type CAUSAL_LM, or the
    model's class (or a base class) is one transformers maps to the causal-LM or image-text-to-text task, by name or
    through the config's `auto_map`; never an encoder-decoder model."""
    *wrappers, inner = _wrappers(model)
    for wrapper in wrappers:
        configs = getattr(wrapper, "peft_config", None)
        if isinstance(configs, dict) and any(getattr(c, "task_type", None) == "CAUSAL_LM" for c in configs.values()):
            return True
    config = getattr(inner, "config", None)
    if getattr(config, "is_encoder_decoder", False):
        return False
    names = {cls.__name__ for cls in type(inner).__mro__}
    remote = str((getattr(config, "auto_map", None) or {}).get("AutoModelForCausalLM", ""))
    return bool(names & _causal_lm_class_names()) or remote.rpartition(".")[2] in names


@functools.lru_cache(maxsize=1)
def _causal_lm_class_names() -> frozenset[str]:
    from transformers.models.auto import modeling_auto

    names = set()
    for mapping in CAUSAL_TASK_MAPPINGS:
        for value in getattr(modeling_auto, mapping, {}).values():
            names.update([value] if isinstance(value, str) else value)
    return frozenset(names)


def loss_kind(model: nn.Module, logits: torch.Tensor, labels: torch.Tensor) -> str:
    """Which loss transformers would apply, decided the way its model heads decide it."""
    if logits.dim() == 3:
        return "causal_lm" if is_causal_lm(model) else "token"
    problem = getattr(getattr(unwrap_model(model), "config", None), "problem_type", None)
    if problem == "regression" or (problem is None and logits.shape[-1] == 1):
        return "regression"
    if problem == "multi_label_classification" or (problem is None and labels.is_floating_point()):
        return "multi_label"
    return "single_label"


def check_model_loss(model: nn.Module, example: dict, index: int) -> None:
    """Refuse a model whose own `.loss` on a one-example batch (with its `labels`) differs from the per-example loss
    the Fisher would square the gradient of; models that take no `labels` or return no loss are not checked."""
    if "labels" not in inspect.signature(unwrap_model(model).forward).parameters:
        return
    with torch.no_grad():
        outputs = model(**example)
    own, logits = getattr(outputs, "loss", None), getattr(outputs, "logits", None)
    if own is None or logits is None:
        return
    kind = loss_kind(model, logits, example["labels"])
    ours = per_example_loss(kind, logits, example["labels"])[0]
    if not torch.isfinite(ours):
        return  # the Fisher pass reports it with the example's number
    tolerance = 1e-4 if logits.dtype in (torch.float32, torch.float64) else 1e-2
    if not torch.isclose(ours, own.detach().float(), rtol=tolerance, atol=1e-6):
        raise ValueError(
            f"The Fisher's per-example loss ({KIND_NAMES[kind]}) is {float(ours):.6g} on example {index}, but "
            f"{type(unwrap_model(model)).__name__}'s own loss is {float(own):.6g}: its loss is not one fish-peft "
            "recognises. Pass loss_fn=(outputs, batch) -> per-example losses of shape (batch,), computed as the "
            "model computes its loss, to compute_fisher / compute_fisher_mask."
        )


def per_example_loss(kind: str, logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """The loss of each example, shape (batch,)."""
    logits = logits.float()
    batch = logits.shape[0]
    if kind == "regression":
        return (logits.reshape(batch, -1) - labels.float().reshape(batch, -1)).pow(2).mean(1)
    if kind == "single_label":
        return F.cross_entropy(logits.reshape(batch, -1), labels.reshape(batch).long(), reduction="none")
    if kind == "multi_label":
        losses = F.binary_cross_entropy_with_logits(logits, labels.float(), reduction="none")
        return losses.reshape(batch, -1).mean(1)
    if kind == "causal_lm":
        logits, labels = logits[:, :-1], labels[:, 1:]
    token_losses = F.cross_entropy(
        logits.reshape(-1, logits.shape[-1]), labels.reshape(-1).long(), ignore_index=IGNORE_INDEX, reduction="none"
    ).view(batch, -1)
    counts = (labels.reshape(batch, -1) != IGNORE_INDEX).sum(1).clamp(min=1)
    return token_losses.sum(1) / counts


def sample_labels(kind: str, logits: torch.Tensor, labels: torch.Tensor, generator: Optional[torch.Generator]) -> torch.Tensor:
    """Labels drawn from the model's own predictive distribution (the likelihood whose NLL the loss is)."""
    logits = logits.detach().float()
    if kind == "regression":  # MSE is the Gaussian NLL with variance 1/2, up to a constant
        noise = torch.randn(logits.shape, generator=generator, device="cpu").to(logits.device)
        return (logits + noise * 0.5**0.5).reshape(labels.shape).to(labels.dtype if labels.is_floating_point() else torch.float32)
    if kind == "multi_label":
        uniform = torch.rand(logits.shape, generator=generator, device="cpu").to(logits.device)
        return (uniform < torch.sigmoid(logits)).to(torch.float32).reshape(labels.shape)
    if kind == "single_label":
        return _categorical(logits, generator).reshape(labels.shape).to(labels.dtype)
    sampled = labels.clone()
    if kind == "causal_lm":
        keep = labels[:, 1:] != IGNORE_INDEX
        sampled[:, 1:][keep] = _categorical(logits[:, :-1][keep], generator).to(labels.dtype)
    else:
        keep = labels != IGNORE_INDEX
        sampled[keep] = _categorical(logits[keep], generator).to(labels.dtype)
    return sampled


def _categorical(logits: torch.Tensor, generator: Optional[torch.Generator]) -> torch.Tensor:
    probs = torch.softmax(logits.reshape(-1, logits.shape[-1]), dim=-1).cpu()
    return torch.multinomial(probs, 1, generator=generator).squeeze(1).to(logits.device)
