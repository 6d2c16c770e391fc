"""`FishConfig`: the PEFT config of a sparse-diff adapter."""

from __future__ import annotations

import math
import os
from dataclasses import InitVar, dataclass, field
from typing import Optional, Union

import torch
from peft.config import PeftConfig

from fish_peft.tuner.peft_type import FISH_PEFT_TYPE
from fish_peft.masks.fish_mask import FishMask
from fish_peft.masks.fisher import FISHER_TYPES
from fish_peft.masks.selection import SCORES, check_keep_ratio

MASK_UPDATES = (None, "topkast", "sparse_momentum")
SAVE_DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


@dataclass
class FishConfig(PeftConfig):
    """Configuration of a FISH sparse-diff adapter.

    Pass the `mask` (a `FishMask` from `compute_fisher_mask`, `random_mask` or `magnitude_mask`); the config keeps
    only its per-parameter counts and shapes, which is what `adapter_config.json` needs so that loading can
    pre-allocate the adapter and refuse a base model of another shape. The indices themselves travel in
    `adapter_model.safetensors`.

    Or pass `keep_ratio` instead, for tools that build the PEFT model from a config (TRL's `SFTTrainer`): the adapter
    then awaits its mask, which `initialize_fish_mask(model, dataloader)` (or `FishMaskInitCallback` in a Trainer)
    computes from the Fisher of the base weights among the `target_modules`, filling in the counts and shapes.

    Args:
        mask: the entries the adapter may change (needed to create an adapter, not to load one).
        keep_ratio: instead of a mask, the share of all the model's parameters left trainable (the paper's budget:
            k = int(N_total * keep_ratio) - N_head), chosen by the Fisher when the mask is initialized.
        target_modules: which modules may hold entries, as in PEFT (names, suffixes or a regex; "all-linear": every
            Linear/Conv1D but the output layer). `None`: every parameter of the model but the head.
        exclude_modules: modules (names, suffixes or a regex) that hold no entries, with everything inside them.
        num_samples: examples the Fisher of a `keep_ratio` config is computed on (all of them if the data holds
            fewer).
        fisher: "empirical" (the paper: gold labels) or "expected" (labels drawn from the model's prediction).
        score: what ranks the entries of a `keep_ratio` mask: "fisher" (the paper) or "gradient_snr" (how
            consistently the examples' gradients push an entry one way; `fish_peft.masks.selection.gradient_snr`).
        trainable_token_indices: embedding rows trained in full beside the diff, by PEFT's TrainableTokens (token ids
            for the input embedding, or {layer name: token ids}); TRL sets it for the tokens a chat template adds.
            The mask holds no entries in those embeddings.
        modules_to_save: modules trained in full and saved with the adapter (the task head). Defaults to the head
            the mask's budget was drawn for (with `keep_ratio`: a module named `classifier` or `score`, if any).
        save_dtype: dtype of the values in `adapter_model.safetensors` ("float32", "float16" or "bfloat16"); `None`
            keeps the training dtype (float32). Training always happens on float32 values.
        mask_update: `None` keeps the mask fixed. "topkast" or "sparse_momentum" let the diff's support move while
            it trains (k entries always; see `fish_peft.dynamic.evolving_diff_engine`, which runs the updates).
        update_every: optimizer steps between two updates of the support.
        prune_rate: fraction of the entries replaced at the first update, decayed along a cosine to 0 (sparse
            momentum: of each parameter's entries; Top-KAST: of its exploration entries).
        exploration: Top-KAST's backward set holds (1 + exploration) * k entries (M/D in the paper).
        init_weights: `True` starts the diff at zero (the adapted model equals the base model); `False` starts it
            at small random values, for tests that must see an adapter act (as LoRA's `init_lora_weights=False`).
        penalty: λ of Top-KAST's exploration penalty. 1e-2 by default: with a diff's tiny density D, λ/D = 2 at 0.5 %
            keeps exploration entries small until their gradient is steady (1e-4 made training unstable under Adam).
    """

    mask: InitVar[Optional[FishMask]] = None
    sparse_parameters: dict[str, int] = field(
        default_factory=dict, metadata={"help": "Number of trainable entries per parameter name (from the mask)."}
    )
    parameter_shapes: dict[str, list[int]] = field(
        default_factory=dict, metadata={"help": "Shape of every adapted parameter of the base model."}
    )
    modules_to_save: Optional[list[str]] = field(
        default=None, metadata={"help": "Modules trained in full and saved with the adapter (e.g. the classifier)."}
    )
    save_dtype: Optional[str] = field(
        default=None, metadata={"help": "dtype of saved values: float32, float16 or bfloat16 (None: float32)."}
    )
    mask_update: Optional[str] = field(
        default=None, metadata={"help": "None (fixed support), 'topkast' or 'sparse_momentum' (support evolves)."}
    )
    update_every: int = field(default=100, metadata={"help": "Optimizer steps between support updates."})
    prune_rate: float = field(default=0.5, metadata={"help": "Fraction of entries replaced at the first update."})
    exploration: float = field(default=1.0, metadata={"help": "Top-KAST: exploration entries per forward entry."})
    penalty: float = field(default=1e-2, metadata={"help": "Top-KAST: λ of the exploration penalty."})
    init_weights: bool = field(
        default=True, metadata={"help": "True: Δ starts at zero; False: small random values (for tests)."}
    )
    mask_info: dict = field(default_factory=dict, metadata={"help": "How the mask was chosen (method, keep ratio)."})
    keep_ratio: Optional[float] = field(
        default=None, metadata={"help": "Without a mask: the share of the model's parameters left trainable."}
    )
    target_modules: Optional[Union[list[str], str]] = field(
        default=None, metadata={"help": "Modules that may hold entries (PEFT's matching; 'all-linear'); None: all."}
    )
    exclude_modules: Optional[Union[list[str], str]] = field(
        default=None, metadata={"help": "Modules that hold no entries (PEFT's matching)."}
    )
    num_samples: int = field(default=1024, metadata={"help": "Examples the Fisher of a keep_ratio config is computed on."})
    trainable_token_indices: Optional[Union[list[int], dict[str, list[int]]]] = field(
        default=None, metadata={"help": "Embedding rows trained in full beside the diff (PEFT's TrainableTokens)."}
    )
    fisher: str = field(default="empirical", metadata={"help": "'empirical' (gold labels) or 'expected' Fisher."})
    score: str = field(
        default="fisher", metadata={"help": "What ranks a keep_ratio mask's entries: 'fisher' or 'gradient_snr'."}
    )

    def __post_init__(self, mask: Optional[FishMask]):
        super().__post_init__()
        self.peft_type = FISH_PEFT_TYPE
        self.mask = mask
        if mask is not None and self.keep_ratio is not None:
            raise ValueError("FishConfig takes a mask or a keep_ratio (the mask computed later from data), not both.")
        if mask is not None:
            if not isinstance(mask, FishMask):
                raise TypeError(
                    f"FishConfig(mask=...) expects a FishMask (from compute_fisher_mask, random_mask or "
                    f"magnitude_mask), got {type(mask).__name__}."
                )
            self.sparse_parameters = mask.counts()
            self.parameter_shapes = {name: list(shape) for name, shape in mask.shapes.items()}
            self.mask_info = dict(mask.info)
            if self.modules_to_save is None and mask.modules_to_save:
                self.modules_to_save = list(mask.modules_to_save)
        self._check_field_types()
        if self.keep_ratio is not None:
            check_keep_ratio(self.keep_ratio)
        if isinstance(self.num_samples, bool) or not isinstance(self.num_samples, int) or self.num_samples < 1:
            raise ValueError(f"FishConfig: num_samples must be a positive integer, got {self.num_samples!r}.")
        if self.fisher not in FISHER_TYPES:
            raise ValueError(f"FishConfig: fisher must be one of {FISHER_TYPES}, got {self.fisher!r}.")
        if self.score not in SCORES:
            raise ValueError(f"FishConfig: score must be one of {SCORES}, got {self.score!r}.")
        if self.score == "gradient_snr" and self.fisher != "empirical":
            raise ValueError(
                "FishConfig: score='gradient_snr' ranks the gradients at the gold labels; use it with fisher='empirical'."
            )
        if not self.sparse_parameters and self.keep_ratio is None:
            raise ValueError(
                "FishConfig needs a mask or a keep_ratio: compute a mask with `compute_fisher_mask(model, dataloader, "
                "keep_ratio=...)` (or `random_mask` / `magnitude_mask`) and pass `FishConfig(mask=mask)`, or pass "
                "`FishConfig(keep_ratio=0.005)` and initialize the mask from data later (`initialize_fish_mask`)."
            )
        for name, count in self.sparse_parameters.items():
            if not isinstance(count, int) or count < 1:
                raise ValueError(f"FishConfig: the count for '{name}' must be a positive integer, got {count!r}.")
            if name not in self.parameter_shapes:
                raise ValueError(f"FishConfig: no shape recorded for '{name}'; rebuild the config from its mask.")
            if count > math.prod(self.parameter_shapes[name]):
                raise ValueError(f"FishConfig: '{name}' cannot have {count} entries, it has only {math.prod(self.parameter_shapes[name])}.")
        if self.save_dtype is not None and self.save_dtype not in SAVE_DTYPES:
            raise ValueError(f"FishConfig: save_dtype must be one of {sorted(SAVE_DTYPES)} or None, got {self.save_dtype!r}.")
        self._check_mask_update()

    def _check_field_types(self) -> None:
        """adapter_config.json comes from strangers too: refuse what is not what save_pretrained writes."""
        counts, shapes = self.sparse_parameters, self.parameter_shapes
        if not isinstance(counts, dict) or not all(isinstance(k, str) for k in counts):
            raise ValueError(f"FishConfig: sparse_parameters must map parameter names to counts, got {type(counts).__name__}.")
        if not isinstance(shapes, dict) or not all(
            isinstance(k, str) and isinstance(v, (list, tuple)) and all(isinstance(d, int) and not isinstance(d, bool) and d > 0 for d in v)
            for k, v in shapes.items()
        ):
            raise ValueError("FishConfig: parameter_shapes must map parameter names to lists of positive integers.")
        if not isinstance(self.mask_info, dict):
            raise ValueError(f"FishConfig: mask_info must be a mapping, got {type(self.mask_info).__name__}.")
        if self.modules_to_save is not None and (
            not isinstance(self.modules_to_save, list) or not all(isinstance(m, str) for m in self.modules_to_save)
        ):
            raise ValueError("FishConfig: modules_to_save must be a list of module names.")
        for key in ("target_modules", "exclude_modules"):
            value = getattr(self, key)
            if not (value is None or isinstance(value, str) or (
                isinstance(value, (list, set, tuple)) and all(isinstance(m, str) for m in value)
            )):
                raise ValueError(f"FishConfig: {key} must be None, a regex or a list of module names, got {value!r}.")

    @property
    def awaits_mask(self) -> bool:
        """Whether this is a `keep_ratio` config whose mask has not been computed yet (`initialize_fish_mask`)."""
        return not self.sparse_parameters

    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path: str, subfolder: Optional[str] = None, **kwargs):
        """PEFT's loading, plus a check of the adapter file that goes with the config (decoded in full, see
        `adapter_files.check_adapter_tensors`) before PEFT touches any model."""
        from huggingface_hub import hf_hub_download

        from fish_peft.tuner.adapter_files import ADAPTER_WEIGHTS, check_adapter_file

        config = super().from_pretrained(pretrained_model_name_or_path, subfolder=subfolder, **kwargs)
        folder = os.path.join(pretrained_model_name_or_path, subfolder or "")
        if os.path.isfile(os.path.join(folder, ADAPTER_WEIGHTS)):
            weights = os.path.join(folder, ADAPTER_WEIGHTS)
        elif os.path.isdir(folder):
            return config  # no weights next to the config: PEFT reports the missing file itself
        else:
            download_kwargs, _, _ = cls._split_kwargs(kwargs)
            weights = hf_hub_download(pretrained_model_name_or_path, ADAPTER_WEIGHTS, subfolder=subfolder, **download_kwargs)
        config._head_shapes = check_adapter_file(weights, config)  # FishModel checks them against the model
        return config

    def _check_mask_update(self) -> None:
        if self.mask_update not in MASK_UPDATES:
            raise ValueError(f"FishConfig: mask_update must be one of {MASK_UPDATES}, got {self.mask_update!r}.")
        if isinstance(self.update_every, bool) or not isinstance(self.update_every, int) or self.update_every < 1:
            raise ValueError(f"FishConfig: update_every must be a whole number of steps >= 1, got {self.update_every!r}.")
        if not 0 < self.prune_rate < 1:
            raise ValueError(f"FishConfig: prune_rate must be in (0, 1), got {self.prune_rate!r}.")
        if not self.exploration > 0:
            raise ValueError(f"FishConfig: exploration must be > 0 (Top-KAST's M/D), got {self.exploration!r}.")
        if not self.penalty >= 0:
            raise ValueError(f"FishConfig: penalty must be >= 0, got {self.penalty!r}.")
