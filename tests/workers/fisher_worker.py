"""Run by tests/distributed/test_distributed.py under `torch.distributed.run`: the Fisher and its mask in several processes.

usage: fisher_worker.py OUT_DIR MODE, MODE one of
  stream   every process reads the same plain DataLoader (num_samples=10: ranks split the first 10 examples)
  sharded  a DataLoader prepared by Accelerate (each process its own batches; num_samples=12, all of them)
  short    rank 1's shard is too short: every process must fail, none may hang
  models   rank 1 holds another model: detected before any scoring
Each process writes scores{rank}.safetensors (the Fisher, and the summed gradients as `sum:` entries), mask{rank}.json
(the Fisher mask's and the gradient_snr mask's digests) and collectives{rank}.json (see collective_log.py).
"""

import json
import sys
from pathlib import Path

import torch
from accelerate import Accelerator
from safetensors.torch import save_file

from fish_peft import compute_fisher, compute_fisher_mask
from tests.models import example_inputs, tiny_bert
from tests.workers.collective_log import record_collectives, save_collectives

NUM_EXAMPLES = 12


def examples() -> list[dict]:
    batch = example_inputs("bert", batch=NUM_EXAMPLES, seq=8, seed=0)
    return [{key: value[i] for key, value in batch.items()} for i in range(NUM_EXAMPLES)]


def main(out: Path, mode: str) -> None:
    calls = record_collectives()
    accelerator = Accelerator(cpu=True)
    rank = accelerator.process_index
    model = tiny_bert(seed=rank if mode == "models" else 0)
    data = examples()[:3] if mode == "short" and rank == 1 else examples()
    loader = torch.utils.data.DataLoader(data, batch_size=2)
    num_samples = 10 if mode == "stream" else NUM_EXAMPLES
    if mode == "sharded":
        loader = accelerator.prepare(loader)
    sharded = mode in ("sharded", "short")
    scores, sums = compute_fisher(model, loader, num_samples=num_samples, chunk_size=3, sharded=sharded, gradient_sums=True)
    options = {"keep_ratio": 0.05, "num_samples": num_samples, "chunk_size": 3, "sharded": sharded}
    mask = compute_fisher_mask(model, loader, **options)
    snr_mask = compute_fisher_mask(model, loader, score="gradient_snr", **options)
    tensors = {**scores, **{f"sum:{name}": t for name, t in sums.items()}}
    save_file({name: t.contiguous() for name, t in tensors.items()}, str(out / f"scores{rank}.safetensors"))
    digests = {"digest": mask.digest(), "selected": mask.num_selected, "gradient_snr": snr_mask.digest()}
    (out / f"mask{rank}.json").write_text(json.dumps(digests))
    save_collectives(calls, out, rank)
    accelerator.end_training()


if __name__ == "__main__":
    main(Path(sys.argv[1]), sys.argv[2])
