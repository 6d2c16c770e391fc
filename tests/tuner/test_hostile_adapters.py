"""Adapter files from strangers: hypothesis mutates a real FISH adapter (file bytes, the safetensors header, the
tensors, adapter_config.json) and every case must either load into exactly the model a plain decoder of those files
describes, or raise a clear error with the base model left as it was. Never another exception, never a wrong model.

CI runs FISH_FUZZ_EXAMPLES (default 150) derandomized examples; set it higher (e.g. 5000) for a long run, which is
random unless FISH_FUZZ_SEED is set.
"""

import collections
import copy
import json
import os
import struct
import tempfile
from pathlib import Path

import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from peft import PeftModel, get_peft_model
from safetensors.torch import save_file

import fish_peft  # noqa: F401  (registers FISH with PEFT)
from fish_peft import AdapterFileError, FishConfig, FishLayer, random_mask
from fish_peft.tuner.packing import GAPS_KEY, OVERFLOW_KEY, VALUES_KEY
from fish_peft.tuner.adapter_files import allow_nonfinite, read_safetensors
from tests.models import tiny_bert

EXAMPLES = int(os.environ.get("FISH_FUZZ_EXAMPLES", "150"))
SEED = os.environ.get("FISH_FUZZ_SEED")
# Besides fish-peft's AdapterFileError / ValueError: PEFT's own refusals of an unknown peft_type (KeyError naming it)
# and of fields another method's config does not take (TypeError). A config re-labelled as another method that PEFT
# knows (e.g. LORA) is that method's business, not a FISH file, so the mutations leave those labels out.
CLEAR_ERRORS = (AdapterFileError, ValueError, TypeError, KeyError)
OUTCOMES = collections.Counter()  # what the cases did, printed by the summary test below

BASE = tiny_bert(seed=0).eval()
BASE_STATE = {k: v.clone() for k, v in BASE.state_dict().items()}
INPUTS = {"input_ids": torch.randint(1, 100, (2, 8), generator=torch.Generator().manual_seed(3))}


def _original_files() -> tuple[bytes, bytes]:
    model = get_peft_model(copy.deepcopy(BASE), FishConfig(mask=random_mask(BASE, 0.05, seed=1)))
    g = torch.Generator().manual_seed(2)
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.copy_(torch.randn(p.shape, generator=g) * 0.1)
    with tempfile.TemporaryDirectory() as folder:
        model.save_pretrained(folder)
        return (Path(folder) / "adapter_config.json").read_bytes(), (Path(folder) / "adapter_model.safetensors").read_bytes()


CONFIG, WEIGHTS = _original_files()


def _split(data: bytes) -> tuple[dict, bytes]:
    (size,) = struct.unpack("<Q", data[:8])
    return json.loads(data[8 : 8 + size]), data[8 + size :]


def _join(header: dict, body: bytes) -> bytes:
    text = json.dumps(header).encode()
    text += b" " * (-len(text) % 8)
    return struct.pack("<Q", len(text)) + text + body


def _tensors(data: bytes) -> dict[str, torch.Tensor]:
    with tempfile.NamedTemporaryFile(suffix=".safetensors") as file:
        file.write(data)
        file.flush()
        return read_safetensors(file.name)


def _save(tensors: dict[str, torch.Tensor]) -> bytes:
    with tempfile.NamedTemporaryFile(suffix=".safetensors") as file:
        save_file({k: v.contiguous() for k, v in tensors.items()}, file.name)
        return Path(file.name).read_bytes()


TENSORS = _tensors(WEIGHTS)
KEYS = sorted(TENSORS)
CONFIG_JSON = json.loads(CONFIG)
NAMES = sorted(CONFIG_JSON["sparse_parameters"])
DTYPES = ["F32", "F16", "BF16", "F64", "I64", "I32", "U16", "U8", "BOOL", "XX"]
TORCH_DTYPES = [torch.float32, torch.float16, torch.bfloat16, torch.int64, torch.int32, torch.uint16, torch.uint8]
ODD_VALUES = [0, 1, -1, 2**16 - 1, 2**16, 2**31, 2**47, -(2**40), float("nan"), float("inf"), 1e30]

