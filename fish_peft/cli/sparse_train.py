"""`fish-peft sparse-train`: train a network from scratch at a fixed density, in an Accelerate loop.

Runs on scikit-learn's bundled handwritten digits (1,797 8x8 images, offline), with an MLP shaped like the papers'
LeNet-300-100 or a small CNN; `method` picks dense, a static random mask, sparse momentum or Top-KAST. The same
loop runs on one CPU or under `accelerate launch` on several GPUs. Each epoch's batch order depends only on the
seed and the epoch, and every epoch is checkpointed, so `resume=True` continues a killed run to the same model.
"""

from __future__ import annotations

import dataclasses
import json
import time
from pathlib import Path
from typing import Any, Optional

import torch
from accelerate import Accelerator
from accelerate.utils import set_seed
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from fish_peft.utils.atomic_files import atomic_path
from fish_peft.dynamic.checkpoint import save_sparse_model
from fish_peft.dynamic.engine import NetworkMaskEngine
from fish_peft.cli.recipe import SparseRecipe
from fish_peft.cli.sparse_train_checkpoints import EpochCheckpoints, load_progress, writes_files
from fish_peft.dynamic.sparse_momentum import SparseMomentum
from fish_peft.dynamic.static import StaticSparse
from fish_peft.dynamic.topkast import TopKAST

def digits_splits(test_fraction: float = 0.2) -> tuple[TensorDataset, TensorDataset]:
    """The bundled digits, scaled to [0, 1], split the same way every time (stratified, fixed seed)."""
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    images, labels = load_digits(return_X_y=True)
    train_x, test_x, train_y, test_y = train_test_split(
        images / 16.0, labels, test_size=test_fraction, stratify=labels, random_state=0
    )
    return _tensors(train_x, train_y), _tensors(test_x, test_y)


def _tensors(images, labels) -> TensorDataset:
    return TensorDataset(torch.tensor(images, dtype=torch.float32), torch.tensor(labels, dtype=torch.long))


def build_model(kind: str) -> nn.Module:
    if kind == "mlp":
        return nn.Sequential(nn.Linear(64, 300), nn.ReLU(), nn.Linear(300, 100), nn.ReLU(), nn.Linear(100, 10))
    return nn.Sequential(
        nn.Unflatten(1, (1, 8, 8)), nn.Conv2d(1, 32, 3, padding=1), nn.ReLU(), nn.Conv2d(32, 64, 3, padding=1),
        nn.ReLU(), nn.MaxPool2d(2), nn.Flatten(), nn.Linear(64 * 4 * 4, 128), nn.ReLU(), nn.Linear(128, 10),
    )


def build_engine(recipe: SparseRecipe, model: nn.Module, total_steps: int, steps_per_epoch: int) -> Optional[NetworkMaskEngine]:
    if recipe.method == "dense":
        return None
    if recipe.method == "static":
        return StaticSparse(model, density=recipe.density, distribution=recipe.distribution, seed=recipe.seed)
    if recipe.method == "sparse_momentum":
        return SparseMomentum(
            model, density=recipe.density, update_every=recipe.update_every or steps_per_epoch, total_steps=total_steps,
            prune_rate=recipe.prune_rate, distribution=recipe.distribution, seed=recipe.seed,
        )
    return TopKAST(
        model, forward_density=recipe.density, backward_density=recipe.backward_density or min(1.0, 2 * recipe.density),
        penalty=recipe.penalty, update_every=recipe.update_every or 1, distribution=recipe.distribution,
    )


