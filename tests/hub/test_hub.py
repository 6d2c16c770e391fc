"""Pushing FISH adapters to the Hub and loading them back by repo id, against a Hub server on 127.0.0.1
(tests/fake_hub.py) driven by the real huggingface_hub client."""

import copy
import hashlib
import json
import logging
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml
from peft import LoraConfig, PeftModel, get_peft_model

import fish_peft
from fish_peft import AdapterFileError, FishConfig, HubError, compute_fisher_mask, push_adapter, random_mask
from fish_peft.cli.command import main
from tests.fake_hub import FakeHub, use_fake_hub
from tests.glue_files import WORDS, write_glue_files
from tests.models import save_tiny_checkpoint, tiny_bert

SECRET = "hf_SecretTokenThatMustNotLeak0123"
RECIPES = Path(__file__).resolve().parents[2] / "recipes"
FAST = ["--epochs", "1", "--batch-size", "8", "--num-samples", "8", "--max-length", "32", "--eval-batch-size", "16"]


@pytest.fixture
def hub(monkeypatch, tmp_path):
    with FakeHub(tokens=(SECRET,)) as hub:
        use_fake_hub(monkeypatch, hub, tmp_path / "hf_home")
        monkeypatch.setenv("HF_TOKEN", SECRET)
        yield hub


def fish_model(base, keep_ratio=0.1, seed=0, mask=None, **config):
    """A FISH PeftModel whose sparse values and head are random, as if trained."""
    mask = mask if mask is not None else random_mask(base, keep_ratio, seed=seed)
    model = get_peft_model(copy.deepcopy(base), FishConfig(mask=mask, **config))
    randomise(model, seed)
    return model.eval()


def randomise(model, seed):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.copy_(torch.randn(p.shape, generator=g))


def inputs():
    return {"input_ids": torch.randint(1, 100, (3, 8), generator=torch.Generator().manual_seed(1))}


def front_matter(card: str):
    head, body = card[4:].split("\n---\n", 1)
    return yaml.safe_load(head), body


def snapshot(folder: Path) -> dict[str, str]:
    return {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(folder.rglob("*")) if p.is_file()}


def test_push_to_hub_then_load_by_repo_id_gives_the_same_model_and_a_fish_card(hub, tmp_path):
    base = tiny_bert()
    batches = [{**inputs(), "labels": torch.tensor([0, 1, 2])}]
    mask = compute_fisher_mask(base, batches, keep_ratio=0.05, num_samples=3)
    model = fish_model(base, mask=mask)
    commit = model.push_to_hub("alice/tiny-fish", commit_message="first version")

    files = hub.files("alice/tiny-fish")
    assert set(files) == {".gitattributes", "README.md", "adapter_config.json", "adapter_model.safetensors", "mask.png"}
    assert hub.commits("alice/tiny-fish")[-1].message == "first version" and commit.oid == hub.commits("alice/tiny-fish")[-1].oid
    again = PeftModel.from_pretrained(copy.deepcopy(base), "alice/tiny-fish").eval()
    assert torch.equal(model(**inputs()).logits, again(**inputs()).logits)
    merged = again.merge_and_unload()
    assert torch.allclose(merged(**inputs()).logits, model(**inputs()).logits, atol=1e-5)

    meta, body = front_matter(files["README.md"].decode())
    assert meta["library_name"] == "peft" and meta["pipeline_tag"] == "text-classification"
    assert {"fish-peft", "peft", "fish"} <= set(meta["tags"]) and meta["license"] == "apache-2.0"
    k = mask.num_selected
    assert f"k = {k:,}" in body and "| mask rule | largest Fisher information" in body and "over 3 training examples" in body
    assert "(mask.png)" in body and "@inproceedings{sung2021training" in body
    assert "### Framework versions" not in body and "Model Card for Model ID" not in body  # no generic card
    (code,) = re.findall(r"```python\n(.*?)```", body, flags=re.S)
    compile(code, "card", "exec")
    assert '"alice/tiny-fish"' in code and "num_labels=3" in code and "import fish_peft" in code
    assert json.loads(files["adapter_config.json"])["sparse_parameters"] == mask.counts()


