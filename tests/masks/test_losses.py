"""The per-example loss is the model's own: causal LMs are recognised the way transformers maps models to tasks, and
a model whose own loss differs from the Fisher's per-example loss is refused, with the `loss_fn=` way out."""

import pytest
import torch
from peft import LoraConfig, get_peft_model
from torch import nn

from fish_peft import compute_fisher, compute_fisher_mask
from fish_peft.masks import losses
from fish_peft.masks.losses import is_causal_lm, per_example_loss
from tests.masks.test_fisher import assert_scores_close, lm_batches, reference_fisher
from tests.models import tiny_bert, tiny_gpt2, tiny_llama, tiny_t5


class UnknownDecoder(nn.Module):
    """A causal LM under a class transformers does not map to a task: GPT-2 inside, its next-token loss outside."""

    def __init__(self):
        super().__init__()
        self.inner = tiny_gpt2()

    def forward(self, input_ids, labels=None):
        return self.inner(input_ids=input_ids, labels=labels)


class SmoothedGPT2(type(tiny_gpt2())):
    """A GPT-2 whose own loss smooths the labels, which no per-example loss of fish-peft does."""

    def forward(self, input_ids=None, labels=None, **kwargs):
        outputs = super().forward(input_ids=input_ids, **kwargs)
        logits, targets = outputs.logits[:, :-1], labels[:, 1:]
        outputs.loss = nn.functional.cross_entropy(logits.transpose(1, 2), targets, label_smoothing=0.1)
        return outputs


@pytest.mark.filterwarnings("ignore::DeprecationWarning")  # torch.compile imports torch.jit
def test_causal_lms_are_recognised_through_wrappers(monkeypatch):
    gpt2 = tiny_gpt2()
    assert is_causal_lm(gpt2) and is_causal_lm(tiny_llama()) and is_causal_lm(SmoothedGPT2(gpt2.config))
    assert is_causal_lm(torch.compile(gpt2)) and is_causal_lm(nn.DataParallel(gpt2))
    assert not is_causal_lm(UnknownDecoder()) and not is_causal_lm(tiny_t5()) and not is_causal_lm(tiny_bert())
    lora = LoraConfig(task_type="CAUSAL_LM", target_modules=["c_attn"], fan_in_fan_out=True)
    wrapped = get_peft_model(tiny_gpt2(), lora)
    monkeypatch.setattr(losses, "_causal_lm_class_names", frozenset)  # as if transformers did not know GPT-2
    assert not is_causal_lm(gpt2) and is_causal_lm(wrapped) and is_causal_lm(nn.DataParallel(wrapped))


@pytest.mark.parametrize("build", [tiny_gpt2, tiny_llama], ids=["gpt2", "llama"])
def test_causal_lms_pass_the_check_and_match_their_own_loss(build):
    model = build()
    batches = lm_batches()
    scores = compute_fisher(model, batches, num_samples=4, chunk_size=2)
    assert_scores_close(scores, reference_fisher(model, batches[:1]))


@pytest.mark.parametrize("build", [UnknownDecoder, lambda: SmoothedGPT2(tiny_gpt2().config)], ids=["unknown", "smooth"])
def test_a_model_whose_own_loss_differs_is_refused_with_the_way_out(build):
    model = build()
    with pytest.raises(ValueError, match=r"own loss is .*loss_fn="):
        compute_fisher_mask(model, lm_batches(), keep_ratio=0.05, num_samples=4)


def test_loss_fn_is_the_way_out():
    model = UnknownDecoder()
    batches = lm_batches()

    def next_token_losses(outputs, batch):
        return per_example_loss("causal_lm", outputs.logits, batch["labels"])

    scores = compute_fisher(model, batches, num_samples=4, loss_fn=next_token_losses)
    assert_scores_close(scores, reference_fisher(model, batches[:1]))
