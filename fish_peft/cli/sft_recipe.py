"""SFT recipes (`task: sft`): supervised fine-tuning of a causal LM on chat or prompt/completion data with TRL's
SFTTrainer. Like a classification recipe, a YAML file of fish-peft's own keys (`SFTRecipe`) with the fields of
TRL's `SFTConfig` (TrainingArguments and TRL's own: max_length, packing, ...) at its top level; `load_recipe` picks
this class when the file (or an override) says `task: sft`. Standard library only, so `--help` stays quick."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, ClassVar, Optional

from fish_peft.cli.recipe_base import (
    FISHER_TYPES, SAVE_DTYPES, SCORES, SET_BY_RUN, TRAINING_ALIASES, Seeded, TrainedByMethod,
)
from fish_peft.cli.recipe_keys import check_at_least, check_choices, key

SFT_TASK = "sft"
SFT_METHODS = ("fish", "random", "lora", "full")
DATA_FORMATS = ("auto", "messages", "prompt_completion")
LOSS_ON = ("assistant", "last_turn", "all")
DTYPES = ("float32", "bfloat16", "float16", "auto")
WORD_LEVEL = "word-level"  # `tokenizer: word-level`: built offline from the training data (sft_model.py)
# SFTConfig fields an SFT run sets itself: those of every run, and the two that `loss_on` decides
SFT_SET_BY_RUN = SET_BY_RUN + ("assistant_only_loss", "completion_only_loss")
# fish-peft's defaults for SFTConfig fields; every other field keeps TRL's default (max_length 1024, packing off, ...)
SFT_TRAINING_DEFAULTS = {"num_train_epochs": 1, "per_device_train_batch_size": 8, "per_device_eval_batch_size": 8,
                         "learning_rate": 2e-5}
# starting points for small instruct models, not tuned: a sparse diff of 0.5 % takes larger steps than full
SFT_LEARNING_RATES = {"fish": 1e-4, "random": 1e-4, "lora": 2e-4, "full": 2e-5}


@dataclass
class SFTRecipe(Seeded, TrainedByMethod):
    """Supervised fine-tuning of a causal LM (`fish-peft train` with `task: sft`): data, model, method, loss and
    evaluation; the SFTConfig fields of the file are kept in `training` and passed to TRL's SFTTrainer."""

    TRAINING_ARGUMENTS: ClassVar[tuple[str, str]] = ("trl", "SFTConfig")
    SET_BY_RUN: ClassVar[tuple[str, ...]] = SFT_SET_BY_RUN

    task: str = key(SFT_TASK, "sft makes a recipe an SFT recipe", (SFT_TASK,))
    model: str = key("Qwen/Qwen2.5-0.5B-Instruct", "Hub id or local folder of the pretrained causal LM; with "
                     "model_config, only the name of the model built from it")
    model_config: Optional[dict[str, Any]] = key(
        None, "build a randomly initialised model from this transformers config (model_type and its fields) instead "
        "of loading model; vocab_size and the special token ids come from the tokenizer", shown_type="mapping or none")
    tokenizer: Optional[str] = key(None, f"Hub id or local folder of the tokenizer (none: the model's); {WORD_LEVEL}: "
                                   "a word-level tokenizer over the training data with a plain chat template (offline)")
    dtype: str = key("float32", "dtype the model's weights load in (auto: the checkpoint's)", DTYPES)
    method: str = key("fish", "what trains: a FISH mask, a random mask of the same size, LoRA, or every weight",
                      SFT_METHODS)
    keep_ratio: float = key(0.005, "share of all the model's parameters the mask may change (fish, random)")
    num_samples: int = key(1024, "training examples whose per-example gradients make the Fisher scores")
    fisher: str = key("empirical", "Fisher at the data's tokens (empirical) or at tokens drawn from the model "
                      "(expected)", FISHER_TYPES)
    score: str = key("fisher", "what ranks the fish mask's entries: the Fisher, or the gradient's signal-to-noise "
                     "ratio over the same examples (gradient_snr; empirical Fisher only)", SCORES)
    target_modules: list[str] = key(["all-linear"], "modules the sparse diff (fish, random) may change, as PEFT "
                                    "matches them: names, suffixes, or all-linear (every Linear but lm_head)")
    exclude_modules: Optional[list[str]] = key(None, "modules the sparse diff leaves alone")
    save_dtype: Optional[str] = key(None, "dtype of the saved diff values (none: float32)", SAVE_DTYPES)
    lora_r: int = key(16, "LoRA rank")
    lora_alpha: int = key(32, "LoRA scaling alpha")
    lora_dropout: float = key(0.05, "LoRA dropout")
    lora_targets: list[str] = key(["all-linear"], "modules LoRA adapts (all-linear: every Linear but lm_head)")
    dataset: Optional[str] = key(None, "Hub dataset id, read with datasets.load_dataset (none: train_file)")
    dataset_config: Optional[str] = key(None, "configuration (subset) of the Hub dataset")
    train_split: str = key("train", "split of the Hub dataset to train on")
    validation_split: Optional[str] = key(None, "split of the Hub dataset to validate on (none: hold out "
                                          "validation_size training examples)")
    train_file: Optional[str] = key(None, "JSON lines or parquet training data instead of a Hub dataset")
    validation_file: Optional[str] = key(None, "JSON lines or parquet validation data (none: hold out "
                                         "validation_size training examples)")
    validation_size: float = key(0.05, "examples held out of training to validate on when the data has no "
                                 "validation split: a share below 1, else a count")
    data_format: str = key("auto", "messages (a conversation per row), prompt_completion (pairs of strings or of "
                           "message lists), or auto: whichever fields the data has", DATA_FORMATS)
    messages_field: str = key("messages", "field of the conversation: a list of {role, content}")
    prompt_field: str = key("prompt", "field of the prompt of prompt/completion data")
    completion_field: str = key("completion", "field of the completion of prompt/completion data")
    loss_on: str = key("assistant", "tokens the loss (and the Fisher) counts: assistant (completions; every "
                       "assistant turn of a conversation, which needs a chat template TRL can mark), last_turn "
                       "(completions; a conversation's last assistant turn, any chat template) or all", LOSS_ON)
    max_train_samples: Optional[int] = key(None, "use only N training examples (shuffled with the seed)")
    max_eval_samples: Optional[int] = key(None, "use only the first N validation examples")
    generations: int = key(4, "validation prompts whose greedy continuations results.json shows")
    max_new_tokens: int = key(48, "tokens generated per prompt for results.json")
    output_dir: str = key("outputs/sft", "folder of the run: adapter, tokenizer, results.json, mask plot, model card")
    methods: list[str] = key(list(SFT_METHODS), "the methods `fish-peft compare` runs", SFT_METHODS)
    lr_by_method: dict[str, float] = key(SFT_LEARNING_RATES, "each method's own learning rate (beats learning_rate "
                                         "unless --learning-rate or --lr is given)", SFT_METHODS)
    batch_size_by_method: dict[str, int] = key({}, "each method's own batch size (beats per_device_train_batch_size "
                                               "unless --batch-size or --per-device-train-batch-size is given)",
                                               SFT_METHODS)
    training: dict[str, Any] = key(
        SFT_TRAINING_DEFAULTS, "any field of TRL's SFTConfig (TrainingArguments' and TRL's: max_length, packing, "
        "gradient_checkpointing, ...), written at the top level of the recipe or as --max-length 512; "
        f"{', '.join(f'{a} = {f}' for a, f in TRAINING_ALIASES.items())}; the run sets {', '.join(SFT_SET_BY_RUN)} "
        "itself (loss_on decides the last two), seed from the recipe's seed, and bf16 where the GPU has it unless "
        "given", shown_type="SFTConfig fields",
    )

    def __post_init__(self):
        check_choices(self)
        check_at_least(self, 1, "num_samples", "lora_r", "lora_alpha", "max_train_samples", "max_eval_samples",
                       "max_new_tokens")
        check_at_least(self, 0, "generations")
        if not 0 < self.keep_ratio <= 1:
            raise ValueError(f"SFTRecipe: keep_ratio must be in (0, 1] (0.005 is 0.5 %), got {self.keep_ratio}.")
        if self.validation_size <= 0 or (self.validation_size >= 1 and self.validation_size != int(self.validation_size)):
            raise ValueError(f"SFTRecipe: validation_size must be a share in (0, 1) or a whole count, got {self.validation_size}.")
        if not self.dataset and not self.train_file:
            raise ValueError("SFTRecipe: name the data: dataset (a Hub id) or train_file (JSON lines or parquet).")
        if self.dataset and self.train_file:
            raise ValueError("SFTRecipe: give dataset (the Hub) or train_file (local), not both.")
        if self.validation_file and not self.train_file:
            raise ValueError("SFTRecipe: validation_file goes with train_file; a Hub dataset names validation_split.")
        if not self.target_modules or not self.lora_targets:
            raise ValueError("SFTRecipe: target_modules and lora_targets name at least one module (or all-linear).")
        self.training = {**SFT_TRAINING_DEFAULTS, **self.training}
        for name in ("per_device_train_batch_size", "per_device_eval_batch_size", "save_steps"):
            if self.training.get(name) is not None and self.training[name] < 1:
                raise ValueError(f"SFTRecipe: {name} must be at least 1, got {self.training[name]}.")
        if self.learning_rate <= 0 or any(v <= 0 for v in self.lr_by_method.values()):
            raise ValueError(f"SFTRecipe: learning rates must be positive, got {self.learning_rate} and {self.lr_by_method}.")
        if any(v < 1 for v in self.batch_size_by_method.values()):
            raise ValueError(f"SFTRecipe: batch_size_by_method values must be at least 1, got {self.batch_size_by_method}.")

    # what the run's shared machinery (resume, output folder, card) asks of every recipe
    mask_update: ClassVar[None] = None
    merge_every: ClassVar[None] = None

    @property
    def target(self):
        """`target_modules` as PEFT takes it: "all-linear" alone is a string, names are a list."""
        return _peft_targets(self.target_modules)

    @property
    def lora_target(self):
        return _peft_targets(self.lora_targets)


def _peft_targets(names: list[str]):
    return names[0] if names == ["all-linear"] else list(names)