def test_several_adapters_a_branch_and_a_private_repo(hub):
    base = tiny_bert()
    model = fish_model(base, seed=0)
    model.add_adapter("other", FishConfig(mask=random_mask(base, 0.05, seed=5)))
    model.set_adapter("other")
    randomise(model, seed=7)
    expected = {}
    for name in ("default", "other"):
        model.set_adapter(name)
        expected[name] = model(**inputs()).logits
    model.push_to_hub("alice/two", revision="v1", private=True, commit_message="two adapters")

    assert hub.is_private("alice/two")
    assert "other/adapter_model.safetensors" in hub.files("alice/two", revision="v1")
    assert "adapter_config.json" not in hub.files("alice/two")  # main is untouched
    assert hub.commits("alice/two", branch="v1")[-1].message == "two adapters"
    again = PeftModel.from_pretrained(copy.deepcopy(base), "alice/two", revision="v1").eval()
    again.load_adapter("alice/two", adapter_name="other", subfolder="other", revision="v1")
    for name in ("default", "other"):
        again.set_adapter(name)
        assert torch.equal(again(**inputs()).logits, expected[name])
    _, body = front_matter(hub.files("alice/two", revision="v1")["README.md"].decode())
    assert "## Adapters in this repository" in body
    assert 'model.load_adapter("alice/two", adapter_name="other", subfolder="other")' in body


def test_named_adapters_without_a_default_load_as_the_card_says(hub, tmp_path):
    base = tiny_bert()
    model = get_peft_model(copy.deepcopy(base), FishConfig(mask=random_mask(base, 0.1, seed=1)), adapter_name="sst2")
    model.add_adapter("mnli", FishConfig(mask=random_mask(base, 0.05, seed=2)))
    randomise(model, seed=4)
    model.eval()
    model.push_to_hub("alice/named")
    _, body = front_matter(hub.files("alice/named")["README.md"].decode())
    # no adapter at the top level: the card describes the first sub-folder's and loads the others next to it
    assert 'PeftModel.from_pretrained(base, "alice/named", subfolder="mnli", adapter_name="mnli")' in body
    assert 'model.load_adapter("alice/named", adapter_name="sst2", subfolder="sst2")' in body and "(mask.png)" in body
    again = PeftModel.from_pretrained(copy.deepcopy(base), "alice/named", subfolder="mnli", adapter_name="mnli").eval()
    again.load_adapter("alice/named", adapter_name="sst2", subfolder="sst2")
    again.set_adapter("sst2")
    assert torch.equal(again(**inputs()).logits, model(**inputs()).logits)


def test_a_comparison_folder_is_refused(hub, tmp_path):
    fish_model(tiny_bert()).save_pretrained(tmp_path / "demo" / "fish")
    (tmp_path / "demo" / "comparison.json").write_text("{}")
    with pytest.raises(ValueError, match="push one method's folder"):
        push_adapter(tmp_path / "demo", "alice/demo")
    assert hub.requests == []


def test_pushing_again_updates_the_same_repo(hub):
    base = tiny_bert()
    model = fish_model(base, seed=0)
    push_adapter(model, "alice/again")
    randomise(model, seed=3)
    push_adapter(model, "alice/again", commit_message="retrained", dataset="nyu-mll/glue", task="sst2", metrics={"accuracy": 0.91})
    assert [c.message for c in hub.commits("alice/again")][-1] == "retrained" and len(hub.commits("alice/again")) == 3
    meta, body = front_matter(hub.files("alice/again")["README.md"].decode())
    assert meta["datasets"] == ["nyu-mll/glue"] and "sst2" in meta["tags"] and "## Results" in body
    (result,) = meta["model-index"][0]["results"]
    assert result["dataset"]["config"] == "sst2" and result["metrics"][0] == {"type": "accuracy", "name": "validation accuracy", "value": 0.91}
    again = PeftModel.from_pretrained(copy.deepcopy(base), "alice/again").eval()
    assert torch.equal(again(**inputs()).logits, model(**inputs()).logits)


