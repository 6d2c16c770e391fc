"""Tiny Hugging Face models built from configs (no network), shared by the test files.

Each builder seeds its own weights inside `torch.random.fork_rng()`, so building a model neither depends on nor
disturbs the global RNG state; keyword arguments override the config.
"""

from __future__ import annotations

from pathlib import Path

import torch
from transformers import (
    BertConfig,
    BertForSequenceClassification,
    GPT2Config,
    GPT2LMHeadModel,
    LlamaConfig,
    LlamaForCausalLM,
    T5Config,
    T5ForConditionalGeneration,
)

VOCAB = 100


def _build(model_cls, config, seed: int):
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = model_cls(config)
    return model.eval()


def tiny_bert(num_labels: int = 3, seed: int = 0, **overrides) -> BertForSequenceClassification:
    """BERT sequence classifier: 2 layers, hidden 32, head `classifier` (Linear 32 -> num_labels)."""
    kwargs = dict(
        vocab_size=VOCAB, hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=64,
        max_position_embeddings=64, type_vocab_size=2, num_labels=num_labels, pad_token_id=0,
    )
    return _build(BertForSequenceClassification, BertConfig(**{**kwargs, **overrides}), seed)


def tiny_gpt2(seed: int = 0, **overrides) -> GPT2LMHeadModel:
    """GPT-2 LM: 2 layers, n_embd 32, Conv1D projections, lm_head tied to transformer.wte (the default)."""
    kwargs = dict(
        vocab_size=VOCAB, n_embd=32, n_layer=2, n_head=4, n_positions=64, bos_token_id=1, eos_token_id=2,
    )
    return _build(GPT2LMHeadModel, GPT2Config(**{**kwargs, **overrides}), seed)


def tiny_llama(seed: int = 0, **overrides) -> LlamaForCausalLM:
    """Llama causal LM: hidden 32, 2 layers, 4 heads, 2 kv heads, RMSNorm, untied lm_head."""
    kwargs = dict(
        vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=64, bos_token_id=1, eos_token_id=2,
    )
    return _build(LlamaForCausalLM, LlamaConfig(**{**kwargs, **overrides}), seed)


def tiny_t5(seed: int = 0, **overrides) -> T5ForConditionalGeneration:
    """T5 encoder-decoder: d_model 32, 2+2 layers; `shared` tied to both embed_tokens and lm_head (the default)."""
    kwargs = dict(
        vocab_size=VOCAB, d_model=32, d_kv=8, d_ff=64, num_layers=2, num_decoder_layers=2, num_heads=4,
        relative_attention_num_buckets=8, relative_attention_max_distance=16,
        pad_token_id=0, eos_token_id=1, decoder_start_token_id=0,
    )
    return _build(T5ForConditionalGeneration, T5Config(**{**kwargs, **overrides}), seed)


MODEL_BUILDERS = {"bert": tiny_bert, "gpt2": tiny_gpt2, "llama": tiny_llama, "t5": tiny_t5}


def example_inputs(family: str, batch: int = 2, seq: int = 8, seed: int = 0, labels: bool = True) -> dict:
    """A batch for a model of `family` (a key of MODEL_BUILDERS), with a padded row and, optionally, labels."""
    g = torch.Generator().manual_seed(seed)
    input_ids = torch.randint(3, VOCAB, (batch, seq), generator=g)
    attention_mask = torch.ones(batch, seq, dtype=torch.long)
    attention_mask[-1, seq - 2 :] = 0  # last row padded (right padding)
    inputs = {"input_ids": input_ids, "attention_mask": attention_mask}
    if family == "bert":
        inputs["token_type_ids"] = torch.zeros(batch, seq, dtype=torch.long)
        inputs["token_type_ids"][:, seq // 2 :] = 1
        if labels:
            inputs["labels"] = torch.randint(0, 3, (batch,), generator=g)
    elif family == "t5":
        decoder_ids = torch.randint(3, VOCAB, (batch, seq // 2 + 1), generator=g)
        if labels:
            inputs["labels"] = decoder_ids  # T5 shifts labels right into decoder_input_ids itself
        else:
            inputs["decoder_input_ids"] = decoder_ids
    elif labels:
        inputs["labels"] = input_ids.masked_fill(attention_mask == 0, -100)
    return inputs


def save_tiny_checkpoint(directory, words) -> str:
    """A tiny pretrained-style checkpoint on disk (BERT encoder without a task head, plus a WordPiece tokenizer
    over `words`), loadable like a Hub model by `from_pretrained(directory)`."""
    from transformers import BertModel, BertTokenizerFast

    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    vocab = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", *sorted(set(words))]
    BertTokenizerFast(vocab={token: i for i, token in enumerate(vocab)}, do_lower_case=True).save_pretrained(directory)
    config = BertConfig(
        vocab_size=len(vocab), hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=64,
        max_position_embeddings=64, pad_token_id=0,
    )
    _build(BertModel, config, seed=0).save_pretrained(directory)
    return str(directory)
