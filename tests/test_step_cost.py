"""benchmarks/step_cost.py --quick: every section and method is measured and reported; no timing is judged."""

import json

from tests.benchmark_runs import run_benchmark

TRAINING = {"fish", "fish_fisher", "fish_w_plus_delta", "lora_qv", "lora_same_params", "full"}


def test_step_cost_quick_reports_every_section_and_method():
    run = run_benchmark("step_cost.py", "--quick")
    assert run.returncode == 0, run.stderr[-3000:]
    report = json.loads(run.stdout)

    stack = report["linear_stack"]["methods"]
    assert set(stack) == {"fish", "fish_w_plus_delta", "lora", "full"}
    assert all(row["step_ms"] > 0 and row["saved_for_backward_mib"] > 0 for row in stack.values())

    for section, peak in [("minilm", "peak_mib"), ("llama", "peak_over_loaded_mib")]:
        rows = report[section]["methods"]
        assert set(rows) == TRAINING | ({"fish_checkpointed", "lora_qv_checkpointed"} if section == "llama" else set())
        assert all(row["step_ms"] > 0 and row[peak] > 0 for row in rows.values()), section
        fish = rows["fish"]
        assert fish["adapter_parameters"] == fish["mask_entries"] == rows["fish_w_plus_delta"]["adapter_parameters"]
        assert abs(rows["lora_same_params"]["adapter_parameters"] / fish["adapter_parameters"] - 1) <= 0.2, section
        assert rows["full"]["trainable_parameters"] > fish["trainable_parameters"] > 0
        assert abs(rows["fish_fisher"]["mask_entries"] / fish["mask_entries"] - 1) <= 0.01, section
    assert report["llama"]["setup"]["parameters"] > 0 and report["llama"]["methods"]["lora_qv"]["peak_over_weights"] > 0

    assert set(report["decoding"]["linear"]["methods"]) == {"base", "fish", "lora"}
    assert set(report["decoding"]["generate"]["methods"]) == {"base", "fish", "fish_fisher", "lora_qv"}
    assert all(row["ms"] > 0 for row in report["decoding"]["linear"]["methods"].values())
    assert all(row["ms_per_token"] > 0 for row in report["decoding"]["generate"]["methods"].values())

    assert len(report["targets"]) == 12
    assert all(isinstance(target["met"], bool) and target["value"] > 0 for target in report["targets"].values())
