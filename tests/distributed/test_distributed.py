"""Several processes (two CPU processes, gloo, the real Accelerate code path): results equal one process's."""

import json

import torch
from safetensors.torch import load_file
from torch.testing import assert_close

from fish_peft import compute_fisher, compute_fisher_mask
from tests.distributed_launch import launch
from tests.models import tiny_bert
from tests.workers.collective_log import check_collectives
from tests.workers.fisher_worker import examples


def single_process_fisher(num_samples, order=None):
    data = examples() if order is None else [examples()[i] for i in order]
    loader = torch.utils.data.DataLoader(data, batch_size=2)
    scores, sums = compute_fisher(tiny_bert(seed=0), loader, num_samples=num_samples, chunk_size=3, gradient_sums=True)
    options = {"keep_ratio": 0.05, "num_samples": num_samples, "chunk_size": 3}
    masks = {score: compute_fisher_mask(tiny_bert(seed=0), loader, score=score, **options) for score in ("fisher", "gradient_snr")}
    return {**scores, **{f"sum:{name}": t for name, t in sums.items()}}, masks


def check_run(out, num_samples, order=None):
    expected, masks = single_process_fisher(num_samples, order)
    digests = {"digest": masks["fisher"].digest(), "selected": masks["fisher"].num_selected,
               "gradient_snr": masks["gradient_snr"].digest()}
    for rank in (0, 1):
        scores = load_file(out / f"scores{rank}.safetensors")  # the Fisher, and the summed gradients (sum:...)
        assert scores.keys() == expected.keys()
        for name in expected:
            assert_close(scores[name], expected[name], rtol=1e-5, atol=1e-7 if name.startswith("sum:") else 1e-9)
        assert json.loads((out / f"mask{rank}.json").read_text()) == digests


def test_fisher_over_one_stream_is_split_between_processes_and_summed(tmp_path):
    run = launch("fisher_worker.py", tmp_path, "stream")
    assert run.returncode == 0, run.stderr[-3000:]
    check_run(tmp_path, num_samples=10)
    fisher_modules = {"fish_peft.distributed.processes"}
    check_collectives(tmp_path, "cpu", fisher_modules)  # the model's device: no CPU tensors a GPU group refuses


def test_fisher_over_accelerate_shards_equals_one_process_over_all_of_them(tmp_path):
    run = launch("fisher_worker.py", tmp_path, "sharded")
    assert run.returncode == 0, run.stderr[-3000:]
    check_run(tmp_path, num_samples=12)


def test_a_process_without_enough_data_fails_every_process_without_hanging(tmp_path):
    run = launch("fisher_worker.py", tmp_path, "short", timeout=180)
    assert run.returncode != 0
    assert "yielded only 3 examples to this process, 6 needed" in run.stderr
    assert "Another process failed while computing the Fisher" in run.stderr
    assert not list(tmp_path.glob("scores*"))


def test_processes_holding_different_models_are_told_so(tmp_path):
    run = launch("fisher_worker.py", tmp_path, "models", timeout=180)
    assert run.returncode != 0
    assert "ProcessMismatchError: The model being scored differs between processes" in run.stderr
