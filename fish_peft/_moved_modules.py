"""The module paths of fish-peft 0.1's flat layout (`fish_peft.config`, `fish_peft.sparse.topkast`, ...) keep
importing, as copies of the modules' names, with a `FutureWarning` once per path; they go away in the next release."""

from __future__ import annotations

import importlib
import importlib.abc
import importlib.util
import sys
import warnings

MOVED = {
    "fish_peft._registration": "fish_peft.tuner.registration",
    "fish_peft.config": "fish_peft.tuner.config",
    "fish_peft.layer": "fish_peft.tuner.layer",
    "fish_peft.model": "fish_peft.tuner.model",
    "fish_peft.packing": "fish_peft.tuner.packing",
    "fish_peft.validation": "fish_peft.tuner.adapter_files",
    "fish_peft.fisher": "fish_peft.masks.fisher",
    "fish_peft.per_example": "fish_peft.masks.per_example",
    "fish_peft.losses": "fish_peft.masks.losses",
    "fish_peft.selection": "fish_peft.masks.selection",
    "fish_peft.communication": "fish_peft.distributed.communication",
    "fish_peft.atomic": "fish_peft.utils.atomic_files",
    "fish_peft.rng_states": "fish_peft.utils.rng_states",
    "fish_peft.diff_merging": "fish_peft.dynamic.diff_averaging",
    "fish_peft.merge_checkpoints": "fish_peft.dynamic.averaging_checkpoints",
    "fish_peft.merged_training": "fish_peft.cli.averaged_training",
    "fish_peft.card_facts": "fish_peft.hub.run_facts",
    "fish_peft.model_card": "fish_peft.hub.model_card",
    "fish_peft.mask_plot": "fish_peft.hub.mask_plot",
    "fish_peft.recipe": "fish_peft.cli.recipe",
    "fish_peft.training": "fish_peft.cli.training",
    "fish_peft.comparison": "fish_peft.cli.comparison",
    "fish_peft.resume": "fish_peft.cli.resume",
    "fish_peft.tasks": "fish_peft.cli.tasks",
    "fish_peft.glue_data": "fish_peft.cli.glue_data",
    "fish_peft.demo_data": "fish_peft.cli.demo_data",
    "fish_peft.output_folders": "fish_peft.cli.output_folders",
    "fish_peft.sparse": "fish_peft.dynamic",
    "fish_peft.sparse.from_scratch": "fish_peft.cli.sparse_train",
    "fish_peft.sparse.epoch_checkpoints": "fish_peft.cli.sparse_train_checkpoints",
}
_OLD_PACKAGES = {"fish_peft.sparse"}
_warned: set[str] = set()


def _new_name(old: str) -> str | None:
    if old in MOVED:  # before the package rule: two of the old package's modules moved elsewhere
        return MOVED[old]
    package, _, child = old.rpartition(".")
    return f"{MOVED[package]}.{child}" if package in _OLD_PACKAGES else None


class _MovedModuleFinder(importlib.abc.MetaPathFinder, importlib.abc.Loader):
    """Answers imports of old paths with a module holding the new module's names."""

    def find_spec(self, name, path, target=None):
        new = _new_name(name)
        if new is None or importlib.util.find_spec(new) is None:
            return None
        return importlib.util.spec_from_loader(name, self, is_package=name in _OLD_PACKAGES)

    def exec_module(self, module) -> None:
        new = _new_name(module.__name__)
        if module.__name__ not in _warned:
            _warned.add(module.__name__)
            warnings.warn(f"{module.__name__} moved to {new}; the old path goes away in the next release.", FutureWarning, stacklevel=2)
        real = importlib.import_module(new)
        module.__dict__.update({k: v for k, v in vars(real).items() if k not in ("__name__", "__spec__", "__loader__", "__package__", "__path__")})


def install() -> None:
    if not any(isinstance(finder, _MovedModuleFinder) for finder in sys.meta_path):
        sys.meta_path.append(_MovedModuleFinder())
