"""The FISH paper's distributed training (merged sparse diffs): two real processes equal the workers simulated in one
process, as the paper's authors ran them; merging in one process changes nothing; bad input is refused."""

import json
import math

import pytest
import torch
from peft import PeftModel
from torch.testing import assert_close
from transformers import AutoModelForSequenceClassification

from fish_peft import random_mask
from fish_peft.dynamic.diff_averaging import DiffAverager
from fish_peft.tuner.layer import FishLayer
from fish_peft.masks.selection import base_named_parameters
from tests.distributed_launch import launch, train_sst2_in_two_processes
from tests.models import example_inputs, tiny_bert
from tests.workers.collective_log import check_collectives
from tests.workers.merge_worker import BATCH, MERGE_EVERY, STEPS, optimizer_for, shard, train_one_batch, worker_model

PROBE = example_inputs("bert", batch=4, seq=8, seed=9, labels=False)


def logits(model):
    model.eval()
    with torch.no_grad():
        return model(**PROBE).logits


def simulate(mask_seeds, reduction):
    """Both workers in one process, with dense tensors: each trains on its half; every MERGE_EVERY steps the sum
    or mean of their dense changes is added to every worker's weights and their diffs restart from zero."""
    workers = [worker_model(seed) for seed in mask_seeds]
    optimizers = [optimizer_for(w) for w in workers]
    loaders = [list(torch.utils.data.DataLoader(shard(rank), batch_size=BATCH)) for rank in range(2)]
    heads = {n: p.detach().clone() for n, p in workers[0].named_parameters() if "modules_to_save" in n}
    scale = 0.5 if reduction == "mean" else 1.0
    for step in range(STEPS):
        for worker, optimizer, loader in zip(workers, optimizers, loaders):
            train_one_batch(worker, optimizer, loader[step])
        if (step + 1) % MERGE_EVERY:
            continue
        with torch.no_grad():
            change = {}
            for worker in workers:
                for module_name, module in worker.named_modules():
                    if isinstance(module, FishLayer):
                        for attr, delta in module.get_delta_weight("default").items():
                            key = f"{module_name.removeprefix('base_model.model.')}.{attr}"
                            change[key] = change.get(key, 0) + scale * delta
            head_change = {n: scale * sum(dict(w.named_parameters())[n] - heads[n] for w in workers) for n in heads}
            for worker in workers:
                base = dict(base_named_parameters(worker))
                for key, delta in change.items():
                    base[key].add_(delta)
                params = dict(worker.named_parameters())
                for n in heads:
                    params[n].copy_(heads[n] + head_change[n])
                for name, p in params.items():
                    if ".fish_values." in name:
                        p.zero_()
            heads = {n: heads[n] + head_change[n] for n in heads}
    return workers[0]


def run_workers(tmp_path, mode):
    run = launch("merge_worker.py", tmp_path, mode)
    assert run.returncode == 0, run.stderr[-4000:]
    return [json.loads((tmp_path / f"result{rank}.json").read_text()) for rank in (0, 1)]


def load_adapter(path):
    return PeftModel.from_pretrained(tiny_bert(hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0), path)


@pytest.mark.parametrize("mode, seeds, reduction", [("shared", (0, 0), "mean"), ("individual", (0, 1), "sum")])
def test_two_processes_equal_the_workers_simulated_in_one(tmp_path, mode, seeds, reduction):
    results = run_workers(tmp_path, mode)
    assert results[0]["digest"] == results[1]["digest"]  # every process ends with the same model
    # on the model's device only (what NCCL needs): the step/mask check-ins, the gathers and the reductions
    check_collectives(tmp_path, "cpu", {"fish_peft.distributed.processes"}
                      | ({"fish_peft.dynamic.diff_averaging"} if mode == "individual" else set()))
    merged = load_adapter(tmp_path / "adapter")
    assert_close(logits(merged), logits(simulate(seeds, reduction)), rtol=1e-4, atol=1e-5)
    k = sum(worker_model(0).peft_config["default"].sparse_parameters.values())
    values = results[0]["traffic"]["diff values"]
    assert values["calls"] == STEPS // MERGE_EVERY
    if mode == "shared":  # only the k values cross the wire
        assert values["bytes"] == values["calls"] * k * 4
        assert results[0]["selected"] <= k  # the union of one mask
    else:  # k positions (int64) and values per process
        assert results[0]["traffic"]["diff positions"]["bytes"] >= values["calls"] * k * 8
        assert results[0]["selected"] > k  # the union of two masks


