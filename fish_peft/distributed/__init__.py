"""Several processes: who this process is, sums and checks that every process agrees, failures raised together,
and the traffic of gradients averaged outside DDP."""

from fish_peft.distributed.processes import (
    ProcessMismatchError,
    check_same_everywhere,
    is_sharded,
    leave_process_group,
    raise_together,
    rank_and_world,
    share,
    sum_across_processes,
    tensors_digest,
)

__all__ = [
    "ProcessMismatchError",
    "check_same_everywhere",
    "is_sharded",
    "leave_process_group",
    "raise_together",
    "rank_and_world",
    "share",
    "sum_across_processes",
    "tensors_digest",
]
