"""Decoding with kept CSR matrices (`DecodingTerms`): the output follows every change of the adapter (values written
in place, another active adapter, new entries, a dtype cast) and equals a dense W + ΣΔ; copies and pickles work."""

import copy
import pickle

import torch
from torch import nn

from fish_peft.tuner.layer import FishLayer


def dense_output(fish: FishLayer, x: torch.Tensor) -> torch.Tensor:
    weight = fish.base_layer.weight.detach().clone().reshape(-1)
    for name in fish.active_adapters:
        weight.index_add_(0, fish.indices(name, "weight").long(), fish.values(name, "weight").detach().to(weight.dtype))
    return nn.functional.linear(x, weight.view_as(fish.base_layer.weight), fish.base_layer.bias)


def test_decoding_follows_every_change_of_the_adapter():
    torch.manual_seed(0)
    fish = FishLayer(nn.Linear(64, 32), "a", {"weight": torch.randperm(2048)[:12].sort().values}, init_weights=False)
    fish.update_layer("b", {"weight": torch.randperm(2048)[:9].sort().values}, init_weights=False)
    x = torch.randn(1, 1, 64)
    built = []
    original = fish._csr_pattern
    fish._csr_pattern = lambda *args: built.append(args[0]) or original(*args)
    with torch.no_grad():
        torch.testing.assert_close(fish(x), dense_output(fish, x))
        fish(x)
        assert built == [("a", False)]  # the second token reused the kept matrix
        del fish._csr_pattern
        fish.values("a", "weight").add_(0.5)  # an optimizer step, in place
        torch.testing.assert_close(fish(x), dense_output(fish, x))
        fish.set_adapter(["a", "b"])
        torch.testing.assert_close(fish(x), dense_output(fish, x))
        fish.set_entries("b", "weight", torch.arange(3), nn.Parameter(torch.ones(3)))
        torch.testing.assert_close(fish(x), dense_output(fish, x))
        fish.double()
        x = x.double()
        torch.testing.assert_close(fish(x), dense_output(fish, x))
        for twin in (copy.deepcopy(fish), pickle.loads(pickle.dumps(fish))):
            torch.testing.assert_close(twin(x), dense_output(fish, x))
        fish.set_adapter("b")
        fish.enable_adapters(False)
        torch.testing.assert_close(fish(x), fish.base_layer(x))


def test_decoding_leaves_a_layer_with_a_bias_diff_to_the_general_forward():
    torch.manual_seed(0)
    fish = FishLayer(nn.Linear(8, 4), "a", {"weight": torch.arange(5), "bias": torch.arange(2)}, init_weights=False)
    x = torch.randn(1, 8)
    with torch.no_grad():
        assert fish._decoding_terms.output(fish, x) is None
        expected = dense_output(fish, x)
        expected[:, :2] += fish.values("a", "bias")
        torch.testing.assert_close(fish(x), expected)


def test_decoding_sees_values_written_in_place_when_the_kept_matrix_is_a_float32_copy():
    """bfloat16 values are kept as a float32 CSR matrix: writing the values must build it again."""
    torch.manual_seed(0)
    fish = FishLayer(nn.Linear(64, 32).to(torch.bfloat16), "a", {"weight": torch.randperm(2048)[:12].sort().values})
    x = torch.randn(1, 1, 64, dtype=torch.bfloat16)
    with torch.no_grad():
        torch.testing.assert_close(fish(x), fish.base_layer(x), rtol=0, atol=0)  # zero values
        fish.values("a", "weight").fill_(1.0)
        expected = fish.base_layer(x).float() + x.float() @ fish.get_delta_weight("a")["weight"].float().t()
        torch.testing.assert_close(fish(x), expected.to(torch.bfloat16))
