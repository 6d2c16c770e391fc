"""fish-peft on a GPU: run once on a CUDA machine from the repository root, `python benchmarks/gpu_check.py`
(about a minute; offline: tiny Llama-architecture causal LMs built from configs, random weights). On `--device`
(default cuda when there is one, else cpu), each check a function below:

  fisher_mask               `compute_fisher_mask`: its forwards ran on the device, valid indices, the exact budget
  train_save_merge(_bf16)   `get_peft_model` + AdamW steps, `save_pretrained`, `PeftModel.from_pretrained` and
                            `merge_and_unload` give the trained logits; float32, then a bfloat16 base under autocast
  evolving_*                `mask_update="sparse_momentum"` / "topkast" driven by `evolving_diff_engine`: the mask
                            moved, the budget stayed, the values stayed on the device
  two_processes             benchmarks/gpu_workers.py in two processes on the one device, process group "cuda:gloo"
                            (like NCCL it refuses CPU tensors): distributed Fisher, DDP training, diff averaging
  quantized_4bit            (on cuda, or named in --only) the model loaded in 4 bits by bitsandbytes under an adapter
                            from the float model's mask: equals the float model with dequant(W) + Δ, trains, reloads;
                            merging, a keep_ratio config and the Fisher on the 4-bit weights are refused (skipped,
                            said in its details, where bitsandbytes is not installed)

Prints one JSON object: per check ok, seconds, peak GPU memory in MiB (null on cpu), details or the error and its
traceback's tail, warnings; versions and device. Exit status 1 if any check failed (all of them run regardless).
`--quick` shrinks the model and steps, the same code paths, for the CPU smoke test tests/test_gpu_check.py.
"""

import argparse
import contextlib
import gc
import importlib.util
import itertools
import json
import math
import os
import subprocess
import sys
import tempfile
import time
import traceback
import warnings
from pathlib import Path

import peft
import psutil  # a dependency of accelerate
import torch
import transformers
from peft import PeftModel, get_peft_model
from transformers import LlamaConfig, LlamaForCausalLM

import fish_peft
from fish_peft import FishConfig, compute_fisher_mask
from fish_peft.dynamic import evolving_diff_engine

ROOT = Path(__file__).resolve().parents[1]
SIZES = {  # hidden, intermediate, layers, sequence length, examples, batch size, training steps
    "full": dict(hidden=256, intermediate=688, layers=4, seq=64, examples=32, batch=8, steps=4),
    "quick": dict(hidden=64, intermediate=128, layers=2, seq=16, examples=8, batch=4, steps=4),
}
VOCAB, KEEP_RATIO = 1000, 0.01


def build_model(size: dict, device: torch.device, dtype=torch.float32, seed: int = 0) -> LlamaForCausalLM:
    """A Llama causal LM with random weights, the same for the same seed on every device (built on the CPU)."""
    config = LlamaConfig(
        vocab_size=VOCAB, hidden_size=size["hidden"], intermediate_size=size["intermediate"],
        num_hidden_layers=size["layers"], num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128,
        pad_token_id=0, bos_token_id=1, eos_token_id=2,
    )
    torch.manual_seed(seed)
    return LlamaForCausalLM(config).to(device=device, dtype=dtype).eval()  # eval: no dropout, comparable runs


def examples(size: dict, seed: int = 0) -> list[dict]:
    """Causal-LM examples on the CPU, as a DataLoader gives them: right-padded, labels -100 on the padding."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, VOCAB, (size["examples"], size["seq"]), generator=g)
    lengths = torch.randint(size["seq"] // 2, size["seq"] + 1, (size["examples"], 1), generator=g)
    attention = (torch.arange(size["seq"]) < lengths).long()
    labels = torch.where(attention.bool(), ids, -100)
    return [{"input_ids": i * a, "attention_mask": a, "labels": y} for i, a, y in zip(ids, attention, labels)]


def loader(size: dict, seed: int = 0, part=slice(None)) -> torch.utils.data.DataLoader:
    return torch.utils.data.DataLoader(examples(size, seed)[part], batch_size=size["batch"])


def to(batch: dict, device: torch.device) -> dict:
    return {key: value.to(device) for key, value in batch.items()}


def autocast(device: torch.device, dtype=None):
    """`torch.autocast` to `dtype` on the device; nothing when `dtype` is None."""
    return torch.autocast(device.type, dtype=dtype) if dtype is not None else contextlib.nullcontext()


def fisher_mask(model, size: dict):
    return compute_fisher_mask(model, loader(size), keep_ratio=KEEP_RATIO, num_samples=size["examples"])


def check_mask(model, mask) -> None:
    """The budget exact; every parameter's indices int64, strictly increasing, inside the parameter."""
    params = dict(model.named_parameters())
    assert mask.num_selected == int(sum(p.numel() for p in params.values()) * KEEP_RATIO), mask.num_selected
    for name, idx in mask.items():
        assert idx.dtype == torch.int64 and bool((idx[1:] > idx[:-1]).all()), name
        assert 0 <= int(idx[0]) and int(idx[-1]) < params[name].numel(), name


