"""What one training step of a FISH adapter costs next to LoRA and full fine-tuning, measured side by side.

A stack of `--layers` Linear(`--width`) layers, `--tokens` tokens, forward + backward of the sum of the output:
- fish: a 0.5 % random mask on the weights (`--keep-ratio`), the weight diffs as sparse terms (`tuner/sparse_terms.py`),
- fish_w_plus_delta: the same adapter through the W + Δ path (what every step cost before the sparse term),
- lora: LoRA r=`--rank` on every layer,
- full: every weight trainable.
For each: mean milliseconds per step (methods interleaved, `--repeats` rounds) and the bytes autograd keeps for the
backward beyond the parameters (saved tensors, each storage counted once). Prints JSON with ratios to LoRA.
"""

import argparse
import json
import time

import torch
from peft import LoraConfig, get_peft_model
from torch import nn

from fish_peft import FishConfig, random_mask
from fish_peft.tuner.layer import FishLayer


def stack(width: int, layers: int) -> nn.Module:
    return nn.Sequential(*[nn.Linear(width, width) for _ in range(layers)])


def models(args) -> dict[str, nn.Module]:
    torch.manual_seed(0)
    base = stack(args.width, args.layers)
    mask = random_mask(base, args.keep_ratio, modules_to_save=[], eligible=r"weight$")
    fish = get_peft_model(base, FishConfig(mask=mask))
    names = [str(i) for i in range(args.layers)]
    return {
        "fish": fish,
        "fish_w_plus_delta": fish,  # the same model, stepped with the sparse term turned off
        "lora": get_peft_model(stack(args.width, args.layers), LoraConfig(r=args.rank, target_modules=names)),
        "full": stack(args.width, args.layers),
    }


def step(name: str, model: nn.Module, x: torch.Tensor) -> None:
    sparse_term = FishLayer._weight_diff_is_a_sparse_term
    if name == "fish_w_plus_delta":
        FishLayer._weight_diff_is_a_sparse_term = lambda self: False
    try:
        model(x).sum().backward()
    finally:
        FishLayer._weight_diff_is_a_sparse_term = sparse_term


def saved_bytes(name: str, model: nn.Module, x: torch.Tensor) -> int:
    """Bytes of the tensors autograd saves for the backward, parameters and the input left out."""
    skip = {p.untyped_storage().data_ptr() for p in model.parameters()} | {x.untyped_storage().data_ptr()}
    storages = {}

    def pack(tensor):
        storage = tensor.untyped_storage()
        if storage.data_ptr() not in skip:
            storages[storage.data_ptr()] = storage.nbytes()
        return tensor

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
        step(name, model, x)
    model.zero_grad(set_to_none=True)
    return sum(storages.values())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--width", type=int, default=1024)
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--tokens", type=int, default=256)
    parser.add_argument("--keep-ratio", type=float, default=0.005)
    parser.add_argument("--rank", type=int, default=8)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--steps", type=int, default=10, help="steps per method in each round")
    args = parser.parse_args()
    x = torch.randn(args.tokens, args.width)
    built = models(args)
    times = {name: [] for name in built}
    for name, model in built.items():  # warm-up
        step(name, model, x)
    for _ in range(args.repeats):
        for name, model in built.items():
            start = time.perf_counter()
            for _ in range(args.steps):
                step(name, model, x)
            times[name].append((time.perf_counter() - start) / args.steps * 1000)
    results = {}
    for name, model in built.items():
        ms = sum(times[name]) / len(times[name])
        results[name] = {"step_ms": round(ms, 2), "saved_for_backward_mib": round(saved_bytes(name, model, x) / 2**20, 2)}
    lora = results["lora"]
    for row in results.values():
        row["step_over_lora"] = round(row["step_ms"] / lora["step_ms"], 2)
        row["memory_over_lora"] = round(row["saved_for_backward_mib"] / lora["saved_for_backward_mib"], 2)
    print(json.dumps({"setup": vars(args), "device": "cpu", "threads": torch.get_num_threads(), "methods": results}, indent=2))


if __name__ == "__main__":
    main()
