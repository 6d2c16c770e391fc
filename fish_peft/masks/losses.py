"""Per-example losses (one value per example, not a batch mean) and labels drawn from the model's prediction.

They match what a transformers model returns as `.loss` for a batch of one example, so the vectorised Fisher equals
a one-example-at-a-time loop over `model(**example).loss`.
"""

from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn

IGNORE_INDEX = -100


def loss_kind(model: nn.Module, logits: torch.Tensor, labels: torch.Tensor) -> str:
    """Which loss transformers would apply, decided the way its model heads decide it."""
    config = getattr(model, "config", None)
    if logits.dim() == 3:
        causal = type(model).__name__.endswith(("ForCausalLM", "LMHeadModel"))
        if causal and not getattr(config, "is_encoder_decoder", False):
            return "causal_lm"
        return "token"
    problem = getattr(config, "problem_type", None)
    if problem == "regression" or (problem is None and logits.shape[-1] == 1):
        return "regression"
    if problem == "multi_label_classification" or (problem is None and labels.is_floating_point()):
        return "multi_label"
    return "single_label"


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
