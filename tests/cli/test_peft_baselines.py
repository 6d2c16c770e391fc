"""PEFT's own tuners at FISH's budget through `fish-peft compare`: LoRA at the closest rank, SHiRA at the closest r,
Super-Tuning at the closest sparsity, and SHiRA on FISH's own mask; their folders load with plain PEFT and `eval`."""

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml
from torch import nn

from fish_peft.cli.command import main
from fish_peft.cli.peft_baselines import closest_rank, closest_sparsity, supertuning_count
from fish_peft.cli.recipe import load_recipe, parse_overrides
from fish_peft.masks.fish_mask import FishMask
from fish_peft.tuner.adapter_files import read_adapter_mask
from tests.glue_files import WORDS, write_glue_files
from tests.models import save_tiny_checkpoint

RECIPES = Path(__file__).resolve().parents[2] / "recipes"
FAST = ["--epochs", "1", "--batch-size", "8", "--num-samples", "8", "--max-length", "32", "--eval-batch-size", "16"]
KEEP_RATIO = 0.05  # the tiny model's 0.5 % would not even hold LoRA at rank 1
BASELINES = ("lora_matched", "shira", "supertuning", "shira_fish")
PEFT_TYPES = {"lora_matched": "LORA", "shira": "SHIRA", "supertuning": "SUPERTUNING", "shira_fish": "SHIRA"}


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    return save_tiny_checkpoint(tmp_path_factory.mktemp("tiny-bert"), WORDS)


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    train, validation = write_glue_files("sst2", tmp_path_factory.mktemp("data"))
    return ["--train-file", str(train), "--validation-file", str(validation)]


@pytest.fixture(scope="module")
def comparison(checkpoint, data, tmp_path_factory):
    out = tmp_path_factory.mktemp("baselines") / "compare"
    code = main([
        "compare", str(RECIPES / "glue" / "sst2.yaml"), "--methods", ",".join(("fish", *BASELINES)), "--model", checkpoint,
        "--output-dir", str(out), "--keep-ratio", str(KEEP_RATIO), "--learning-rate", "1e-2", *FAST, *data,
        "--selection", "per_module",  # FISH's mask then reaches every Linear weight, each with its own count
    ])
    assert code == 0
    return out


def base_model(checkpoint):
    from transformers import AutoModelForSequenceClassification

    return AutoModelForSequenceClassification.from_pretrained(checkpoint, num_labels=2)


def encoder_linears(model) -> dict[str, nn.Linear]:
    return {name: m for name, m in model.named_modules() if isinstance(m, nn.Linear) and not name.startswith("classifier")}


