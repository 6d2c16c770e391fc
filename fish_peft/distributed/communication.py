"""The bytes that cross the wire in a run of several processes: counted, and, for the tensors fish-peft reduces
itself, averaged. Under DDP a FISH adapter's 1-D value tensors (and the task head) are the only gradients that
need reducing; `count_ddp_traffic` measures what DDP actually sends, so it can be compared with dense DDP."""

from __future__ import annotations

from collections import defaultdict

import torch
from torch.distributed.algorithms.ddp_comm_hooks.default_hooks import allreduce_hook

from fish_peft.distributed.processes import all_reduce_in_place, rank_and_world


class Traffic:
    """Payload bytes this process put into collectives, by what they carried (a process's share of an all-reduce is
    counted as the size of the tensor it reduces)."""

    def __init__(self):
        self.bytes: dict[str, int] = defaultdict(int)
        self.calls: dict[str, int] = defaultdict(int)

    def add(self, what: str, tensor: torch.Tensor) -> None:
        self.bytes[what] += tensor.numel() * tensor.element_size()
        self.calls[what] += 1

    def total(self) -> int:
        return sum(self.bytes.values())

    def as_dict(self) -> dict[str, dict[str, int]]:
        return {what: {"bytes": self.bytes[what], "calls": self.calls[what]} for what in sorted(self.bytes)}


def count_ddp_traffic(ddp_model: torch.nn.parallel.DistributedDataParallel, traffic: Traffic | None = None) -> Traffic:
    """Count what `ddp_model` communicates from now on: every gradient bucket it all-reduces (through a
    communication hook that then does DDP's usual all-reduce) and the buffers it broadcasts before each forward."""
    traffic = traffic or Traffic()

    def counting_allreduce(state, bucket):  # no annotations: DDP checks them, and they are strings here
        state.add("gradients", bucket.buffer())
        return allreduce_hook(None, bucket)

    def count_buffers(module, args):
        if module.will_sync_module_buffers():
            for buffer in module.modules_buffers:
                traffic.add("buffers", buffer)

    ddp_model.register_comm_hook(traffic, counting_allreduce)
    ddp_model.register_forward_pre_hook(count_buffers)
    return traffic


def reduce_across_processes(tensor: torch.Tensor, traffic: Traffic, what: str, mean: bool = True) -> torch.Tensor:
    """In place: `tensor` becomes its mean (or sum) over all processes, counted in `traffic` as `what`; returns it."""
    world = rank_and_world()[1]
    if world > 1:
        traffic.add(what, tensor)
        all_reduce_in_place(tensor)
        if mean:
            tensor.div_(world)
    return tensor


class _AveragedGradient(torch.autograd.Function):
    """Identity in forward; in backward the gradient is averaged across processes (what DDP does for its own
    parameters, for tensors DDP cannot hold because their length changes)."""

    @staticmethod
    def forward(ctx, tensor, traffic):
        ctx.traffic = traffic
        return tensor.view_as(tensor)

    @staticmethod
    def backward(ctx, grad):
        return reduce_across_processes(grad.contiguous().clone(), ctx.traffic, "diff gradients"), None


def with_averaged_gradient(tensor: torch.Tensor, traffic: Traffic) -> torch.Tensor:
    """`tensor`, whose gradient will be averaged across processes in backward."""
    return _AveragedGradient.apply(tensor, traffic)
