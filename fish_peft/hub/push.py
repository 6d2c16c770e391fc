"""Share FISH adapters on the Hugging Face Hub with the model card fish-peft writes.

`push_adapter` uploads a saved folder (what `fish-peft train` or `save_pretrained` wrote) or a `PeftModel`: the
adapter files (the sparse diff and the head only), the run's recipe, results and mask plot, and a card rendered from
them. `PeftModel.push_to_hub` comes here for models with FISH adapters: transformers' own version replaces README.md
with a generic card after saving, and PEFT has no hook to prevent it, so `install_push_to_hub` wraps that one method
(every other PEFT method keeps PEFT's behaviour).

Nothing is uploaded before the repository id, the token and every adapter file have been checked; the folder being
pushed is never written to. The token is only ever handed to `huggingface_hub`.
"""

from __future__ import annotations

import inspect
import json
import os
import shutil
import tempfile
import warnings
from pathlib import Path
from typing import Any, Optional, Union

import yaml
from huggingface_hub import CommitInfo, HfApi, get_token
from huggingface_hub.errors import HfHubHTTPError
from huggingface_hub.utils import HFValidationError, validate_repo_id

from fish_peft.hub.run_facts import (
    ADAPTER_CONFIG, CARD, MASK_PLOT, RECIPE, RESULTS, card_context, find_adapters, named_labels, read_adapter_config,
    read_adapter_mask, write_model_card,
)
from fish_peft.tuner.config import FishConfig
from fish_peft.hub.model_card import is_hub_id
from fish_peft.tuner.adapter_files import ADAPTER_WEIGHTS

# What a push writes: those an earlier push left that this one does not write are removed in the same commit, so the
# repository never mixes two versions (an adapter this push does not hold, the previous run's results and plot).
PUBLISHED_FILES = (ADAPTER_CONFIG, ADAPTER_WEIGHTS, "adapter_model.bin", RECIPE, RESULTS, MASK_PLOT)
LOCAL_PATH_KEYS = ("train_file", "validation_file", "output_dir")
DEFAULT_COMMIT_MESSAGE = "Upload FISH sparse-diff adapter (fish-peft)"
# What the card of a push may be told (see `card_context`): everything else it says comes from the files pushed.
CARD_KEYWORDS = tuple(name for name in inspect.signature(card_context).parameters if name not in ("folder", "repo_id", "tags"))
# Keywords of `push_to_hub` in transformers (4.x and 5.x) and PEFT that do not apply to a FISH adapter, and why.
IGNORED_PUSH_KEYWORDS = {
    "use_temp_dir": "the adapter is always staged in a new temporary folder, never in the working directory",
    "safe_serialization": "a FISH adapter is always saved as safetensors, which PEFT loads without running code",
    "max_shard_size": "a sparse diff holds k values and their indices, a few megabytes at most: it is never sharded",
    "ignore_metadata_errors": "the card is written anew from the adapter's files, not parsed from the repository's",
}
LOGIN_HELP = (
    "log in with `hf auth login` (or `huggingface_hub.login()` in Python) using a token with write access from "
    "https://huggingface.co/settings/tokens, or set the HF_TOKEN environment variable"
)


class HubError(RuntimeError):
    """Pushing to the Hub could not be done; the message says why and what to do."""


def push_adapter(
    source: Union[str, os.PathLike, Any],
    repo_id: str,
    *,
    private: Optional[bool] = None,
    revision: Optional[str] = None,
    commit_message: Optional[str] = None,
    commit_description: Optional[str] = None,
    create_pr: bool = False,
    token: Union[str, bool, None] = None,
    tags: Optional[list[str]] = None,
    **card: Any,
) -> CommitInfo:
    """Upload a FISH adapter with its model card to the Hub repository `repo_id` (created if missing).

    `source` is a folder written by `fish-peft train` or `save_pretrained` (every adapter in it, sub-folders
    included), or a `PeftModel` with FISH adapters. `private`, `revision` (a branch, created from main if
    missing), `commit_message`, `commit_description` and `create_pr` mean what they mean in `huggingface_hub`.
    `token` defaults to the stored Hub login or HF_TOKEN. `tags` are added to the card's; the other keywords
    (`base_model`, `dataset`, `task`, `metrics`, `license`, `label_names`) fill in or override what the card would
    say from the folder's files (a model's class names come from its config). Pushing again updates the same
    repository. Returns the commit's `CommitInfo`.
    """
    check_repo_id(repo_id)
    check_card_keywords(card)
    token = resolve_token(token)
    tags = [tags] if isinstance(tags, str) else tags
    with tempfile.TemporaryDirectory(prefix="fish-peft-push-") as staging:
        staging = Path(staging)
        if isinstance(source, (str, os.PathLike)):
            _stage_folder(Path(source), staging)
        else:
            _stage_model(source, staging)
            card.setdefault("label_names", model_label_names(source))
        _check_adapters(staging)
        _hide_local_paths(staging, card.get("base_model"))
        context = write_model_card(staging, repo_id=repo_id, tags=tuple(tags or ()), **card)
        _point_configs_at(staging, context["base_model"])
        return _upload(staging, repo_id, token, private, revision, commit_message, commit_description, create_pr)


