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
from fish_peft.masks.fisher_scorer import FisherScorer, batch_size, slice_batch

FISHER_TYPES = ("empirical", "expected")

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
    gradient_sums: bool = False,
) -> Union[dict[str, torch.Tensor], tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]]:
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
        gradient_sums: also sum the per-example gradients themselves over the same examples (float32, empirical
            Fisher only), for scores that need the mean gradient beside the Fisher (`gradient_snr`).

    Returns:
        {parameter name: tensor of `score_dtype` shaped like the parameter}; with `gradient_sums`, that and
        {parameter name: Σ of the per-example gradients}.
    """
    if fisher not in FISHER_TYPES:
        raise ValueError(f"fisher must be one of {FISHER_TYPES}, got {fisher!r}.")
    if fisher == "expected" and loss_fn is not None:
        raise ValueError("fisher='expected' needs the model's own likelihood; it cannot be combined with loss_fn.")
    if fisher == "expected" and gradient_sums:
        raise ValueError("gradient_sums are the gradients at the gold labels: use them with fisher='empirical'.")
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
    scorer = FisherScorer(model, params, fisher, loss_fn, generator, vectorized, score_dtype, score_device, gradient_sums)
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
        if gradient_sums:
            sum_across_processes(scorer.sums)
    return (scorer.scores, scorer.sums) if gradient_sums else scorer.scores


def _score_stream(scorer, dataloader, params, span: tuple[int, int], offset: int, chunk_size: int, progress: bool) -> int:
    """Score the examples [start, stop) = `span` of the dataloader's stream in chunks (example i counts as number
    offset + i); returns how far the stream reached, at most `stop`."""
    start, stop = span
    seen = 0
    bar = _progress_bar(stop - start, progress)
    for batch in dataloader:
        batch = _as_model_batch(batch, _device_of(params))
        size = batch_size(batch)
        first, last = max(start, seen), min(stop, seen + size)
        if first < last:
            for chunk in range(first, last, chunk_size):
                end = min(chunk + chunk_size, last)
                scorer.score(slice_batch(batch, chunk - seen, end - seen), first_example=offset + chunk)
            bar.update(last - first)
        seen += size
        if seen >= stop:
            break
    bar.close()
    return min(seen, stop)


def _as_model_batch(batch, device) -> dict:
    if not isinstance(batch, Mapping):
        raise TypeError(f"The dataloader must yield dict batches (model inputs plus 'labels'), got {type(batch).__name__}.")
    batch = dict(batch)
    if "labels" not in batch and "label" in batch:
        batch["labels"] = batch.pop("label")
    if "labels" not in batch:
        raise ValueError("Batches need gold 'labels' for the Fisher (the paper scores the loss at the gold label).")
    return {k: v.to(device) if isinstance(v, torch.Tensor) else v for k, v in batch.items()}


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
