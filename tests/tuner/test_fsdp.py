"""FSDP substitutes its own views of the parameters in forward, which would silently bypass the sparse diff: a FISH
model under FSDP must refuse to run and point to DDP."""

import json

from tests.distributed_launch import launch


def test_fsdp_with_original_parameters_is_refused_naming_ddp(tmp_path):
    run = launch("fsdp_worker.py", tmp_path, timeout=180)
    assert run.returncode == 0, run.stderr[-4000:]
    for rank in (0, 1):
        error = json.loads((tmp_path / f"result{rank}.json").read_text())["error"]
        assert error.startswith("ShardedParametersError: FISH adapters cannot train under FSDP")
        assert "DDP" in error
