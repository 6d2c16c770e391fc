"""What a FISH adapter costs per training step and per decoded token, beside LoRA, full fine-tuning and the base model.

FISH is a 0.5 % random mask (`random_mask`, `--keep-ratio`): entries in every row and column of every matrix, its
costliest case; fish_fisher is FISH with its own mask (`compute_fisher_mask` on the section's training batches),
whose entries crowd into few of each matrix's columns; fish_w_plus_delta is the random-mask adapter stepped with
`FishLayer._weight_diff_is_a_sparse_term` patched to False, i.e. through W + Δ (what a step cost before the sparse
terms). Sections (`--sections`; `--quick` shrinks every size for the test):
- linear_stack: 4 × Linear(1024), 256 tokens, forward + backward of the output's sum. fish (weights only),
  fish_w_plus_delta, lora (r=8, every layer), full. Time, and the bytes autograd keeps for the backward beyond the
  parameters and the input (each storage counted once).
- minilm: the real all-MiniLM-L6-v2 (2 labels), 32 Rotten Tomatoes sentences padded to 64 tokens; a step is the
  loss's forward + backward + AdamW step + zero_grad. fish (mask over every parameter), fish_fisher,
  fish_w_plus_delta, lora_qv (r=8 on query/value), lora_same_params (every Linear of the encoder, at the rank whose
  count of values is closest to FISH's), full. Every method trains the classifier in full (FISH: the head its mask
  keeps, inside its budget; LoRA: modules_to_save).
- llama: a Llama-architecture causal LM of 0.25B parameters (random weights, float32), 4 × 128 random tokens,
  labels = input_ids, 3 AdamW steps. The same methods (LoRA on q_proj/v_proj, and "all-linear"), and fish and
  lora_qv with activation checkpointing (non-reentrant, every decoder layer), as TRL's SFTConfig runs by default.
- decoding: batch 1, adapters unmerged, eval mode, no_grad: one token through 4 × Linear(2048) (base, and fish and
  lora as in linear_stack), and greedy generation of 32 tokens after 8 with the KV cache on the llama section's
  model (base, fish, fish_fisher, lora_qv).

Time is the median over `--repeats` rounds in which the methods take turns on the same inputs (the llama section
holds its eight models at once, about 11 GB with full fine-tuning's AdamW state). Peak memory (minilm, llama)
is measured in a fresh process per method (forked from a server that has only imported the libraries), beyond what
it holds once the model, adapter, optimizer and batches are built: on CPU the peak resident set (VmHWM, reset
through /proc/self/clear_refs, glibc's mmap threshold fixed at 64 KiB so that it follows live memory) less the
resident set then; on CUDA torch's peak allocated memory less the allocated memory then. Prints one JSON document
with ratios and the issue's targets: FISH's step ≤ 1.1× LoRA's (lora_qv's) time and memory, unmerged decoding ≤
1.25× the base model's time.
"""

import argparse
import copy
import dataclasses
import functools
import json
import multiprocessing
import os
import statistics
import time
from concurrent.futures import ProcessPoolExecutor
from contextlib import nullcontext
from typing import Callable, Optional
from unittest import mock

import torch
from peft import LoraConfig, get_peft_model
from torch import nn
from transformers import (
    AutoConfig, AutoModelForSequenceClassification, AutoTokenizer, LlamaConfig, LlamaForCausalLM, logging,
)

from fish_peft import FishConfig, FishLayer, compute_fisher_mask, random_mask
from fish_peft.cli.demo_data import minilm_path, split_rotten_tomatoes
from peak_memory import PeakMemory

