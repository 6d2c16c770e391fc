"""Bytes per trainable parameter of saved FISH adapters, beside a LoRA adapter of about the same size.

On the real all-MiniLM-L6-v2 (sequence classification, 2 labels, head saved with the adapter): FISH adapters at
0.5 % (a Fisher mask on 256 Rotten Tomatoes sentences and a random mask, whose uniformly spread indices are the
worst case for gap encoding) saved with float32 and bfloat16 values, a PEFT LoRA on query/value whose rank gives
about the same trainable count, and, for reference, the naive layout of one int64 index tensor and one float32
value tensor per parameter. Prints JSON.
"""

import copy
import json
import os
import tempfile

import torch
from peft import LoraConfig, get_peft_model
from safetensors.torch import save_file
from transformers import AutoModelForSequenceClassification, AutoTokenizer, logging

from fish_peft import FishConfig, compute_fisher_mask, random_mask
from fish_peft.cli.demo_data import minilm_path, sentence_loader, split_rotten_tomatoes


def saved_size(peft_model) -> dict:
    trainable, _ = peft_model.get_nb_trainable_parameters()
    with tempfile.TemporaryDirectory() as directory:
        peft_model.save_pretrained(directory)
        size = os.path.getsize(os.path.join(directory, "adapter_model.safetensors"))
    return {"trainable": trainable, "bytes": size, "bytes_per_trainable": round(size / trainable, 3)}


def naive_size(mask, head_params: int) -> dict:
    tensors = {}
    for name, idx in mask.items():
        tensors[name + ".indices"] = idx.clone()
        tensors[name + ".values"] = torch.zeros(idx.numel())
    with tempfile.TemporaryDirectory() as directory:
        path = os.path.join(directory, "naive.safetensors")
        save_file(tensors, path)
        size = os.path.getsize(path) + 4 * head_params
    trainable = mask.num_selected + head_params
    return {"trainable": trainable, "bytes": size, "bytes_per_trainable": round(size / trainable, 3)}


def main():
    logging.set_verbosity_error()
    torch.manual_seed(0)
    path = minilm_path()
    base = AutoModelForSequenceClassification.from_pretrained(path, num_labels=2)
    head_params = sum(p.numel() for p in base.classifier.parameters())
    train, _ = split_rotten_tomatoes()
    loader = sentence_loader(AutoTokenizer.from_pretrained(path), train[:256], 32, shuffle=False)
    masks = {"fisher": compute_fisher_mask(base, loader, 0.005, num_samples=256), "random": random_mask(base, 0.005)}

    report = {"model": "all-MiniLM-L6-v2", "keep_ratio": 0.005}
    for kind, mask in masks.items():
        for dtype in (None, "bfloat16"):
            model = get_peft_model(copy.deepcopy(base), FishConfig(mask=mask, save_dtype=dtype))
            report[f"fish_{kind}_{dtype or 'float32'}"] = saved_size(model)
        report[f"naive_int64_float32_{kind}"] = naive_size(mask, head_params)

    k = masks["fisher"].num_selected
    per_rank = sum(m.in_features + m.out_features for n, m in base.named_modules() if n.endswith(("query", "value")))
    rank = max(1, round(k / per_rank))
    lora = get_peft_model(copy.deepcopy(base), LoraConfig(r=rank, target_modules=["query", "value"], modules_to_save=["classifier"]))
    report[f"lora_r{rank}_query_value_float32"] = saved_size(lora)
    report[f"lora_r{rank}_query_value_bfloat16"] = saved_size(lora.to(torch.bfloat16))
    report["targets"] = {"fish_float32": "<= 8 bytes/trainable", "fish_bfloat16": "<= 6 bytes/trainable"}
    print(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
