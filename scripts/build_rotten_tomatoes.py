"""Build ``fish_peft/data/rotten_tomatoes.tsv.gz`` from the vaderSentiment 3.3.2 sdist.

Reads ``hutto_ICWSM_2014/movieReviewSnippets_GroundTruth.txt`` (tab-separated: id,
mean rating in [-4, 4], sentence) from ``additional_resources/hutto_ICWSM_2014.tar.gz``
inside the sdist, labels sentences 1 if rating > 0.5 and 0 if rating < -0.5, drops the
rest, and writes a gzip TSV (``sentence, label, rating``) in the original order. Text
and rating strings are copied verbatim. The output is byte-for-byte reproducible.

Usage: python scripts/build_rotten_tomatoes.py path/to/vaderSentiment-3.3.2.tar.gz
"""

import argparse
import gzip
import io
import tarfile
from pathlib import Path

INNER_ARCHIVE = "vaderSentiment-3.3.2/additional_resources/hutto_ICWSM_2014.tar.gz"
SNIPPETS = "hutto_ICWSM_2014/movieReviewSnippets_GroundTruth.txt"
OUTPUT = Path(__file__).resolve().parents[1] / "fish_peft" / "data" / "rotten_tomatoes.tsv.gz"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("sdist", type=Path, help="path to vaderSentiment-3.3.2.tar.gz")
    args = parser.parse_args()

    with tarfile.open(args.sdist) as sdist:
        inner = sdist.extractfile(INNER_ARCHIVE).read()
    with tarfile.open(fileobj=io.BytesIO(inner)) as archive:
        text = archive.extractfile(SNIPPETS).read().decode("utf-8")

    lines = ["sentence\tlabel\trating"]
    counts = {0: 0, 1: 0, "neutral": 0}
    for row in text.splitlines():
        _, rating, sentence = row.split("\t")
        value = float(rating)
        if -0.5 <= value <= 0.5:
            counts["neutral"] += 1
            continue
        label = int(value > 0.5)
        counts[label] += 1
        lines.append(f"{sentence}\t{label}\t{rating}")

    payload = ("\n".join(lines) + "\n").encode("utf-8")
    OUTPUT.write_bytes(gzip.compress(payload, compresslevel=9, mtime=0))
    print(f"wrote {OUTPUT} ({OUTPUT.stat().st_size} bytes): "
          f"positive={counts[1]} negative={counts[0]} dropped neutral={counts['neutral']}")


if __name__ == "__main__":
    main()