METHODS = ("fish", "fish_fisher", "fish_w_plus_delta", "lora_qv", "lora_same_params", "full")
CHECKPOINTED = ("fish_checkpointed", "lora_qv_checkpointed")  # the llama's, with activation checkpointing
SECTION_METHODS = {"minilm": METHODS, "llama": METHODS + CHECKPOINTED}
LORA_TARGETS = {  # section: (lora_qv's targets, lora_same_params's targets)
    "minilm": (["query", "value"], r".*\.encoder\..*\.(query|key|value|dense)"),
    "llama": (["q_proj", "v_proj"], "all-linear"),  # PEFT leaves lm_head out of "all-linear"
}
PRELOAD = [  # what the fork server imports once for every measuring process
    "torch", "peft", "fish_peft.tuner", "fish_peft.cli.demo_data", "transformers.models.bert.modeling_bert",
    "transformers.models.llama.modeling_llama",
]
HEADS = {"minilm": ["classifier"], "llama": []}
TARGETS = {  # the limits, at their place in the report
    "linear_stack.methods.fish.step_ms_over_lora": 1.1,
    "linear_stack.methods.fish.saved_for_backward_mib_over_lora": 1.1,
    "minilm.methods.fish.step_ms_over_lora_qv": 1.1,
    "minilm.methods.fish.peak_mib_over_lora_qv": 1.1,
    "minilm.methods.fish_fisher.step_ms_over_lora_qv": 1.1,
    "minilm.methods.fish_fisher.peak_mib_over_lora_qv": 1.1,
    "llama.methods.fish.step_ms_over_lora_qv": 1.1,
    "llama.methods.fish.peak_over_loaded_mib_over_lora_qv": 1.1,
    "llama.methods.fish_fisher.step_ms_over_lora_qv": 1.1,
    "llama.methods.fish_fisher.peak_over_loaded_mib_over_lora_qv": 1.1,
    "decoding.linear.methods.fish.ms_over_base": 1.25,
    "decoding.generate.methods.fish.ms_per_token_over_base": 1.25,
}


@dataclasses.dataclass(frozen=True)
class Settings:
    """Every size the sections use (the defaults are the issue's; `QUICK` overrides them for the test)."""

    device: str = "cpu"
    keep_ratio: float = 0.005
    rank: int = 8
    repeats: int = 5
    width: int = 1024  # linear_stack
    layers: int = 4
    tokens: int = 256
    stack_steps: int = 10  # per method and round
    minilm_batch: int = 32
    minilm_length: int = 64
    minilm_steps: int = 2  # per method and round, each on its own batch
    llama: tuple = (1024, 16, 16, 4, 2816, 32000)  # hidden, layers, heads, key/value heads, intermediate, vocab
    llama_batch: int = 4
    llama_length: int = 128
    llama_steps: int = 3
    decode_width: int = 2048
    decode_forwards: int = 200  # per method and round
    prompt: int = 8
    new_tokens: int = 32


QUICK = dict(
    repeats=1, width=128, layers=2, tokens=32, stack_steps=2, minilm_batch=4, minilm_length=16,
    llama=(128, 2, 4, 2, 352, 8000), llama_batch=2, llama_length=16, decode_width=128, decode_forwards=10, new_tokens=8,
)


# ---- building ---------------------------------------------------------------------------------------------------

def stack(width: int, layers: int) -> nn.Sequential:
    return nn.Sequential(*[nn.Linear(width, width) for _ in range(layers)])


def stack_models(s: Settings, width: int) -> dict[str, nn.Module]:
    """A stack of Linear(`width`) and two adapted copies: FISH on the weights and LoRA on every layer."""
    torch.manual_seed(0)
    with torch.device(s.device):
        base = stack(width, s.layers)
    mask = random_mask(base, s.keep_ratio, modules_to_save=[], eligible=r"weight$")
    lora = LoraConfig(r=s.rank, target_modules=[str(i) for i in range(s.layers)])
    return {
        "base": base,
        "fish": get_peft_model(copy.deepcopy(base), FishConfig(mask=mask)),
        "lora": get_peft_model(copy.deepcopy(base), lora),
    }


def llama_config(s: Settings) -> LlamaConfig:
    hidden, layers, heads, kv_heads, intermediate, vocab = s.llama
    return LlamaConfig(
        vocab_size=vocab, hidden_size=hidden, num_hidden_layers=layers, num_attention_heads=heads,
        num_key_value_heads=kv_heads, intermediate_size=intermediate, pad_token_id=0,
    )


def structure(section: str, s: Settings) -> nn.Module:
    """The section's model on the meta device: its shapes without its weights."""
    with torch.device("meta"):
        if section == "minilm":
            config = AutoConfig.from_pretrained(minilm_path(), num_labels=2)
            return AutoModelForSequenceClassification.from_config(config)
        return LlamaForCausalLM(llama_config(s))


