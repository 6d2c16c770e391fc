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
from fish_peft.utils.atomic_files import atomic_folder
from tests.models import tiny_bert

WORKER = Path(__file__).resolve().parents[1] / "workers" / "save_loop_worker.py"
ROOT = Path(__file__).resolve().parents[2]
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


def _mode(path):
    return path.stat().st_mode & 0o777


def test_files_and_folders_get_the_modes_of_the_umask_and_a_replaced_file_keeps_its_own(tmp_path):
    """safetensors 0.8 writes 0600 files of its own (through a temporary), which a save must not pass on."""
    from safetensors.torch import save_file

    from fish_peft.utils.atomic_files import atomic_path

    previous = os.umask(0o027)
    try:
        with atomic_path(str(tmp_path / "new.json")) as tmp:
            Path(tmp).write_text("{}")
        with atomic_path(str(tmp_path / "new.safetensors")) as tmp:
            save_file({"x": torch.zeros(2)}, tmp)
        with atomic_folder(tmp_path / "run") as staging:
            (staging / "sub").mkdir(mode=0o700)
            save_file({"x": torch.zeros(2)}, staging / "sub" / "adapter_model.safetensors")
        (tmp_path / "private.json").write_text("old")
        os.chmod(tmp_path / "private.json", 0o600)
        with atomic_path(str(tmp_path / "private.json")) as tmp:
            Path(tmp).write_text("new")
    finally:
        os.umask(previous)
    assert _mode(tmp_path / "new.json") == _mode(tmp_path / "new.safetensors") == 0o640
    assert _mode(tmp_path / "run") == _mode(tmp_path / "run" / "sub") == 0o750
    assert _mode(tmp_path / "run" / "sub" / "adapter_model.safetensors") == 0o640
    assert _mode(tmp_path / "private.json") == 0o600 and (tmp_path / "private.json").read_text() == "new"


def test_a_save_replaces_what_it_owns_and_keeps_everything_else(tmp_path):
    target = tmp_path / "run"
    (target / "old-experiment" / "deep").mkdir(parents=True)
    (target / "old-experiment" / "deep" / "adapter_model.safetensors").write_bytes(b"theirs")
    (target / "checkpoints" / "checkpoint-10").mkdir(parents=True)
    (target / "checkpoints" / "notes.txt").write_text("a user's file in a folder the save owns part of")
    for name in ("notes.md", "results.json", "mask.png"):
        (target / name).write_text("previous")
    os.chmod(target / "old-experiment", 0o700)
    inode = (target / "notes.md").stat().st_ino
    owns = lambda relative: relative in ("results.json", "mask.png") or relative.startswith("checkpoints/checkpoint-")  # noqa: E731
    with atomic_folder(target, owns=owns) as staging:
        (staging / "results.json").write_text("new")
    found = sorted(str(p.relative_to(target)) for p in target.rglob("*"))
    assert found == ["checkpoints", "checkpoints/notes.txt", "notes.md", "old-experiment", "old-experiment/deep",
                     "old-experiment/deep/adapter_model.safetensors", "results.json"]
    assert (target / "results.json").read_text() == "new" and (target / "notes.md").stat().st_ino == inode
    assert _mode(target / "old-experiment") == 0o700
    with atomic_folder(target) as staging:  # by default a save owns the names it writes, and nothing else
        (staging / "notes.md").write_text("replaced")
    assert (target / "notes.md").read_text() == "replaced" and (target / "results.json").read_text() == "new"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["run"]


@pytest.mark.parametrize("renameat2", [True, False])
def test_files_written_into_the_folder_while_it_is_saved_are_kept(tmp_path, monkeypatch, renameat2):
    """A user's editor saves notes.md (a new file renamed over the old) and a new file appears between the carrying
    over and the swap; with renameat2 and with the fallback of two renames."""
    import fish_peft.utils.atomic_files as atomic

    target = tmp_path / "run"
    target.mkdir()
    (target / "notes.md").write_text("first draft")
    (target / "results.json").write_text("previous")
    real_exchange = atomic._exchange

    def user_writes_then_exchange(a, b):
        (target / "late.md").write_text("written during the save")
        (target / ".notes.md.swp").write_text("second draft")
        os.replace(target / ".notes.md.swp", target / "notes.md")
        return renameat2 and real_exchange(a, b)

    monkeypatch.setattr(atomic, "_exchange", user_writes_then_exchange)
    with atomic_folder(target, owns=lambda relative: relative == "results.json") as staging:
        (staging / "results.json").write_text("new")
    assert {p.name: p.read_text() for p in target.iterdir()} == {
        "notes.md": "second draft", "late.md": "written during the save", "results.json": "new",
    }
    assert sorted(p.name for p in tmp_path.iterdir()) == ["run"]
