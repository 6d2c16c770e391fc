"""FisherScorer: the Fisher pass's accumulator. Chunk by chunk it adds each example's squared gradient (and, when
asked, the gradient itself) into per-parameter sums: vectorised from one backward pass per chunk (`per_example.py`),
checked on the first examples against the one-example loop (`sampled_gradients.py`), the loop for parameters the
hooks cannot rebuild."""

from __future__ import annotations

import warnings

import torch
from torch import nn

from fish_peft.masks.losses import check_model_loss, loss_kind, per_example_loss, sample_labels
from fish_peft.masks.per_example import CallRecorder, add_gradient_sum, add_square_sum
from fish_peft.masks.sampled_gradients import compared_entries, squared_gradients_at

MAX_EXACT_CLASSES = 64  # up to this many classes the expected Fisher sums over classes instead of sampling
VERIFY_EXAMPLES = 4  # examples on which the vectorised path is checked against the loop
LOSS_CHECK_EXAMPLES = 2  # examples whose per-example loss is checked against the model's own


class FisherScorer:
    """Accumulates squared per-example gradients chunk by chunk into `scores` and, with `gradient_sums` (empirical
    Fisher only), the per-example gradients themselves into `sums` (float32, where the scores are)."""

    def __init__(
        self, model, params, fisher, loss_fn, generator, vectorized, score_dtype, score_device, gradient_sums=False
    ):
        self.model, self.params, self.fisher, self.loss_fn, self.generator = model, params, fisher, loss_fn, generator
        self.scores = {
            name: torch.zeros(p.shape, dtype=score_dtype, device=p.device if score_device is None else score_device)
            for name, p in params.items()
        }
        self.sums = None
        if gradient_sums:
            self.sums = {name: torch.zeros(s.shape, device=s.device) for name, s in self.scores.items()}
        self.recorder = CallRecorder(model, params) if vectorized else None
        self.vectorized_names = set(self.recorder.hooked_parameters) if vectorized else set()
        self.verified = not vectorized
        self.loss_checked = loss_fn is not None

    def close(self) -> None:
        if self.recorder is not None:
            self.recorder.remove()

    def score(self, batch: dict, first_example: int) -> None:
        if not self.loss_checked:
            for i in range(min(LOSS_CHECK_EXAMPLES, batch_size(batch))):
                check_model_loss(self.model, slice_batch(batch, i, i + 1), first_example + i)
            self.loss_checked = True
        if not self.verified:
            head = min(VERIFY_EXAMPLES, batch_size(batch))
            self._verify(slice_batch(batch, 0, head), first_example)
            if self.fisher == "empirical":  # the check scored these examples already
                batch, first_example = slice_batch(batch, head, batch_size(batch)), first_example + head
        if not batch_size(batch):
            return
        if self.vectorized_names:
            self._score_vectorized(batch, first_example, self.fisher, self._accumulate)
        self._score_looped(batch, first_example)

    def _verify(self, batch: dict, first_example: int) -> None:
        """On the first few examples, each parameter's vectorised score must equal the one-example loop's (at the
        gold labels) at a bounded sample of its entries (`compared_entries`). A parameter whose per-example
        gradients the hooks cannot rebuild is scored by the loop. For the empirical Fisher the vectorised scores of
        these examples are kept as theirs."""
        entries, vectorised = {}, {}

        def sample(name: str, contributions: list) -> None:
            if self.fisher == "empirical" and self._in_place(name):  # still zero, so they hold these examples' alone
                full = self.scores[name]
                add_square_sum(contributions, full)
            else:
                full = torch.zeros(self.params[name].shape, dtype=torch.float32, device=self.params[name].device)
                add_square_sum(contributions, full)
                if self.fisher == "empirical":
                    self._add(name, full)
            if self.fisher == "empirical":
                self._add_gradients(name, contributions)
            entries[name] = compared_entries(full.view(-1))
            vectorised[name] = full.view(-1)[entries[name]]

        self._score_vectorized(batch, first_example, "empirical", sample)
        for name in self.vectorized_names - set(entries):  # no module call of theirs was recorded: scored 0
            entries[name] = compared_entries(torch.zeros(self.params[name].numel(), device=self.params[name].device))
            vectorised[name] = torch.zeros(entries[name].numel(), device=entries[name].device)
        examples = [slice_batch(batch, i, i + 1) for i in range(batch_size(batch))]
        losses = (next(self._weighted_losses(e, first_example + i, "empirical")) for i, e in enumerate(examples))
        reference = squared_gradients_at({name: self.params[name] for name in entries}, entries, losses)
        scale = max((float(r.abs().max()) for r in reference.values() if r.numel()), default=0.0)
        self.vectorized_names = {
            name for name in self.vectorized_names
            if not entries[name].numel()
            or (vectorised[name] - reference[name]).abs().max()
            <= _tolerance(self.params[name].dtype) * reference[name].abs().max() + 1e-5 * scale
        }
        looped = sorted(set(self.params) - self.vectorized_names)
        if self.fisher == "empirical":
            for name in looped:
                self.scores[name].zero_()
                if self.sums is not None:
                    self.sums[name].zero_()
            self._score_looped(batch, first_example)
        if looped:
            warnings.warn(
                f"{len(looped)} parameter(s) are scored one example at a time (slower) because their per-example "
                f"gradients cannot be rebuilt from one backward pass: {', '.join(looped[:3])}"
                + (" ..." if len(looped) > 3 else ""),
                stacklevel=5,
            )
        self.verified = True

    def _weighted_losses(self, batch: dict, first_example: int, fisher: str):
        """Forward once; yield the per-example losses whose summed squared gradients make the Fisher."""
        outputs = self.model(**_model_inputs(self.model, batch))
        if self.loss_fn is not None:
            losses = self.loss_fn(outputs, batch)
            _check_finite(losses, first_example)
            yield losses
            return
        logits = outputs.logits if hasattr(outputs, "logits") else outputs[0]
        labels = batch["labels"]
        kind = loss_kind(self.model, logits, labels)
        if fisher == "empirical":
            losses = per_example_loss(kind, logits, labels)
            _check_finite(losses, first_example)
            yield losses
        elif kind == "single_label" and logits.shape[-1] <= MAX_EXACT_CLASSES:
            probs = torch.softmax(logits.detach().float(), dim=-1)
            for c in range(logits.shape[-1]):
                losses = per_example_loss(kind, logits, torch.full_like(labels, c))
                _check_finite(losses, first_example)
                yield losses * probs[:, c].sqrt()  # squared later: weight p_c on g_c²
        else:
            losses = per_example_loss(kind, logits, sample_labels(kind, logits, labels, self.generator))
            _check_finite(losses, first_example)
            yield losses

    def _score_vectorized(self, batch: dict, first_example: int, fisher: str, accumulate) -> None:
        """One forward and one backward per loss; `accumulate(name, contributions)` takes each parameter's
        per-example gradients in turn."""
        with self.recorder.recording(batch_size(batch)):
            passes = self._weighted_losses(batch, first_example, fisher)
            losses = next(passes)
        self.vectorized_names -= self.recorder.unbatched
        if not self.recorder.calls:
            raise ValueError("No module that owns a scored parameter took part in the forward pass.")
        while losses is not None:
            following = next(passes, None)
            self.recorder.backward(losses.sum(), self.vectorized_names, accumulate, last=following is None)
            losses = following
        self.recorder.calls = []

    def _score_looped(self, batch: dict, first_example: int) -> None:
        """The parameters the hooks cannot score, one example at a time."""
        names = [name for name in self.params if name not in self.vectorized_names]
        params = [self.params[name] for name in names]
        for i in range(batch_size(batch) if names else 0):
            for losses in self._weighted_losses(slice_batch(batch, i, i + 1), first_example + i, self.fisher):
                grads = torch.autograd.grad(losses.sum(), params, allow_unused=True, retain_graph=True)
                for name, grad in zip(names, grads):
                    if grad is not None:
                        self._add(name, grad.float().pow(2))
                        if self.sums is not None:
                            self.sums[name].add_(grad.float().to(self.sums[name].device))

    def _in_place(self, name: str) -> bool:
        """Whether a parameter's scores can take squared gradients directly (float32, on the parameter's device)."""
        return self.scores[name].dtype == torch.float32 and self.scores[name].device == self.params[name].device

    def _accumulate(self, name: str, contributions: list) -> None:
        if self._in_place(name):
            add_square_sum(contributions, self.scores[name])
        else:  # summed in float32 on the model's device, then added once
            full = torch.zeros(self.params[name].shape, dtype=torch.float32, device=self.params[name].device)
            add_square_sum(contributions, full)
            self._add(name, full)
        self._add_gradients(name, contributions)

    def _add_gradients(self, name: str, contributions: list) -> None:
        if self.sums is None:
            return
        if self.sums[name].device == self.params[name].device:
            add_gradient_sum(contributions, self.sums[name])
        else:
            full = torch.zeros(self.params[name].shape, dtype=torch.float32, device=self.params[name].device)
            add_gradient_sum(contributions, full)
            self.sums[name].add_(full.to(self.sums[name].device))

    def _add(self, name: str, squares: torch.Tensor) -> None:
        self.scores[name].add_(squares.to(self.scores[name].device))


