"""In a worker: record every collective that fish-peft's own code calls, with the devices of the tensors it hands
over, so that a test can check they all live on the model's device (NCCL, and a gloo group serving only `cuda`,
refuse any other) and that no object collective (which picks its own device) is used."""

import json
import sys
from pathlib import Path

import torch
import torch.distributed as dist

COLLECTIVES = ("all_reduce", "all_gather", "broadcast", "reduce", "all_gather_object", "broadcast_object_list",
               "gather_object", "scatter_object_list")


def record_collectives() -> list[dict]:
    """Start recording; the returned list fills with {collective, caller, devices} as fish-peft calls them."""
    calls = []
    for name in COLLECTIVES:
        original = getattr(dist, name)

        def recording(*args, _name=name, _original=original, **kwargs):
            caller = sys._getframe(1).f_globals.get("__name__", "")
            if caller.startswith("fish_peft"):
                tensors = [a for a in args if isinstance(a, torch.Tensor)]
                tensors += [t for a in args if isinstance(a, list) for t in a if isinstance(t, torch.Tensor)]
                calls.append({"collective": _name, "caller": caller, "devices": sorted({str(t.device) for t in tensors})})
            return _original(*args, **kwargs)

        setattr(dist, name, recording)
    return calls


def save_collectives(calls: list[dict], out: Path, rank: int) -> None:
    (out / f"collectives{rank}.json").write_text(json.dumps(calls))


def check_collectives(out: Path, device: str, callers: set[str]) -> None:
    """Every recorded collective of both ranks handed over tensors on `device` only, none was an object
    collective, and each module in `callers` made at least one."""
    for rank in (0, 1):
        calls = json.loads((out / f"collectives{rank}.json").read_text())
        assert callers <= {call["caller"] for call in calls}, calls
        for call in calls:
            assert not call["collective"].endswith(("_object", "_object_list")), call
            assert call["devices"] == [device], call