def test_the_token_goes_to_the_hub_and_nowhere_else(hub, tmp_path, caplog, capsys):
    base = tiny_bert()
    model = fish_model(base)
    model.save_pretrained(tmp_path / "saved")
    caplog.set_level(logging.DEBUG)
    push_adapter(tmp_path / "saved", "alice/secret")
    model.push_to_hub("alice/secret")

    assert any(headers.get("authorization") == f"Bearer {SECRET}" for method, _, headers in hub.requests if method == "POST")
    uploaded = b"".join(hub.files("alice/secret").values())
    local = b"".join(p.read_bytes() for p in tmp_path.rglob("*") if p.is_file() and "hf_home" not in p.parts)
    captured = capsys.readouterr()
    for text in (uploaded, local, caplog.text.encode(), captured.out.encode(), captured.err.encode()):
        assert SECRET.encode() not in text


def test_no_token_is_a_clear_error_before_any_request(hub, monkeypatch):
    monkeypatch.delenv("HF_TOKEN")
    with pytest.raises(HubError, match=r"hf auth login.*HF_TOKEN"):
        fish_model(tiny_bert()).push_to_hub("alice/no-token")
    assert hub.requests == []


@pytest.mark.parametrize("repo_id", ["alice/bad name", "alice/x/y", "", "alice/-bad-", "a" * 97, "alice/..x"])
def test_a_malformed_repo_id_is_refused_before_any_work(hub, tmp_path, repo_id):
    model = fish_model(tiny_bert())
    with pytest.raises(ValueError, match="repository id"):
        push_adapter(model, repo_id)
    assert hub.requests == []
    assert main(["push", str(tmp_path / "not-even-looked-at"), repo_id]) == 2


def test_a_server_failure_mid_upload_leaves_local_files_and_a_retry_succeeds(hub, tmp_path):
    base = tiny_bert()
    model = fish_model(base)
    folder = tmp_path / "run"
    model.save_pretrained(folder)
    before = snapshot(folder)
    hub.fail_next("commit")
    with pytest.raises(HubError, match="run the same push again"):
        push_adapter(folder, "alice/flaky")
    assert snapshot(folder) == before
    assert "adapter_model.safetensors" not in hub.files("alice/flaky")
    push_adapter(folder, "alice/flaky")
    again = PeftModel.from_pretrained(copy.deepcopy(base), "alice/flaky").eval()
    assert torch.equal(again(**inputs()).logits, model(**inputs()).logits)
    assert snapshot(folder) == before


def test_a_damaged_adapter_file_is_refused_before_upload(hub, tmp_path):
    folder = tmp_path / "run"
    fish_model(tiny_bert()).save_pretrained(folder)
    config = json.loads((folder / "adapter_config.json").read_text())
    name = next(iter(config["sparse_parameters"]))
    config["sparse_parameters"][name] += 1
    (folder / "adapter_config.json").write_text(json.dumps(config))
    with pytest.raises(AdapterFileError, match="counts"):
        push_adapter(folder, "alice/damaged")
    assert hub.requests == []


def test_other_peft_methods_keep_peft_push_to_hub(hub):
    lora = get_peft_model(tiny_bert(), LoraConfig(target_modules=["query", "value"], r=2))
    lora.push_to_hub("alice/lora")
    card = hub.files("alice/lora")["README.md"].decode()
    assert "fish-peft" not in card and "adapter_model.safetensors" in hub.files("alice/lora")


