"""What crosses the wire when several processes train all-MiniLM-L6-v2: dense DDP (full fine-tuning) against the
sparse path (a FISH adapter under DDP: only its values and the head are reduced) and the FISH paper's merged diffs.

Two parts, each in 2 CPU processes (gloo, `torch.distributed.run`), printed as one JSON:
  traffic   bytes per step each process puts into DDP's collectives (counted by a communication hook, plus the
            buffers DDP broadcasts before each forward) and the mean step time, for dense DDP and for FISH adapters
            at keep ratios 0.5 % and 2 % (random masks of that budget: the bytes depend on k alone).
  accuracy  the demo recipe (recipes/demo.yaml: Rotten Tomatoes, 1,000 validation sentences) trained by
            `fish-peft train` in 2 processes as dense DDP, sparse DDP (FISH 0.5 %) and merged diffs (every
            --merge-every steps, shared and individual masks), with accuracy and the bytes per process in all.
usage: python benchmarks/communication.py [--parts traffic,accuracy] [--steps 12] [--merge-every 10]
"""

import argparse
import json
import os
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
KEEP_RATIOS = (0.005, 0.02)


def launch(args: list[str], timeout: float = 3600) -> subprocess.CompletedProcess:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    command = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", f"--master_port={port}", *args]
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    run = subprocess.run(command, capture_output=True, text=True, timeout=timeout, env=env, cwd=ROOT)
    if run.returncode:
        raise RuntimeError(f"{' '.join(command)} failed:\n{run.stderr[-4000:]}")
    return run


def traffic_worker(steps: int, out: Path) -> None:
    """In each process: a few training steps per setting, counting DDP's bytes; rank 0 writes the numbers."""
    import torch
    from accelerate import Accelerator
    from peft import get_peft_model
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    from fish_peft import FishConfig, random_mask
    from fish_peft.distributed.communication import count_ddp_traffic
    from fish_peft.cli.demo_data import minilm_path, split_rotten_tomatoes

    accelerator = Accelerator(cpu=True)
    tokenizer = AutoTokenizer.from_pretrained(minilm_path())
    sentences = [s for s, _ in split_rotten_tomatoes()[0][: 16 * 2 * (steps + 1)]]
    labels = [label for _, label in split_rotten_tomatoes()[0][: len(sentences)]]
    encoded = tokenizer(sentences, padding="max_length", truncation=True, max_length=64, return_tensors="pt")
    data = [{"input_ids": encoded["input_ids"][i], "attention_mask": encoded["attention_mask"][i], "labels": torch.tensor(labels[i])} for i in range(len(sentences))]
    results = {}
    for setting in ["dense", *(f"fish_{r}" for r in KEEP_RATIOS)]:
        torch.manual_seed(0)
        model = AutoModelForSequenceClassification.from_pretrained(minilm_path(), num_labels=2)
        total = sum(p.numel() for p in model.parameters())
        if setting != "dense":
            model = get_peft_model(model, FishConfig(mask=random_mask(model, float(setting.split("_")[1]), seed=0)))
        trained = [p for p in model.parameters() if p.requires_grad]
        optimizer = torch.optim.AdamW(trained, lr=1e-4)
        loader = torch.utils.data.DataLoader(data, batch_size=16)
        prepared, optimizer, loader = accelerator.prepare(model, optimizer, loader)
        traffic = count_ddp_traffic(prepared)
        prepared.train()
        times = []
        for batch in loader:
            started = time.perf_counter()
            accelerator.backward(prepared(**batch).loss)
            optimizer.step()
            optimizer.zero_grad()
            times.append(time.perf_counter() - started)
        done = len(times)
        results[setting] = {
            "trainable_values": sum(p.numel() for p in trained),
            "total_parameters": total,
            "gradient_bytes_per_step": traffic.bytes["gradients"] / done,
            "buffer_bytes_per_step": traffic.bytes["buffers"] / done,
            "bytes_per_step": traffic.total() / done,
            "step_seconds": sum(times[1:]) / (done - 1),  # the first step builds DDP's buckets
            "steps": done,
        }
        accelerator.free_memory()
    if accelerator.is_main_process:
        dense = results["dense"]
        for setting, row in results.items():
            row["bytes_vs_dense"] = row["bytes_per_step"] / dense["bytes_per_step"]
            row["step_time_vs_dense"] = row["step_seconds"] / dense["step_seconds"]
        out.write_text(json.dumps(results))
    accelerator.end_training()


def traffic(steps: int) -> dict:
    with tempfile.TemporaryDirectory() as scratch:
        out = Path(scratch) / "traffic.json"
        launch([__file__, "--worker", str(steps), str(out)])
        return json.loads(out.read_text())


def accuracy(merge_every: int, output_dir: str, traffic_rows: dict, only: list[str]) -> dict:
    """The demo recipe trained in 2 processes as dense DDP, sparse DDP and merged diffs."""
    runs = {
        "dense_ddp": ["--method", "full"],
        "fish_ddp": ["--method", "fish"],
        "fish_merged_shared": ["--method", "fish", "--merge-every", str(merge_every), "--recompute-every", "10"],
        "fish_merged_individual": ["--method", "fish", "--merge-every", str(merge_every), "--recompute-every", "10", "--mask-sharing", "individual"],
    }
    summary = {}
    for name, extra in runs.items():
        out = Path(output_dir) / name
        if name in only or not (out / "results.json").is_file():  # others: kept from an earlier run of this benchmark
            launch(["-m", "fish_peft.cli.command", "train", "recipes/demo.yaml", "--output-dir", str(out), "--overwrite", *extra])
        results = json.loads((out / "results.json").read_text())
        row = {"accuracy": results["metrics"]["validation"]["accuracy"], "steps": results["steps"], "train_seconds": results["train_seconds"]}
        if "merging" in results:
            row.update(merges=results["merging"]["merges"], bytes_per_process=results["merging"]["bytes_per_process"], traffic=results["merging"]["traffic"])
        else:  # DDP: every step sends what the traffic part counted per step for this model
            per_step = traffic_rows["dense" if name == "dense_ddp" else "fish_0.005"]["bytes_per_step"]
            row.update(bytes_per_step=per_step, bytes_per_process=per_step * results["steps"])
        summary[name] = row
    dense_bytes = summary["dense_ddp"]["bytes_per_process"]
    for row in summary.values():
        row["bytes_vs_dense_ddp"] = row["bytes_per_process"] / dense_bytes
    return summary


def main():
    if len(sys.argv) > 1 and sys.argv[1] == "--worker":
        traffic_worker(int(sys.argv[2]), Path(sys.argv[3]))
        return
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--parts", default="traffic,accuracy")
    parser.add_argument("--steps", type=int, default=12)
    parser.add_argument("--merge-every", type=int, default=10)
    parser.add_argument("--output-dir", default="outputs/communication")
    parser.add_argument("--rerun", default="dense_ddp,fish_ddp,fish_merged_shared,fish_merged_individual",
                        help="accuracy runs to train again; the others are read from --output-dir when there")
    args = parser.parse_args()
    parts = args.parts.split(",")
    report = {"processes": 2, "device": "cpu (gloo)"}
    report["traffic"] = traffic(args.steps)
    if "accuracy" in parts:
        report["accuracy"] = accuracy(args.merge_every, args.output_dir, report["traffic"], args.rerun.split(","))
    print(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
