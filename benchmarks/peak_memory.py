"""Peak memory of a block of code, beyond what is held when it starts: on CPU the peak resident set (VmHWM, reset
on entering by writing 5 to /proc/self/clear_refs) less the resident set then; on CUDA torch's peak allocated memory
less the allocated memory then. Shared by the benchmarks that report memory."""

from pathlib import Path

import torch


class PeakMemory:
    """`with PeakMemory(device) as peak: ...`, then `peak.bytes`."""

    def __init__(self, device: str):
        self.cuda = torch.device(device).type == "cuda"

    def __enter__(self):
        if self.cuda:
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
            self.start = torch.cuda.memory_allocated()
        else:
            Path("/proc/self/clear_refs").write_text("5")  # resets VmHWM, the peak resident set, to the current one
            self.start = _status_bytes("VmRSS")
        return self

    def __exit__(self, *exc):
        if self.cuda:
            torch.cuda.synchronize()
            self.bytes = torch.cuda.max_memory_allocated() - self.start
        else:
            self.bytes = _status_bytes("VmHWM") - self.start


def _status_bytes(field: str) -> int:
    line = next(line for line in Path("/proc/self/status").read_text().splitlines() if line.startswith(field + ":"))
    return int(line.split()[1]) * 1024
