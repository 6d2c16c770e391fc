"""Build ``fish_peft/data/rotten_tomatoes.tsv.gz`` from the vaderSentiment 3.3.2 sdist.

Reads the movie-review sentences (``movieReviewSnippets``, see ``vader_snippets.py``), labels sentences 1 if rating
> 0.5 and 0 if rating < -0.5, drops the rest, and writes a gzip TSV (``sentence, label, rating``) in the original
order. Text and rating strings are copied verbatim. The output is byte-for-byte reproducible.

Usage: python scripts/build_rotten_tomatoes.py path/to/vaderSentiment-3.3.2.tar.gz
"""

import argparse
import gzip
from pathlib import Path

from vader_snippets import labelled_sentences, read_ground_truth

OUTPUT = Path(__file__).resolve().parents[1] / "fish_peft" / "data" / "rotten_tomatoes.tsv.gz"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("sdist", type=Path, help="path to vaderSentiment-3.3.2.tar.gz")
    args = parser.parse_args()

    rows, neutral = labelled_sentences(read_ground_truth(args.sdist, "movieReviewSnippets"))
    lines = ["sentence\tlabel\trating", *(f"{sentence}\t{label}\t{rating}" for sentence, label, rating in rows)]
    payload = ("\n".join(lines) + "\n").encode("utf-8")
    OUTPUT.write_bytes(gzip.compress(payload, compresslevel=9, mtime=0))
    positive = sum(label for _, label, _ in rows)
    print(f"wrote {OUTPUT} ({OUTPUT.stat().st_size} bytes): "
          f"positive={positive} negative={len(rows) - positive} dropped neutral={neutral}")


if __name__ == "__main__":
    main()
