"""Memory and time of `compute_fisher_mask` on Llama-architecture causal LMs of about 0.25B, 0.5B and 1B parameters.

Random weights (built from `LlamaConfig`, float32) and random tokens: memory and time do not depend on them. For each
size, in fresh processes over the same `--num-samples` examples of `--seq-len` tokens in batches of `--batch-size`:
- fisher_mask: `compute_fisher_mask` (keep ratio `--keep-ratio`, chunk size `--chunk-size` or the default),
- plain: one ordinary batched forward+backward per batch (what a training step costs, gradients included).
Peak memory is measured beyond the loaded model (CPU: the peak resident set, reset after loading through
/proc/self/clear_refs; CUDA: torch's peak allocated memory) and given as a multiple of the model's float32 weights.
The plain pass's peak is its gradients (1x) plus one batch's activations, so fisher_mask's peak less those
activations is also given. Prints JSON with the ratios. Targets: fisher_mask peak <= 1.3x the weights, time <= 2x
the plain pass.
"""

import argparse
import json
import subprocess
import sys
import time

import torch
from transformers import LlamaConfig, LlamaForCausalLM, logging

from fish_peft import compute_fisher, compute_fisher_mask, mask_from_scores
from peak_memory import PeakMemory

SIZES = {  # name: (hidden, layers, attention heads, intermediate); 4 key/value heads, vocabulary 32000
    "0.25B": (1024, 16, 16, 2816),
    "0.5B": (1536, 16, 12, 4096),
    "1B": (2048, 20, 16, 5632),
}


def build_model(size: str, device: str) -> LlamaForCausalLM:
    hidden, layers, heads, intermediate = SIZES[size]
    config = LlamaConfig(
        vocab_size=32000, hidden_size=hidden, num_hidden_layers=layers, num_attention_heads=heads,
        num_key_value_heads=4, intermediate_size=intermediate, max_position_embeddings=2048,
    )
    torch.manual_seed(0)
    with torch.device(device):
        return LlamaForCausalLM(config).eval()


def batches(args) -> list[dict]:
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(0, 32000, (args.num_samples, args.seq_len), generator=g).to(args.device)
    return [{"input_ids": ids[i : i + args.batch_size], "labels": ids[i : i + args.batch_size]}
            for i in range(0, args.num_samples, args.batch_size)]


def plain_pass(model, data) -> None:
    for batch in data:
        model(**batch).loss.backward()
    model.zero_grad(set_to_none=True)


def measure(args) -> dict:
    """In this process: build the model, run one measurement, return its seconds and peak bytes."""
    model = build_model(args.size, args.device)
    data = batches(args)
    with torch.no_grad():
        model(input_ids=data[0]["input_ids"][:1, :8])  # warm-up, outside the measurement
    chunking = {} if args.chunk_size is None else {"chunk_size": args.chunk_size}
    phases = {
        "plain": lambda: plain_pass(model, data),
        "fisher_mask": lambda: compute_fisher_mask(model, data, args.keep_ratio, args.num_samples, **chunking),
        "fisher": lambda: compute_fisher(model, data, args.num_samples, **chunking),
    }
    result = {}
    held = None
    for phase in ["fisher", "selection"] if args.measure == "phases" else [args.measure]:
        start = time.perf_counter()
        with PeakMemory(args.device) as memory:
            if phase == "selection":
                mask_from_scores(model, held, args.keep_ratio)
            else:
                held = phases[phase]()
        result[phase] = {"seconds": time.perf_counter() - start, "peak_bytes": memory.bytes}
    return result


def run_child(args, size: str, what: str) -> dict:
    command = [sys.executable, __file__, "--child", "--size", size, "--measure", what, "--device", args.device,
               "--num-samples", str(args.num_samples), "--batch-size", str(args.batch_size),
               "--seq-len", str(args.seq_len), "--keep-ratio", str(args.keep_ratio)]
    if args.chunk_size is not None:
        command += ["--chunk-size", str(args.chunk_size)]
    done = subprocess.run(command, capture_output=True, text=True, check=False)
    if done.returncode:
        raise RuntimeError(f"{size} {what} failed:\n{done.stderr[-3000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def report(args, size: str) -> dict:
    model = build_model(size, "meta")
    numel = sum(p.numel() for p in model.parameters())
    weights = 4 * numel
    row = {"size": size, "parameters": numel, "float32_weights_gb": round(weights / 1e9, 3)}
    measured = run_child(args, size, "fisher_mask") | run_child(args, size, "plain")
    if args.breakdown:
        measured |= run_child(args, size, "phases")
    for name, values in measured.items():
        row[name] = {
            "seconds": round(values["seconds"], 1),
            "peak_beyond_model_gb": round(values["peak_bytes"] / 1e9, 3),
            "peak_over_weights": round(values["peak_bytes"] / weights, 2),
        }
    row["fisher_mask_time_over_plain"] = round(measured["fisher_mask"]["seconds"] / measured["plain"]["seconds"], 2)
    activations = measured["plain"]["peak_bytes"] - weights  # the plain pass holds float32 gradients besides them
    row["fisher_mask_peak_over_weights_beyond_plain_activations"] = round(
        (measured["fisher_mask"]["peak_bytes"] - activations) / weights, 2
    )
    return row


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sizes", nargs="+", choices=list(SIZES), default=list(SIZES))
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--num-samples", type=int, default=8)
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("--seq-len", type=int, default=128)
    parser.add_argument("--keep-ratio", type=float, default=0.005)
    parser.add_argument("--chunk-size", type=int, default=None, help="compute_fisher's chunk_size (default: its own)")
    parser.add_argument("--breakdown", action="store_true", help="also measure compute_fisher and the selection apart")
    parser.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--size", choices=list(SIZES), help=argparse.SUPPRESS)
    parser.add_argument("--measure", choices=["plain", "fisher_mask", "phases"], help=argparse.SUPPRESS)
    args = parser.parse_args()
    logging.set_verbosity_error()
    if args.child:
        print(json.dumps(measure(args)))
        return
    print(json.dumps({
        "model": "LlamaForCausalLM, random weights, float32",
        "device": args.device,
        "num_samples": args.num_samples,
        "batch_size": args.batch_size,
        "seq_len": args.seq_len,
        "keep_ratio": args.keep_ratio,
        "chunk_size": args.chunk_size or "default",
        "torch_threads": torch.get_num_threads(),
        "sizes": [report(args, size) for size in args.sizes],
        "targets": {"fisher_mask.peak_over_weights": "<= 1.3", "fisher_mask_time_over_plain": "<= 2"},
    }, indent=2))


if __name__ == "__main__":
    main()
