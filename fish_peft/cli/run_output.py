"""The last stage of a run: its results (results.json) and its output folder, written all at once by the first
process: the adapter (the whole model for `full`), results.json, recipe.yaml, the mask plot and the model card."""

from __future__ import annotations

import json
import math
import resource
import time
from pathlib import Path
from typing import Any, Optional

import torch
from transformers import Trainer

from fish_peft.cli.output_folders import RUN
from fish_peft.cli.recipe import Recipe
from fish_peft.cli.run_setup import Setup, label_names
from fish_peft.cli.tasks import dataset_name
from fish_peft.cli.training_loops import Trained
from fish_peft.distributed.processes import rank_and_world
from fish_peft.hub.mask_plot import plot_mask
from fish_peft.hub.run_facts import write_model_card
from fish_peft.masks.fish_mask import FishMask
from fish_peft.masks.selection import base_named_parameters
from fish_peft.utils.atomic_files import atomic_folder, atomic_path


def run_results(recipe: Recipe, setup: Setup, model, trainer: Trainer, trained: Trained, fisher_seconds) -> dict[str, Any]:
    """What results.json holds, but for what saving adds (`adapter_bytes`, `wall_seconds`): the best model's metrics
    on every validation split, each epoch's, sizes, costs and the mask."""
    evaluation = setup.evaluation_splits()
    mask = trained.mask
    results = {
        "task": setup.task.name,
        "method": recipe.method,
        "model": recipe.model,
        "metrics": {split: strip_prefix(trainer.evaluate(data, metric_key_prefix=split), split) for split, data in evaluation.items()},
        "epochs": epoch_metrics(trainer.state.log_history, tuple(evaluation)),
        **training_facts(model, trained, fisher_seconds),
        "mask": None if mask is None else {"selected": mask.num_selected, "parameters": len(mask), **mask.info, **trained.mask_facts},
        "recipe": recipe.to_dict(),
        "label_names": label_names(setup.model.config, setup.task),
        "dataset": dataset_name(recipe.task, recipe.train_file),
        "train_examples": len(setup.tokenized["train"]),
        "validation_examples": {split: len(data) for split, data in evaluation.items()},
        **trained.facts,
    }
    results["processes"] = rank_and_world()[1]
    return results


def training_facts(model, trained: Trained, fisher_seconds) -> dict[str, Any]:
    """What every run's results.json says of its training: sizes, times and peak memory."""
    return {
        "trainable_parameters": count_trainable(model),
        "total_parameters": sum(p.numel() for _, p in base_named_parameters(model)),
        "fisher_seconds": fisher_seconds,
        "mean_step_seconds": trained.mean_step_seconds,
        "train_seconds": trained.train_seconds,
        "steps": trained.steps,
        "peak_memory_bytes": peak_memory_bytes(),
    }


def write_run_folder(out: Path, recipe, title: str, model, mask: Optional[FishMask], results: dict, started: float,
                     tokenizer=None) -> None:
    """On the first process (the one that writes under `accelerate launch`), replace the output folder at once: until
    the new folder replaces it, the old one (with its checkpoints, for --resume) stays whole. `title` is what the
    run trained for (a task, "sft"), for the mask plot's title; a `tokenizer` (SFT runs) is saved with the adapter."""
    if rank_and_world()[0] != 0:
        return
    with atomic_folder(out, owns=RUN.owns) as staging:
        results["adapter_bytes"] = save_run(staging, recipe, title, model, mask)
        if tokenizer is not None:
            tokenizer.save_pretrained(str(staging))
        results["wall_seconds"] = time.perf_counter() - started
        write_json(staging / "results.json", results)
        write_model_card(staging)


def save_run(out: Path, recipe, title: str, model, mask: Optional[FishMask]) -> int:
    """Write the adapter (or model), recipe and plot into the staging folder `out`; returns the size of the saved
    weights. The model card comes last, from these files and `results.json` (`write_model_card`)."""
    model.save_pretrained(str(out))
    (out / "README.md").unlink(missing_ok=True)  # PEFT's generic card; fish-peft writes its own
    weight_bytes = sum(path.stat().st_size for path in out.glob("*.safetensors"))
    (out / "recipe.yaml").write_text(recipe.to_yaml())
    if mask is not None:
        shapes = {name: tuple(p.shape) for name, p in base_named_parameters(model)}
        plot_mask(mask, str(out / "mask.png"), title=f"{recipe.method} mask, {title}", shapes=shapes)
    return weight_bytes


def strip_prefix(metrics: dict[str, float], split: str) -> dict[str, float]:
    """`{split}_accuracy` → `accuracy`, without Trainer's timings."""
    prefix = f"{split}_"
    return {k.removeprefix(prefix): v for k, v in metrics.items() if k.startswith(prefix) and not k.endswith(("_runtime", "per_second"))}


def epoch_metrics(log_history: list[dict], splits: tuple[str, ...]) -> list[dict[str, Any]]:
    """Validation metrics after every epoch, from Trainer's log."""
    epochs: dict[float, dict[str, Any]] = {}
    for entry in log_history:
        for split in splits:
            if f"eval_{split}_loss" in entry:
                row = epochs.setdefault(entry["epoch"], {"epoch": entry["epoch"]})
                row[split] = strip_prefix({k.removeprefix("eval_"): v for k, v in entry.items()}, split)
        if "loss" in entry and "epoch" in entry:
            epochs.setdefault(entry["epoch"], {"epoch": entry["epoch"]})["train_loss"] = entry["loss"]
    return [epochs[e] for e in sorted(epochs)]


def count_trainable(model) -> int:
    if hasattr(model, "get_nb_trainable_parameters"):
        return model.get_nb_trainable_parameters()[0]
    return sum(p.numel() for p in model.parameters() if p.requires_grad)


def peak_memory_bytes() -> int:
    """The peak since `reset_peak_memory`: CUDA's allocated memory, or the process's resident set (VmHWM)."""
    if torch.cuda.is_available():
        return int(torch.cuda.max_memory_allocated())
    status = Path("/proc/self/status")
    if status.exists():
        line = next((line for line in status.read_text().splitlines() if line.startswith("VmHWM:")), None)
        if line is not None:
            return int(line.split()[1]) * 1024
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # Linux reports KiB


def reset_peak_memory() -> None:
    """Start `peak_memory_bytes` afresh, so that each run of a comparison reports its own peak (on a CPU under Linux
    through /proc/self/clear_refs, which sets VmHWM to the resident set now)."""
    if torch.cuda.is_available():
        torch.cuda.reset_peak_memory_stats()
        return
    clear_refs = Path("/proc/self/clear_refs")
    if clear_refs.exists():
        try:
            clear_refs.write_text("5")
        except OSError:  # a sandbox may refuse it: the peak stays the process's
            pass


def write_json(path: Path, data: dict) -> None:
    with atomic_path(str(path)) as tmp:
        Path(tmp).write_text(json.dumps(data, indent=2, default=_jsonable))


def _jsonable(value):
    if isinstance(value, float) and math.isnan(value):
        return None
    return str(value)
