"""Training a FISH adapter under DDP (run by tests/distributed/test_ddp.py under `torch.distributed.run`; `train` also runs in
one process there, as the reference with the same global batch).

usage: ddp_worker.py OUT_DIR MODE, MODE one of
  loop              fixed mask, a plain Accelerate loop
  trainer           fixed mask, transformers.Trainer
  topkast           Top-KAST diff, a plain Accelerate loop, mask updates every 2 steps
  sparse_momentum   sparse-momentum diff, likewise (parameter lengths change at every update)
  mismatch          rank 1 holds a mask with the same counts, other indices: the first training forward under
                    DDP must refuse it
  touch             rank 0 alone reads the DDP ignore list (no collective may hide there), then both train
Each process writes result{rank}.json: its adapter's digest, the mask digests after each update, and the bytes
it communicated; rank 0 also saves the adapter in OUT_DIR/adapter.
"""

import json
import os
import sys
from pathlib import Path

import torch
from accelerate import Accelerator
from peft import get_peft_model
from transformers import Trainer, TrainingArguments

from fish_peft import FishConfig, random_mask
from fish_peft.distributed.communication import Traffic, count_ddp_traffic
from fish_peft.distributed.processes import tensors_digest
from fish_peft.dynamic import evolving_diff_engine
from tests.models import example_inputs, tiny_bert

NUM_EXAMPLES, STEPS = 24, 6


def examples() -> list[dict]:
    batch = example_inputs("bert", batch=NUM_EXAMPLES, seq=8, seed=1)
    return [{key: value[i] for key, value in batch.items()} for i in range(NUM_EXAMPLES)]


def peft_model(mode: str, mask_seed: int = 0):
    """Evolving masks leave out the attention key biases: their gradient is zero in exact arithmetic (softmax ignores
    a shift), so which of their entries an update picks would be decided by float noise, not by the algorithm."""
    model = tiny_bert(hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)
    mask_update = mode if mode in ("topkast", "sparse_momentum") else None
    eligible = r"^(?!.*attention\.self\.key\.bias)" if mask_update else None
    # per_module: the same counts whatever the seed, so only the indices differ (what DDP itself cannot see)
    selection = "per_module" if mode == "mismatch" else "global"
    mask = random_mask(model, keep_ratio=0.05, seed=mask_seed, eligible=eligible, selection=selection)
    return get_peft_model(model, FishConfig(mask=mask, mask_update=mask_update, update_every=2, penalty=1e-3))


def adapter_digest(model) -> str:
    return tensors_digest({n: t for n, t in model.state_dict().items() if ".fish_" in n or "modules_to_save" in n})


def train_loop(mode: str, accelerator: Accelerator, batch_size: int, model=None):
    """STEPS optimizer steps over the examples in order; returns (model, engine, traffic, mask digests after updates).
    Evolving masks train with SGD: Adam's first steps move every entry by about lr, and float-level differences
    would then break the ties in |Δ| that the mask updates rank by."""
    model = model or peft_model(mode)
    engine = evolving_diff_engine(model, total_steps=STEPS) if model.peft_config["default"].mask_update else None
    trained = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.SGD(trained, lr=0.5, momentum=0.9) if engine else torch.optim.AdamW(trained, lr=1e-2)
    loader = torch.utils.data.DataLoader(examples(), batch_size=batch_size)
    prepared, optimizer, loader = accelerator.prepare(model, optimizer, loader)
    traffic = count_ddp_traffic(prepared) if accelerator.num_processes > 1 else Traffic()
    digests = []
    prepared.train()
    for _, batch in zip(range(STEPS), loader):
        accelerator.backward(prepared(**batch).loss)
        optimizer.step()
        optimizer.zero_grad()
        if engine is not None and engine.step(optimizer):
            digests.append(engine.mask_digest())
    return model, engine, traffic, digests


def train_trainer(out: Path, batch_size: int):
    model = peft_model("trainer")
    args = TrainingArguments(
        output_dir=str(out / "trainer"), per_device_train_batch_size=batch_size, max_steps=STEPS, learning_rate=1e-2,
        lr_scheduler_type="constant", train_sampling_strategy="sequential", save_strategy="no", report_to=[],
        average_tokens_across_devices=False,  # BERT classification losses are means already: see the README
        use_cpu=True, logging_strategy="no", dataloader_num_workers=0,
    )
    Trainer(model=model, args=args, train_dataset=examples()).train()
    return model


def main(out: Path, mode: str) -> None:
    # built before the process group exists, so that nothing compares the two masks before DDP does
    model = peft_model(mode, mask_seed=int(os.environ["RANK"])) if mode == "mismatch" else None
    accelerator = Accelerator(cpu=True)
    rank = accelerator.process_index
    result = {}
    if mode == "touch":
        model = peft_model("loop")
        if rank == 0:
            result["ignored"] = len(model.base_model._ddp_params_and_buffers_to_ignore)
        model, *_ = train_loop("loop", accelerator, 2, model)
    elif mode == "trainer":
        model = train_trainer(out, batch_size=2)
    else:
        model, engine, traffic, digests = train_loop(mode, accelerator, 2, model)
        result = {"update_digests": digests, "traffic": traffic.as_dict(), "steps": STEPS,
                  "engine_traffic": engine.traffic.as_dict() if engine else {}}
    result["adapter_digest"] = adapter_digest(model)
    (out / f"result{rank}.json").write_text(json.dumps(result))
    if rank == 0:
        model.save_pretrained(out / "adapter")
    accelerator.end_training()  # every process leaves the process group together (gloo aborts a straggler otherwise)


if __name__ == "__main__":
    main(Path(sys.argv[1]), sys.argv[2])