def test_fish_peft_push_of_a_run_folder_in_a_subprocess_with_hf_endpoint(hub, tmp_path):
    checkpoint = save_tiny_checkpoint(tmp_path / "tiny-bert", WORDS)
    train, validation = write_glue_files("sst2", tmp_path)
    out = tmp_path / "run"
    args = ["train", RECIPES / "glue" / "sst2.yaml", "--model", checkpoint, "--output-dir", out, *FAST,
            "--train-file", train, "--validation-file", validation]
    assert main([str(a) for a in args]) == 0
    before = snapshot(out)
    command = [sys.executable, "-m", "fish_peft.cli.command", "push", str(out), "alice/sst2-fish", "--revision", "v2",
               "--commit-message", "from the CLI", "--base-model", "prajjwal1/bert-tiny", "--tag", "tiny"]
    done = subprocess.run(command, env={**os.environ, **hub.env(token=SECRET)}, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    assert json.loads(done.stdout)["revision"] == "v2" and SECRET not in done.stdout + done.stderr
    assert snapshot(out) == before

    files = hub.files("alice/sst2-fish", revision="v2")
    assert SECRET.encode() not in b"".join(files.values())
    assert str(tmp_path).encode() not in b"".join(files.values())  # no path of this machine is published
    uploaded = yaml.safe_load(files["recipe.yaml"])
    assert uploaded["model"] == "prajjwal1/bert-tiny" and uploaded["train_file"] == train.name
    assert json.loads(files["results.json"])["recipe"] == uploaded
    assert {"adapter_config.json", "adapter_model.safetensors", "recipe.yaml", "results.json", "mask.png", "README.md"} <= set(files)
    meta, body = front_matter(files["README.md"].decode())
    results = json.loads((out / "results.json").read_text())
    (result,) = meta["model-index"][0]["results"]
    assert {m["type"]: m["value"] for m in result["metrics"]} == pytest.approx(
        {k: v for k, v in results["metrics"]["validation"].items() if k not in ("loss", "epoch")}
    )
    assert meta["base_model"] == "prajjwal1/bert-tiny"
    assert "datasets" not in meta and f"| data | {train.name} (local file)" in body  # named, not listed as Hub datasets
    assert result["dataset"]["type"] == f"{train.name} (local file)" and "config" not in result["dataset"]
    assert {"tiny", "sst2", "fish", "peft", "sparse-fine-tuning"} <= set(meta["tags"])
    (shown,) = re.findall(r"```yaml\n(.*?)```", body, flags=re.S)
    shown = yaml.safe_load(shown)
    assert shown["keep_ratio"] == 0.005 and shown["num_samples"] == 8 and shown["train_file"] == train.name
    assert not {"lora_r", "lr_by_method", "methods", "output_dir", "update_every", "merge_reduction"} & set(shown)
    assert json.loads(files["adapter_config.json"])["base_model_name_or_path"] == "prajjwal1/bert-tiny"
    assert json.loads((out / "adapter_config.json").read_text())["base_model_name_or_path"] == checkpoint

    from transformers import AutoModelForSequenceClassification

    def load(source, **kwargs):
        base = AutoModelForSequenceClassification.from_pretrained(checkpoint, num_labels=2)
        return PeftModel.from_pretrained(base, source, **kwargs).eval()

    ids = {"input_ids": torch.randint(5, 20, (2, 6), generator=torch.Generator().manual_seed(0))}
    expected = load(str(out))(**ids).logits
    assert torch.equal(load("alice/sst2-fish", revision="v2")(**ids).logits, expected)

    # The uploaded config names the base by its Hub id, so AutoPeftModel finds it there.
    from huggingface_hub import HfApi
    from peft import AutoPeftModelForSequenceClassification

    HfApi().create_repo("prajjwal1/bert-tiny")
    HfApi().upload_folder(repo_id="prajjwal1/bert-tiny", folder_path=checkpoint)
    auto = AutoPeftModelForSequenceClassification.from_pretrained("alice/sst2-fish", revision="v2").eval()
    assert torch.equal(auto(**ids).logits, expected)


def test_push_command_help(capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["push", "--help"])
    assert exit_info.value.code == 0 and "HF_TOKEN" in capsys.readouterr().out


def test_fish_peft_is_what_registers_the_push(hub):
    from peft import PeftModel as Peft

    assert getattr(Peft.push_to_hub, "_fish_peft", False) and fish_peft.push_adapter is push_adapter


def test_a_local_base_model_and_data_files_are_published_by_name_not_by_path(hub, tmp_path):
    from fish_peft.cli.recipe import Recipe

    folder, base = tmp_path / "run", tiny_bert()
    model = fish_model(base)
    model.save_pretrained(folder)
    recipe = Recipe(task="custom", model=str(tmp_path / "models" / "my-bert"), output_dir=str(folder),
                    train_file=str(tmp_path / "data" / "train.csv"), validation_file=str(tmp_path / "data" / "dev.csv"))
    (folder / "recipe.yaml").write_text(recipe.to_yaml())
    (folder / "results.json").write_text(json.dumps({"model": recipe.model, "recipe": yaml.safe_load(recipe.to_yaml())}))
    config = json.loads((folder / "adapter_config.json").read_text())
    (folder / "adapter_config.json").write_text(json.dumps({**config, "base_model_name_or_path": recipe.model}))
    before = snapshot(folder)
    push_adapter(folder, "alice/local-run")
    files = hub.files("alice/local-run")
    assert str(tmp_path).encode() not in b"".join(files.values())
    uploaded = yaml.safe_load(files["recipe.yaml"])
    assert (uploaded["model"], uploaded["train_file"], uploaded["output_dir"]) == ("my-bert (local folder)", "train.csv", "run")
    assert json.loads(files["results.json"])["model"] == "my-bert (local folder)"
    assert json.loads(files["adapter_config.json"])["base_model_name_or_path"] is None
    assert "base_model:" not in files["README.md"].decode().split("\n---\n")[0]  # not a Hub id: not in the metadata
    assert snapshot(folder) == before  # the local folder keeps its paths
    again = PeftModel.from_pretrained(copy.deepcopy(base), "alice/local-run").eval()
    assert torch.equal(again(**inputs()).logits, model(**inputs()).logits)


def test_pushing_again_removes_what_the_earlier_push_wrote_and_this_one_does_not(hub, tmp_path):
    from huggingface_hub import HfApi

    base = tiny_bert()
    two = fish_model(base, seed=0)
    two.add_adapter("other", FishConfig(mask=random_mask(base, 0.05, seed=5)))
    folder = tmp_path / "run"
    two.save_pretrained(folder)
    (folder / "results.json").write_text(json.dumps({"metrics": {"validation": {"accuracy": 0.5}}}))
    push_adapter(folder, "alice/replaced")
    HfApi().upload_file(path_or_fileobj=b"my notes", path_in_repo="notes.md", repo_id="alice/replaced")
    assert {"other/adapter_model.safetensors", "results.json", "notes.md"} <= set(hub.files("alice/replaced"))

    one = fish_model(base, seed=3)
    push_adapter(one, "alice/replaced", commit_message="one adapter")
    files = hub.files("alice/replaced")
    assert not [name for name in files if name.startswith("other/")] and "results.json" not in files
    assert files["notes.md"] == b"my notes"  # what fish-peft does not write is left alone
    assert "## Adapters in this repository" not in files["README.md"].decode()
    again = PeftModel.from_pretrained(copy.deepcopy(base), "alice/replaced").eval()
    assert torch.equal(again(**inputs()).logits, one(**inputs()).logits)


def test_create_pr_proposes_the_new_adapter_and_leaves_main_alone(hub):
    base = tiny_bert()
    model = fish_model(base, seed=0)
    push_adapter(model, "alice/proposed", base_model="prajjwal1/bert-tiny")
    main_files = hub.files("alice/proposed")
    assert json.loads(main_files["adapter_config.json"])["base_model_name_or_path"] == "prajjwal1/bert-tiny"
    randomise(model, seed=4)
    info = push_adapter(model, "alice/proposed", create_pr=True, commit_message="retrained")
    assert info.pr_revision == "refs/pr/1" and info.pr_url.endswith("/alice/proposed/discussions/1")
    assert hub.files("alice/proposed") == main_files
    proposed = PeftModel.from_pretrained(copy.deepcopy(base), "alice/proposed", revision=info.pr_revision).eval()
    assert torch.equal(proposed(**inputs()).logits, model(**inputs()).logits)


def test_push_to_hub_takes_the_keywords_of_transformers_and_peft(hub):
    """Those that do not apply to a sparse adapter (safe_serialization, use_temp_dir, max_shard_size, ...) are
    ignored; the others do what they say; `use_auth_token` is the token's older name."""
    model = fish_model(tiny_bert())
    model.push_to_hub(
        "alice/keywords", safe_serialization=True, use_temp_dir=True, max_shard_size="1GB", ignore_metadata_errors=True,
        commit_message="all of them", commit_description="every keyword", private=True, token=SECRET, revision="v1",
        tags=["sst2-demo"],
    )
    files = hub.files("alice/keywords", revision="v1")
    assert "adapter_model.safetensors" in files and hub.is_private("alice/keywords")
    assert hub.commits("alice/keywords", branch="v1")[-1].message == "all of them"
    assert "sst2-demo" in front_matter(files["README.md"].decode())[0]["tags"]
    with pytest.warns(UserWarning, match="safe_serialization=False is ignored"):
        info = model.push_to_hub("alice/keywords", safe_serialization=False, use_auth_token=SECRET, create_pr=True, tags="one-tag")
    proposed = hub.files("alice/keywords", revision=info.pr_revision)
    assert "adapter_model.bin" not in proposed and "one-tag" in front_matter(proposed["README.md"].decode())[0]["tags"]


def test_a_keyword_that_is_really_wrong_is_refused_by_name_before_any_request(hub):
    model = fish_model(tiny_bert())
    with pytest.raises(TypeError, match=r"unexpected keyword argument\(s\) comit_message.*commit_message"):
        model.push_to_hub("alice/typo", comit_message="typo")
    with pytest.raises(ValueError, match="pass only token"):
        model.push_to_hub("alice/typo", token=SECRET, use_auth_token="hf_another")
    with pytest.raises(TypeError, match="unexpected keyword argument"):
        push_adapter(model, "alice/typo", safe_serialization=True)  # push_adapter has no such keyword
    assert hub.requests == []


def test_the_card_of_a_model_with_named_labels_gives_them_back(hub):
    base = tiny_bert(num_labels=2, id2label={0: "negative", 1: "positive"}, label2id={"negative": 0, "positive": 1})
    fish_model(base).push_to_hub("alice/named-labels")
    (code,) = re.findall(r"```python\n(.*?)```", front_matter(hub.files("alice/named-labels")["README.md"].decode())[1], flags=re.S)
    assert 'id2label = {0: "negative", 1: "positive"}' in code and "label2id={name: i for i, name in id2label.items()}" in code
    assert 'pipeline("text-classification", model=merged, tokenizer=tokenizer)' in code
    fish_model(tiny_bert()).push_to_hub("alice/placeholder-labels")  # LABEL_0, LABEL_1, LABEL_2 name nothing
    assert "id2label" not in hub.files("alice/placeholder-labels")["README.md"].decode()


def test_a_run_folders_card_shows_the_data_sizes_results_json_records(tmp_path):
    from fish_peft.hub.run_facts import write_model_card

    folder = tmp_path / "run"
    fish_model(tiny_bert()).save_pretrained(folder)
    results = {"dataset": "nyu-mll/glue", "metrics": {"validation_matched": {"accuracy": 0.8, "loss": 0.5}}}
    (folder / "results.json").write_text(json.dumps(results))
    write_model_card(folder, task="mnli")
    assert "validation examples" not in (folder / "README.md").read_text()  # not recorded: not claimed

    sizes = {"train_examples": 392_702, "validation_examples": {"validation_matched": 9_815, "validation_mismatched": 9_832}}
    (folder / "results.json").write_text(json.dumps({**results, **sizes}))
    write_model_card(folder, task="mnli")
    meta, body = front_matter((folder / "README.md").read_text())
    (result,) = meta["model-index"][0]["results"]
    assert result["dataset"] == {"name": "nyu-mll/glue mnli", "type": "nyu-mll/glue", "config": "mnli", "split": "validation_matched"}
    assert result["metrics"] == [{"type": "accuracy", "name": "validation_matched accuracy", "value": 0.8}]
    assert ": 392,702 training and 9,815 validation examples |" in body
    assert "on the `validation_matched` split (9,815 examples)" in body
