"""Training under DDP (two CPU processes, gloo, through Accelerate and Trainer) gives the adapter one process gives
with the same global batch; only the adapter's values cross the wire; evolving masks agree on every rank."""

import json
from pathlib import Path

import pytest
import torch
from accelerate import Accelerator
from peft import PeftModel
from safetensors.torch import load_file
from torch.testing import assert_close
from transformers import AutoModelForSequenceClassification

from tests.distributed_launch import ROOT, launch, train_sst2_in_two_processes
from tests.models import tiny_bert
from tests.workers.ddp_worker import STEPS, peft_model, train_loop, train_trainer

RECIPES = Path(__file__).resolve().parents[2] / "recipes"


def run_workers(tmp_path, mode):
    run = launch("ddp_worker.py", tmp_path, mode)
    assert run.returncode == 0, run.stderr[-4000:]
    return [json.loads((tmp_path / f"result{rank}.json").read_text()) for rank in (0, 1)]


def assert_same_adapter(saved_dir, model):
    """The adapter saved by the two processes equals `model`'s (indices exactly, values to float tolerance)."""
    saved = load_file(saved_dir / "adapter_model.safetensors")
    expected = {k: v for k, v in model.state_dict().items()}
    reloaded = PeftModel.from_pretrained(tiny_bert(hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0), saved_dir)
    assert saved  # the file holds the packed diff and the head
    for name, tensor in reloaded.state_dict().items():
        if ".fish_indices." in name:
            assert torch.equal(tensor, expected[name]), name
        elif ".fish_values." in name or "modules_to_save" in name:
            assert_close(tensor, expected[name], rtol=1e-4, atol=1e-6, msg=name)


def test_ddp_in_an_accelerate_loop_trains_the_adapter_one_process_trains(tmp_path):
    results = run_workers(tmp_path, "loop")
    assert results[0]["adapter_digest"] == results[1]["adapter_digest"]
    reference, _, _, _ = train_loop("loop", Accelerator(cpu=True), batch_size=4)
    assert_same_adapter(tmp_path / "adapter", reference)


def test_ddp_under_trainer_trains_the_adapter_one_process_trains(tmp_path):
    results = run_workers(tmp_path, "trainer")
    assert results[0]["adapter_digest"] == results[1]["adapter_digest"]
    assert_same_adapter(tmp_path / "adapter", train_trainer(tmp_path / "single", batch_size=4))


def test_only_the_trainable_values_cross_the_wire(tmp_path):
    results = run_workers(tmp_path, "loop")
    trainable = sum(p.numel() for p in peft_model("loop").parameters() if p.requires_grad)  # k diff values + head
    per_step = results[0]["traffic"]["gradients"]["bytes"] / STEPS
    dense = sum(p.numel() for p in tiny_bert().parameters()) * 4
    assert trainable * 4 <= per_step <= 1.2 * trainable * 4
    assert per_step < dense / 10
    buffers = results[0]["traffic"].get("buffers", {"bytes": 0})["bytes"] / STEPS
    assert buffers <= 64 * 8 * 2  # BERT's position and token-type id buffers; the mask's indices are not sent


@pytest.mark.parametrize("rule", ["topkast", "sparse_momentum"])
def test_evolving_diffs_under_ddp_agree_on_every_rank_and_with_one_process(tmp_path, rule):
    results = run_workers(tmp_path, rule)
    reference, engine, _, digests = train_loop(rule, Accelerator(cpu=True), batch_size=4)
    assert len(digests) == engine.updates >= 2
    assert results[0]["update_digests"] == results[1]["update_digests"] == digests
    assert results[0]["adapter_digest"] == results[1]["adapter_digest"]
    assert_same_adapter(tmp_path / "adapter", reference)
    head = sum(p.numel() for n, p in peft_model(rule).named_parameters() if p.requires_grad and "modules_to_save" in n)
    assert results[0]["traffic"]["gradients"]["bytes"] / STEPS == head * 4  # DDP reduces only the head
    assert results[0]["engine_traffic"]["diff gradients"]["bytes"] > 0


def test_reading_the_ddp_ignore_list_on_one_process_only_does_not_hang(tmp_path):
    results = run_workers(tmp_path, "touch")
    assert results[0]["ignored"] > 0 and results[0]["adapter_digest"] == results[1]["adapter_digest"]


def test_processes_with_different_masks_are_stopped_when_ddp_trains_the_model(tmp_path):
    run = launch("ddp_worker.py", tmp_path, "mismatch", timeout=180)
    assert run.returncode != 0
    assert "ProcessMismatchError: The FISH mask (the adapters' indices) differs between processes" in run.stderr


def test_fish_peft_train_runs_in_two_processes_and_the_first_writes_the_run(tmp_path):
    out, checkpoint = train_sst2_in_two_processes(tmp_path, "--mask-update", "sparse_momentum", "--update-every", "2")
    results = json.loads((out / "results.json").read_text())
    assert results["processes"] == 2 and results["mask"]["mask_updates"] >= 1
    reloaded = PeftModel.from_pretrained(AutoModelForSequenceClassification.from_pretrained(checkpoint, num_labels=2), out)
    assert reloaded.peft_config["default"].sparse_parameters == json.loads((out / "adapter_config.json").read_text())["sparse_parameters"]
    assert not list(out.glob(".saving-*")) and not (out / "checkpoints").exists()


def test_fish_peft_compare_runs_in_two_processes_and_the_first_writes_the_comparison(tmp_path):
    from tests.glue_files import WORDS, write_glue_files
    from tests.models import save_tiny_checkpoint

    checkpoint = save_tiny_checkpoint(tmp_path / "tiny-bert", WORDS)
    train, validation = write_glue_files("sst2", tmp_path)
    out = tmp_path / "comparison"
    run = launch(
        "cli_worker.py", "compare", ROOT / "recipes" / "glue" / "sst2.yaml", "--methods", "fish,lora", "--model",
        checkpoint, "--train-file", train, "--validation-file", validation, "--epochs", "1", "--batch-size", "4",
        "--num-samples", "8", "--max-length", "32", "--output-dir", out,
    )
    assert run.returncode == 0, run.stderr[-4000:]
    assert run.stdout.count("| method |") == 1  # one table, from the first process
    rows = json.loads((out / "comparison.json").read_text())["rows"]
    assert [row["method"] for row in rows] == ["fish", "lora"] and all(row["adapter_bytes"] > 0 for row in rows)
    assert all(json.loads((out / m / "results.json").read_text())["processes"] == 2 for m in ("fish", "lora"))


@pytest.mark.parametrize("rule", ["sparse_momentum", "topkast"])
def test_whole_network_mask_updates_agree_on_every_rank(tmp_path, rule):
    """Every update compares the masks across processes (MaskEngine.step) and would stop the run if they differed."""
    out = tmp_path / "run"
    run = launch(
        "cli_worker.py", "sparse-train", RECIPES / "sparse" / f"digits_{rule}.yaml", "--output-dir", out,
        "--epochs", "2", "--update-every", "4",
    )
    assert run.returncode == 0, run.stderr[-4000:]
    results = json.loads((out / "results.json").read_text())
    assert results["mask_updates"] >= 2
    assert abs(results["density"] - results["recipe"]["density"]) < 0.01