def check_repo_id(repo_id: Any) -> None:
    """A clear error for a repository id the Hub would refuse, before any work is done."""
    if not isinstance(repo_id, str) or repo_id.count("/") > 1:
        raise ValueError(f"{repo_id!r} is not a Hub repository id: use 'name' or 'namespace/name', e.g. 'alice/minilm-sst2-fish'.")
    try:
        validate_repo_id(repo_id)
    except HFValidationError as err:
        raise ValueError(
            f"{repo_id!r} is not a valid Hub repository id ({err}). Use 'namespace/name' made of letters, digits, "
            "'-', '_' and '.', at most 96 characters, e.g. 'alice/minilm-sst2-fish'."
        ) from None


def check_card_keywords(card: dict[str, Any]) -> None:
    """A clear error, before any work, for a keyword that is neither the Hub's nor the card's (a typo, most often)."""
    unknown = sorted(set(card) - set(CARD_KEYWORDS))
    if unknown:
        raise TypeError(
            f"push got unexpected keyword argument(s) {', '.join(unknown)}. It takes the Hub's private, revision, "
            f"commit_message, commit_description, create_pr, token and tags, and for the card {', '.join(CARD_KEYWORDS)}."
        )


def model_label_names(model: Any) -> Optional[list[str]]:
    """The class names of a PeftModel's base model: an adapter does not keep them, so the card's snippet gives
    them back."""
    return named_labels(getattr(getattr(model.get_base_model(), "config", None), "id2label", None))


def hub_keywords(kwargs: dict[str, Any]) -> dict[str, Any]:
    """The keywords of a `PeftModel.push_to_hub` call as `push_adapter` takes them.

    Those of transformers' and PEFT's `push_to_hub` that do not apply to a sparse adapter are accepted and ignored
    (`IGNORED_PUSH_KEYWORDS` says why; `safe_serialization=False` warns, since the files stay safetensors), the
    older `use_auth_token` is the token; anything `push_adapter` does not know is refused by it, by name.
    """
    kwargs = dict(kwargs)
    if kwargs.get("safe_serialization", True) is False:
        warnings.warn("safe_serialization=False is ignored: FISH adapters are always pushed as safetensors.", stacklevel=3)
    for name in IGNORED_PUSH_KEYWORDS:
        kwargs.pop(name, None)
    if "use_auth_token" in kwargs:
        legacy, token = kwargs.pop("use_auth_token"), kwargs.get("token")
        if None not in (legacy, token) and legacy != token:
            raise ValueError("push_to_hub got both token and use_auth_token (its old name): pass only token.")
        kwargs["token"] = legacy if token is None else token
    return kwargs


def resolve_token(token: Union[str, bool, None]) -> str:
    """The token to push with: the one given, else the stored login or HF_TOKEN; a clear error when there is none."""
    if token is False:
        raise HubError(f"push needs a token with write access (token=False was given); {LOGIN_HELP}.")
    found = token if isinstance(token, str) and token else get_token()
    if not found:
        raise HubError(f"No Hugging Face token found, so nothing can be pushed: {LOGIN_HELP}.")
    return found


def _stage_folder(folder: Path, staging: Path) -> None:
    """Copy what is worth publishing from `folder`: its files (not the card, which is written anew, nor hidden
    temporaries) and the adapters in its sub-folders (not checkpoints)."""
    if not folder.is_dir():
        raise FileNotFoundError(f"{folder} is not a folder; pass the output folder of `fish-peft train` or `save_pretrained`.")
    for sub in ["", *(sub for _, sub in find_adapters(folder) if sub)]:
        (staging / sub).mkdir(exist_ok=True)
        for path in (folder / sub).iterdir():
            if path.is_file() and path.name != CARD and not path.name.startswith("."):
                shutil.copy2(path, staging / sub / path.name)


