"""Periodic diff averaging (the FISH paper's distributed mode) resumes: a `DiffAverager` run continued from a checkpoint taken
after an averaging round ends with the model of an uninterrupted run, with the mask recomputed along the way; `fish-peft train`
with `merge_every` in two processes, killed with SIGKILL and resumed, ends with the same adapter."""

import json
import subprocess
import time

import pytest
import torch
from safetensors.torch import load_file

from fish_peft import random_mask
from fish_peft.dynamic.diff_averaging import DiffAverager
from fish_peft.dynamic.averaging_checkpoints import AveragingCheckpoints, last_averaging_checkpoint, load_averaging_checkpoint
from fish_peft.cli.resume import CHECKPOINTS
from fish_peft.utils.rng_states import capture_rng
from fish_peft.masks.selection import base_named_parameters
from fish_peft.dynamic.targets import SparseTrainingError
from fish_peft.cli.command import main
from tests.distributed_launch import ROOT, kill_all, launch, launch_command
from tests.glue_files import WORDS, write_glue_files
from tests.models import save_tiny_checkpoint
from tests.workers.merge_worker import BATCH, optimizer_for, shard, train_one_batch, worker_model

STEPS = 12


def averaged_run(folder, stop_after=None, resume=False):
    """Train 12 steps averaging every 2, a new random mask after every round; with `stop_after`, checkpoint at that
    step into `folder` and stop; with `resume`, continue from the checkpoint in `folder`."""
    model = worker_model(0)
    optimizer = optimizer_for(model)
    scheduler = torch.optim.lr_scheduler.LinearLR(optimizer, 1.0, 0.1, total_iters=STEPS)
    averager = DiffAverager(model, optimizer, merge_every=2, recompute_every=1, total_steps=STEPS,
                        recompute_mask=lambda: random_mask(model, 0.05, seed=averager.rounds))
    if resume:
        load_averaging_checkpoint(last_averaging_checkpoint(folder), averager, scheduler)
    batches = list(torch.utils.data.DataLoader(shard(0) + shard(1), batch_size=BATCH))
    for batch in batches[averager.steps:]:
        train_one_batch(model, optimizer, batch)
        scheduler.step()
        averager.step()
        if averager.steps == stop_after:
            AveragingCheckpoints(folder, steps_per_epoch=STEPS, save_steps=None).save(averager, scheduler, capture_rng())
            return averager
    averager.finish()
    return averager


def test_a_averaged_run_resumed_after_a_merge_ends_with_the_uninterrupted_model(tmp_path):
    whole = averaged_run(tmp_path).model
    stopped = averaged_run(tmp_path, stop_after=6)
    assert stopped.recomputations == 3 and last_averaging_checkpoint(tmp_path).name == "merge-6"
    cut_off = tmp_path / ".merge-8.saving"  # a save killed before every process had written its file
    cut_off.mkdir()
    (cut_off / "process-0.pt").write_bytes(b"")
    assert last_averaging_checkpoint(tmp_path).name == "merge-6"
    resumed = averaged_run(tmp_path, resume=True).model

    expected, got = whole.state_dict(), resumed.state_dict()
    assert sorted(expected) == sorted(got)
    for name in expected:
        assert torch.equal(expected[name], got[name]), name
    assert resumed.peft_config["default"].sparse_parameters == whole.peft_config["default"].sparse_parameters


def test_a_checkpoint_is_taken_only_after_an_averaging_round_and_loads_only_onto_the_pretrained_model(tmp_path):
    with pytest.raises(SparseTrainingError, match="right after an averaging round"):
        averaged_run(tmp_path, stop_after=5)  # step 5: no merge there
    assert not list(tmp_path.iterdir())
    averaged_run(tmp_path, stop_after=4)
    model = worker_model(0)
    with torch.no_grad():
        for _, parameter in base_named_parameters(model):
            parameter.add_(1.0)  # e.g. a model merged into already
    optimizer = optimizer_for(model)
    fresh = DiffAverager(model, optimizer, merge_every=2)
    with pytest.raises(ValueError, match="checkpointed with a learning-rate schedule"):
        load_averaging_checkpoint(last_averaging_checkpoint(tmp_path), fresh, None)
    with pytest.raises(SparseTrainingError, match="pretrained weights"):
        load_averaging_checkpoint(last_averaging_checkpoint(tmp_path), fresh, torch.optim.lr_scheduler.LinearLR(optimizer))


def test_diff_averaging_killed_with_sigkill_in_two_processes_resumes_to_the_same_adapter(tmp_path, capsys):
    """Individual masks, recomputed every 5 merges; 50 steps per epoch, checkpoints every 10 steps. Killed (launcher
    and workers) after checkpoint 30 (epoch 1), resumed, killed again after checkpoint 70 (epoch 2), resumed."""
    checkpoint = save_tiny_checkpoint(tmp_path / "tiny-bert", WORDS)
    train, validation = write_glue_files("sst2", tmp_path, n_train=400, n_val=12)

    def args(out, *extra):
        return ["train", ROOT / "recipes" / "glue" / "sst2.yaml", "--model", checkpoint, "--train-file", train,
                "--validation-file", validation, "--epochs", "2", "--batch-size", "4", "--num-samples", "8",
                "--max-length", "32", "--eval-batch-size", "16", "--save-steps", "10", "--lr", "1e-3",
                "--keep-ratio", "0.05", "--merge-every", "2", "--recompute-every", "5", "--mask-sharing", "individual",
                "--output-dir", out, *extra]

    whole = tmp_path / "whole"
    run = launch("cli_worker.py", *args(whole))
    assert run.returncode == 0, run.stderr[-4000:]
    out = tmp_path / "run"
    for kill_at, extra in ((30, ()), (70, ("--resume",))):
        command, env = launch_command("cli_worker.py", *args(out, *extra))
        process = subprocess.Popen(command, env=env, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
        deadline = time.monotonic() + 240
        while not (out / CHECKPOINTS / f"merge-{kill_at}").exists():
            assert process.poll() is None, f"training ended before it could be killed: {process.stderr.read()[-3000:]}"
            assert time.monotonic() < deadline, "timed out waiting for the run"
            time.sleep(0.01)
        kill_all(process)
        assert not (out / "adapter_model.safetensors").exists()
    assert main([str(a) for a in args(out, "--resume")]) == 2
    assert "saved by 2 processes; resume it with as many (now 1)" in capsys.readouterr().err
    run = launch("cli_worker.py", *args(out, "--resume"))
    assert run.returncode == 0, run.stderr[-4000:]

    expected, got = (load_file(folder / "adapter_model.safetensors") for folder in (whole, out))
    assert sorted(expected) == sorted(got)
    for key in expected:
        assert torch.equal(expected[key], got[key]), key
    assert json.loads((out / "adapter_config.json").read_text()) == json.loads((whole / "adapter_config.json").read_text())
    merging = [json.loads((folder / "results.json").read_text())["merging"] for folder in (whole, out)]
    assert merging[0] == merging[1] and merging[0]["recomputations"] == 9
    assert not (out / CHECKPOINTS).exists()


def test_a_checkpoint_that_fails_on_one_process_stops_every_process(tmp_path):
    run = launch("merge_worker.py", tmp_path, "unsaveable", timeout=180)
    assert run.returncode != 0
    assert "Another process failed while saving a checkpoint" in run.stderr
    assert "FileExistsError" in run.stderr or "NotADirectoryError" in run.stderr
