"""fish-peft: sparse fine-tuning (FISH masks) as a Hugging Face PEFT method.

Importing this package registers the method with PEFT, so `get_peft_model(model, FishConfig(...))` and
`PeftModel.from_pretrained(model, path)` work for FISH adapters.
"""

from ._registration import register as _register
from .config import FishConfig
from .fisher import compute_fisher
from .hub import HubError, push_adapter
from .layer import FishLayer
from .masks import FishMask
from .model import FishModel, ShardedParametersError
from .selection import bias_mask, compute_fisher_mask, magnitude_mask, mask_from_scores, random_mask
from .validation import AdapterFileError, allow_nonfinite

_register()

__version__ = "0.1.0"

__all__ = [
    "AdapterFileError",
    "FishConfig",
    "FishLayer",
    "FishMask",
    "FishModel",
    "HubError",
    "allow_nonfinite",
    "bias_mask",
    "compute_fisher",
    "compute_fisher_mask",
    "magnitude_mask",
    "mask_from_scores",
    "push_adapter",
    "random_mask",
    "ShardedParametersError",
]