def adapter_values(model) -> dict:
    return {n: p.detach().float().clone() for n, p in model.named_parameters() if p.requires_grad}


def adamw(model) -> torch.optim.AdamW:
    return torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2, weight_decay=0.0)


def train(model, size: dict, device, optimizer=None, low=None, after_step=None, seed=1, part=slice(None)) -> list:
    """`size["steps"]` steps over the examples (cycled), under autocast to `low` if given, `after_step(step)` after
    each `optimizer.step()`; returns the losses, each asserted finite."""
    optimizer, losses, batches = optimizer or adamw(model), [], itertools.cycle(loader(size, seed, part))
    model.train()
    for step in range(1, size["steps"] + 1):
        with autocast(device, low):
            loss = model(**to(next(batches), device)).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        losses.append(loss.item())
        assert math.isfinite(losses[-1]), f"loss {losses[-1]} at step {step}"
        if after_step is not None:
            after_step(step)
    model.eval()
    return losses


def check_fisher_mask(size: dict, device: torch.device) -> dict:
    model = build_model(size, device)
    seen = []
    hook = model.register_forward_pre_hook(  # the devices of every forward's tensor inputs
        lambda m, args, kwargs: seen.extend(t.device.type for t in [*args, *kwargs.values()] if torch.is_tensor(t)),
        with_kwargs=True,
    )
    before = torch.cuda.memory_allocated() if device.type == "cuda" else 0
    mask = fisher_mask(model, size)
    hook.remove()
    check_mask(model, mask)
    assert seen and set(seen) == {device.type}, f"the Fisher's forwards ran on {sorted(set(seen))}"
    assert all(p.device.type == device.type for p in model.parameters())
    details = {"parameters": sum(p.numel() for p in model.parameters()), "selected": mask.num_selected}
    if device.type == "cuda":
        details["peak_over_model_mib"] = (torch.cuda.max_memory_allocated() - before) / 2**20
        assert details["peak_over_model_mib"] > 0, "no GPU memory was used beyond the model"
    return details


def check_train_save_merge(size: dict, device: torch.device, dtype=torch.float32) -> dict:
    low = dtype if dtype != torch.float32 else None  # autocast to it
    tolerance = dict(atol=2e-2, rtol=2e-2) if low else dict(atol=1e-4, rtol=1e-4)
    base = build_model(size, device, dtype)
    model = get_peft_model(base, FishConfig(mask=fisher_mask(base, size)))
    start = adapter_values(model)
    losses = train(model, size, device, low=low)
    assert any(not torch.equal(start[n], v) for n, v in adapter_values(model).items()), "training changed nothing"
    batch = to(next(iter(loader(size, seed=2))), device)

    def logits(m):
        with torch.no_grad(), autocast(device, low):
            return m(**batch).logits.float()

    trained = logits(model)
    assert torch.isfinite(trained).all()
    with tempfile.TemporaryDirectory() as folder:
        model.save_pretrained(folder)
        reloaded = PeftModel.from_pretrained(build_model(size, device, dtype), folder).eval()
    assert all(p.device.type == device.type for p in reloaded.parameters()), "the reloaded adapter is off the device"
    torch.testing.assert_close(logits(reloaded), trained, **tolerance)
    merged = reloaded.merge_and_unload()
    torch.testing.assert_close(logits(merged), trained, **tolerance)
    return {"losses": losses, "trainable": sum(v.numel() for v in start.values())}


