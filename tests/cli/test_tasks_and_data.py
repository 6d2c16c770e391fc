"""GLUE task table, metrics (checked against scikit-learn and scipy) and the offline path files -> splits -> tokens."""

import subprocess
import sys
import warnings

import datasets
import numpy as np
import pytest
import torch
from scipy import stats
from sklearn import metrics as skm
from transformers import BertTokenizerFast

from fish_peft.cli.glue_data import load_raw_splits, prepare_splits, tokenize_splits
from fish_peft.cli.tasks import GLUE_TASKS, METRICS, compute_metrics, custom_task, dataset_name, get_task
from tests.glue_files import GLUE_SCHEMA, WORDS, write_glue_files

SPECIAL = ("[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]")
# References take (predictions, labels) like ours; scikit-learn's own order is (y_true, y_pred).
REFERENCES = {
    "accuracy": lambda p, y: skm.accuracy_score(y, p),
    "f1": lambda p, y: skm.f1_score(y, p, zero_division=0),
    "matthews_correlation": lambda p, y: skm.matthews_corrcoef(y, p),
    "pearson": lambda p, y: stats.pearsonr(p, y)[0],
    "spearmanr": lambda p, y: stats.spearmanr(p, y)[0],
}


@pytest.fixture(autouse=True)
def local_datasets_cache(tmp_path, monkeypatch):
    """Keep the arrow files `datasets` writes for loaded files inside the test's own folder."""
    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", tmp_path / "hf_datasets_cache")


@pytest.fixture(scope="module")
def tokenizer():
    """A WordPiece tokenizer whose vocabulary is the test word list (transformers 5 ignores `vocab_file=`)."""
    return BertTokenizerFast(vocab={word: i for i, word in enumerate((*SPECIAL, *WORDS))})


def split_dict(**splits) -> datasets.DatasetDict:
    return datasets.DatasetDict({name: datasets.Dataset.from_dict(columns) for name, columns in splits.items()})


# --- task table and metrics ---


def test_task_table_matches_glue_schema():
    assert set(GLUE_TASKS) == set(GLUE_SCHEMA)
    for name, (text_columns, num_labels) in GLUE_SCHEMA.items():
        task = get_task(name)
        assert (task.name, task.text_columns, task.num_labels) == (name, text_columns, num_labels)
        assert len(task.label_names) == (0 if task.is_regression else num_labels)
    assert get_task("MNLI").validation_splits == ("validation_matched", "validation_mismatched")
    assert get_task("cola").metrics == ("matthews_correlation",)


def test_unknown_task_names_the_glue_tasks():
    with pytest.raises(ValueError, match="Unknown GLUE task 'mnli-mm'.*cola.*wnli"):
        get_task("mnli-mm")


@pytest.mark.parametrize("name", sorted(GLUE_TASKS))
def test_compute_metrics_matches_references(name):
    task, rng = GLUE_TASKS[name], np.random.default_rng(sorted(GLUE_TASKS).index(name))
    if task.is_regression:  # scores on a half-point grid, so both sides have many ties
        labels = rng.integers(0, 11, size=300) / 2
        predictions = np.round(labels + rng.normal(0, 1.5, size=300)).reshape(-1, 1)
        flat = predictions[:, 0]
    else:  # logits that favour the true class on about half the rows
        labels = rng.integers(task.num_labels, size=300)
        hints = np.eye(task.num_labels)[labels] * rng.integers(0, 2, size=(300, 1))
        predictions = rng.normal(size=(300, task.num_labels)) + hints
        flat = predictions.argmax(axis=1)
    scores = compute_metrics(task, predictions, labels)
    expected = {metric: REFERENCES[metric](flat, labels) for metric in task.metrics}
    assert set(scores) == {*task.metrics, "combined_score"}
    for metric, value in expected.items():
        assert scores[metric] == pytest.approx(value, abs=1e-12)
    assert scores["combined_score"] == pytest.approx(np.mean(list(expected.values())), abs=1e-12)


@pytest.mark.parametrize("metric", sorted(METRICS))
@pytest.mark.parametrize("seed", range(5))
def test_each_metric_matches_its_reference(metric, seed):
    rng = np.random.default_rng(seed)
    n, classes = int(rng.integers(2, 60)), 2 if metric == "f1" else int(rng.integers(2, 5))
    if metric in ("pearson", "spearmanr"):
        labels, predictions = rng.integers(0, 4, n) + 0.5, rng.normal(size=n).round(1)
    else:
        labels, predictions = rng.integers(classes, size=n), rng.integers(classes, size=n)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # scipy warns on constant input; the value is what we compare
        expected = REFERENCES[metric](predictions, labels)
    assert METRICS[metric](predictions, labels) == pytest.approx(expected, abs=1e-12, nan_ok=True)


