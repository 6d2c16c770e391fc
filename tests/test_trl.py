"""TRL's SFTTrainer trains a FISH sparse diff from `peft_config=FishConfig(keep_ratio=...)`: the mask comes from the
Fisher of the completion-only loss, training changes only the masked entries, and the saved adapter loads with
PeftModel and AutoPeftModelForCausalLM. Offline: a tiny Llama and a word-level tokenizer built on the spot."""

import datasets
import pytest
import torch
import trl
from peft import AutoPeftModelForCausalLM, PeftModel, get_peft_model
from torch.utils.data import DataLoader
from transformers import AutoModelForCausalLM, PreTrainedTokenizerFast

import fish_peft  # noqa: F401  (registers FISH with PEFT)
from fish_peft import FishConfig, FishMaskInitCallback, compute_fisher_mask, random_mask
from tests.models import tiny_llama

WORDS = "what did the a cat dog bird sat ran flew on mat log tree away home".split()
SPECIALS = ["<pad>", "<s>", "</s>", "<unk>", "user", "assistant", ":"]
CHAT_TEMPLATE = (
    "{% for m in messages %}{{ m['role'] }} : {{ m['content'] }} {% if m['role'] == 'assistant' %}{{ eos_token }} "
    "{% endif %}{% endfor %}{% if add_generation_prompt %}assistant : {% endif %}"
)
KEEP_RATIO = 0.05


def word_tokenizer() -> PreTrainedTokenizerFast:
    from tokenizers import Tokenizer, models, pre_tokenizers

    backend = Tokenizer(models.WordLevel({t: i for i, t in enumerate(SPECIALS + WORDS)}, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.Whitespace()
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=backend, pad_token="<pad>", bos_token="<s>", eos_token="</s>", unk_token="<unk>"
    )
    tokenizer.chat_template = CHAT_TEMPLATE
    return tokenizer


def conversations():
    rows = [("cat", "the cat sat on the mat"), ("dog", "the dog ran away"), ("bird", "a bird flew home")]
    return [
        {"prompt": [{"role": "user", "content": f"what did the {animal} do"}], "completion": [{"role": "assistant", "content": answer}]}
        for animal, answer in rows * 3
    ]


@pytest.fixture
def base_dir(tmp_path):
    """A tiny Llama saved with its tokenizer, so AutoPeftModelForCausalLM finds the base from adapter_config.json."""
    tokenizer = word_tokenizer()
    path = tmp_path / "base"
    tiny_llama(vocab_size=len(tokenizer), pad_token_id=0, bos_token_id=1, eos_token_id=2).save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


def test_sft_trainer_trains_a_fish_diff_on_completions_and_the_adapter_loads_back(tmp_path, base_dir):
    tokenizer = word_tokenizer()
    args = trl.SFTConfig(
        output_dir=str(tmp_path / "out"), max_steps=3, per_device_train_batch_size=3, learning_rate=1e-2,
        report_to=[], save_strategy="no", use_cpu=True, disable_tqdm=True, bf16=False,  # float32: exact comparisons
    )
    trainer = trl.SFTTrainer(
        model=AutoModelForCausalLM.from_pretrained(base_dir),
        args=args,
        train_dataset=datasets.Dataset.from_list(conversations()),
        processing_class=tokenizer,
        peft_config=FishConfig(keep_ratio=KEEP_RATIO, target_modules="all-linear", num_samples=9),
        callbacks=[FishMaskInitCallback()],
    )
    model = trainer.model
    assert model.peft_config["default"].awaits_mask

    # TRL's completion-only loss: the collated labels ignore every prompt token and keep every completion token
    rows = [trainer.train_dataset[i] for i in range(3)]
    batch = trainer.data_collator(rows)
    for row, example, labels in zip(rows, conversations(), batch["labels"]):
        prompt = tokenizer.apply_chat_template(example["prompt"], add_generation_prompt=True, tokenize=True, return_dict=True)
        cut = len(prompt["input_ids"])
        assert row["input_ids"][:cut] == prompt["input_ids"]
        assert (labels[:cut] == -100).all() and labels[cut : len(row["input_ids"])].tolist() == row["input_ids"][cut:]

    trainer.train()

    # the mask: the Fisher of that same loss on the same data, at the configured budget, in the linear layers only
    config = model.peft_config["default"]
    base = AutoModelForCausalLM.from_pretrained(base_dir)
    total = sum(p.numel() for p in base.parameters())
    assert sum(config.sparse_parameters.values()) == int(total * KEEP_RATIO)
    assert all(name.endswith("_proj.weight") for name in config.sparse_parameters)
    loader = DataLoader(trainer.train_dataset, batch_size=3, collate_fn=trainer.data_collator)
    expected = compute_fisher_mask(base, loader, KEEP_RATIO, 9, modules_to_save=None, eligible=r"_proj\.weight$")
    assert config.mask.digest() == expected.digest()
    whole_sequence = [{**b, "labels": b["input_ids"].masked_fill(b["attention_mask"] == 0, -100)} for b in loader]
    assert compute_fisher_mask(base, whole_sequence, KEEP_RATIO, 9, modules_to_save=None, eligible=r"_proj\.weight$").digest() != expected.digest()

    trainer.save_model(str(tmp_path / "adapter"))
    ids = tokenizer("user : what did the cat do assistant :", return_tensors="pt")["input_ids"]
    model.eval()
    with torch.no_grad():
        trained = model(input_ids=ids).logits
        assert not torch.equal(trained, base(input_ids=ids).logits)
        via_peft = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(base_dir), tmp_path / "adapter")
        assert torch.equal(via_peft(input_ids=ids).logits, trained)
        via_auto = AutoPeftModelForCausalLM.from_pretrained(tmp_path / "adapter")
        assert torch.equal(via_auto(input_ids=ids).logits, trained)

    # training moved only the masked entries of the base weights
    before = dict(base.named_parameters())
    for name, weight in via_auto.merge_and_unload().named_parameters():
        changed = (weight != before[name]).flatten().nonzero().flatten()
        allowed = config.mask[name] if name in config.mask else torch.empty(0, dtype=torch.long)
        assert torch.isin(changed, allowed).all(), name
        if name in config.mask:
            assert changed.numel() > 0.9 * allowed.numel()