def base_model(section: str, s: Settings) -> nn.Module:
    torch.manual_seed(0)
    if section == "minilm":
        return AutoModelForSequenceClassification.from_pretrained(minilm_path(), num_labels=2).to(s.device)
    with torch.device(s.device):
        return LlamaForCausalLM(llama_config(s))


def adapt(base: nn.Module, section: str, method: str, s: Settings, same_params_rank: Optional[int] = None):
    """(the model `method` trains, what it trains): FISH with `random_mask`'s or the Fisher mask's budget (its head,
    if any, counted in), LoRA with the head in modules_to_save, or every parameter."""
    if method in CHECKPOINTED:
        model, facts = adapt(base, section, method.removesuffix("_checkpointed"), s, same_params_rank)
        model.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
        return model, facts
    qv, all_linear = LORA_TARGETS[section]
    facts = {}
    if method.startswith("fish"):
        mask = fisher_mask(base, section, s) if method == "fish_fisher" else random_mask(base, s.keep_ratio)
        model = get_peft_model(base, FishConfig(mask=mask))
        facts["mask_entries"] = mask.num_selected
    elif method.startswith("lora"):
        rank, targets = (s.rank, qv) if method == "lora_qv" else (same_params_rank, all_linear)
        model = get_peft_model(base, LoraConfig(r=rank, target_modules=targets, modules_to_save=HEADS[section] or None))
        facts["rank"] = rank
    else:
        model = base
    trainable = {name: p.numel() for name, p in model.named_parameters() if p.requires_grad}
    head = sum(n for name, n in trainable.items() if any(f"{h}." in name for h in HEADS[section]))
    facts |= {"trainable_parameters": sum(trainable.values()), "adapter_parameters": sum(trainable.values()) - head}
    return model, facts


def fisher_mask(base: nn.Module, section: str, s: Settings):
    """FISH's mask of `base` from the section's training batches (the llama's per-example gradients 2 at a time:
    each is the model's size)."""
    data = batches(section, s)
    examples = sum(len(batch["labels"]) for batch in data)
    return compute_fisher_mask(base, data, s.keep_ratio, num_samples=examples, chunk_size=2 if section == "llama" else 16)


def matched_rank(section: str, s: Settings, count: int) -> int:
    """The rank at which LoRA on lora_same_params's targets trains the number of values closest to `count`."""
    targets = LORA_TARGETS[section][1]
    probe = get_peft_model(structure(section, s), LoraConfig(r=1, target_modules=targets))
    per_rank, _ = probe.get_nb_trainable_parameters()
    return max(1, round(count / per_rank))


def batches(section: str, s: Settings) -> list[dict[str, torch.Tensor]]:
    """The training batches, the same for every method: real sentences (minilm) or random tokens (llama)."""
    if section == "minilm":
        size = s.minilm_batch
        examples = split_rotten_tomatoes()[0][: size * s.minilm_steps]
        tokenizer = AutoTokenizer.from_pretrained(minilm_path())
        encoded = tokenizer(
            [text for text, _ in examples], padding="max_length", truncation=True, max_length=s.minilm_length,
            return_tensors="pt",
        )
        encoded["labels"] = torch.tensor([label for _, label in examples])
        encoded = {key: value.to(s.device) for key, value in encoded.items()}
        return [{key: value[i : i + size] for key, value in encoded.items()} for i in range(0, len(examples), size)]
    generator = torch.Generator().manual_seed(0)
    shape = (s.llama_steps, s.llama_batch, s.llama_length)
    ids = torch.randint(0, s.llama[-1], shape, generator=generator).to(s.device)
    return [{"input_ids": batch, "labels": batch} for batch in ids]


# ---- measuring --------------------------------------------------------------------------------------------------

def weight_diff_path(method: str):
    """fish_w_plus_delta's context: FISH layers form W + Δ instead of adding the weight's diff as a sparse term."""
    if method != "fish_w_plus_delta":
        return nullcontext()
    return mock.patch.object(FishLayer, "_weight_diff_is_a_sparse_term", lambda self: False)


