"""Where a mask landed (mask_by_layer, plot_mask) and the Hub model card (render_model_card: huggingface_hub.ModelCard)."""

import re

import jinja2
import pytest
import torch
import yaml

from fish_peft import FishMask
from fish_peft.hub.mask_plot import mask_by_layer, plot_mask, plot_masks
from fish_peft.cli.recipe import Recipe
from fish_peft.cli.tasks import dataset_name
from fish_peft.hub.model_card import RECIPE_KEY_APPLIES, is_hub_id, model_card, render_model_card

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


def hand_mask(counts, shapes, **kwargs):
    """A FishMask selecting the first `counts[name]` entries of each parameter."""
    return FishMask({name: torch.arange(n) for name, n in counts.items()}, shapes, **kwargs)


BERT_SHAPES = {
    "bert.embeddings.word_embeddings.weight": (100, 8),
    "bert.embeddings.LayerNorm.weight": (8,),
    **{f"bert.encoder.layer.{i}.attention.self.query.weight": (8, 8) for i in range(3)},
    **{f"bert.encoder.layer.{i}.attention.self.query.bias": (8,) for i in range(3)},
    **{f"bert.encoder.layer.{i}.output.dense.weight": (8, 32) for i in range(3)},
    "bert.pooler.dense.weight": (8, 8),
    "classifier.weight": (3, 8),
}
BERT_COUNTS = {
    "bert.embeddings.word_embeddings.weight": 8,  # 1 %
    "bert.encoder.layer.0.attention.self.query.weight": 32,  # 50 %
    "bert.encoder.layer.1.attention.self.query.weight": 16,
    "bert.encoder.layer.2.attention.self.query.weight": 1,
    "bert.encoder.layer.1.attention.self.query.bias": 4,
    "bert.encoder.layer.0.output.dense.weight": 64,
    "bert.encoder.layer.2.output.dense.weight": 2,
    "bert.pooler.dense.weight": 64,
}


def bert_mask():
    info = {"method": "fisher", "keep_ratio": 0.01}
    return hand_mask(BERT_COUNTS, BERT_SHAPES, modules_to_save=["classifier"], info=info)


def test_mask_by_layer_groups_by_layer_and_module_kind():
    by_layer = mask_by_layer(bert_mask())
    assert by_layer == {
        "attention.self.query.weight": {"0": 0.5, "1": 0.25, "2": 1 / 64},
        "attention.self.query.bias": {"1": 0.5},
        "output.dense.weight": {"0": 0.25, "2": 2 / 256},
        "word_embeddings.weight": {"embeddings": 0.01},
        "dense.weight": {"pooler": 1.0},
    }


def test_mask_by_layer_shows_parameters_the_mask_left_out_as_zero_when_given_shapes():
    by_layer = mask_by_layer(bert_mask(), shapes=BERT_SHAPES)
    assert by_layer["attention.self.query.bias"] == {"0": 0.0, "1": 0.5, "2": 0.0}
    assert by_layer["output.dense.weight"] == {"0": 0.25, "1": 0.0, "2": 2 / 256}
    assert by_layer["LayerNorm.weight"] == {"embeddings": 0.0}
    # the head is trained in full, so it is not part of the picture
    assert not any("classifier" in col for row in by_layer.values() for col in row)
    # columns: embeddings left of the layers, the pooler right of them
    assert list(by_layer["word_embeddings.weight"]) == ["embeddings"]
    with pytest.raises(ValueError):
        mask_by_layer(bert_mask(), shapes={**BERT_SHAPES, "bert.pooler.dense.weight": (4, 4)})


def test_plot_mask_writes_a_png(tmp_path):
    path = tmp_path / "plots" / "mask.png"
    plot_mask(bert_mask(), str(path), shapes=BERT_SHAPES)
    data = path.read_bytes()
    assert data.startswith(PNG_SIGNATURE) and len(data) > 1000
    assert [p.name for p in path.parent.iterdir()] == ["mask.png"]  # no temporary file left behind


def test_each_module_share_of_the_budget_shows_where_k_went():
    """The pooler's one 8x8 matrix holds 64 of the 191 entries: 34 % of the budget, though it is 1 parameter of the 12 shown."""
    shares = mask_by_layer(bert_mask(), shapes=BERT_SHAPES, of="budget")
    k = sum(BERT_COUNTS.values())
    assert shares["dense.weight"] == {"pooler": 64 / k}
    assert shares["attention.self.query.weight"] == {"0": 32 / k, "1": 16 / k, "2": 1 / k}
    assert sum(v for row in shares.values() for v in row.values()) == pytest.approx(1.0)
    with pytest.raises(ValueError, match="module.*budget"):
        mask_by_layer(bert_mask(), of="parameters")


def test_plot_masks_puts_several_methods_in_one_png(tmp_path):
    other = hand_mask({name: 1 for name in BERT_COUNTS}, BERT_SHAPES, modules_to_save=["classifier"])
    path = tmp_path / "masks.png"
    plot_masks({"fish": bert_mask(), "random": other}, str(path), shapes=BERT_SHAPES)
    assert path.read_bytes().startswith(PNG_SIGNATURE)
    with pytest.raises(ValueError, match="at least one"):
        plot_masks({}, str(tmp_path / "none.png"))


