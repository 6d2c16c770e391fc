"""fish-peft: sparse fine-tuning (FISH masks) as a Hugging Face PEFT method.

Importing this package registers the method with PEFT (at once if PEFT is loaded, else the moment it is), so
`get_peft_model(model, FishConfig(...))` and `PeftModel.from_pretrained(model, path)` work for FISH adapters. The
public names load on first use, so `fish-peft --help` needs no torch. The layers, from the bottom: `utils`,
`distributed`, `masks`, `tuner` (the PEFT method), `dynamic` (masks that move while training), `hub` (sharing) and
`cli` (the `fish-peft` command); a layer imports only those below it.
"""

import importlib
import importlib.abc
import importlib.util
import sys

from fish_peft import _moved_modules

__version__ = "0.1.0"

_HOMES = {
    "fish_peft.masks": (
        "FishMask", "bias_mask", "compute_fisher", "compute_fisher_mask", "magnitude_mask", "mask_from_scores",
        "random_mask",
    ),
    "fish_peft.tuner": (
        "AdapterFileError", "FishConfig", "FishLayer", "FishModel", "ShardedParametersError", "allow_nonfinite",
        "initialize_fish_mask",
    ),
    "fish_peft.tuner.mask_init_callback": ("FishMaskInitCallback",),
    "fish_peft.hub": ("HubError", "push_adapter"),
}
_HOME = {name: module for module, names in _HOMES.items() for name in names}
__all__ = sorted(_HOME)


def __getattr__(name: str):
    if name in _HOME:
        return getattr(importlib.import_module(_HOME[name]), name)
    raise AttributeError(f"module 'fish_peft' has no attribute {name!r}")


def _register() -> None:
    """Importing the tuner registers it (a no-op while it is being imported: it registers when it is done)."""
    from fish_peft.hub import install_push_to_hub

    importlib.import_module("fish_peft.tuner")
    install_push_to_hub()


class _RegisterWhenPeftLoads(importlib.abc.MetaPathFinder):
    """Registers FISH right after `import peft` finishes, in a process that imported fish_peft first. It stays in
    place until then: a mere lookup (`importlib.util.find_spec("peft")`, as transformers does) loads nothing."""

    _looking = False

    def find_spec(self, name, path, target=None):
        if name != "peft" or self._looking:
            return None
        self._looking = True
        try:
            spec = importlib.util.find_spec(name)
        finally:
            self._looking = False
        if spec is None or spec.loader is None:
            return spec
        exec_module = spec.loader.exec_module

        def exec_then_register(module):
            exec_module(module)
            if self in sys.meta_path:
                sys.meta_path.remove(self)
            _register()

        spec.loader.exec_module = exec_then_register
        return spec


if "peft" in sys.modules:
    _register()
elif not any(isinstance(finder, _RegisterWhenPeftLoads) for finder in sys.meta_path):
    sys.meta_path.insert(0, _RegisterWhenPeftLoads())
_moved_modules.install()
