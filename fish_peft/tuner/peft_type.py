"""`PeftType.FISH`: PEFT keys its mapping dicts by members of its `PeftType` enum, so FISH adds itself as one."""

from peft.utils import PeftType

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