def _tolerance(dtype: torch.dtype) -> float:
    """Relative difference allowed between the vectorised and the looped scores of a parameter of `dtype`: the two
    paths round differently, by about the dtype's precision (bfloat16 keeps 8 bits of mantissa)."""
    return 1e-3 if torch.finfo(dtype).bits >= 32 else 5 * torch.finfo(dtype).eps


def _check_finite(losses: torch.Tensor, first_example: int) -> None:
    bad = (~torch.isfinite(losses.detach())).nonzero().flatten()
    if bad.numel():
        raise ValueError(
            f"The loss is NaN/inf for example {first_example + int(bad[0])} during the Fisher pass. Check its labels "
            "(in range for the head?) and inputs, or compute the Fisher in float32."
        )


def _model_inputs(model: nn.Module, batch: dict) -> dict:
    """What to pass to the model: labels only where it needs them to build decoder inputs."""
    config = getattr(model, "config", None)
    needs_labels = getattr(config, "is_encoder_decoder", False) and "decoder_input_ids" not in batch
    return {k: v for k, v in batch.items() if k != "labels" or needs_labels}


def batch_size(batch: dict) -> int:
    return batch["labels"].shape[0]


def slice_batch(batch: dict, start: int, end: int) -> dict:
    size = batch_size(batch)
    return {k: v[start:end] if isinstance(v, torch.Tensor) and v.dim() and v.shape[0] == size else v for k, v in batch.items()}