def _stage_model(model: Any, staging: Path) -> None:
    configs = getattr(model, "peft_config", None)
    if not isinstance(configs, dict) or not any(isinstance(c, FishConfig) for c in configs.values()):
        raise TypeError(
            f"push_adapter expects a PeftModel with FISH adapters or a saved folder, got {type(model).__name__}."
        )
    model.save_pretrained(str(staging))


def _check_adapters(staging: Path) -> None:
    """Decode every FISH adapter before uploading: a damaged file stops the push here."""
    for _, sub in find_adapters(staging):
        if isinstance(read_adapter_config(staging / sub), FishConfig):
            read_adapter_mask(staging / sub)


def _hide_local_paths(staging: Path, base_model: Optional[str]) -> None:
    """Keep this machine's paths out of the uploaded recipes and results (and so out of the card): files go by their
    names, a local base model by the Hub id given for it, else by its folder's name."""
    for sub in {"", *(sub for _, sub in find_adapters(staging))}:
        recipe_path, results_path = staging / sub / RECIPE, staging / sub / RESULTS
        if recipe_path.is_file():
            recipe = yaml.safe_load(recipe_path.read_text())
            if isinstance(recipe, dict):
                recipe_path.write_text(yaml.safe_dump(_public_recipe(recipe, base_model), sort_keys=False))
        if results_path.is_file():
            results = json.loads(results_path.read_text())
            if isinstance(results, dict) and isinstance(results.get("recipe"), dict):
                results["recipe"] = _public_recipe(results["recipe"], base_model)
                results["model"] = results["recipe"].get("model")
                results_path.write_text(json.dumps(results, indent=2))


def _public_recipe(recipe: dict, base_model: Optional[str]) -> dict:
    public = dict(recipe)
    for key in LOCAL_PATH_KEYS:
        if isinstance(public.get(key), str):
            public[key] = Path(public[key]).name
    model = public.get("model")
    if isinstance(model, str) and not is_hub_id(model):
        public["model"] = base_model if is_hub_id(base_model) else f"{Path(model).name} (local folder)"
    return public


def _point_configs_at(staging: Path, base_model: str) -> None:
    """Name the base model by its Hub id in uploaded configs that name a local folder, so that
    `AutoPeftModel.from_pretrained(repo_id)` can find it; without a Hub id, name none rather than a path of this
    machine."""
    for _, sub in find_adapters(staging):
        path = staging / sub / ADAPTER_CONFIG
        config = json.loads(path.read_text())
        named = config.get("base_model_name_or_path")
        public = base_model if is_hub_id(base_model) else None
        if not is_hub_id(named) and named != public:
            config["base_model_name_or_path"] = public
            path.write_text(json.dumps(config, indent=2, sort_keys=True))


def _upload(staging, repo_id, token, private, revision, commit_message, commit_description, create_pr) -> CommitInfo:
    api = HfApi(token=token)
    try:
        repo_id = api.create_repo(repo_id, private=private, exist_ok=True).repo_id
        if revision and revision != "main":
            api.create_branch(repo_id, branch=revision, exist_ok=True)
        return api.upload_folder(
            repo_id=repo_id,
            folder_path=str(staging),
            revision=revision,
            commit_message=commit_message or DEFAULT_COMMIT_MESSAGE,
            commit_description=commit_description,
            create_pr=create_pr,
            delete_patterns=[pattern for name in PUBLISHED_FILES for pattern in (name, f"*/{name}")],
        )
    except Exception as err:
        raise HubError(_failure_message(err, repo_id, token)) from None


def _failure_message(err: Exception, repo_id: str, token: str) -> str:
    status = getattr(getattr(err, "response", None), "status_code", None) if isinstance(err, HfHubHTTPError) else None
    detail = str(err).replace(token, "***")
    if status == 401:
        advice = f"the Hub refused the token; {LOGIN_HELP}"
    elif status == 403:
        advice = f"the token may not write to {repo_id}: use a token with write access to that namespace"
    else:
        advice = "nothing on this machine was changed; run the same push again"
    return f"Pushing to {repo_id} failed ({type(err).__name__}: {detail}): {advice}."