def test_recomputed_masks_agree_and_the_adapter_holds_every_merged_change(tmp_path):
    results = run_workers(tmp_path, "recompute")
    assert results[0]["digest"] == results[1]["digest"]
    assert results[0]["recomputations"] == results[0]["merges"] == STEPS // MERGE_EVERY
    assert results[0]["traffic"]["fisher scores"]["calls"] == results[0]["recomputations"]
    merged = load_adapter(tmp_path / "adapter")
    assert sum(merged.peft_config["default"].sparse_parameters.values()) == results[0]["selected"]


def test_a_process_that_runs_out_of_data_stops_every_process(tmp_path):
    run = launch("merge_worker.py", tmp_path, "uneven", timeout=180)
    assert run.returncode != 0
    assert "ProcessMismatchError: The processes are out of step" in run.stderr
    assert not (tmp_path / "adapter").exists()


def test_averaging_in_one_process_changes_nothing_and_finish_keeps_the_model():
    def train(merge: bool, recompute: bool = False):
        model = worker_model(0)
        optimizer = optimizer_for(model)
        averager = None
        if merge:
            kwargs = {"recompute_every": 1, "recompute_mask": lambda: random_mask(model, 0.05, seed=averager.rounds)} if recompute else {}
            averager = DiffAverager(model, optimizer, merge_every=2, **kwargs)
        for batch in list(torch.utils.data.DataLoader(shard(0), batch_size=BATCH))[:5]:
            train_one_batch(model, optimizer, batch)
            if averager:
                averager.step()
        before = logits(model)
        if averager:
            averager.finish()
        trained = {id(p) for p in model.parameters() if p.requires_grad}
        assert {id(p) for group in optimizer.param_groups for p in group["params"]} == trained  # nothing stale
        return model, before, logits(model)

    _, _, plain = train(merge=False)
    model, before, after = train(merge=True)
    assert_close(after, plain, rtol=1e-4, atol=1e-6)
    assert_close(after, before, rtol=1e-5, atol=1e-7)
    model, before, after = train(merge=True, recompute=True)
    assert_close(after, before, rtol=1e-5, atol=1e-7)
    assert sum(model.peft_config["default"].sparse_parameters.values()) > sum(worker_model(0).peft_config["default"].sparse_parameters.values())
    base = dict(base_named_parameters(model))
    assert all(torch.equal(base[n], p) for n, p in base_named_parameters(tiny_bert()) if n in base)  # W restored


@pytest.mark.parametrize("kwargs, message", [
    ({"merge_every": 0}, "merge_every must be a whole number of steps >= 1"),
    ({"merge_every": 2, "reduction": "median"}, "reduction must be one of"),
    ({"merge_every": 2, "recompute_every": 0}, "recompute_every must be a whole number of averaging rounds"),
    ({"merge_every": 2, "recompute_every": 3}, "recompute_every needs recompute_mask"),
])
def test_bad_settings_are_refused(kwargs, message):
    model = worker_model(0)
    with pytest.raises(ValueError, match=message):
        DiffAverager(model, optimizer_for(model), **kwargs)


@pytest.mark.parametrize("sharing", ["shared", "individual"])
def test_fish_peft_train_averages_diffs_in_two_processes(tmp_path, sharing):
    out, checkpoint = train_sst2_in_two_processes(
        tmp_path, "--lr", "1e-2", "--keep-ratio", "0.05",  # at 0.5 % the two halves' masks of this tiny model agree
        "--merge-every", "2", "--recompute-every", "1", "--mask-sharing", sharing,
    )
    results = json.loads((out / "results.json").read_text())
    merging = results["merging"]
    assert merging["processes"] == 2 and merging["merges"] == math.ceil(merging["steps"] / 2) >= 2
    assert merging["recomputations"] == merging["merges"] - 1  # none after the last merge
    assert ("diff positions" in merging["traffic"]) == (sharing == "individual")  # own masks: positions travel too
    assert merging["bytes_per_process"] > 0 and "accuracy" in results["metrics"]["validation"]
    config = json.loads((out / "adapter_config.json").read_text())
    assert sum(config["sparse_parameters"].values()) == results["mask"]["selected"]
    PeftModel.from_pretrained(AutoModelForSequenceClassification.from_pretrained(checkpoint, num_labels=2), out)
