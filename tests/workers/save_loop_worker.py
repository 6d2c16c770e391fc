"""Save two FISH adapters of different supports into one folder, by turns, until killed (tests/utils/test_atomic_saves.py).

Before the loop each version is also saved to its own reference folder; the parent then kills this process at
arbitrary moments and checks that the folder always holds one complete version."""

import copy
import sys
from pathlib import Path

import torch
from peft import get_peft_model

import fish_peft  # noqa: F401  (registers FISH with PEFT)
from fish_peft import FishConfig, random_mask
from fish_peft.utils.atomic_files import atomic_folder
from tests.models import tiny_bert


def version(base, seed, keep_ratio):
    model = get_peft_model(copy.deepcopy(base), FishConfig(mask=random_mask(base, keep_ratio, seed=seed)))
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.copy_(torch.randn(p.shape, generator=torch.Generator().manual_seed(seed)))
    return model


if __name__ == "__main__":
    out, references = Path(sys.argv[1]), Path(sys.argv[2])
    base = tiny_bert()
    versions = [version(base, 1, 0.05), version(base, 2, 0.2)]
    for i, model in enumerate(versions):
        model.save_pretrained(references / str(i))
    saves = 0
    while True:
        with atomic_folder(out) as staging:
            versions[saves % 2].save_pretrained(staging)
        saves += 1
        if saves == 2:
            print("saving", flush=True)