def train_sparse(
    recipe: SparseRecipe, accelerator: Optional[Accelerator] = None, overwrite: bool = False, resume: bool = False
) -> dict[str, Any]:
    """Train as the recipe says; write results.json and the model (sparse checkpoint, or dense weights) into
    output_dir; return the results. `resume` continues an interrupted run from its last epoch checkpoint."""
    if overwrite and resume:
        raise ValueError("--resume continues the run in the output folder and --overwrite replaces it; pass one.")
    checkpoints = EpochCheckpoints(recipe.output_dir)
    checkpoint = checkpoints.resume_point(recipe) if resume else None
    if not resume and not overwrite:
        if (Path(recipe.output_dir) / "results.json").exists():
            raise FileExistsError(f"{recipe.output_dir} already holds a run; pass --overwrite or choose another --output-dir.")
        if checkpoints.interrupted():
            raise FileExistsError(
                f"{recipe.output_dir} holds an interrupted run: --resume continues it from its last epoch, --overwrite starts again."
            )
    accelerator = accelerator or Accelerator()
    set_seed(recipe.seed)
    train_set, test_set = digits_splits()
    model = build_model(recipe.model)
    order = torch.Generator()  # reseeded every epoch
    train_loader = DataLoader(train_set, batch_size=recipe.batch_size, shuffle=True, generator=order)
    test_loader = DataLoader(test_set, batch_size=256)
    steps_per_epoch = len(train_loader)
    engine = build_engine(recipe, model, recipe.epochs * steps_per_epoch, steps_per_epoch)
    if recipe.optimizer == "sgd":
        optimizer = torch.optim.SGD(model.parameters(), lr=recipe.lr, momentum=recipe.momentum)
    else:
        optimizer = torch.optim.Adam(model.parameters(), lr=recipe.lr)
    scheduler = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, recipe.epochs * steps_per_epoch)
    model, optimizer, train_loader, test_loader, scheduler = accelerator.prepare(model, optimizer, train_loader, test_loader, scheduler)
    if engine is not None:
        accelerator.register_for_checkpointing(engine)

    progress = {"history": [], "engine_seconds": 0.0, "mask_updates": 0, "train_seconds": 0.0}
    if checkpoint is not None:
        accelerator.load_state(str(checkpoint))
        progress = load_progress(checkpoint)
    elif writes_files(accelerator):
        checkpoints.start(recipe)
    history, engine_seconds, updates = progress["history"], progress["engine_seconds"], progress["mask_updates"]
    started = time.perf_counter() - progress["train_seconds"]
    for epoch in range(len(history), recipe.epochs):
        order.manual_seed(recipe.seed + epoch)
        model.train()
        for inputs, labels in train_loader:
            optimizer.zero_grad()
            accelerator.backward(nn.functional.cross_entropy(model(inputs), labels))
            optimizer.step()
            scheduler.step()
            if engine is not None:
                tick = time.perf_counter()
                updates += engine.step(optimizer)
                engine_seconds += time.perf_counter() - tick
        history.append({"epoch": epoch + 1, "test_accuracy": evaluate(model, test_loader, accelerator)})
        if epoch + 1 < recipe.epochs:
            progress = {"history": history, "engine_seconds": engine_seconds, "mask_updates": updates,
                        "train_seconds": time.perf_counter() - started}
            checkpoints.save(accelerator, epoch + 1, progress)
    train_seconds = time.perf_counter() - started

    results = {
        "recipe": dataclasses.asdict(recipe),
        "test_accuracy": history[-1]["test_accuracy"],
        "epochs": history,
        "density": engine.density() if engine is not None else 1.0,
        "mask_updates": updates,
        "train_seconds": train_seconds,
        "mask_update_share": (engine.update_seconds if engine is not None else 0.0) / train_seconds,  # prune/regrow
        "engine_share": engine_seconds / train_seconds,  # all of engine.step(), with keeping pruned weights at zero
    }
    if writes_files(accelerator):
        save_run(recipe, engine, accelerator.unwrap_model(model), results)
        checkpoints.finish()
    return results


@torch.no_grad()
def evaluate(model: nn.Module, loader: DataLoader, accelerator: Accelerator) -> float:
    model.eval()
    correct = total = 0
    for inputs, labels in loader:
        predictions, labels = accelerator.gather_for_metrics((model(inputs).argmax(-1), labels))
        correct += int((predictions == labels).sum())
        total += labels.numel()
    return correct / total


def save_run(recipe: SparseRecipe, engine: Optional[NetworkMaskEngine], model: nn.Module, results: dict) -> None:
    out = Path(recipe.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    if engine is not None:
        save_sparse_model(engine, str(out / "sparse_model.safetensors"))
    else:
        from safetensors.torch import save_file

        with atomic_path(str(out / "model.safetensors")) as tmp:
            save_file({k: v.contiguous() for k, v in model.state_dict().items()}, tmp)
    with atomic_path(str(out / "results.json")) as tmp:
        Path(tmp).write_text(json.dumps(results, indent=2))