def test_degenerate_cases_follow_scikit_learn_and_scipy():
    labels, constant = np.array([0, 1, 1, 0]), np.zeros(4, dtype=int)
    assert METRICS["matthews_correlation"](constant, labels) == 0.0 == skm.matthews_corrcoef(labels, constant)
    assert METRICS["f1"](constant, constant) == 0.0  # no true or predicted positives
    assert np.isnan(METRICS["pearson"](np.full(4, 0.1), labels.astype(float)))
    assert np.isnan(METRICS["spearmanr"](labels.astype(float), np.full(4, 3.0)))
    with pytest.raises(ValueError, match="equal length"):
        METRICS["accuracy"](labels, labels[:3])


def test_constant_input_gives_nan_without_a_warning():
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert np.isnan(METRICS["spearmanr"](np.full(5, 2.0), np.arange(5.0)))
        assert METRICS["f1"](np.zeros(5, dtype=int), np.zeros(5, dtype=int)) == 0.0


def test_the_task_table_loads_without_scikit_learn_or_scipy_stats():
    loaded = "sorted(m for m in ('sklearn', 'scipy.stats') if m in sys.modules)"
    code = f"import sys, fish_peft.cli.tasks as t; t.get_task('sst2'); print({loaded})"
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "[]"


def test_dataset_names_claim_a_hub_id_only_for_hub_data():
    assert dataset_name("sst2", None) == "nyu-mll/glue"
    assert dataset_name("sst2", "/data/glue/sst2_train.csv") == "sst2_train.csv (local file)"
    assert dataset_name("custom", "reviews.jsonl") == "reviews.jsonl (local file)"
    assert "vaderSentiment" in dataset_name("rotten_tomatoes", None) and " " in dataset_name("rotten_tomatoes", None)


def test_compute_metrics_accepts_class_ids_and_column_scores():
    rte = compute_metrics(get_task("rte"), np.array([1, 0, 1]), np.array([1, 1, 1]))
    assert rte["accuracy"] == pytest.approx(2 / 3)
    stsb = compute_metrics(get_task("stsb"), np.array([[1.0], [2.0], [4.0]]), np.array([1.5, 2.0, 5.0]))
    assert stsb["spearmanr"] == pytest.approx(1.0)
    with pytest.raises(ValueError, match=r"shape \(n, 3\)"):
        compute_metrics(get_task("mnli"), np.zeros((4, 2)), np.zeros(4))


def test_custom_task_defaults_and_checks():
    assert custom_task(["text"], 2).metrics == ("accuracy", "f1")
    assert custom_task(["text"], 5).metrics == ("accuracy",)
    regression = custom_task(("a", "b"), 1)
    assert regression.is_regression and regression.metrics == ("pearson", "spearmanr") and regression.name == "custom"
    with pytest.raises(ValueError, match="f1 is binary"):
        custom_task(["text"], 3, metrics=["f1"])
    with pytest.raises(ValueError, match="do not apply to classification"):
        custom_task(["text"], 2, metrics=["pearson"])
    with pytest.raises(ValueError, match="non-empty subset"):
        custom_task(["text"], 2, metrics=["bleu"])
    with pytest.raises(ValueError, match="1 text column"):
        custom_task(["a", "b", "c"], 2)


# --- files -> splits -> tokens ---


PIPELINE_CASES = [(name, "csv") for name in sorted(GLUE_TASKS)] + [
    (name, fmt) for name in ("mrpc", "stsb") for fmt in ("jsonl", "parquet")
]


@pytest.mark.parametrize(("name", "fmt"), PIPELINE_CASES)
def test_glue_files_load_prepare_and_tokenize(name, fmt, tmp_path, tokenizer):
    task = get_task(name)
    train_file, validation_file = write_glue_files(name, tmp_path, fmt=fmt)
    raw = load_raw_splits(task, str(train_file), str(validation_file))
    assert list(raw) == ["train", task.validation_splits[0]]
    assert raw["train"].column_names == [*task.text_columns, "label", "idx"]

    splits = prepare_splits(raw, task)
    for split, dataset in splits.items():
        assert dataset.column_names == [*task.text_columns, "labels"]
        assert dataset["labels"][:] == pytest.approx(raw[split]["label"][:])
    labels = splits["train"].features["labels"]
    if task.is_regression:
        assert labels == datasets.Value("float32")
    else:
        assert labels == datasets.ClassLabel(names=list(task.label_names)) and labels.dtype == "int64"

    tokenized = tokenize_splits(splits, tokenizer, task.text_columns, max_length=12)
    train = tokenized["train"]
    assert set(train.column_names) == {"labels", "input_ids", "token_type_ids", "attention_mask"}
    ids = train["input_ids"][:]
    assert max(map(len, ids)) <= 12 and tokenizer.unk_token_id not in {i for row in ids for i in row}
    assert (max(max(row) for row in train["token_type_ids"][:]) == 1) == (len(task.text_columns) == 2)
    expected = torch.float32 if task.is_regression else torch.int64
    assert train.with_format("torch")["labels"][:].dtype == expected


