"""The two_processes check of benchmarks/gpu_check.py, which runs it on one device as
`python -m torch.distributed.run --standalone --nproc_per_node 2 benchmarks/gpu_workers.py OUT_DIR --device cuda`.
Process group "cuda:gloo" on cuda (like NCCL it refuses CPU tensors), "gloo" on cpu; both processes on GPU 0. In order:
the distributed Fisher (each process scores its share; the mask is the one a lone process computes), DDP training of
the adapter (the processes agree after every step), diff averaging (they differ between rounds, agree after each).
Each process writes OUT_DIR/result{rank}.json, with its peak GPU memory in MiB.
"""

import argparse
import json
from datetime import timedelta
from pathlib import Path

import torch
import torch.distributed as dist
from peft import get_peft_model
from torch.nn.parallel import DistributedDataParallel

from benchmarks.gpu_check import KEEP_RATIO, SIZES, adamw, adapter_values, build_model, check_mask, fisher_mask, loader
from benchmarks.gpu_check import to, train
from fish_peft import FishConfig
from fish_peft.distributed.processes import check_same_everywhere, digest_integers, gather_integers, leave_process_group
from fish_peft.distributed.processes import tensors_digest
from fish_peft.dynamic.diff_averaging import DiffAverager


def distributed_fisher(size: dict, device: torch.device, alone) -> tuple:
    model = build_model(size, device)
    mask = fisher_mask(model, size)  # checks inside that every process holds the same mask
    check_mask(model, mask)
    check_same_everywhere(mask.digest(), "Fisher mask")
    overlap = mask.jaccard(alone)
    assert overlap > 0.95, f"the two-process mask shares only {overlap:.3f} of the one-process mask"
    return mask, {"selected": mask.num_selected, "jaccard_with_one_process": overlap}


def ddp_training(size: dict, device: torch.device, mask, rank: int) -> dict:
    model = get_peft_model(build_model(size, device), FishConfig(mask=mask))
    start = adapter_values(model)
    ddp = DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda" else None)

    def agree(step: int) -> None:
        check_same_everywhere(tensors_digest(adapter_values(model)), f"adapter after DDP step {step}")

    losses = train(ddp, size, device, adamw(model), after_step=agree, seed=1 + rank)  # each process its own batches
    assert any(not torch.equal(start[n], v) for n, v in adapter_values(model).items()), "training changed nothing"
    return {"losses": losses}


def diff_averaging(size: dict, device: torch.device, mask, rank: int) -> dict:
    model = get_peft_model(build_model(size, device), FishConfig(mask=mask))
    averager = DiffAverager(model, optimizer := adamw(model), merge_every=2, total_steps=size["steps"])

    def average(step: int) -> None:
        apart = tensors_digest(model.state_dict())
        if averager.step():
            check_same_everywhere(tensors_digest(model.state_dict()), f"model after averaging at step {step}")
        else:  # trained apart since the last round: the processes differ
            assert len({tuple(d) for d in gather_integers(digest_integers(apart))}) == 2, f"no difference at {step}"

    half = slice(rank * size["examples"] // 2, (rank + 1) * size["examples"] // 2)  # each process its own half
    losses = train(model, size, device, optimizer, after_step=average, seed=3, part=half)
    averager.finish()
    check_same_everywhere(tensors_digest(model.state_dict()), "model after the last averaging")
    assert averager.rounds == size["steps"] // 2, f"{averager.rounds} averaging rounds in {size['steps']} steps"
    with torch.no_grad():
        assert torch.isfinite(model(**to(next(iter(loader(size, seed=2))), device)).logits).all()
    return {"losses": losses, "rounds": averager.rounds, "traffic": averager.traffic.as_dict()}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("out", type=Path)
    parser.add_argument("--device", default="cuda", choices=["cuda", "cpu"])
    parser.add_argument("--quick", action="store_true")
    args = parser.parse_args()
    size = SIZES["quick" if args.quick else "full"]
    device = torch.device("cuda", 0) if args.device == "cuda" else torch.device("cpu")
    if device.type == "cuda":
        torch.cuda.set_device(0)  # both processes on the one GPU
    alone = fisher_mask(build_model(size, device), size)  # before the process group: one process, every example
    dist.init_process_group(backend="cuda:gloo" if device.type == "cuda" else "gloo", timeout=timedelta(seconds=120))
    rank = dist.get_rank()
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    mask, result = distributed_fisher(size, device, alone)
    result = {"fisher": result, "ddp": ddp_training(size, device, mask, rank),
              "diff_averaging": diff_averaging(size, device, mask, rank)}
    result["peak_mib"] = torch.cuda.max_memory_allocated() / 2**20 if device.type == "cuda" else None
    result["keep_ratio"] = KEEP_RATIO
    (args.out / f"result{rank}.json").write_text(json.dumps(result))
    leave_process_group()


if __name__ == "__main__":
    main()
