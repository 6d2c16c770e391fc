"""What fish-peft needs from `torch.distributed` when it runs in several processes (`accelerate launch`,
`torch.distributed.run`): who this process is, how a sample budget is shared, sums across processes, and checks that
every process agrees. With one process (or no process group) every function is a no-op.

Every tensor handed to a collective lives on a device the process group serves (`collective_device`): NCCL, and a
gloo group created for `cuda` alone, refuse CPU tensors."""

from __future__ import annotations

import hashlib
from typing import Optional

import torch
import torch.distributed as dist

DIGEST_BLOCK = 1 << 22  # entries of a tensor reduced at a time by `tensors_digest`
BITS_AS_INTEGER = {1: torch.uint8, 2: torch.int16, 4: torch.int32, 8: torch.int64}


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


def collective_device(tensor: Optional[torch.Tensor] = None) -> torch.device:
    """`tensor`'s device when the process group serves its type, else the device the group serves: the CPU where
    it can, else this process's current CUDA device."""
    served = {part.split(":")[0] for part in dist.get_backend_config().split(",")}
    if tensor is not None and tensor.device.type in served:
        return tensor.device
    if "cpu" in served:
        return torch.device("cpu")
    return torch.device("cuda", torch.cuda.current_device())


def sum_across_processes(tensors: dict[str, torch.Tensor]) -> None:
    """In place: every tensor becomes its sum over all processes (summed on a device the group serves)."""
    if rank_and_world()[1] > 1:
        for name in sorted(tensors):
            all_reduce_in_place(tensors[name])


def all_reduce_in_place(tensor: torch.Tensor, op=dist.ReduceOp.SUM) -> None:
    """`dist.all_reduce` of `tensor`, through a copy on a device the group serves when `tensor` is elsewhere."""
    moved = tensor.to(collective_device(tensor))
    dist.all_reduce(moved, op=op)
    if moved is not tensor:
        tensor.copy_(moved)


def gather_integers(values: list[int]) -> list[list[int]]:
    """Every process's `values` (the same count everywhere, each a signed 64-bit integer), in rank order."""
    world = rank_and_world()[1]
    if world == 1:
        return [list(values)]
    mine = torch.tensor(values, dtype=torch.int64, device=collective_device())
    parts = [torch.empty_like(mine) for _ in range(world)]
    dist.all_gather(parts, mine)
    return torch.stack(parts).tolist()


def digest_integers(digest: str) -> list[int]:
    """A digest of any length as four signed 64-bit integers (a sha256 of it), for `gather_integers`."""
    raw = hashlib.sha256(digest.encode()).digest()
    return [int.from_bytes(raw[i : i + 8], "little", signed=True) for i in range(0, 32, 8)]


def raise_together(error: Optional[BaseException], what: str) -> None:
    """Call on every process after a step that may fail on some: if any failed, all raise (the failed ones their own
    error), so no process waits forever in a collective the failed one never reaches."""
    if rank_and_world()[1] == 1:
        if error is not None:
            raise error
        return
    failed = torch.tensor([0 if error is None else 1], device=collective_device())
    dist.all_reduce(failed, op=dist.ReduceOp.MAX)
    if error is not None:
        raise error
    if failed.item():
        raise RuntimeError(f"Another process failed while {what}; its error says why.")


def tensors_digest(tensors: dict[str, torch.Tensor]) -> str:
    """A sha256 of named tensors (names, shapes, dtypes and values), for checking that processes hold the same
    model or mask. The values are reduced where they live, to two sums per tensor (see `_value_sums`), so nothing
    the size of a parameter is copied to the host."""
    digest = hashlib.sha256()
    sums = []
    for name in sorted(tensors):
        tensor = tensors[name].detach()
        digest.update(f"{name} {tuple(tensor.shape)} {tensor.dtype};".encode())
        sums.append(_value_sums(tensor))
    if sums:
        digest.update(torch.stack([s.cpu() for s in sums]).numpy().tobytes())
    return digest.hexdigest()


def _value_sums(tensor: torch.Tensor) -> torch.Tensor:
    """Two 64-bit sums of a tensor's bit patterns, the second weighted by each entry's position (so that moved
    values count); integer overflow wraps, so the sums are the same whatever order the device adds in."""
    flat = tensor.reshape(-1)
    if flat.dtype == torch.bool:
        flat = flat.to(torch.uint8)
    if flat.is_floating_point() or flat.is_complex():  # the exact bits, as integers of the same width
        flat = flat.contiguous().view(BITS_AS_INTEGER.get(flat.element_size(), torch.uint8))
    sums = torch.zeros(2, dtype=torch.int64, device=flat.device)
    for start in range(0, flat.numel(), DIGEST_BLOCK):
        bits = flat[start : start + DIGEST_BLOCK].to(torch.int64)
        position = torch.arange(start, start + bits.numel(), dtype=torch.int64, device=flat.device)
        sums[0] += bits.sum()
        sums[1] += (bits * (position * 0x9E3779B1 + 1 | 1)).sum()
    return sums


def check_same_everywhere(digest: str, what: str) -> None:
    """Raise `ProcessMismatchError` on every process unless all processes hold the same `digest` of `what`."""
    if rank_and_world()[1] == 1:
        return
    digests = gather_integers(digest_integers(digest))
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