class Training:
    """A model trained by `method` with AdamW: one step is forward with labels + backward + step + zero_grad."""

    def __init__(self, method: str, model: nn.Module):
        self.method, self.model = method, model.train()
        self.optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-5)

    def step(self, batch: dict[str, torch.Tensor]) -> None:
        with weight_diff_path(self.method):
            self.model(**batch).loss.backward()
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)


def seconds(run: Callable[[], object], device: str) -> float:
    synchronize(device)
    start = time.perf_counter()
    run()
    synchronize(device)
    return time.perf_counter() - start


def synchronize(device: str) -> None:
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize()


def interleaved(runs: dict[str, Callable[[], object]], s: Settings) -> dict[str, float]:
    """Median seconds of one call of each run over `s.repeats` rounds in which the runs take turns, after a warm-up
    call of each."""
    for run in runs.values():
        run()
    times = {name: [] for name in runs}
    for _ in range(s.repeats):
        for name, run in runs.items():
            times[name].append(seconds(run, s.device))
    return {name: statistics.median(values) for name, values in times.items()}


def measure_training(section: str, method: str, s: Settings, same_params_rank: Optional[int]) -> dict:
    """In a fresh process: build, then step through the batches; the peak memory beyond what the built model,
    adapter, optimizer and batches hold (times are measured interleaved, not here)."""
    logging.set_verbosity_error()
    model, facts = adapt(base_model(section, s), section, method, s, same_params_rank)
    training, data = Training(method, model), batches(section, s)
    with PeakMemory(s.device) as peak:
        for batch in data:
            training.step(batch)
    return {"peak_bytes": peak.bytes, "facts": facts}


def in_fresh_process(function: Callable, *args):
    """function(*args) in a process forked from multiprocessing's fork server, which has imported the libraries
    (named, since Python 3.11's fork server does not preload the main script as documented) and done nothing else."""
    # glibc's large blocks mapped and returned on free from 64 KiB (its threshold otherwise moves with the history
    # of frees): the peak resident set is then the peak of live memory, not ±5 % of allocator state between runs
    os.environ.setdefault("MALLOC_MMAP_THRESHOLD_", str(64 * 1024))  # read when the fork server starts
    context = multiprocessing.get_context("forkserver")
    context.set_forkserver_preload(PRELOAD)
    with ProcessPoolExecutor(1, mp_context=context) as pool:
        return pool.submit(function, *args).result()


def in_fresh_processes(section: str, s: Settings) -> dict[str, dict]:
    """measure_training of every method, fish first: lora_same_params's rank is matched to fish's count."""
    results = {"fish": in_fresh_process(measure_training, section, "fish", s, None)}
    rank = matched_rank(section, s, results["fish"]["facts"]["adapter_parameters"])
    for method in SECTION_METHODS[section][1:]:
        results[method] = in_fresh_process(measure_training, section, method, s, rank)
    return results


def over(rows: dict[str, dict], key: str, reference: str) -> dict[str, dict]:
    """Each row with `key`_over_`reference` added."""
    ratio = f"{key}_over_{reference}"
    return {name: row | {ratio: round(row[key] / rows[reference][key], 3)} for name, row in rows.items()}


def against_both_loras(rows: dict[str, dict], memory: str) -> dict[str, dict]:
    """Time and `memory` over LoRA on query/value (the issue's baseline) and over LoRA on every Linear at FISH's
    parameter count (an adapter on every layer keeps every layer's input for its backward, as FISH does)."""
    for reference in ("lora_qv", "lora_same_params"):
        rows = over(over(rows, "step_ms", reference), memory, reference)
    return rows


def mib(n_bytes: float) -> float:
    return round(n_bytes / 2**20, 2)


# ---- sections ---------------------------------------------------------------------------------------------------

def saved_bytes(run: Callable[[], None], skip: list[torch.Tensor]) -> int:
    """Bytes of the tensors autograd saves for the backward during `run`, those sharing storage with `skip` left out."""
    skipped = {t.untyped_storage().data_ptr() for t in skip}
    storages = {}

    def pack(tensor):
        storage = tensor.untyped_storage()
        if storage.data_ptr() not in skipped:
            storages[storage.data_ptr()] = storage.nbytes()
        return tensor

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
        run()
    return sum(storages.values())