byte_flips = st.lists(st.tuples(st.integers(0, len(WEIGHTS) - 1), st.integers(0, 255)), min_size=1, max_size=4).map(
    lambda flips: ("flip bytes", CONFIG, _flip(WEIGHTS, flips))
)
truncations = st.integers(0, len(WEIGHTS) - 1).map(lambda n: ("truncate", CONFIG, WEIGHTS[:n]))


def _flip(data: bytes, flips) -> bytes:
    data = bytearray(data)
    for position, value in flips:
        data[position] = value
    return bytes(data)


@st.composite
def header_edits(draw):
    header, body = _split(WEIGHTS)
    key = draw(st.sampled_from(KEYS))
    edit = draw(st.sampled_from(["dtype", "shape", "offsets", "rename", "delete", "duplicate"]))
    if edit == "dtype":
        header[key]["dtype"] = draw(st.sampled_from(DTYPES))
    elif edit == "shape":
        header[key]["shape"] = draw(st.lists(st.one_of(st.integers(0, 40), st.integers(2**20, 2**62)), max_size=3))
    elif edit == "offsets":
        header[key]["data_offsets"] = draw(st.lists(st.integers(-5, len(body) + 5) | st.just(2**63), min_size=2, max_size=2))
    elif edit == "rename":
        header[draw(st.sampled_from(["classifier.weight", "junk", "base_model.model.bert.pooler.dense.weight"]))] = header.pop(key)
    elif edit == "delete":
        del header[key]
    else:
        header[key + ".copy"] = dict(header[key])
    return (f"header {edit}", CONFIG, _join(header, body))


@st.composite
def tensor_edits(draw):
    tensors = dict(TENSORS)
    key = draw(st.sampled_from(KEYS))
    edit = draw(st.sampled_from(["set", "drop", "add", "dtype", "reshape", "shorten", "swap"]))
    tensor = tensors[key].clone()
    if edit == "set" and tensor.numel():
        position = draw(st.integers(0, tensor.numel() - 1))
        value = draw(st.sampled_from(ODD_VALUES))
        try:
            tensor.view(-1)[position] = value
        except (RuntimeError, OverflowError):
            tensor = tensor.double()
            tensor.view(-1)[position] = value
        tensors[key] = tensor
    elif edit == "drop":
        del tensors[key]
    elif edit == "add":
        name = draw(st.sampled_from(["base_model.model.bert.pooler.dense.weight", "base_model.model.classifier.extra", "x"]))
        tensors[name] = torch.randn(draw(st.integers(1, 4)), 32)
    elif edit == "dtype":
        tensors[key] = tensor.to(draw(st.sampled_from(TORCH_DTYPES)))
    elif edit == "reshape" and tensor.numel() % 2 == 0:
        tensors[key] = tensor.reshape(2, -1)
    elif edit == "shorten" and tensor.numel():
        tensors[key] = tensor.reshape(-1)[: draw(st.integers(0, tensor.numel() - 1))].clone()
    elif edit == "swap":
        other = draw(st.sampled_from(KEYS))
        tensors[key], tensors[other] = tensors[other], tensors[key]
    return (f"tensor {edit}", CONFIG, _save(tensors))


@st.composite
def config_edits(draw):
    config = json.loads(CONFIG)
    edit = draw(st.sampled_from(["count", "shape", "peft_type", "delete", "type", "add"]))
    name = draw(st.sampled_from(NAMES))
    if edit == "count":
        config["sparse_parameters"][name] += draw(st.sampled_from([-1, 1, -config["sparse_parameters"][name], 10**9]))
    elif edit == "shape":
        shape = config["parameter_shapes"][name]
        shape[draw(st.integers(0, len(shape) - 1))] = draw(st.sampled_from([0, 1, 2, 10**12, -3]))
    elif edit == "peft_type":
        config["peft_type"] = draw(st.sampled_from(["FISHY", "", None]))
    elif edit == "delete":
        del config[draw(st.sampled_from(["sparse_parameters", "parameter_shapes", "modules_to_save", "peft_type"]))]
    elif edit == "type":
        field = draw(st.sampled_from(["sparse_parameters", "parameter_shapes", "modules_to_save", "mask_info", "save_dtype"]))
        config[field] = draw(st.sampled_from([[1, 2], "x", 3, {"a": "b"}, None]))
    else:
        config["sparse_parameters"]["bert.pooler.dense.bias"] = 1
        config["parameter_shapes"]["bert.pooler.dense.bias"] = [32]
    return (f"config {edit}", json.dumps(config).encode(), WEIGHTS)