def test_string_labels_map_through_task_names_or_sorted_training_labels():
    sst2 = prepare_splits(
        split_dict(train={"sentence": ["a", "b"], "label": ["positive", "negative"]},
                   validation={"sentence": ["c"], "label": ["negative"]}),
        get_task("sst2"),
    )
    assert sst2["train"]["labels"][:] == [1, 0] and sst2["validation"]["labels"][:] == [0]
    custom = prepare_splits(
        split_dict(
            train={"text": ["a", "b", "c"], "y": ["spam", "ham", "eggs"]}, validation={"text": ["d"], "y": ["spam"]}
        ),
        custom_task(["text"], 3),
        label_column="y",
    )
    assert custom["train"].features["labels"].names == ["eggs", "ham", "spam"]
    assert custom["train"]["labels"][:] == [2, 1, 0] and custom["validation"]["labels"][:] == [2]


# --- bad input, caught before training ---


def test_missing_file_and_unknown_extension(tmp_path):
    task = get_task("sst2")
    train_file, validation_file = write_glue_files("sst2", tmp_path)
    with pytest.raises(FileNotFoundError, match="nowhere.csv"):
        load_raw_splits(task, str(tmp_path / "nowhere.csv"), str(validation_file))
    with pytest.raises(ValueError, match=r"\.csv, \.json, \.jsonl, \.parquet"):
        load_raw_splits(task, str(train_file), str(tmp_path / "validation.tsv"))
    with pytest.raises(ValueError, match="both train_file and validation_file"):
        load_raw_splits(task, str(train_file))
    with pytest.raises(ValueError, match="not a GLUE task"):
        load_raw_splits(custom_task(["sentence"], 2))


GOOD_VALIDATION = {"sentence": ["c", "d"], "label": [0, 1]}
BAD_SPLITS = {
    "unknown text column": (dict(text_columns=["text"]), {}, r"Text column 'text'.*columns are: sentence, label"),
    "missing label column": (dict(label_column="gold"), {}, r"Label column 'gold'.*'train'"),
    "out of range": ({}, {"label": [0, 2]}, r"'train'.*integers in \[0, 2\); found \[2\]"),
    "not an integer": ({}, {"label": [0.0, 0.5]}, r"found \[0\.5\]"),
    "some -1": ({}, {"label": [-1, 1]}, r"found \[-1\] \(-1 marks rows without a gold label"),
    "all -1": ({}, {"label": [-1, -1]}, "'train'.*no gold labels"),
    "missing text": ({}, {"sentence": ["a", None]}, "1 rows have no 'sentence' value"),
    "empty split": ({}, {"sentence": [], "label": []}, "Split 'train' is empty"),
}


@pytest.mark.parametrize("case", BAD_SPLITS)
def test_bad_splits_are_rejected(case):
    kwargs, train_changes, message = BAD_SPLITS[case]
    raw = split_dict(train={"sentence": ["a", "b"], "label": [0, 1], **train_changes}, validation=GOOD_VALIDATION)
    with pytest.raises(ValueError, match=message):
        prepare_splits(raw, get_task("sst2"), **kwargs)


def test_bad_string_and_regression_labels_are_rejected():
    with pytest.raises(ValueError, match=r"'validation'.*unseen labels \['maybe'\]"):
        prepare_splits(
            split_dict(train={"t": ["a", "b"], "label": ["yes", "no"]}, validation={"t": ["c"], "label": ["maybe"]}),
            custom_task(["t"], 2),
        )
    with pytest.raises(ValueError, match="1 distinct labels.*num_labels=2"):
        prepare_splits(split_dict(train={"t": ["a", "b"], "label": ["yes", "yes"]}), custom_task(["t"], 2))
    stsb = get_task("stsb")
    pair = {"sentence1": ["a", "b"], "sentence2": ["c", "d"]}
    with pytest.raises(ValueError, match="numeric labels, not strings"):
        prepare_splits(split_dict(train={**pair, "label": ["1.0", "2.0"]}), stsb)
    with pytest.raises(ValueError, match="'validation'.*no gold labels"):
        prepare_splits(
            split_dict(train={**pair, "label": [1.0, 2.0]}, validation={**pair, "label": [-1.0, -1.0]}), stsb
        )
