"""The FISH paper's distributed training in two processes (run by tests/dynamic/test_diff_merging.py under
`torch.distributed.run`): each process trains its own adapter on its half of the examples and merges every 2 steps.

usage: merge_worker.py OUT_DIR MODE, MODE one of
  shared       both processes hold the same mask; mean of the changes
  individual   each process its own mask; sum of the changes
  recompute    shared mask, recomputed after every merge from the Fisher over both halves
  uneven       rank 1 has fewer batches: every process must fail, none may hang
  unsaveable   shared mask, checkpointed after every merge into OUT_DIR/checkpoints, which is a file: every
               process must fail, none may hang
Each process writes result{rank}.json (the merged model's digest, traffic) and collectives{rank}.json; rank 0 saves the adapter in OUT_DIR/adapter.
"""

import json
import os
import sys
from pathlib import Path

import torch
from accelerate import Accelerator
from peft import get_peft_model

from fish_peft import FishConfig, compute_fisher_mask, random_mask
from fish_peft.dynamic.diff_averaging import DiffMerger
from fish_peft.distributed.processes import tensors_digest
from fish_peft.dynamic.averaging_checkpoints import MergeCheckpoints
from fish_peft.utils.rng_states import capture_rng
from tests.models import example_inputs, tiny_bert
from tests.workers.collective_log import record_collectives, save_collectives

NUM_EXAMPLES, STEPS, MERGE_EVERY, BATCH = 24, 6, 2, 2


def shard(rank: int) -> list[dict]:
    batch = example_inputs("bert", batch=NUM_EXAMPLES, seq=8, seed=2)
    half = NUM_EXAMPLES // 2
    return [{key: value[i] for key, value in batch.items()} for i in range(rank * half, (rank + 1) * half)]


def worker_model(mask_seed: int):
    model = tiny_bert(hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)
    return get_peft_model(model, FishConfig(mask=random_mask(model, keep_ratio=0.05, seed=mask_seed)))


def optimizer_for(model):
    return torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=1e-2)


def train_one_batch(model, optimizer, batch) -> None:
    model.train()
    model(**batch).loss.backward()
    optimizer.step()
    optimizer.zero_grad()


def main(out: Path, mode: str) -> None:
    rank = int(os.environ["RANK"])
    calls = record_collectives()
    model = worker_model(mask_seed=rank if mode == "individual" else 0)  # before the process group: no mask check
    accelerator = Accelerator(cpu=True)
    data = shard(rank)[: 4 if mode == "uneven" and rank == 1 else None]
    loader = torch.utils.data.DataLoader(data, batch_size=BATCH)
    optimizer = optimizer_for(model)
    recompute = None
    if mode == "recompute":
        recompute = lambda: compute_fisher_mask(model, loader, keep_ratio=0.05, num_samples=8, sharded=True)  # noqa: E731
    merger = DiffMerger(
        model, optimizer, merge_every=MERGE_EVERY, reduction="sum" if mode == "individual" else "mean",
        recompute_every=1 if recompute else None, recompute_mask=recompute,
    )
    checkpoints = MergeCheckpoints(out / "checkpoints", steps_per_epoch=MERGE_EVERY, save_steps=None)
    if mode == "unsaveable" and rank == 0:
        (out / "checkpoints").write_text("not a folder")
    for _, batch in zip(range(STEPS), loader):
        train_one_batch(model, optimizer, batch)
        if merger.step() and mode == "unsaveable":
            checkpoints.save(merger, None, capture_rng())
    merger.finish()
    result = {
        "digest": tensors_digest({n: t for n, t in model.state_dict().items()}),
        "traffic": merger.traffic.as_dict(),
        "merges": merger.merges,
        "recomputations": merger.recomputations,
        "selected": sum(model.peft_config["default"].sparse_parameters.values()),
    }
    (out / f"result{rank}.json").write_text(json.dumps(result))
    save_collectives(calls, out, rank)
    if rank == 0:
        model.save_pretrained(out / "adapter")
    accelerator.end_training()


if __name__ == "__main__":
    main(Path(sys.argv[1]), sys.argv[2])
