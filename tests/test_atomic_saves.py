"""A process killed while it saves leaves the previous version whole: SIGKILL at arbitrary moments of a loop of
adapter saves (tests/workers/save_loop_worker.py), then load what is there."""

import copy
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from peft import PeftModel

import fish_peft  # noqa: F401  (registers FISH with PEFT)
from fish_peft.atomic import atomic_folder
from tests.models import tiny_bert

WORKER = Path(__file__).resolve().parent / "workers" / "save_loop_worker.py"
ROOT = Path(__file__).resolve().parents[1]
INPUTS = {"input_ids": torch.randint(1, 100, (2, 8), generator=torch.Generator().manual_seed(0))}


def logits(folder):
    return PeftModel.from_pretrained(copy.deepcopy(tiny_bert()), folder).eval()(**INPUTS).logits


@pytest.mark.parametrize("delays", [(0.003, 0.011, 0.029, 0.047, 0.071)])
def test_a_kill_during_an_adapter_save_leaves_one_complete_version(tmp_path, delays):
    references = tmp_path / "references"
    expected = None
    for round_, delay in enumerate(delays):
        out = tmp_path / "adapter"
        worker = subprocess.Popen([sys.executable, str(WORKER), str(out), str(references)], cwd=ROOT,
                                  env={**os.environ, "PYTHONPATH": str(ROOT)}, stdout=subprocess.PIPE,
                                  stderr=subprocess.PIPE, text=True)
        assert worker.stdout.readline().strip() == "saving", worker.stderr.read()[-2000:]
        time.sleep(delay)
        worker.send_signal(signal.SIGKILL)
        worker.wait()
        if expected is None:
            expected = [logits(references / "0"), logits(references / "1")]
        found = logits(out)  # loads: config and weights of the same version
        assert any(torch.equal(found, e) for e in expected), f"round {round_}: a mixed or damaged adapter"


def test_an_error_inside_the_save_keeps_the_previous_folder(tmp_path):
    target = tmp_path / "run"
    with atomic_folder(target) as staging:
        (staging / "a.txt").write_text("old")
    with pytest.raises(KeyboardInterrupt):
        with atomic_folder(target) as staging:
            (staging / "a.txt").write_text("new, half")
            raise KeyboardInterrupt
    assert (target / "a.txt").read_text() == "old" and sorted(p.name for p in tmp_path.iterdir()) == ["run"]


def test_the_next_save_removes_what_killed_saves_left_behind(tmp_path):
    target = tmp_path / "run"
    for leftover in (".run.saving-k1ll3d", ".run.old-k1ll3d"):
        (tmp_path / leftover).mkdir()
        (tmp_path / leftover / "adapter_model.safetensors").write_bytes(b"half")
    (tmp_path / ".other.saving-x").mkdir()  # another folder's save: not ours to touch
    with atomic_folder(target) as staging:
        (staging / "a.txt").write_text("new")
    assert sorted(p.name for p in tmp_path.iterdir()) == [".other.saving-x", "run"]