def check_evolving(size: dict, device: torch.device, rule: str) -> dict:
    base = build_model(size, device)
    mask = fisher_mask(base, size)
    model = get_peft_model(base, FishConfig(mask=mask, mask_update=rule, update_every=1))
    engine = evolving_diff_engine(model, total_steps=size["steps"])
    engine.bind(optimizer := adamw(model))
    before = engine.mask_digest()
    losses = train(model, size, device, optimizer, after_step=lambda step: engine.step())
    assert engine.updates >= 1 and engine.mask_digest() != before, "the mask did not move"
    assert sum(e.values.numel() for e in engine.entries) == mask.num_selected, "the budget changed"
    assert all(e.values.device.type == device.type for e in engine.entries), "diff values left the device"
    with torch.no_grad():
        assert torch.isfinite(model(**to(next(iter(loader(size, seed=2))), device)).logits).all()
    return {"losses": losses, "updates": engine.updates}


def check_two_processes(size: dict, device: torch.device, quick: bool, timeout: float) -> dict:
    """Runs benchmarks/gpu_workers.py in two processes; each writes result{rank}.json."""
    with tempfile.TemporaryDirectory() as out:
        command = [
            sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
            str(ROOT / "benchmarks" / "gpu_workers.py"), out, "--device", device.type, *(["--quick"] if quick else []),
        ]
        env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]),
               "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false"}
        launcher = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env)
        try:
            output = launcher.communicate(timeout=timeout)[0]
        except subprocess.TimeoutExpired:  # end the workers too: they run in sessions of their own
            for process in [*psutil.Process(launcher.pid).children(recursive=True), launcher]:
                with contextlib.suppress(psutil.NoSuchProcess):
                    process.kill()
            raise TimeoutError(f"two processes over {timeout} s: {launcher.communicate()[0][-3000:]}") from None
        assert launcher.returncode == 0, f"exit status {launcher.returncode}: {output[-3000:]}"
        return {"ranks": [json.loads((Path(out) / f"result{rank}.json").read_text()) for rank in range(2)]}


def check_quantized_4bit(size: dict, device: torch.device) -> dict:
    """A bitsandbytes 4-bit base (NF4, float32 compute, so the float reference is exact up to kernel rounding) under a
    FISH adapter made from the float model's Fisher mask."""
    if importlib.util.find_spec("bitsandbytes") is None:
        return {"skipped": "bitsandbytes is not installed (pip install bitsandbytes)"}
    import bitsandbytes
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig

    from fish_peft import FishLayer
    from fish_peft.tuner.quantized_bases import QuantizedBaseError, QuantizedFishLayer, dequantized_weight

    float_model = build_model(size, device)
    mask = fisher_mask(float_model, size)
    batch = to(next(iter(loader(size, seed=2))), device)
    with tempfile.TemporaryDirectory() as folder:
        float_model.save_pretrained(Path(folder) / "base")

        def load_4bit():
            quantization = BitsAndBytesConfig(
                load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_compute_dtype=torch.float32
            )
            model = AutoModelForCausalLM.from_pretrained(Path(folder) / "base", quantization_config=quantization,
                                                         device_map={"": str(device)}, dtype=torch.float32).eval()
            for module in model.modules():  # CPU only: no repacking for bitsandbytes' inference-only bfloat16 kernel
                if hasattr(module, "support_avx512bf16_for_cpu"):
                    module.support_avx512bf16_for_cpu = False
            return model

        model = get_peft_model(load_4bit(), FishConfig(mask=mask, init_weights=False))
        layers = [m for m in model.modules() if isinstance(m, QuantizedFishLayer)]
        assert layers, "no quantized layer was adapted"
        packed = layers[0].get_base_layer().weight
        assert packed.dtype == torch.uint8 and packed.device.type == device.type, (packed.dtype, packed.device)

        def logits(m):
            with torch.no_grad():
                return m(**batch).logits.float()

        def dequantized_reference() -> LlamaForCausalLM:
            """The float model whose quantized weights are dequant(W), plus Δ where the adapter has one."""
            reference, weights = build_model(size, device), {}
            for name, module in model.get_base_model().named_modules():
                if type(module).__name__ == "Linear4bit":
                    weights[f"{name.removesuffix('.base_layer')}.weight"] = dequantized_weight(module)
            for name, module in model.get_base_model().named_modules():
                if isinstance(module, FishLayer):  # the quantized ones and the others (embeddings, norms, lm_head)
                    for attr, delta in module.get_delta_weight("default").items():
                        key = f"{name}.{attr}"
                        weights[key] = weights.get(key, module.base_parameter(attr).detach().float()) + delta
            reference.load_state_dict(weights, strict=False)
            return reference

        tolerance = dict(atol=2e-3, rtol=2e-3)
        torch.testing.assert_close(logits(model), logits(dequantized_reference()), **tolerance)
        losses = train(model, size, device)
        trained = logits(model)
        torch.testing.assert_close(trained, logits(dequantized_reference()), **tolerance)
        model.save_pretrained(Path(folder) / "adapter")
        reloaded = PeftModel.from_pretrained(load_4bit(), Path(folder) / "adapter").eval()
        torch.testing.assert_close(logits(reloaded), trained, **tolerance)
        refusals = {}
        for what, attempt, error in [
            ("merge", lambda: reloaded.merge_and_unload(), QuantizedBaseError),
            ("keep_ratio", lambda: get_peft_model(load_4bit(), FishConfig(keep_ratio=KEEP_RATIO, target_modules="all-linear")),
             QuantizedBaseError),
            ("fisher", lambda: fisher_mask(load_4bit(), size), ValueError),
        ]:
            try:
                attempt()
            except error as err:
                refusals[what] = str(err)[:120]
            else:
                raise AssertionError(f"{what} on the 4-bit base was not refused")
    return {"bitsandbytes": bitsandbytes.__version__, "adapted_layers": len(layers), "losses": losses,
            "trainable": sum(p.numel() for p in model.parameters() if p.requires_grad), "refused": refusals}


