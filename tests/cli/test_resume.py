"""A `fish-peft train` run killed with SIGKILL and resumed ends with the adapter of an uninterrupted run, with a
fixed mask and with an evolving one (Top-KAST, sparse momentum); the same recipe and seed give the same mask and
adapter; resuming refuses what would not be sound."""

import json
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from fish_peft.cli.command import main
from fish_peft.cli.resume import CHECKPOINTS, last_complete_checkpoint
from fish_peft.dynamic.callback import ENGINE_STATE
from tests.glue_files import WORDS, write_glue_files
from tests.models import save_tiny_checkpoint

RECIPE = Path(__file__).resolve().parents[2] / "recipes" / "glue" / "sst2.yaml"


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    root = tmp_path_factory.mktemp("resume")
    checkpoint = save_tiny_checkpoint(root / "tiny-bert", WORDS)
    train, validation = write_glue_files("sst2", root, n_train=400, n_val=12)
    return ["--model", checkpoint, "--train-file", train, "--validation-file", validation, "--epochs", "2",
            "--batch-size", "4", "--num-samples", "8", "--max-length", "32", "--eval-batch-size", "16",
            "--save-steps", "10", "--lr", "1e-3", "--keep-ratio", "0.05"]


def train_args(data, out, *extra):
    return ["train", str(RECIPE), *map(str, data), "--output-dir", str(out), *extra]


def run_cli(*args):
    return main([str(a) for a in args])


@pytest.fixture(scope="module")
def uninterrupted(data, tmp_path_factory):
    out = tmp_path_factory.mktemp("uninterrupted") / "run"
    assert run_cli(*train_args(data, out)) == 0
    return out


def adapter(out):
    return load_file(out / "adapter_model.safetensors")


def assert_same_adapter(a, b):
    assert sorted(a) == sorted(b)
    for key in a:
        assert torch.equal(a[key], b[key]), key


def start_training(data, out, *extra):
    return subprocess.Popen([sys.executable, "-m", "fish_peft.cli.command", *train_args(data, out, *extra)],
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)


def wait_for(condition, process, timeout=240):
    deadline = time.monotonic() + timeout
    while not condition():
        assert process.poll() is None, f"training ended before it could be killed: {process.stderr.read()[-2000:]}"
        assert time.monotonic() < deadline, "timed out waiting for the run"
        time.sleep(0.01)


def test_a_run_killed_with_sigkill_twice_resumes_to_the_same_adapter(data, uninterrupted, tmp_path):
    """Killed inside the first epoch (after checkpoint 30), resumed, killed again inside the second (after 130)."""
    out = tmp_path / "run"
    process = start_training(data, out)
    wait_for((out / CHECKPOINTS / "checkpoint-30" / "trainer_state.json").exists, process)
    process.send_signal(signal.SIGKILL)
    process.wait()
    assert not (out / "adapter_model.safetensors").exists()
    assert run_cli(*train_args(data, out)) == 2  # an interrupted run is not silently started again

    process = start_training(data, out, "--resume")
    wait_for((out / CHECKPOINTS / "checkpoint-130" / "trainer_state.json").exists, process)
    process.send_signal(signal.SIGKILL)
    process.wait()
    assert run_cli(*train_args(data, out, "--resume")) == 0
    assert_same_adapter(adapter(out), adapter(uninterrupted))
    assert not (out / CHECKPOINTS).exists()


def test_a_kill_during_a_checkpoint_save_falls_back_to_the_previous_checkpoint(data, uninterrupted, tmp_path):
    """Kill the run as soon as checkpoint-40 starts being written: it is incomplete, checkpoint-30 is used."""
    out = tmp_path / "run"
    process = start_training(data, out)
    wait_for((out / CHECKPOINTS / "checkpoint-40").exists, process)
    process.send_signal(signal.SIGKILL)
    process.wait()
    folder = out / CHECKPOINTS
    assert last_complete_checkpoint(folder).name in ("checkpoint-30", "checkpoint-40")
    if not (folder / "checkpoint-40" / "trainer_state.json").exists():
        assert last_complete_checkpoint(folder).name == "checkpoint-30"
    assert run_cli(*train_args(data, out, "--resume")) == 0
    assert_same_adapter(adapter(out), adapter(uninterrupted))


