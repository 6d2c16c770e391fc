"""Make FISH a first-class PEFT method.

PEFT dispatches config loading, model construction and state-dict key handling through mapping dicts keyed by
`PeftType`. We add a `FISH` member to that enum and fill the dicts through PEFT's own `register_peft_method`.
"""

from peft.utils import register_peft_method

from fish_peft.tuner.peft_type import FISH_NAME, FISH_PEFT_TYPE

def register() -> None:
    """Register FISH's config and tuner with PEFT once per interpreter."""
    from peft.mapping import PEFT_TYPE_TO_TUNER_MAPPING

    from fish_peft.tuner.config import FishConfig
    from fish_peft.tuner.model import FishModel

    if FISH_PEFT_TYPE not in PEFT_TYPE_TO_TUNER_MAPPING:
        register_peft_method(name=FISH_NAME, config_cls=FishConfig, model_cls=FishModel)
