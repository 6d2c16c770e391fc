"""Running a benchmark script the way a user does, in its own process, for the tests that check its report."""

import os
import subprocess
import sys

from tests.distributed_launch import ROOT


def run_benchmark(script: str, *arguments: str) -> subprocess.CompletedProcess:
    """`python benchmarks/<script> <arguments>` on one thread; stdout holds its one JSON object."""
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false"}
    return subprocess.run(
        [sys.executable, str(ROOT / "benchmarks" / script), *arguments],
        capture_output=True, text=True, timeout=300, env=env, cwd=ROOT,
    )
