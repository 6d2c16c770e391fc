"""The PEFT method: `FishConfig`, the sparse-diff layers, the tuner that injects, merges and unloads them, the adapter
file format and its checks, the mask of a keep_ratio config computed from data, and the registration with PEFT (done
when this package is imported)."""

from fish_peft.tuner.adapter_files import AdapterFileError, allow_nonfinite
from fish_peft.tuner.config import FishConfig
from fish_peft.tuner.layer import FishLayer
from fish_peft.tuner.mask_initialization import initialize_fish_mask
from fish_peft.tuner.model import FishModel, ShardedParametersError
from fish_peft.tuner.registration import register

register()

__all__ = [
    "AdapterFileError", "FishConfig", "FishLayer", "FishModel", "ShardedParametersError", "allow_nonfinite",
    "initialize_fish_mask",
]
