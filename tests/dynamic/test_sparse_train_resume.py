"""`fish-peft sparse-train` killed with SIGKILL after an epoch checkpoint and resumed ends with the model, masks and
per-epoch accuracies of an uninterrupted run; an interrupted folder is not restarted by accident."""

import json
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from fish_peft.cli.command import main
from fish_peft.cli.sparse_train_checkpoints import CHECKPOINTS
from tests.cli.test_resume import wait_for

RECIPES = Path(__file__).resolve().parents[2] / "recipes" / "sparse"
EPOCHS = "6"


def args(rule, out, *extra):
    return ["sparse-train", str(RECIPES / f"digits_{rule}.yaml"), "--epochs", EPOCHS, "--output-dir", str(out), *extra]


@pytest.mark.parametrize("rule", ["sparse_momentum", "topkast"])
def test_a_killed_sparse_train_run_resumes_to_the_same_model(rule, tmp_path, capsys):
    whole = tmp_path / "whole"
    assert main(args(rule, whole)) == 0
    out = tmp_path / "run"
    process = subprocess.Popen([sys.executable, "-m", "fish_peft.cli.command", *args(rule, out)],
                               stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    wait_for((out / CHECKPOINTS / "epoch-2").is_dir, process)
    process.send_signal(signal.SIGKILL)
    process.wait()
    assert not (out / "results.json").exists()

    assert main(args(rule, out)) == 2
    assert "interrupted run" in capsys.readouterr().err
    assert main(args(rule, out, "--resume", "--lr", "0.05")) == 2
    assert "lr: 0.1 -> 0.05" in capsys.readouterr().err
    assert main(args(rule, out, "--resume")) == 0

    resumed, expected = load_file(out / "sparse_model.safetensors"), load_file(whole / "sparse_model.safetensors")
    assert sorted(resumed) == sorted(expected)
    for key in expected:
        assert torch.equal(resumed[key], expected[key]), key
    results, whole_results = (json.loads((run / "results.json").read_text()) for run in (out, whole))
    assert results["epochs"] == whole_results["epochs"] and results["mask_updates"] == whole_results["mask_updates"]
    assert not (out / CHECKPOINTS).exists()


def test_resume_needs_an_interrupted_run(tmp_path, capsys):
    assert main(args("topkast", tmp_path / "nothing", "--resume")) == 2
    assert "Nothing to resume" in capsys.readouterr().err
