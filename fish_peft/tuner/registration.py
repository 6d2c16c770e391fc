"""Make FISH a first-class PEFT method.

PEFT dispatches config loading, model construction and state-dict key handling through mapping dicts keyed by
`PeftType`. We add a `FISH` member to that enum and fill the dicts through PEFT's own `register_peft_method`.
"""

from peft.utils import PeftType, register_peft_method

FISH_NAME = "fish"


def _add_peft_type_member(name: str) -> PeftType:
    """Add `name` as a member of PEFT's str-valued `PeftType` enum (idempotent)."""
    if name in PeftType._member_map_:
        return PeftType._member_map_[name]
    member = str.__new__(PeftType, name)
    member._name_ = name
    member._value_ = name
    member.__objclass__ = PeftType
    PeftType._member_map_[name] = member
    PeftType._value2member_map_[name] = member
    PeftType._member_names_.append(name)
    type.__setattr__(PeftType, name, member)
    return member


FISH_PEFT_TYPE = _add_peft_type_member(FISH_NAME.upper())


def register() -> None:
    """Register FISH's config and tuner with PEFT once per interpreter."""
    from peft.mapping import PEFT_TYPE_TO_TUNER_MAPPING

    from fish_peft.tuner.config import FishConfig
    from fish_peft.tuner.model import FishModel

    if FISH_PEFT_TYPE not in PEFT_TYPE_TO_TUNER_MAPPING:
        register_peft_method(name=FISH_NAME, config_cls=FishConfig, model_cls=FishModel)
