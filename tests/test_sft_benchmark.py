"""benchmarks/sft.py --quick: FISH, LoRA and full fine-tuning through TRL's SFTTrainer on the offline tiny Llama, the
same code paths the full run takes, and a report of the promised shape with finite values (no timing claims)."""

import json
import math

from tests.benchmark_runs import run_benchmark

METHOD_KEYS = {
    "lr", "trainable", "trainable_share", "val_loss", "val_token_accuracy", "val_exact_match", "val_loss_before",
    "pretraining_tasks_loss", "pretraining_tasks_loss_before", "train_loss", "step_ms_median", "steps",
    "train_seconds", "memory",
}


def finite_numbers(value) -> list[float]:
    if isinstance(value, dict):
        return [x for v in value.values() for x in finite_numbers(v)]
    return [value] if isinstance(value, (int, float)) and not isinstance(value, bool) else []


def test_sft_benchmark_quick_reports_every_method():
    run = run_benchmark("sft.py", "--quick")
    assert run.returncode == 0, run.stderr[-3000:]
    report = json.loads(run.stdout)  # stdout holds the one JSON object, progress goes to stderr
    assert report["device"] == "cpu" and report["keep_ratio"] == 0.005
    assert set(report["methods"]) == {"fish", "fish_matched", "lora", "full"}
    total = report["pretraining"]["parameters"]
    for name, result in report["methods"].items():
        assert METHOD_KEYS <= set(result), name
        assert all(math.isfinite(x) for x in finite_numbers(result)), name
        assert result["steps"] == report["size"]["steps"] and result["step_ms_median"] > 0
        assert result["memory"]["training"]["peak_mib"] > 0
        assert set(result["pretraining_tasks_loss"]) == {"copy", "reverse", "shift"}
        assert 0 <= result["val_exact_match"] <= 1 and 0 <= result["val_token_accuracy"] <= 1
    fish, matched, lora, full = (report["methods"][m] for m in ("fish", "fish_matched", "lora", "full"))
    assert fish["trainable"] == fish["mask_entries"] == int(total * 0.005)
    for result in (fish, matched):
        assert result["memory"]["mask_init"]["seconds"] >= 0 and result["memory"]["mask_init"]["peak_mib"] > 0
    assert lora["lora_rank"] >= 1 and 0 < lora["trainable"] < full["trainable"] == total
    assert matched["trainable"] == lora["trainable"]  # FISH at LoRA's count
    assert full["trainable_share"] == 1.0