@pytest.mark.parametrize(
    "names",
    [
        ["transformer.wte.weight", "transformer.wpe.weight", "transformer.ln_f.weight"]
        + [f"transformer.h.{i}.{kind}" for i in range(4) for kind in ("attn.c_attn.weight", "ln_1.bias")],
        ["model.embed_tokens.weight", "model.norm.weight", "lm_head.weight"]
        + [f"model.layers.{i}.{kind}" for i in range(4) for kind in ("self_attn.q_proj.weight", "mlp.up_proj.weight")],
    ],
    ids=["gpt2", "llama"],
)
def test_plot_mask_for_gpt2_and_llama_names(tmp_path, names):
    shapes = {name: (16,) if name.endswith(("bias", "norm.weight", "ln_f.weight")) else (16, 16) for name in names}
    counts = {name: 1 + i for i, name in enumerate(names)}
    mask = hand_mask(counts, shapes, info={"method": "random", "keep_ratio": 0.05, "num_total_parameters": 5000})
    by_layer = mask_by_layer(mask)
    layer_columns = {col for row in by_layer.values() for col in row if col.isdigit()}
    assert layer_columns == {"0", "1", "2", "3"}
    path = tmp_path / "mask.png"
    plot_mask(mask, str(path), title="where it landed")
    assert path.read_bytes().startswith(PNG_SIGNATURE)


def card_context(**changes):
    context = {
        "base_model": "bert-large-cased-whole-word-masking",
        "task": "sst2",
        "dataset": "nyu-mll/glue",
        "method": "fish",
        "keep_ratio": 0.005,
        "num_labels": 2,
        "trainable_parameters": 1_678_000,
        "total_parameters": 335_143_938,
        "adapter_bytes": 10_068_000,
        "metrics": {"accuracy": 0.9312, "eval_f1": 0.9301},
        "mask_table": bert_mask().report() * 3,  # 24 rows: the card lists 15
        "plot_file": "mask.png",
        "recipe_yaml": "task: sst2\nmethod: fish\nkeep_ratio: 0.005\nlr: 5.0e-05\n",
        "license": "apache-2.0",
        "repo_id": "someone/bert-large-fish-sst2",
    }
    context.update(changes)
    return context


def front_matter(card):
    assert card.startswith("---\n")
    head, body = card[4:].split("\n---\n", 1)
    return yaml.safe_load(head), body


def python_blocks(body):
    return re.findall(r"```python\n(.*?)```", body, flags=re.S)


def test_model_card_front_matter_is_hub_metadata():
    meta, body = front_matter(render_model_card(card_context()))
    assert meta["library_name"] == "peft"
    assert meta["base_model"] == "bert-large-cased-whole-word-masking"
    assert {"fish-peft", "fish", "sst2"} <= set(meta["tags"])
    assert meta["datasets"] == ["nyu-mll/glue"] and meta["license"] == "apache-2.0"
    (result,) = meta["model-index"][0]["results"]
    assert meta["model-index"][0]["name"] == "someone/bert-large-fish-sst2"
    assert result["task"]["type"] == "text-classification"
    assert result["dataset"]["type"] == "nyu-mll/glue"
    assert {m["type"]: m["value"] for m in result["metrics"]} == {"accuracy": 0.9312, "f1": 0.9301}

    assert "![" in body and "(mask.png)" in body
    assert "@inproceedings" in body and "2111.09839" in body
    assert "```yaml\ntask: sst2\n" in body
    # top 15 rows of the mask table, then how many more
    assert body.count("| `bert.") == 15 and "9 more" in body


def test_model_card_code_compiles_and_loads_the_adapter():
    _, body = front_matter(render_model_card(card_context(repo_id=None)))
    (code,) = python_blocks(body)
    compile(code, "card", "exec")
    assert "import fish_peft" in code and '"path/to/adapter"' in code
    assert "num_labels=2" in code and ".merge_and_unload()" in code


def test_model_card_without_metrics_has_no_model_index():
    meta, body = front_matter(render_model_card(card_context(metrics={}, mask_table=[], plot_file=None)))
    assert "model-index" not in meta and "## Results" not in body and "![" not in body


def test_model_card_missing_key_raises():
    context = card_context()
    del context["num_labels"]
    with pytest.raises(jinja2.UndefinedError):
        render_model_card(context)


def test_model_card_is_a_huggingface_hub_model_card():
    card = model_card(card_context(metrics={"pearson": float("nan"), "spearmanr": 0.5}))
    assert card.data.library_name == "peft" and card.data.datasets == ["nyu-mll/glue"]
    nan, spearman = card.data.eval_results
    assert (spearman.dataset_type, spearman.dataset_config, spearman.metric_value) == ("nyu-mll/glue", "sst2", 0.5)
    assert nan.metric_value != nan.metric_value  # NaN stays NaN
    assert str(card) == render_model_card(card_context(metrics={"pearson": float("nan"), "spearmanr": 0.5}))