@pytest.mark.parametrize("rule", ["topkast", "sparse_momentum"])
def test_an_evolving_diff_killed_with_sigkill_resumes_to_the_same_adapter(data, tmp_path, rule):
    """The support moves every 15 steps (13 updates in 200 steps). Killed after checkpoint 70, resumed; then killed
    again as if between the Trainer's files of checkpoint 120 and the engine state: an earlier one is used."""
    evolving = ("--mask-update", rule, "--update-every", "15")
    whole = tmp_path / "whole"
    assert run_cli(*train_args(data, whole, *evolving)) == 0
    out = tmp_path / "run"
    process = start_training(data, out, *evolving)
    wait_for((out / CHECKPOINTS / "checkpoint-70" / ENGINE_STATE).exists, process)
    process.send_signal(signal.SIGKILL)
    process.wait()
    process = subprocess.Popen([sys.executable, "-m", "fish_peft.cli.command", *train_args(data, out, *evolving, "--resume")],
                               stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    wait_for((out / CHECKPOINTS / "checkpoint-120" / ENGINE_STATE).exists, process)
    process.send_signal(signal.SIGKILL)
    process.wait()
    for newer in (out / CHECKPOINTS).glob("checkpoint-1[2-9]0"):
        (newer / ENGINE_STATE).unlink(missing_ok=True)
    fallback = last_complete_checkpoint(out / CHECKPOINTS, evolving=True)  # kept: the best (100) or the one before
    assert fallback.name in ("checkpoint-100", "checkpoint-110")
    trainer_only = last_complete_checkpoint(out / CHECKPOINTS)  # the Trainer's files alone are there
    assert int(trainer_only.name.removeprefix("checkpoint-")) >= 120

    assert run_cli(*train_args(data, out, *evolving, "--resume")) == 0
    assert_same_adapter(adapter(out), adapter(whole))
    assert json.loads((out / "adapter_config.json").read_text()) == json.loads((whole / "adapter_config.json").read_text())
    mask, whole_mask = (json.loads((run / "results.json").read_text())["mask"] for run in (out, whole))
    assert mask["mask_updates"] == whole_mask["mask_updates"] == 13
    assert mask["jaccard_with_initial"] == whole_mask["jaccard_with_initial"] < 1


def test_partial_checkpoints_are_passed_over(tmp_path):
    folder = tmp_path / CHECKPOINTS
    for step, files in ((10, ("trainer_state.json", "optimizer.pt", "model.safetensors")), (20, ("optimizer.pt",)),
                        (30, ("trainer_state.json", "optimizer.pt", "adapter_config.json", "adapter_model.safetensors"))):
        (folder / f"checkpoint-{step}").mkdir(parents=True)
        for name in files:
            (folder / f"checkpoint-{step}" / name).write_text("{}" if name.endswith(".json") else "")
    # checkpoint-30's adapter does not decode, checkpoint-20 never finished: checkpoint-10 it is
    assert last_complete_checkpoint(folder).name == "checkpoint-10"


def test_resume_refuses_another_recipe_and_a_folder_with_nothing_to_resume(data, tmp_path, capsys):
    out = tmp_path / "run"
    assert run_cli(*train_args(data, out, "--resume")) == 2
    assert "Nothing to resume" in capsys.readouterr().err
    (out / CHECKPOINTS).mkdir(parents=True)
    from fish_peft.cli.recipe import load_recipe, parse_overrides
    from fish_peft.cli.resume import remember_recipe

    remember_recipe(load_recipe(str(RECIPE), parse_overrides([str(a) for a in data] + ["--output-dir", str(out)])), out)
    assert run_cli(*train_args(data, out, "--resume", "--lr", "5e-4")) == 2
    assert "learning_rate: 0.001 -> 0.0005" in capsys.readouterr().err
    assert run_cli(*train_args(data, out, "--resume")) == 2
    assert "no complete checkpoint" in capsys.readouterr().err
    assert run_cli(*train_args(data, out, "--resume", "--overwrite")) == 2


def test_the_same_recipe_and_seed_give_the_same_mask_and_adapter(data, uninterrupted, tmp_path):
    out = tmp_path / "again"
    assert run_cli(*train_args(data, out)) == 0
    assert_same_adapter(adapter(out), adapter(uninterrupted))
    config = json.loads((out / "adapter_config.json").read_text())
    assert config == json.loads((uninterrupted / "adapter_config.json").read_text())  # the mask's counts and info
    other = tmp_path / "other-seed"
    assert run_cli(*train_args(data, other, "--seed", "1")) == 0
    assert not torch.equal(adapter(other)["fish_packed.values"], adapter(uninterrupted)["fish_packed.values"])

