"""benchmarks/gpu_check.py on the CPU (`--device cpu --quick`, its two processes with gloo): the same code paths the
GPU run takes, so a GPU session spends its time on the GPU, not on fixing the script."""

import json

from tests.benchmark_runs import run_benchmark

CHECKS = {
    "fisher_mask", "train_save_merge", "train_save_merge_bf16", "evolving_sparse_momentum", "evolving_topkast",
    "two_processes",
}


def test_gpu_check_passes_on_cpu():
    run = run_benchmark("gpu_check.py", "--device", "cpu", "--quick", "--timeout", "200")
    report = json.loads(run.stdout)  # stdout holds the one JSON object, progress goes to stderr
    failed = {name: check.get("traceback") for name, check in report["checks"].items() if not check["ok"]}
    assert not failed, failed
    assert run.returncode == 0, run.stderr[-3000:]
    assert set(report["checks"]) == CHECKS and report["ok"]
    assert report["device"] == "cpu" and all(check["peak_mib"] is None for check in report["checks"].values())
    ranks = report["checks"]["two_processes"]["details"]["ranks"]
    assert len(ranks) == 2 and ranks[0]["fisher"] == ranks[1]["fisher"]  # the same mask on both processes
    assert all(r["diff_averaging"]["rounds"] == report["size"]["steps"] // 2 for r in ranks)
    assert report["checks"]["evolving_topkast"]["details"]["updates"] >= 1
