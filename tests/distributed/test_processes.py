"""The building blocks of several processes, in one: the device a collective's tensors go to, and the digest that
processes compare without copying tensors to the host."""

import pytest
import torch
import torch.distributed as dist

from fish_peft.distributed import processes
from fish_peft.distributed.processes import collective_device, digest_integers, tensors_digest


@pytest.mark.parametrize("config, tensor_device, expected", [
    ("cpu:gloo,cuda:gloo", "cpu", "cpu"),
    ("cpu:gloo,cuda:nccl", "cpu", "cpu"),
    ("cuda:nccl", "cpu", "cuda:0"),  # NCCL refuses CPU tensors: they go to this process's GPU
    ("cuda:gloo", "cpu", "cuda:0"),
    ("cuda:nccl", "meta", "cuda:0"),
    ("cpu:gloo", None, "cpu"),
    ("cuda:nccl", None, "cuda:0"),
])
def test_collectives_get_tensors_on_a_device_the_group_serves(monkeypatch, config, tensor_device, expected):
    monkeypatch.setattr(dist, "get_backend_config", lambda: config)
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 0)
    tensor = None if tensor_device is None else torch.zeros(1, device=tensor_device)
    assert collective_device(tensor) == torch.device(expected)


def test_a_tensor_on_a_served_device_stays_where_it_is(monkeypatch):
    monkeypatch.setattr(dist, "get_backend_config", lambda: "cpu:gloo,cuda:nccl")
    assert collective_device(torch.zeros(1, device="meta")) == torch.device("cpu")
    monkeypatch.setattr(dist, "get_backend_config", lambda: "meta:fake")
    assert collective_device(torch.zeros(1, device="meta")) == torch.device("meta")


def tensors():
    generator = torch.Generator().manual_seed(0)
    return {
        "weight": torch.randn(300, 200, generator=generator),
        "half": torch.randn(50, generator=generator).bfloat16(),
        "indices": torch.arange(0, 1000, 7),
        "mask": torch.rand(40, generator=generator) > 0.5,
        "double": torch.randn(3, dtype=torch.float64, generator=generator),
    }


def test_the_digest_is_equal_for_equal_tensors_and_sees_every_difference(monkeypatch):
    monkeypatch.setattr(processes, "DIGEST_BLOCK", 1000)  # several blocks per tensor
    reference = tensors_digest(tensors())
    assert tensors_digest({name: t.clone() for name, t in reversed(tensors().items())}) == reference
    changed = []
    for change in ("one bit", "swap", "shape", "dtype", "name", "mask", "index", "sign"):
        t = tensors()
        if change == "one bit":
            t["weight"].view(torch.int32)[123, 45] ^= 1
        elif change == "swap":
            t["weight"][[0, 1]] = t["weight"][[1, 0]]
        elif change == "shape":
            t["weight"] = t["weight"].reshape(200, 300)
        elif change == "dtype":
            t["indices"] = t["indices"].int()
        elif change == "name":
            t["weights"] = t.pop("weight")
        elif change == "mask":
            t["mask"][3] = ~t["mask"][3]
        elif change == "index":
            t["indices"][-1] += 1
        else:
            t["half"][0] = -t["half"][0]
        changed.append(tensors_digest(t) != reference)
    assert all(changed), changed


def test_a_digest_of_any_length_becomes_four_integers():
    assert len(digest_integers("abc")) == 4 and digest_integers("abc") != digest_integers("abd")
    assert all(-(2**63) <= v < 2**63 for v in digest_integers("x" * 500))
