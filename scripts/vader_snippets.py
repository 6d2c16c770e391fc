"""Read the sentiment-rated sentences that the vaderSentiment 3.3.2 source distribution ships (MIT licence).

``additional_resources/hutto_ICWSM_2014.tar.gz`` inside the sdist holds ``<corpus>_GroundTruth.txt`` files for the
corpora ``movieReviewSnippets``, ``amazonReviewSnippets``, ``nytEditorialSnippets`` and ``tweets``: tab-separated id,
mean human rating in [-4, 4], sentence. Get the sdist offline from PyPI with
``pip download --no-deps --no-binary :all: vaderSentiment==3.3.2``.
"""

import io
import tarfile
from pathlib import Path

INNER_ARCHIVE = "vaderSentiment-3.3.2/additional_resources/hutto_ICWSM_2014.tar.gz"
NEUTRAL_BAND = 0.5  # |rating| <= this is neither positive nor negative: dropped


def read_ground_truth(sdist: Path, corpus: str) -> str:
    """The text of ``hutto_ICWSM_2014/<corpus>_GroundTruth.txt`` inside the sdist."""
    with tarfile.open(sdist) as archive:
        inner = archive.extractfile(INNER_ARCHIVE).read()
    with tarfile.open(fileobj=io.BytesIO(inner)) as archive:
        return archive.extractfile(f"hutto_ICWSM_2014/{corpus}_GroundTruth.txt").read().decode("utf-8")


def labelled_sentences(text: str) -> tuple[list[tuple[str, int, str]], int]:
    """``(sentence, label, rating)`` in file order, 1 if rating > 0.5 and 0 if rating < -0.5, with the rating string
    verbatim; and how many neutral sentences were dropped."""
    rows, neutral = [], 0
    for line in text.splitlines():
        if not line.strip():
            continue
        _, rating, sentence = line.split("\t")
        if abs(float(rating)) <= NEUTRAL_BAND:
            neutral += 1
        else:
            rows.append((sentence, int(float(rating) > NEUTRAL_BAND), rating))
    return rows, neutral