def linear_stack(s: Settings) -> dict:
    built = stack_models(s, s.width)
    models = {"fish": built["fish"], "fish_w_plus_delta": built["fish"], "lora": built["lora"], "full": built["base"]}
    x = torch.randn(s.tokens, s.width, device=s.device)

    def step(name: str) -> None:
        with weight_diff_path(name):
            models[name](x).sum().backward()
        models[name].zero_grad(set_to_none=True)

    runs = {name: lambda name=name: [step(name) for _ in range(s.stack_steps)] for name in models}
    times = interleaved(runs, s)
    rows = {
        name: {
            "step_ms": round(1000 * times[name] / s.stack_steps, 2),
            "saved_for_backward_mib": mib(saved_bytes(lambda: step(name), [*model.parameters(), x])),
        }
        for name, model in models.items()
    }
    rows = over(over(rows, "step_ms", "lora"), "saved_for_backward_mib", "lora")
    setup = {"layers": s.layers, "width": s.width, "tokens": s.tokens, "steps_per_round": s.stack_steps,
             "fish": "random mask on the weights", "lora_rank": s.rank}
    return {"setup": setup, "methods": rows}


def interleaved_step_ms(section: str, s: Settings, rank: int, data: list[dict[str, torch.Tensor]]) -> dict[str, float]:
    """Milliseconds of one step of each method, its models held at once and taking turns over `data`."""
    trainings = [
        Training(method, adapt(base_model(section, s), section, method, s, rank)[0]) for method in SECTION_METHODS[section]
    ]
    times = interleaved({t.method: lambda t=t: [t.step(batch) for batch in data] for t in trainings}, s)
    return {method: round(1000 * seconds / len(data), 1) for method, seconds in times.items()}


def minilm(s: Settings) -> dict:
    measured = in_fresh_processes("minilm", s)
    data = batches("minilm", s)
    step_ms = interleaved_step_ms("minilm", s, measured["lora_same_params"]["facts"]["rank"], data)
    rows = {
        method: {"step_ms": step_ms[method], "peak_mib": mib(result["peak_bytes"]), **result["facts"]}
        for method, result in measured.items()
    }
    rows = against_both_loras(rows, "peak_mib")
    setup = {
        "model": "all-MiniLM-L6-v2, AutoModelForSequenceClassification, 2 labels", "batch": s.minilm_batch,
        "length": s.minilm_length, "data": "Rotten Tomatoes training sentences, padded/truncated to length",
        "steps_per_round": len(data), "head": "classifier trained in full by every method (fish: its mask's "
        "modules_to_save='auto', inside the 0.5 % budget; lora: modules_to_save=['classifier']; full: all)",
        "lora_same_params_targets": LORA_TARGETS["minilm"][1],
        "peak_memory": "fresh process per method, beyond the built model, adapter, optimizer and batches",
    }
    return {"setup": setup, "methods": rows}


def llama(s: Settings) -> dict:
    parameters = sum(p.numel() for p in structure("llama", s).parameters())
    weight_bytes = 4 * parameters
    measured = in_fresh_processes("llama", s)
    first_batch = batches("llama", s)[:1]  # each round, one step of every method
    step_ms = interleaved_step_ms("llama", s, measured["lora_same_params"]["facts"]["rank"], first_batch)
    rows = {}
    for method, result in measured.items():
        rows[method] = {
            "step_ms": step_ms[method],
            "peak_over_loaded_mib": mib(result["peak_bytes"]),
            "peak_over_weights": round(result["peak_bytes"] / weight_bytes, 3),
            **result["facts"],
        }
    rows = against_both_loras(rows, "peak_over_loaded_mib")
    fish, lora = rows["fish_checkpointed"], rows["lora_qv_checkpointed"]
    for key in ("step_ms", "peak_over_loaded_mib"):
        fish[f"{key}_over_lora_qv_checkpointed"] = round(fish[key] / lora[key], 3)
    hidden, layers, heads, kv_heads, intermediate, vocab = s.llama
    setup = {
        "model": "LlamaForCausalLM, random weights, float32", "parameters": parameters,
        "float32_weights_mib": mib(weight_bytes), "hidden": hidden, "layers": layers, "heads": heads,
        "kv_heads": kv_heads, "intermediate": intermediate, "vocab": vocab, "batch": s.llama_batch,
        "length": s.llama_length, "steps": s.llama_steps, "steps_per_round": 1,
        "lora_same_params_targets": LORA_TARGETS["llama"][1],
        "peak_memory": "fresh process per method, beyond the built model, adapter, optimizer and batches",
    }
    return {"setup": setup, "methods": rows}


