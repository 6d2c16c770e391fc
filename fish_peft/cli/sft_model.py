"""The tokenizer and the causal LM of an SFT recipe: loaded (Hub id or local folder), or built offline (a word-level
tokenizer over the training data, a model from a config), and the chat-template checks that conversational data
needs before any training."""

from __future__ import annotations

from collections import Counter
from typing import Any

import torch
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer, PreTrainedTokenizerFast

from fish_peft.cli.sft_data import COMPLETION, MESSAGES, PROMPT, SFTData
from fish_peft.cli.sft_recipe import WORD_LEVEL, SFTRecipe

WORD_LEVEL_SPECIALS = ("<pad>", "<s>", "</s>", "<unk>")
WORD_LEVEL_VOCABULARY = 8000  # most frequent words kept
# the roles as words and the assistant's answer, its end-of-turn token included, marked for TRL's assistant-only loss
WORD_LEVEL_CHAT_TEMPLATE = (
    "{% for message in messages %}{{ message['role'] }} : {% if message['role'] == 'assistant' %}{% generation %}"
    "{{ message['content'] }} {{ eos_token }}{% endgeneration %} {% else %}{{ message['content'] }} {% endif %}"
    "{% endfor %}{% if add_generation_prompt %}assistant : {% endif %}"
)
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16, "auto": "auto"}


def load_tokenizer(recipe: SFTRecipe, data: SFTData):
    """The recipe's tokenizer, checked against what its data needs (`check_chat_template`)."""
    if recipe.tokenizer == WORD_LEVEL:
        tokenizer = word_level_tokenizer(data.splits["train"])
    elif recipe.model_config is not None and recipe.tokenizer is None:
        raise ValueError(
            f"A model built from model_config has no tokenizer of its own: name one (tokenizer: a Hub id or local "
            f"folder) or use tokenizer: {WORD_LEVEL}."
        )
    else:
        tokenizer = AutoTokenizer.from_pretrained(recipe.tokenizer or recipe.model)
    check_chat_template(tokenizer, recipe, data)
    return tokenizer


def check_chat_template(tokenizer, recipe: SFTRecipe, data: SFTData) -> None:
    """Conversational data is rendered with the tokenizer's chat template, and a conversation's assistant turns are
    found through that template's `{% generation %}` markers (TRL adds them to the templates it knows): refuse,
    before training, a tokenizer that cannot do what the data and `loss_on` need. A recipe's `chat_template_path`
    (an SFTConfig field) gives TRL a template of its own, so the tokenizer's is not checked then."""
    if recipe.training.get("chat_template_path") or not data.conversational:
        return
    name = recipe.tokenizer or recipe.model
    if not tokenizer.chat_template:
        raise ValueError(
            f"The data is conversational ({data.format}), which is rendered with the tokenizer's chat template, but "
            f"the tokenizer of {name} has none. Use a tokenizer that has one (an instruct model's), give one with "
            "chat_template_path (a .jinja file, or a model whose template to copy), or give plain-text "
            "prompt/completion data."
        )
    if data.format == MESSAGES and recipe.loss_on == "assistant":
        from trl.chat_template_utils import get_training_chat_template

        try:
            get_training_chat_template(tokenizer)
        except ValueError:
            raise ValueError(
                f"loss_on: assistant trains on every assistant turn of a conversation, which TRL finds through "
                f"{{% generation %}} markers in the chat template; the template of {name} has none and TRL cannot "
                "add them to it. Use loss_on: last_turn (each conversation's last assistant turn as the completion, "
                "with any template), loss_on: all (every token), or a chat_template_path with the markers."
            ) from None


def word_level_tokenizer(train) -> PreTrainedTokenizerFast:
    """A lower-cased word-level tokenizer over the training data's words (the most frequent
    `WORD_LEVEL_VOCABULARY`), with <pad> <s> </s> <unk> and a plain chat template ("user : ... assistant : ...
    </s>") whose assistant turns are marked for TRL: a tokenizer for tiny offline models, no download needed."""
    from tokenizers import Tokenizer, models, normalizers, pre_tokenizers

    splitter = pre_tokenizers.Whitespace()
    counts = Counter(["system", "user", "assistant", ":"])
    for text in _texts(train):
        counts.update(word for word, _ in splitter.pre_tokenize_str(text.lower()))
    words = [word for word, _ in sorted(counts.items(), key=lambda item: (-item[1], item[0]))[:WORD_LEVEL_VOCABULARY]]
    vocabulary = {token: i for i, token in enumerate([*WORD_LEVEL_SPECIALS, *words])}
    backend = Tokenizer(models.WordLevel(vocabulary, unk_token="<unk>"))
    backend.normalizer = normalizers.Lowercase()
    backend.pre_tokenizer = splitter
    pad, bos, eos, unk = WORD_LEVEL_SPECIALS
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=backend, pad_token=pad, bos_token=bos, eos_token=eos, unk_token=unk)
    tokenizer.chat_template = WORD_LEVEL_CHAT_TEMPLATE
    return tokenizer


def _texts(dataset):
    """Every text of a split in TRL's field names: message contents, prompts and completions."""
    for field in (MESSAGES, PROMPT, COMPLETION):
        if field in dataset.column_names:
            for value in dataset[field]:
                if isinstance(value, str):
                    yield value
                else:
                    yield from (message["content"] for message in value)


def load_causal_lm(recipe: SFTRecipe, tokenizer):
    """The recipe's model: `model` from the Hub or a folder, or a model built from `model_config` with weights drawn
    from the recipe's seed, its vocabulary and special tokens those of the tokenizer."""
    dtype = DTYPES[recipe.dtype]
    if recipe.model_config is None:
        return AutoModelForCausalLM.from_pretrained(recipe.model, dtype=dtype)
    config = build_config(recipe.model_config, tokenizer)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(recipe.seed)
        model = AutoModelForCausalLM.from_config(config)
    return model if dtype == "auto" else model.to(dtype)


def build_config(fields: dict[str, Any], tokenizer):
    """A transformers config from `model_type` and its fields, its vocabulary and special token ids the tokenizer's."""
    fields = dict(fields)
    model_type = fields.pop("model_type", None)
    if not model_type:
        raise ValueError("model_config needs model_type (llama, qwen2, gpt2, ...) with the config's fields.")
    fields.update(
        vocab_size=len(tokenizer), pad_token_id=tokenizer.pad_token_id, bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
    )
    try:
        config = AutoConfig.for_model(model_type, **fields)
    except ValueError as err:
        raise ValueError(f"model_config: {err}") from None
    if type(config) not in AutoModelForCausalLM._model_mapping:
        raise ValueError(f"model_config: {model_type} has no causal LM in transformers; SFT trains causal LMs.")
    return config