def test_each_baseline_trains_the_count_closest_to_fish_budget(comparison, checkpoint):
    rows = {row["method"]: row for row in json.loads((comparison / "comparison.json").read_text())["rows"]}
    assert list(rows) == ["fish", *BASELINES]
    model = base_model(checkpoint)
    total = sum(p.numel() for p in model.parameters())
    budget, head = int(total * KEEP_RATIO), sum(p.numel() for p in model.classifier.parameters())
    assert rows["fish"]["trainable_parameters"] == budget
    linears = encoder_linears(model)

    def closest(counts):  # the achievable trainable count nearest to the budget (the smaller one on a tie)
        return min(sorted(counts), key=lambda count: abs(count - budget))

    lora_per_rank = sum(m.in_features + m.out_features for n, m in linears.items() if n.endswith(("query", "value")))
    shira_per_rank = sum(m.in_features + m.out_features for m in linears.values())
    shira_most = min(m.in_features * m.out_features // (m.in_features + m.out_features) for m in linears.values())
    sizes = [m.weight.numel() for m in linears.values()]
    fish_mask = read_adapter_mask(comparison / "fish")
    fish_linear_entries = sum(fish_mask[f"{name}.weight"].numel() for name in linears if f"{name}.weight" in fish_mask)
    expected = {
        "lora_matched": closest(r * lora_per_rank + head for r in range(1, 65)),
        "shira": closest(r * shira_per_rank + head for r in range(1, shira_most + 1)),
        "supertuning": closest(count + head for count in supertuning_counts(sizes)),
        "shira_fish": fish_linear_entries + head,
    }
    for method, count in expected.items():
        results = json.loads((comparison / method / "results.json").read_text())
        assert results["total_parameters"] == total, method  # SHiRA's and Super-Tuning's values are not counted in
        assert rows[method]["trainable_parameters"] == count, method
        config = json.loads((comparison / method / "adapter_config.json").read_text())
        assert config["peft_type"] == PEFT_TYPES[method] and config["modules_to_save"] == ["classifier"]
        card = yaml.safe_load((comparison / method / "README.md").read_text().split("---")[1])
        assert card["library_name"] == "peft" and method in card["tags"]
    for method in ("lora_matched", "shira", "supertuning"):  # within what the rank / r / sparsity steps allow
        assert abs(rows[method]["trainable_parameters"] - budget) <= 0.1 * budget, method
    lora = json.loads((comparison / "lora_matched" / "adapter_config.json").read_text())
    assert lora["r"] * lora_per_rank + head == expected["lora_matched"] and lora["lora_alpha"] == 2 * lora["r"]
    shira = json.loads((comparison / "shira" / "adapter_config.json").read_text())
    assert set(shira["target_modules"]) == set(linears) and shira["random_seed"] == 0
    assert shira["r"] * shira_per_rank + head == expected["shira"]
    supertuning = json.loads((comparison / "supertuning" / "adapter_config.json").read_text())
    assert supertuning_count(sizes, supertuning["sparsity"]) + head == expected["supertuning"]
    assert fish_linear_entries < fish_mask.num_selected  # FISH also picked biases / norms / embeddings: dropped


def test_shira_fish_trains_exactly_the_fish_mask_on_each_linear_weight(comparison, checkpoint):
    from peft import PeftModel
    from peft.tuners.shira.layer import ShiraLayer

    fish_mask = read_adapter_mask(comparison / "fish")
    model = PeftModel.from_pretrained(base_model(checkpoint), comparison / "shira_fish")
    adapted = {name.removeprefix("base_model.model."): m for name, m in model.named_modules() if isinstance(m, ShiraLayer)}
    assert len(adapted) == len(encoder_linears(base_model(checkpoint)))  # per_module: every weight has entries
    r = model.peft_config["default"].r  # each layer's entries, padded to the r(m+n) PEFT's SHiRA loader allocates
    assert all(m.shira_weight["default"].numel() == r * (m.in_features + m.out_features) for m in adapted.values())
    for name, linear in encoder_linears(base_model(checkpoint)).items():
        fish = fish_mask[f"{name}.weight"] if f"{name}.weight" in fish_mask else torch.empty(0, dtype=torch.long)
        if name not in adapted:
            assert fish.numel() == 0, name
            continue
        layer = adapted[name]
        rows, cols = layer.shira_indices["default"].long()
        assert torch.equal(torch.unique(rows * linear.in_features + cols), fish.sort().values), name
        delta = layer.get_delta_weight("default").to_dense().flatten()
        assert set(delta.nonzero().flatten().tolist()) <= set(fish.tolist()), name
    results = json.loads((comparison / "shira_fish" / "results.json").read_text())
    assert results["mask"]["selected"] == sum(len(set(map(tuple, m.shira_indices["default"].T.tolist()))) for m in adapted.values())
    assert (comparison / "shira_fish" / "mask.png").is_file()


LOAD_WITH_PEFT_ALONE = """
import json, sys, torch
from peft import PeftModel
from transformers import AutoModelForSequenceClassification
checkpoint, folders = sys.argv[1], sys.argv[2:]
logits = {}
for folder in folders:
    model = PeftModel.from_pretrained(AutoModelForSequenceClassification.from_pretrained(checkpoint, num_labels=2), folder)
    logits[folder] = model.eval()(input_ids=torch.tensor([[2, 7, 9, 11, 3]])).logits.tolist()
assert not [name for name in sys.modules if name.startswith("fish_peft")]
print(json.dumps(logits))
"""


def test_saved_baselines_load_with_peft_alone_and_eval_gives_their_metrics(comparison, checkpoint, capsys):
    from peft import PeftModel

    folders = [str(comparison / method) for method in BASELINES]
    loaded = subprocess.run(
        [sys.executable, "-c", LOAD_WITH_PEFT_ALONE, checkpoint, *folders], capture_output=True, text=True, check=True
    )
    logits = json.loads(loaded.stdout.strip().splitlines()[-1])
    for folder in folders:
        model = PeftModel.from_pretrained(base_model(checkpoint), folder).eval()
        here = model(input_ids=torch.tensor([[2, 7, 9, 11, 3]])).logits
        assert torch.allclose(here, torch.tensor(logits[folder]), atol=1e-6), folder
        assert not torch.allclose(here, base_model(checkpoint).eval()(input_ids=torch.tensor([[2, 7, 9, 11, 3]])).logits)
        capsys.readouterr()
        assert main(["eval", folder]) == 0
        evaluated = json.loads(capsys.readouterr().out)["validation"]
        saved = json.loads((Path(folder) / "results.json").read_text())["metrics"]["validation"]
        assert evaluated["accuracy"] == pytest.approx(saved["accuracy"]), folder
        assert evaluated["loss"] == pytest.approx(saved["loss"], rel=1e-5), folder


@pytest.mark.parametrize("method", BASELINES)
def test_no_mask_update_for_the_baselines(method):
    with pytest.raises(ValueError, match=f"method '{method}' has none to move"):
        load_recipe(RECIPES / "glue" / "sst2.yaml", parse_overrides(["--method", method, "--mask-update", "topkast"]))


def test_an_evolving_mask_is_refused_and_only_shira_fish_has_a_mask_to_save(checkpoint, data, tmp_path, capsys):
    out = tmp_path / "run"
    args = ["train", str(RECIPES / "glue" / "sst2.yaml"), "--method", "shira", "--mask-update", "topkast"]
    assert main([*args, "--model", checkpoint, "--output-dir", str(out), *FAST, *data]) == 2
    error = capsys.readouterr().err
    assert "mask_update" in error and "'shira'" in error and "use fish or random" in error
    assert not out.exists()
    assert main(["mask", str(RECIPES / "glue" / "sst2.yaml"), "--method", "supertuning", "--model", checkpoint,
                 "--output-dir", str(out), *FAST, *data]) == 2
    assert "has no mask" in capsys.readouterr().err
    assert main(["mask", str(RECIPES / "glue" / "sst2.yaml"), "--method", "shira_fish", "--keep-ratio", str(KEEP_RATIO),
                 "--model", checkpoint, "--output-dir", str(out), *FAST, *data]) == 0
    mask = FishMask.load(str(out / "mask.safetensors"))  # FISH's mask on the Linear weights only
    linear_weights = {f"{name}.weight" for name in encoder_linears(base_model(checkpoint))}
    assert mask.num_selected > 0 and set(mask) <= linear_weights
    assert mask.info["linear_weights_only"] and mask.info["dropped_entries"] > 0


def supertuning_counts(sizes):
    """Every count Super-Tuning reaches with one entry at least per layer: it keeps floor(n * density) of each layer,
    a step function of the density that changes only at the densities j / n."""
    counts = set()
    for size in set(sizes):
        for j in range(1, size + 1):
            per_layer = [n * j // size for n in sizes]
            if min(per_layer) >= 1:
                counts.add(sum(per_layer))
    return counts


def brute_force_rank(per_rank, fixed, budget, most):
    return min(range(1, most + 1), key=lambda r: (abs(r * per_rank + fixed - budget), r))


@pytest.mark.parametrize("per_rank, fixed, budget, most", [
    (256, 66, 1078, 64), (960, 66, 1078, 15), (960, 66, 100, 15), (100, 0, 150, 9), (100, 0, 151, 9), (7, 3, 10**6, 12),
])
def test_closest_rank_is_the_brute_force_one(per_rank, fixed, budget, most):
    assert closest_rank(per_rank, fixed, budget, most) == brute_force_rank(per_rank, fixed, budget, most)


@pytest.mark.parametrize("sizes, wanted", [([1024] * 9 + [2048] * 4, 1012), ([300, 5000, 77], 400), ([10, 10], 19), ([64], 1)])
def test_closest_sparsity_reaches_the_closest_reachable_count(sizes, wanted):
    best = min(sorted(supertuning_counts(sizes)), key=lambda count: abs(count - wanted))
    sparsity = closest_sparsity(sizes, wanted)
    assert 0 <= sparsity < 1 and min(int(n * (1 - sparsity)) for n in sizes) >= 1
    assert supertuning_count(sizes, sparsity) == best
    with pytest.raises(ValueError, match="raise keep_ratio"):
        closest_sparsity(sizes, len(sizes) - 1)