def run_check(name: str, check, device: torch.device) -> dict:
    """Runs one check: ok, details (or error and traceback), warnings, seconds, peak GPU memory (MiB) of the check."""
    cuda = device.type == "cuda"
    gc.collect()
    if cuda:
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
    start = time.perf_counter()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        try:
            result = {"ok": True, "details": check()}
        except Exception as err:  # recorded; the other checks still run
            result = {"ok": False, "error": f"{type(err).__name__}: {err}"[:2000],
                      "traceback": traceback.format_exc()[-3000:]}
    result["warnings"] = sorted({f"{w.category.__name__}: {w.message}"[:300] for w in caught})
    if cuda:
        torch.cuda.synchronize()
    result["seconds"] = round(time.perf_counter() - start, 2)
    result["peak_mib"] = torch.cuda.max_memory_allocated() / 2**20 if cuda else None
    if name == "two_processes" and result["ok"] and cuda:  # the workers' peaks, each process its own
        result["peak_mib"] = max(r["peak_mib"] for r in result["details"]["ranks"])
    print(f"{name}: {'ok' if result['ok'] else 'FAILED ' + result['error']} ({result['seconds']} s)", file=sys.stderr)
    return result


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu", choices=["cuda", "cpu"])
    parser.add_argument("--quick", action="store_true", help="smaller model and fewer steps (CPU smoke test)")
    parser.add_argument("--only", nargs="*", help="run only these checks")
    parser.add_argument("--timeout", type=float, default=300, help="seconds for the two processes")
    args = parser.parse_args()
    device = torch.device(args.device, 0) if args.device == "cuda" else torch.device("cpu")
    if device.type == "cuda":
        torch.cuda.set_device(device)
    size = SIZES["quick" if args.quick else "full"]
    checks = {
        "fisher_mask": lambda: check_fisher_mask(size, device),
        "train_save_merge": lambda: check_train_save_merge(size, device),
        "train_save_merge_bf16": lambda: check_train_save_merge(size, device, torch.bfloat16),
        "evolving_sparse_momentum": lambda: check_evolving(size, device, "sparse_momentum"),
        "evolving_topkast": lambda: check_evolving(size, device, "topkast"),
        "two_processes": lambda: check_two_processes(size, device, args.quick, args.timeout),
    }
    if device.type == "cuda" or "quantized_4bit" in (args.only or []):  # on CPU, CI's smoke test runs the six above
        checks["quantized_4bit"] = lambda: check_quantized_4bit(size, device)
    results = {name: run_check(name, check, device) for name, check in checks.items() if name in (args.only or checks)}
    report = {
        "ok": all(r["ok"] for r in results.values()),
        "device": str(device),
        "device_name": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
        "versions": {"torch": torch.__version__, "transformers": transformers.__version__, "peft": peft.__version__,
                     "fish_peft": fish_peft.__version__, "cuda": torch.version.cuda},
        "size": size,
        "checks": results,
    }
    print(json.dumps(report, indent=1))
    return 0 if report["ok"] else 1


if __name__ == "__main__":
    sys.exit(main())
