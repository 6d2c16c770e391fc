"""Speed of the vectorised Fisher against the one-example-at-a-time loop and a plain batched pass.

On the real all-MiniLM-L6-v2 and real Rotten Tomatoes sentences, over the same `--num-samples` examples:
- vectorised: `compute_fisher` (per-example gradients from one backward per chunk),
- loop: `compute_fisher(vectorized=False)`, one forward+backward per example (the reference),
- plain: one ordinary batched forward+backward per batch (what training costs; no per-example gradients).
Prints JSON with the times, the ratios, and the agreement of the two 0.5 % masks (Jaccard).
"""

import argparse
import json
import time

import torch
from transformers import AutoModelForSequenceClassification, AutoTokenizer, logging

from fish_peft import compute_fisher, mask_from_scores
from fish_peft.cli.demo_data import minilm_path, sentence_loader, split_rotten_tomatoes


def timed(fn):
    start = time.perf_counter()
    result = fn()
    return result, time.perf_counter() - start


def plain_pass(model, loader, num_samples):
    seen = 0
    for batch in loader:
        model(**batch).loss.backward()
        model.zero_grad(set_to_none=True)
        seen += batch["labels"].shape[0]
        if seen >= num_samples:
            break


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--num-samples", type=int, default=1024)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--chunk-size", type=int, default=16)
    parser.add_argument("--keep-ratio", type=float, default=0.005)
    args = parser.parse_args()
    logging.set_verbosity_error()
    torch.manual_seed(0)

    path = minilm_path()
    model = AutoModelForSequenceClassification.from_pretrained(path, num_labels=2).eval()
    train, _ = split_rotten_tomatoes()
    loader = sentence_loader(AutoTokenizer.from_pretrained(path), train[: args.num_samples], args.batch_size, shuffle=False)

    _, plain_s = timed(lambda: plain_pass(model, loader, args.num_samples))
    vectorised, vectorised_s = timed(lambda: compute_fisher(model, loader, args.num_samples, chunk_size=args.chunk_size))
    loop, loop_s = timed(lambda: compute_fisher(model, loader, args.num_samples, vectorized=False))

    mask_vectorised = mask_from_scores(model, vectorised, args.keep_ratio)
    mask_loop = mask_from_scores(model, loop, args.keep_ratio)
    largest = max(loop[n].abs().max().item() for n in loop)
    max_diff = max((vectorised[n] - loop[n]).abs().max().item() for n in loop) / largest
    print(json.dumps({
        "model": "all-MiniLM-L6-v2",
        "num_samples": args.num_samples,
        "batch_size": args.batch_size,
        "chunk_size": args.chunk_size,
        "torch_threads": torch.get_num_threads(),
        "seconds": {"vectorised": round(vectorised_s, 2), "loop": round(loop_s, 2), "plain_batched_pass": round(plain_s, 2)},
        "loop_over_vectorised": round(loop_s / vectorised_s, 2),
        "vectorised_over_plain": round(vectorised_s / plain_s, 2),
        "mask_jaccard": round(mask_vectorised.jaccard(mask_loop), 4),
        "max_score_difference_relative_to_largest_score": max_diff,
        "targets": {"loop_over_vectorised": ">= 3", "vectorised_over_plain": "<= 2", "mask_jaccard": ">= 0.99"},
    }, indent=2))


if __name__ == "__main__":
    main()