def reference_logits(config: dict, tensors: dict[str, torch.Tensor]) -> torch.Tensor:
    """The model the files describe, decoded one index at a time into a dense copy of the base: W + Δ and the head."""
    dense = copy.deepcopy(BASE)
    params = dict(dense.named_parameters())
    gaps = [int(g) for g in tensors[GAPS_KEY].tolist()]
    for position, high in tensors[OVERFLOW_KEY].tolist():
        gaps[position] += high << 16
    values = tensors[VALUES_KEY].tolist()
    offset = 0
    with torch.no_grad():
        for name in sorted(config["sparse_parameters"]):
            flat, index = params[name].view(-1), 0
            for i in range(config["sparse_parameters"][name]):
                index += gaps[offset + i]
                flat[index] += values[offset + i]
            offset += config["sparse_parameters"][name]
        for key, tensor in tensors.items():
            if not key.startswith("fish_packed."):
                params[key.removeprefix("base_model.model.")].copy_(tensor)
    return dense(**INPUTS).logits


def check_case(case) -> str:
    label, config_bytes, weights_bytes = case
    base = copy.deepcopy(BASE)
    with tempfile.TemporaryDirectory() as folder:
        (Path(folder) / "adapter_config.json").write_bytes(config_bytes)
        (Path(folder) / "adapter_model.safetensors").write_bytes(weights_bytes)
        try:
            model = PeftModel.from_pretrained(base, folder).eval()
        except CLEAR_ERRORS as err:
            if isinstance(err, KeyError):  # PEFT's dispatch on peft_type, before fish-peft sees the file
                assert json.loads(config_bytes).get("peft_type") != "FISH", f"{label}: bare {err!r}"
            else:
                assert len(str(err)) > 20, f"{label}: unclear error {err!r}"
            assert not any(isinstance(m, FishLayer) for m in base.modules()), f"{label}: the base model was changed"
            assert all(torch.equal(v, BASE_STATE[k]) for k, v in base.state_dict().items()), label
            return f"{label}: {type(err).__name__}"
        expected = reference_logits(json.loads(config_bytes), _tensors(weights_bytes))
        torch.testing.assert_close(model(**INPUTS).logits, expected, rtol=1e-5, atol=1e-5, equal_nan=True, msg=f"{label}: wrong model")
        return f"{label}: loaded"


fuzz_settings = settings(
    max_examples=EXAMPLES, deadline=None, derandomize=SEED is None and EXAMPLES <= 1000, database=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)


@fuzz_settings
@given(st.one_of(byte_flips, truncations, header_edits(), tensor_edits(), config_edits()))
def test_every_mutated_adapter_loads_exactly_or_is_refused_clearly(case):
    OUTCOMES[check_case(case)] += 1


def test_fuzz_summary(capsys):
    """Runs after the fuzz test (file order) and prints what the cases did, for the closing note and long runs."""
    if OUTCOMES:
        with capsys.disabled():
            print(f"\nfuzz outcomes over {sum(OUTCOMES.values())} cases:")
            for outcome, count in OUTCOMES.most_common():
                print(f"  {count:6d}  {outcome}")
    assert not OUTCOMES or any(o.endswith("loaded") for o in OUTCOMES)


def test_the_untouched_files_load_and_nan_values_need_allow_nonfinite(tmp_path):
    assert check_case(("original", CONFIG, WEIGHTS)) == "original: loaded"
    tensors = dict(TENSORS)
    tensors[VALUES_KEY] = tensors[VALUES_KEY].clone()
    tensors[VALUES_KEY][0] = float("nan")
    (tmp_path / "adapter_config.json").write_bytes(CONFIG)
    (tmp_path / "adapter_model.safetensors").write_bytes(_save(tensors))
    try:
        PeftModel.from_pretrained(copy.deepcopy(BASE), tmp_path)
    except AdapterFileError as err:
        assert "allow_nonfinite" in str(err)
    else:
        raise AssertionError("NaN values loaded without allow_nonfinite()")
    with allow_nonfinite():
        model = PeftModel.from_pretrained(copy.deepcopy(BASE), tmp_path)
    assert torch.isnan(model(**INPUTS).logits).any()
