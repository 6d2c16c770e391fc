"""What fish-peft needs from `torch.distributed` when it runs in several processes (`accelerate launch`,
`torch.distributed.run`): who this process is, how a sample budget is shared, sums across processes, and checks that
every process agrees. With one process (or no process group) every function is a no-op."""

from __future__ import annotations

import hashlib
from typing import Optional

import torch
import torch.distributed as dist


class ProcessMismatchError(RuntimeError):
    """Processes that must agree (on a mask, a model) do not."""


def rank_and_world() -> tuple[int, int]:
    """(this process's rank, number of processes); (0, 1) without a process group."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def is_sharded(dataloader) -> bool:
    """Whether `dataloader` gives each process its own part of the data (one prepared by Accelerate)."""
    return type(dataloader).__module__.startswith("accelerate.")


def share(total: int, rank: int, world: int) -> tuple[int, int]:
    """This rank's contiguous part [start, end) of `total` items, the first `total % world` ranks one larger."""
    size, extra = divmod(total, world)
    start = rank * size + min(rank, extra)
    return start, start + size + (1 if rank < extra else 0)


def sum_across_processes(tensors: dict[str, torch.Tensor]) -> None:
    """In place: every tensor becomes its sum over all processes."""
    if rank_and_world()[1] > 1:
        for name in sorted(tensors):
            dist.all_reduce(tensors[name], op=dist.ReduceOp.SUM)


def raise_together(error: Optional[BaseException], what: str) -> None:
    """Call on every process after a step that may fail on some: if any failed, all raise (the failed ones their own
    error), so no process waits forever in a collective the failed one never reaches."""
    if rank_and_world()[1] == 1:
        if error is not None:
            raise error
        return
    failed = torch.tensor([0 if error is None else 1])
    dist.all_reduce(failed, op=dist.ReduceOp.MAX)
    if error is not None:
        raise error
    if failed.item():
        raise RuntimeError(f"Another process failed while {what}; its error says why.")


def tensors_digest(tensors: dict[str, torch.Tensor]) -> str:
    """A sha256 of named tensors' values (for checking that processes hold the same model)."""
    digest = hashlib.sha256()
    for name in sorted(tensors):
        tensor = tensors[name].detach().cpu()
        digest.update(name.encode())
        digest.update((tensor.float() if tensor.is_floating_point() else tensor).contiguous().numpy().tobytes())
    return digest.hexdigest()


def check_same_everywhere(digest: str, what: str) -> None:
    """Raise `ProcessMismatchError` on every process unless all processes hold the same `digest` of `what`."""
    rank, world = rank_and_world()
    if world == 1:
        return
    digests: list[Optional[str]] = [None] * world
    dist.all_gather_object(digests, digest)
    differing = [r for r, d in enumerate(digests) if d != digests[0]]
    if differing:
        raise ProcessMismatchError(
            f"The {what} differs between processes (rank 0 vs ranks {differing}); every process must start from the "
            "same model and see the same settings: seed them identically and load the same checkpoint."
        )


def leave_process_group() -> None:
    """Wait for every process, then close the process group: a process that exits alone makes gloo abort the others."""
    if dist.is_available() and dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()
