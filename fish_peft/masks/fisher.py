"""The FISH paper's Fisher information: Σ over examples of the squared per-example gradient of the loss.

`compute_fisher` scores every parameter (or the ones given) on `num_samples` examples. The default path is
vectorised: one forward and one backward per chunk of examples, with per-example gradients rebuilt from hooks (see
`per_example.py`). On the first chunk it checks every parameter's vectorised score against the plain
one-example-at-a-time loop at a bounded sample of entries (`sampled_gradients.py`); a parameter that differs (used
outside its module's forward, say) is scored by that loop, which is also available for every parameter with
`vectorized=False`. First, the per-example loss must equal the model's own `.loss` (`losses.check_model_loss`).
Beyond the model and one chunk's activations, the pass holds the scores and one parameter's temporaries: each
parameter's per-example gradients are squared during the backward, as soon as its output-gradients arrive.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable, Iterable, Mapping
from typing import Optional, Union

import torch
from torch import nn

from fish_peft.distributed.processes import (
    check_same_everywhere,
    is_sharded,
    raise_together,
    rank_and_world,
    share,
    sum_across_processes,
    tensors_digest,
)
from fish_peft.masks.losses import check_model_loss, loss_kind, per_example_loss, sample_labels
from fish_peft.masks.per_example import CallRecorder, add_square_sum
from fish_peft.masks.sampled_gradients import compared_entries, squared_gradients_at

FISHER_TYPES = ("empirical", "expected")
MAX_EXACT_CLASSES = 64  # up to this many classes the expected Fisher sums over classes instead of sampling
VERIFY_EXAMPLES = 4  # examples on which the vectorised path is checked against the loop
LOSS_CHECK_EXAMPLES = 2  # examples whose per-example loss is checked against the model's own

LossFn = Callable[[object, Mapping[str, torch.Tensor]], torch.Tensor]


def compute_fisher(
    model: nn.Module,
    dataloader: Iterable[Mapping[str, torch.Tensor]],
    num_samples: int = 1024,
    *,
    parameters: Optional[Mapping[str, nn.Parameter]] = None,
    fisher: str = "empirical",
    loss_fn: Optional[LossFn] = None,
    chunk_size: int = 16,
    vectorized: bool = True,
    seed: int = 0,
    progress: bool = False,
    sharded: Optional[bool] = None,
    per_process: bool = False,
    score_dtype: torch.dtype = torch.float32,
    score_device: Optional[Union[str, torch.device]] = None,
) -> dict[str, torch.Tensor]:
    """Diagonal Fisher information of `model` on the first `num_samples` examples of `dataloader`.

    Args:
        model: a transformers model (or any module whose forward takes the batch's keys and returns logits).
        dataloader: yields dict batches with the model inputs and gold `labels`.
        num_samples: examples to use (the paper: 1024); the last batch is cut to reach it exactly.
        parameters: {name: parameter} to score; defaults to every parameter of the model.
        fisher: "empirical" squares the gradient of the loss at the gold label (the paper); "expected" weights
            each label by the model's predicted probability (exactly for up to 64 classes, otherwise by sampling
            one label per prediction from the model, as for language modelling and regression).
        loss_fn: `(outputs, batch) -> per-example losses (batch,)`, for models whose loss is not a transformers
            classification / regression / language-modelling loss (empirical Fisher only).
        chunk_size: examples per vectorised backward; bounds memory.
        vectorized: False runs the reference loop, one example at a time.
        seed: seeds label sampling for the expected Fisher.
        progress: show a progress bar.
        sharded: in several processes, whether the dataloader already gives each process its own data (default:
            yes for a dataloader prepared by Accelerate). A sharded loader's processes score `num_samples` split
            between them from their own data; an unsharded one's process r scores its contiguous part of the first
            `num_samples` examples. Either way the scores are summed across processes, so every process returns
            the Fisher over `num_samples` examples in all, the same as one process over the same examples.
        per_process: each process scores the first `num_samples` examples of its own dataloader alone and keeps
            its own scores (the FISH paper's individual masks in distributed training); nothing is exchanged.
        score_dtype: the scores' dtype; torch.bfloat16 halves their memory (each chunk is still summed in float32).
        score_device: where the scores are kept (e.g. "cpu" for a model that fills its GPU); default: with each
            parameter.

    Returns:
        {parameter name: tensor of `score_dtype` shaped like the parameter}.
    """
    if fisher not in FISHER_TYPES:
        raise ValueError(f"fisher must be one of {FISHER_TYPES}, got {fisher!r}.")
    if fisher == "expected" and loss_fn is not None:
        raise ValueError("fisher='expected' needs the model's own likelihood; it cannot be combined with loss_fn.")
    if isinstance(num_samples, bool) or not isinstance(num_samples, int) or num_samples < 1:
        raise ValueError(f"num_samples must be a positive integer, got {num_samples!r}.")
    if isinstance(chunk_size, bool) or not isinstance(chunk_size, int) or chunk_size < 1:
        raise ValueError(f"chunk_size must be a positive integer, got {chunk_size!r}.")
    if not isinstance(score_dtype, torch.dtype) or not score_dtype.is_floating_point:
        raise ValueError(f"score_dtype must be a floating-point dtype (e.g. torch.bfloat16), got {score_dtype!r}.")
    params = dict(parameters) if parameters is not None else dict(model.named_parameters())
    if not params:
        raise ValueError("No parameters to score.")
    # bitsandbytes' packed 4-bit (uint8, or a float quant_storage) and 8-bit (int8) weights: no gradient to square
    quantized = [n for n, p in params.items() if not p.is_floating_point() or type(p).__name__ in ("Params4bit", "Int8Params")]
    if quantized:
        raise ValueError(
            f"{len(quantized)} parameter(s) to score are stored quantized, e.g. '{quantized[0]}' "
            f"({params[quantized[0]].dtype}, {type(params[quantized[0]]).__name__}): the Fisher is a gradient of float "
            "weights. Compute the mask on the base model loaded in bfloat16 or float32 and pass FishConfig(mask=mask) "
            "to the quantized model (a mask names parameters and their dequantized shapes), or leave these "
            "parameters out (eligible=... / parameters=...)."
        )
    generator = torch.Generator().manual_seed(seed)
    scorer = _FisherScorer(model, params, fisher, loss_fn, generator, vectorized, score_dtype, score_device)
    was_training = model.training
    requires_grad = {name: p.requires_grad for name, p in params.items()}
    model.eval()  # no dropout: each example's gradient is a deterministic function of the example
    for p in params.values():
        p.requires_grad_(True)
    rank, world = (0, 1) if per_process else rank_and_world()
    if world > 1:
        check_same_everywhere(tensors_digest(params), "model being scored")
    sharded = world > 1 and (is_sharded(dataloader) if sharded is None else sharded)
    if sharded:  # this process's share of the budget, from the start of its own data
        offset, end = share(num_samples, rank, world)
        start, stop = 0, end - offset
    else:  # this process's part of the one stream every process reads
        offset, (start, stop) = 0, share(num_samples, rank, world)
    error = None
    try:
        available = None if sharded else _dataset_size(dataloader)
        if available is not None and available < num_samples:
            raise ValueError(
                f"num_samples={num_samples} but the dataloader holds only {available} examples; lower num_samples "
                "or pass more data."
            )
        seen = _score_stream(scorer, dataloader, params, (start, stop), offset, chunk_size, progress and rank == 0)
        if seen < stop:
            here = " to this process" if world > 1 else ""
            if seen == 0:
                raise ValueError(f"The dataloader yielded no examples{here}; the Fisher needs at least one labelled example.")
            raise ValueError(
                f"num_samples={num_samples} but the dataloader yielded only {seen} examples{here}, {stop} needed; "
                "lower num_samples or pass more data."
            )
    except Exception as err:  # every process must learn of it before the collective below
        error = err
    finally:
        scorer.close()
        model.train(was_training)
        for name, p in params.items():
            p.requires_grad_(requires_grad[name])
    if world == 1 and error is not None:
        raise error
    if world > 1:
        raise_together(error, "computing the Fisher")
        sum_across_processes(scorer.scores)
    return scorer.scores


def _score_stream(scorer, dataloader, params, span: tuple[int, int], offset: int, chunk_size: int, progress: bool) -> int:
    """Score the examples [start, stop) = `span` of the dataloader's stream in chunks (example i counts as number
    offset + i); returns how far the stream reached, at most `stop`."""
    start, stop = span
    seen = 0
    bar = _progress_bar(stop - start, progress)
    for batch in dataloader:
        batch = _as_model_batch(batch, _device_of(params))
        size = _batch_size(batch)
        first, last = max(start, seen), min(stop, seen + size)
        if first < last:
            for chunk in range(first, last, chunk_size):
                end = min(chunk + chunk_size, last)
                scorer.score(_slice(batch, chunk - seen, end - seen), first_example=offset + chunk)
            bar.update(last - first)
        seen += size
        if seen >= stop:
            break
    bar.close()
    return min(seen, stop)


class _FisherScorer:
    """Accumulates squared per-example gradients chunk by chunk into `scores`."""

    def __init__(self, model, params, fisher, loss_fn, generator, vectorized, score_dtype, score_device):
        self.model, self.params, self.fisher, self.loss_fn, self.generator = model, params, fisher, loss_fn, generator
        self.scores = {
            name: torch.zeros(p.shape, dtype=score_dtype, device=p.device if score_device is None else score_device)
            for name, p in params.items()
        }
        self.recorder = CallRecorder(model, params) if vectorized else None
        self.vectorized_names = set(self.recorder.hooked_parameters) if vectorized else set()
        self.verified = not vectorized
        self.loss_checked = loss_fn is not None

    def close(self) -> None:
        if self.recorder is not None:
            self.recorder.remove()

    def score(self, batch: dict, first_example: int) -> None:
        if not self.loss_checked:
            for i in range(min(LOSS_CHECK_EXAMPLES, _batch_size(batch))):
                check_model_loss(self.model, _slice(batch, i, i + 1), first_example + i)
            self.loss_checked = True
        if not self.verified:
            head = min(VERIFY_EXAMPLES, _batch_size(batch))
            self._verify(_slice(batch, 0, head), first_example)
            if self.fisher == "empirical":  # the check scored these examples already
                batch, first_example = _slice(batch, head, _batch_size(batch)), first_example + head
        if not _batch_size(batch):
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
            entries[name] = compared_entries(full.view(-1))
            vectorised[name] = full.view(-1)[entries[name]]

        self._score_vectorized(batch, first_example, "empirical", sample)
        for name in self.vectorized_names - set(entries):  # no module call of theirs was recorded: scored 0
            entries[name] = compared_entries(torch.zeros(self.params[name].numel(), device=self.params[name].device))
            vectorised[name] = torch.zeros(entries[name].numel(), device=entries[name].device)
        examples = [_slice(batch, i, i + 1) for i in range(_batch_size(batch))]
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
        with self.recorder.recording(_batch_size(batch)):
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
        for i in range(_batch_size(batch) if names else 0):
            for losses in self._weighted_losses(_slice(batch, i, i + 1), first_example + i, self.fisher):
                grads = torch.autograd.grad(losses.sum(), params, allow_unused=True, retain_graph=True)
                for name, grad in zip(names, grads):
                    if grad is not None:
                        self._add(name, grad.float().pow(2))

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


def _as_model_batch(batch, device) -> dict:
    if not isinstance(batch, Mapping):
        raise TypeError(f"The dataloader must yield dict batches (model inputs plus 'labels'), got {type(batch).__name__}.")
    batch = dict(batch)
    if "labels" not in batch and "label" in batch:
        batch["labels"] = batch.pop("label")
    if "labels" not in batch:
        raise ValueError("Batches need gold 'labels' for the Fisher (the paper scores the loss at the gold label).")
    return {k: v.to(device) if isinstance(v, torch.Tensor) else v for k, v in batch.items()}


def _batch_size(batch: dict) -> int:
    return batch["labels"].shape[0]


def _slice(batch: dict, start: int, end: int) -> dict:
    size = _batch_size(batch)
    return {k: v[start:end] if isinstance(v, torch.Tensor) and v.dim() and v.shape[0] == size else v for k, v in batch.items()}


def _device_of(params: Mapping[str, nn.Parameter]) -> torch.device:
    return next(iter(params.values())).device


def _dataset_size(dataloader) -> Optional[int]:
    dataset = getattr(dataloader, "dataset", None)
    try:
        return len(dataset) if dataset is not None else None
    except TypeError:
        return None


def _progress_bar(total: int, enabled: bool):
    from tqdm.auto import tqdm

    return tqdm(total=total, desc="Fisher", unit="ex", disable=not enabled)