def decoding(s: Settings) -> dict:
    return {"linear": decoding_linear(s), "generate": decoding_generate(s)}


def decoding_linear(s: Settings) -> dict:
    models = {name: model.eval() for name, model in stack_models(s, s.decode_width).items()}
    x = torch.randn(1, s.decode_width, device=s.device)

    def forwards(model: nn.Module) -> None:
        with torch.no_grad():
            for _ in range(s.decode_forwards):
                model(x)

    times = interleaved({name: lambda m=model: forwards(m) for name, model in models.items()}, s)
    rows = over({name: {"ms": round(1000 * t / s.decode_forwards, 4)} for name, t in times.items()}, "ms", "base")
    setup = {"layers": s.layers, "width": s.decode_width, "tokens": 1, "ms": "per forward", "lora_rank": s.rank}
    return {"setup": setup, "methods": rows}


def decoding_generate(s: Settings) -> dict:
    base = base_model("llama", s).eval()
    models = {"base": base} | {m: adapt(copy.deepcopy(base), "llama", m, s)[0] for m in ("fish", "fish_fisher", "lora_qv")}
    generator = torch.Generator().manual_seed(1)
    prompt = torch.randint(0, s.llama[-1], (1, s.prompt), generator=generator).to(s.device)

    def generate(model: nn.Module) -> None:
        with torch.no_grad():
            model.generate(input_ids=prompt, attention_mask=torch.ones_like(prompt), do_sample=False,
                           max_new_tokens=s.new_tokens, min_new_tokens=s.new_tokens)

    times = interleaved({name: lambda m=model: generate(m) for name, model in models.items()}, s)
    rows = {name: {"ms_per_token": round(1000 * t / s.new_tokens, 2)} for name, t in times.items()}
    rows = over(rows, "ms_per_token", "base")
    setup = {"model": "the llama section's", "prompt": s.prompt, "new_tokens": s.new_tokens, "cache": "KV cache",
             "ms_per_token": "whole generate call / new tokens"}
    return {"setup": setup, "methods": rows}


SECTIONS = {"linear_stack": linear_stack, "minilm": minilm, "llama": llama, "decoding": decoding}


def targets(report: dict) -> dict:
    """The issue's targets among the sections run: value, limit and whether it is met."""
    result = {}
    for path, limit in TARGETS.items():
        keys = path.split(".")
        if keys[0] in report:
            value = functools.reduce(dict.__getitem__, keys, report)
            result[path] = {"value": value, "limit": limit, "met": value <= limit}
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sections", default=",".join(SECTIONS), help=f"comma-separated, of {', '.join(SECTIONS)}")
    parser.add_argument("--quick", action="store_true", help="tiny sizes and one round (for the test)")
    parser.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    parser.add_argument("--repeats", type=int, help="rounds of interleaved timing (default 5, 1 with --quick)")
    parser.add_argument("--keep-ratio", type=float, default=0.005)
    parser.add_argument("--rank", type=int, default=8, help="LoRA's rank (lora, lora_qv)")
    args = parser.parse_args()
    sections = args.sections.split(",")
    if unknown := set(sections) - set(SECTIONS):
        parser.error(f"unknown sections: {', '.join(sorted(unknown))}")
    if args.device == "cuda" and not torch.cuda.is_available():
        parser.error("--device cuda, but CUDA is not available")
    settings = Settings(device=args.device, keep_ratio=args.keep_ratio, rank=args.rank, **(QUICK if args.quick else {}))
    if args.repeats is not None:
        settings = dataclasses.replace(settings, repeats=args.repeats)
    logging.set_verbosity_error()
    start = time.perf_counter()
    report = {"device": args.device, "threads": torch.get_num_threads(), "quick": args.quick,
              "keep_ratio": settings.keep_ratio, "repeats": settings.repeats}
    report |= {section: SECTIONS[section](settings) for section in sections}
    report["targets"] = targets(report)
    report["seconds"] = round(time.perf_counter() - start, 1)
    print(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
