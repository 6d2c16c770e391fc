"""fish-peft: sparse fine-tuning (FISH masks) as a Hugging Face PEFT method.

Importing this package registers the method with PEFT, so `get_peft_model(model, FishConfig(...))` and
`PeftModel.from_pretrained(model, path)` work for FISH adapters. The layers, from the bottom: `utils`, `distributed`,
`masks`, `tuner` (the PEFT method), `dynamic` (masks that move while training), `hub` (sharing) and `cli` (the
`fish-peft` command); a layer imports only those below it. `hub` and `cli` load on first use.
"""

from fish_peft import _moved_modules
from fish_peft.hub import install_push_to_hub
from fish_peft.masks import (
    FishMask,
    bias_mask,
    compute_fisher,
    compute_fisher_mask,
    magnitude_mask,
    mask_from_scores,
    random_mask,
)
from fish_peft.tuner.adapter_files import AdapterFileError, allow_nonfinite
from fish_peft.tuner.config import FishConfig
from fish_peft.tuner.layer import FishLayer
from fish_peft.tuner.model import FishModel, ShardedParametersError
from fish_peft.tuner.registration import register as _register

_register()
install_push_to_hub()
_moved_modules.install()

__version__ = "0.1.0"

_HUB_NAMES = ("HubError", "push_adapter")


def __getattr__(name: str):
    if name in _HUB_NAMES:
        from fish_peft import hub

        return getattr(hub, name)
    raise AttributeError(f"module 'fish_peft' has no attribute {name!r}")


__all__ = [
    "AdapterFileError",
    "FishConfig",
    "FishLayer",
    "FishMask",
    "FishModel",
    "HubError",
    "ShardedParametersError",
    "allow_nonfinite",
    "bias_mask",
    "compute_fisher",
    "compute_fisher_mask",
    "magnitude_mask",
    "mask_from_scores",
    "push_adapter",
    "random_mask",
]
