"""A FISH model under FSDP with `use_orig_params=True` (run by tests/tuner/test_fsdp.py under `torch.distributed.run`):
each process writes result{rank}.json with the error its first forward raised."""

import json
import sys
from pathlib import Path

import torch
import torch.distributed as dist
from peft import get_peft_model
from torch.distributed.fsdp import FullyShardedDataParallel

from fish_peft import FishConfig, random_mask
from tests.models import example_inputs, tiny_bert


def main(out: Path) -> None:
    dist.init_process_group("gloo")
    model = tiny_bert()
    model = get_peft_model(model, FishConfig(mask=random_mask(model, keep_ratio=0.05), init_weights=False))
    sharded = FullyShardedDataParallel(model, use_orig_params=True, device_id=torch.device("cpu"))
    try:
        sharded(**example_inputs("bert", batch=2, seq=8, seed=1))
        error = None
    except Exception as err:  # noqa: BLE001 - the test reads which error it was
        error = f"{type(err).__name__}: {err}"
    (out / f"result{dist.get_rank()}.json").write_text(json.dumps({"error": error}))
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    main(Path(sys.argv[1]))
