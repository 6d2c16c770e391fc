"""Sharing: the push of an adapter or run folder to the Hugging Face Hub, its model card, and the mask plot. Loaded
on first use: `import fish_peft` pulls in only `install_push_to_hub`, which imports nothing of fish-peft until a
push."""

import functools
from typing import Any

_PUSH_NAMES = ("HubError", "push_adapter")


def install_push_to_hub() -> None:
    """Route `PeftModel.push_to_hub` of models with FISH adapters to `push_adapter` (once per interpreter), with
    every keyword transformers' and PEFT's `push_to_hub` take (`hub_keywords`). transformers' own push would
    replace the model card with a generic one after saving, and PEFT offers no hook; LoRA and the rest keep PEFT's."""
    from peft import PeftModel

    original = PeftModel.push_to_hub
    if getattr(original, "_fish_peft", False):
        return

    @functools.wraps(original)
    def push_to_hub(self, repo_id: str, **kwargs: Any):
        from fish_peft.tuner.config import FishConfig

        if not any(isinstance(config, FishConfig) for config in getattr(self, "peft_config", {}).values()):
            return original(self, repo_id, **kwargs)
        from fish_peft.hub.push import hub_keywords, push_adapter

        return push_adapter(self, repo_id, **hub_keywords(kwargs))

    push_to_hub._fish_peft = True
    PeftModel.push_to_hub = push_to_hub


def __getattr__(name: str):
    if name in _PUSH_NAMES:
        from fish_peft.hub import push

        return getattr(push, name)
    raise AttributeError(f"module 'fish_peft.hub' has no attribute {name!r}")
