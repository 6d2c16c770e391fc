"""What an output folder holds, which of its files a command wrote, and which folders a command may write into.

`fish-peft train`, `compare` and `mask` each write one kind of folder. A command writes into a folder that is new,
empty, or of its own kind, and refuses any other before doing any work: fish-peft never deletes a file it did not
write, and never mixes its files with another kind's (a comparison's `fish/` run next to a single run's adapter, a
mask's `mask.png` over a run's). Replacing a folder of its own kind (`--overwrite`) replaces what the command writes
there (`FolderKind.files`) and keeps everything else, such as the user's notes. Hidden entries (`.DS_Store`,
`.gitkeep`) do not make a folder non-empty.
"""

from __future__ import annotations

import fnmatch
import shutil
from dataclasses import dataclass
from pathlib import Path

from fish_peft.cli.lr_search import TUNING_FOLDER
from fish_peft.cli.recipe import METHODS
from fish_peft.cli.resume import CHECKPOINTS, RUN_MASK, RUN_RECIPE

LISTED = 8  # entries an error message names before it says how many more there are


@dataclass(frozen=True)
class FolderKind:
    """One kind of output folder: the command that writes it, what marks a folder as one, and what it writes."""

    what: str  # "a run of `fish-peft train`", for messages
    markers: tuple[str, ...]  # relative paths (or glob patterns) only this kind writes; any marks a folder as this kind
    files: tuple[str, ...]  # glob patterns (relative paths) of everything the command writes into its folder

    def found_in(self, folder: Path) -> bool:
        return any(any(folder.glob(m)) if _pattern(m) else (folder / m).exists() for m in self.markers)

    def owns(self, relative: str) -> bool:
        """Whether the entry at `relative` (a path inside the folder, "a/b") is one this kind writes."""
        return any(fnmatch.fnmatchcase(relative, pattern) for pattern in self.files)


RUN = FolderKind(
    "a run of `fish-peft train`",
    markers=("recipe.yaml", "adapter_config.json", f"{CHECKPOINTS}/{RUN_RECIPE}"),
    files=(
        "adapter_config.json", "adapter_model.safetensors", "adapter_model.bin",  # an adapter
        "config.json", "generation_config.json", "model.safetensors", "model-*-of-*.safetensors",  # a full model
        "model.safetensors.index.json",
        # a tokenizer (SFT runs save theirs with the adapter)
        "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "added_tokens.json", "chat_template.jinja",
        "chat_template.json", "vocab.json", "merges.txt", "tokenizer.model", "vocab.txt",
        "results.json", "recipe.yaml", "mask.png", "README.md",
        # what training keeps for --resume (Trainer's checkpoints, diff averaging's, temporaries of both)
        f"{CHECKPOINTS}/{RUN_RECIPE}", f"{CHECKPOINTS}/{RUN_MASK}", f"{CHECKPOINTS}/checkpoint-*",
        f"{CHECKPOINTS}/README.md",  # the card TRL's SFTTrainer writes beside its checkpoints
        f"{CHECKPOINTS}/tmp-checkpoint-*", f"{CHECKPOINTS}/merge-*", f"{CHECKPOINTS}/.merge-*.saving",
        f"{CHECKPOINTS}/.{RUN_RECIPE}.tmp-*", f"{CHECKPOINTS}/.{RUN_MASK}.tmp-*",
    ),
)
MASKS_PLOT = "masks.png"  # a comparison's masks side by side
COMPARISON = FolderKind(
    "a comparison of `fish-peft compare`",
    # a method's run: in METHOD/ (one seed), seed=SEED/METHOD/ (several), tuning/METHOD/lr=LR/ (--lr-grid's grid)
    markers=("comparison.json", "comparison.md", *(f"{where}/{marker}" for m in METHODS for marker in RUN.markers
                                                   for where in (m, f"seed=*/{m}", f"{TUNING_FOLDER}/{m}/lr=*"))),
    # a method's folder is a run, replaced as runs are
    files=("comparison.json", "comparison.md", MASKS_PLOT, *METHODS, "seed=*", TUNING_FOLDER),
)
MASK = FolderKind(
    "a mask of `fish-peft mask`",
    markers=("mask.safetensors", "mask_report.json"),
    files=("mask.safetensors", "mask_report.json", "mask.png"),
)
SPARSE_RUN = FolderKind(  # written by `fish-peft sparse-train`; named here so that the others can say what they found
    "a run of `fish-peft sparse-train`",
    markers=("sparse_model.safetensors", f"{CHECKPOINTS}/run_recipe.json"),
    files=("sparse_model.safetensors", "model.safetensors", "results.json", f"{CHECKPOINTS}"),
)
KINDS = (COMPARISON, RUN, MASK, SPARSE_RUN)


def _pattern(marker: str) -> bool:
    return any(c in marker for c in "*?[")


def visible_entries(folder: Path) -> list[str]:
    """The folder's entries that are not hidden, sorted, folders with a trailing "/" ([] when it does not exist)."""
    if not folder.is_dir():
        return []
    return sorted(p.name + ("/" if p.is_dir() else "") for p in folder.iterdir() if not p.name.startswith("."))


def kinds_in(folder: Path) -> list[FolderKind]:
    """The kinds whose markers the folder holds (one for a folder fish-peft wrote, none for a user's)."""
    return [kind for kind in KINDS if kind.found_in(folder)]


def check_output_folder(folder: Path, kind: FolderKind, elsewhere: str) -> None:
    """Refuse, before any work, to write `kind` into a folder that holds anything but a folder of that kind.

    `elsewhere` is an output folder to suggest instead. Whether a folder of the same kind may be replaced
    (`--overwrite`) or continued (`--resume`) is the command's own decision.
    """
    if folder.exists() and not folder.is_dir():
        raise FileExistsError(f"{folder} is a file, not a folder; pass another --output-dir, e.g. {elsewhere}.")
    entries = visible_entries(folder)
    found = kinds_in(folder)
    if not entries or found == [kind]:
        return
    held = " and ".join(k.what for k in found) if found else "files that fish-peft did not write"
    raise FileExistsError(
        f"{folder} holds {held} ({describe(entries)}), not {kind.what}. fish-peft never deletes files it did not "
        f"write nor mixes them with another command's, so it will not write there (--overwrite replaces only "
        f"{kind.what}): pass another --output-dir, e.g. {elsewhere}, or move those files away."
    )


def describe(entries: list[str]) -> str:
    """The first entries of a folder for a message, and how many more there are."""
    more = f" and {len(entries) - LISTED} more" if len(entries) > LISTED else ""
    return ", ".join(entries[:LISTED]) + more


def remove_owned(folder: Path, kind: FolderKind, under: str) -> None:
    """Delete what `kind` wrote in the sub-folder `under` of `folder` (an earlier run's checkpoints), and that
    sub-folder if nothing else is left in it; anything else there stays."""
    root = folder / under
    if not root.is_dir():
        return
    for entry in root.iterdir():
        if kind.owns(f"{under}/{entry.name}"):
            if entry.is_dir() and not entry.is_symlink():
                shutil.rmtree(entry)
            else:
                entry.unlink()
    if not any(root.iterdir()):
        root.rmdir()