def test_a_template_variable_the_context_lacks_is_named(tmp_path):
    template = tmp_path / "card.md.j2"
    template.write_text("---\n{{ card_data }}\n---\n# {{ name }} for {{ nonexistent }} and {{ typo_key }}\n")
    with pytest.raises(jinja2.UndefinedError, match="lacks nonexistent, typo_key"):
        render_model_card(card_context(), template)
    template.write_text("---\n{{ card_data }}\n---\n# {{ name }}: {{ thousands(trainable_parameters) }}\n")
    meta, body = front_matter(render_model_card(card_context(), template))
    assert body == "# someone/bert-large-fish-sst2: 1,678,000" and meta["license"] == "apache-2.0"


@pytest.mark.parametrize(
    "method, library, tags",
    [("fish", "peft", {"peft", "sparse-fine-tuning"}), ("bitfit", "peft", {"peft", "sparse-fine-tuning"}),
     ("lora", "peft", {"peft"}), ("full", "transformers", set())],
)
def test_model_card_library_and_tags_say_what_the_method_is(method, library, tags):
    meta, _ = front_matter(render_model_card(card_context(method=method)))
    assert meta["library_name"] == library
    assert set(meta["tags"]) & {"peft", "sparse-fine-tuning"} == tags
    assert {"fish-peft", method, "sst2"} <= set(meta["tags"])


def test_the_shipped_demo_data_is_not_claimed_as_a_hub_dataset():
    dataset = dataset_name("rotten_tomatoes", None)
    assert not is_hub_id(dataset) and dataset_name("sst2", None) == "nyu-mll/glue"
    card = render_model_card(card_context(task="rotten_tomatoes", dataset=dataset))
    meta, body = front_matter(card)
    assert "datasets" not in meta
    (result,) = meta["model-index"][0]["results"]
    assert result["dataset"]["type"] == dataset and "config" not in result["dataset"]
    assert "rotten_tomatoes" not in yaml.safe_dump(result)
    assert f"| data | {dataset} |" in body and "fine-tuned on rotten_tomatoes with" in body
    assert body.count("rotten_tomatoes") == 2  # the sentence and the task row, nowhere beside the data's name


def test_model_card_names_the_task_once_and_the_hub_dataset_by_its_link():
    _, body = front_matter(render_model_card(card_context(train_examples=67_349, validation_examples=872)))
    assert "| task | sst2, 2 labels |" in body
    assert "| data | [`nyu-mll/glue`](https://huggingface.co/datasets/nyu-mll/glue): 67,349 training and 872 validation examples |" in body
    assert "on the `validation` split (872 examples)" in body
    _, body = front_matter(render_model_card(card_context()))
    assert "| data | [`nyu-mll/glue`](https://huggingface.co/datasets/nyu-mll/glue) |" in body and "validation examples" not in body


def shown_recipe(**recipe):
    method = recipe.get("method", "fish")
    _, body = front_matter(render_model_card(card_context(method=method, recipe_yaml=Recipe(**recipe).to_yaml())))
    (block,) = re.findall(r"```yaml\n(.*?)```", body, flags=re.S)
    return yaml.safe_load(block)


def test_the_card_shows_the_recipe_keys_that_apply_to_the_method():
    mask_keys = {"keep_ratio", "num_samples", "fisher", "selection"}
    evolving, merging = {"update_every", "prune_rate", "exploration", "penalty"}, {"merge_reduction", "mask_sharing"}
    lora_keys, comparison = {"lora_r", "lora_alpha", "lora_targets"}, {"methods", "lr_by_method", "output_dir"}
    fish = shown_recipe(method="fish", lr_by_method={"fish": 1e-3})
    assert mask_keys <= set(fish) and not (evolving | merging | lora_keys | comparison) & set(fish)
    assert {"task", "model", "learning_rate", "num_train_epochs", "seed"} <= set(fish) and "train_file" not in fish  # unset keys left out
    assert evolving <= set(shown_recipe(method="fish", mask_update="topkast"))
    assert {"update_every", "prune_rate"} == set(shown_recipe(method="random", mask_update="sparse_momentum")) & evolving
    assert merging | {"merge_every"} <= set(shown_recipe(method="fish", merge_every=5))
    lora = shown_recipe(method="lora")
    assert lora_keys <= set(lora) and not (mask_keys | {"save_dtype"}) & set(lora)
    full = shown_recipe(method="full")
    assert not (mask_keys | lora_keys | evolving | comparison | {"save_dtype"}) & set(full) and full["method"] == "full"
    assert "keep_ratio" not in shown_recipe(method="bitfit")


def test_every_key_the_card_may_leave_out_is_a_recipe_key():
    assert set(RECIPE_KEY_APPLIES) <= set(yaml.safe_load(Recipe().to_yaml()))


@pytest.mark.parametrize("method", ["lora", "full", "bitfit"])
def test_model_card_of_other_methods_has_no_mask_section(method):
    meta, body = front_matter(render_model_card(card_context(method=method)))
    assert method in meta["tags"]
    assert "## The mask" not in body and "| `bert." not in body and "![" not in body
    for code in python_blocks(body):
        compile(code, "card", "exec")
    assert ("PeftModel" in body) == (method != "full")