def test_a_chat_template_cloned_by_trl_trains_the_new_token_rows_beside_the_diff(tmp_path, base_dir):
    """TRL's `chat_template_path` adds the template's tokens and asks PEFT for `trainable_token_indices`: their rows
    train in full (PEFT's TrainableTokens), the mask leaves the embedding to them, and the adapter loads back."""
    source = word_tokenizer()
    source.add_special_tokens({"additional_special_tokens": ["<|turn|>", "<|end|>"]})
    source.chat_template = CHAT_TEMPLATE.replace("{{ m['role'] }} :", "<|turn|> {{ m['role'] }} :").replace("eos_token", "'<|end|>'")
    source.eos_token = "<|end|>"
    source.save_pretrained(tmp_path / "template")
    args = trl.SFTConfig(
        output_dir=str(tmp_path / "out"), max_steps=3, per_device_train_batch_size=3, learning_rate=1e-2, report_to=[],
        save_strategy="no", use_cpu=True, disable_tqdm=True, bf16=False, chat_template_path=str(tmp_path / "template"),
    )
    config = FishConfig(keep_ratio=0.2, num_samples=9, modules_to_save=["lm_head"])  # lm_head: as TRL advises
    trainer = trl.SFTTrainer(
        model=AutoModelForCausalLM.from_pretrained(base_dir), args=args, train_dataset=datasets.Dataset.from_list(conversations()),
        processing_class=word_tokenizer(), peft_config=config, callbacks=[FishMaskInitCallback()],
    )
    new_tokens = trainer.processing_class.convert_tokens_to_ids(["<|turn|>", "<|end|>"])
    assert set(new_tokens) <= set(config.trainable_token_indices["embed_tokens"])  # with TRL's padding tokens
    model = trainer.model
    embedding = model.get_input_embeddings()
    rows_before = embedding(torch.tensor(new_tokens)).detach().clone()
    trainer.train()

    assert not any("embed_tokens" in name for name in config.sparse_parameters)  # the rows are TrainableTokens' own
    assert config.sparse_parameters and not torch.equal(embedding(torch.tensor(new_tokens)), rows_before)
    trainer.save_model(str(tmp_path / "adapter"))
    ids = trainer.processing_class("<|turn|> user : what did the cat do <|end|>", return_tensors="pt")["input_ids"]
    model.eval()
    with torch.no_grad():
        trained = model(input_ids=ids).logits
        base = AutoModelForCausalLM.from_pretrained(base_dir)
        base.resize_token_embeddings(model.get_input_embeddings().weight.shape[0])
        torch.manual_seed(0)
        loaded = PeftModel.from_pretrained(base, tmp_path / "adapter")
        assert torch.equal(loaded(input_ids=ids).logits, trained)


def test_a_mask_with_entries_in_an_embedding_that_trainable_tokens_trains_is_refused():
    model = tiny_llama()
    mask = random_mask(model, 0.05, seed=0, modules_to_save=[])
    assert "model.embed_tokens.weight" in mask
    with pytest.raises(ValueError, match="trainable_token_indices trains in full.*model.embed_tokens.weight"):
        get_peft_model(model, FishConfig(mask=mask, trainable_token_indices=[3, 4]))
