"""The scripts that build fish-peft's offline sentiment data from the vaderSentiment sdist label, split and write
it as their docstrings say, and never write over a file that is already there."""

import csv
import io
import subprocess
import sys
import tarfile
from pathlib import Path

import pytest

SCRIPTS = Path(__file__).resolve().parents[1] / "scripts"


def fake_sdist(path: Path, ratings: list[str]) -> Path:
    """A vaderSentiment-3.3.2.tar.gz whose inner archive holds an amazonReviewSnippets file with these ratings."""
    text = "".join(f"1_{i}\t{rating}\tsentence {i}, with a comma\n" for i, rating in enumerate(ratings))
    inner = io.BytesIO()
    with tarfile.open(fileobj=inner, mode="w:gz") as archive:
        add_file(archive, "hutto_ICWSM_2014/amazonReviewSnippets_GroundTruth.txt", text.encode())
    with tarfile.open(path, "w:gz") as sdist:
        add_file(sdist, "vaderSentiment-3.3.2/additional_resources/hutto_ICWSM_2014.tar.gz", inner.getvalue())
    return path


def add_file(archive: tarfile.TarFile, name: str, payload: bytes) -> None:
    info = tarfile.TarInfo(name)
    info.size = len(payload)
    archive.addfile(info, io.BytesIO(payload))


def build(sdist: Path, out: Path) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(SCRIPTS / "build_amazon_reviews.py"), str(sdist), "--output-dir", str(out)],
                          capture_output=True, text=True)


def read_rows(path: Path) -> list[dict]:
    with path.open(newline="", encoding="utf-8") as file:
        return list(csv.DictReader(file))


def test_amazon_reviews_are_labelled_by_rating_split_and_never_written_over(tmp_path):
    ratings = ["-0.5", "0.5", "0.51", "-0.51", "0.0"] + ["2.0", "-3.1"] * 400  # three neutral (|r| <= 0.5)
    sdist = fake_sdist(tmp_path / "vaderSentiment-3.3.2.tar.gz", ratings)
    out = tmp_path / "amazon"
    result = build(sdist, out)
    assert result.returncode == 0, result.stderr
    validation, train = read_rows(out / "validation.csv"), read_rows(out / "train.csv")
    assert (len(validation), len(train)) == (600, 802 - 600)
    labels = {row["sentence"]: int(row["label"]) for row in validation + train}
    assert len(labels) == 802 and "sentence 0, with a comma" not in labels
    assert (labels["sentence 2, with a comma"], labels["sentence 3, with a comma"]) == (1, 0)
    assert sum(labels.values()) == 401

    (out / "train.csv").write_text("the user's own file\n")
    again = build(sdist, out)
    assert again.returncode != 0 and "FileExistsError" in again.stderr
    assert (out / "train.csv").read_text() == "the user's own file\n"
