"""Write the Amazon product-review sentences of the vaderSentiment 3.3.2 sdist as a train and a validation CSV.

fish-peft's second offline sentiment dataset (the first, Rotten Tomatoes, is the demo's): 2,943 review sentences
(``amazonReviewSnippets``, see ``vader_snippets.py``) labelled 1 if the mean human rating > 0.5 and 0 if < -0.5,
the neutral ones dropped, shuffled with ``random.Random(0)``; the first 600 are the validation split. Columns
``sentence,label``, for ``task: custom`` (recipes/amazon_reviews.yaml).

Usage: python scripts/build_amazon_reviews.py path/to/vaderSentiment-3.3.2.tar.gz [--output-dir outputs/data/amazon_reviews]
"""

import argparse
import csv
import random
from pathlib import Path

from vader_snippets import labelled_sentences, read_ground_truth

VALIDATION_SIZE = 600


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("sdist", type=Path, help="path to vaderSentiment-3.3.2.tar.gz")
    parser.add_argument("--output-dir", type=Path, default=Path("outputs/data/amazon_reviews"))
    args = parser.parse_args()

    rows, neutral = labelled_sentences(read_ground_truth(args.sdist, "amazonReviewSnippets"))
    random.Random(0).shuffle(rows)
    args.output_dir.mkdir(parents=True, exist_ok=True)
    for split, part in (("validation", rows[:VALIDATION_SIZE]), ("train", rows[VALIDATION_SIZE:])):
        path = args.output_dir / f"{split}.csv"
        with path.open("x", newline="", encoding="utf-8") as file:  # never over someone's file
            writer = csv.writer(file)
            writer.writerow(["sentence", "label"])
            writer.writerows((sentence, label) for sentence, label, _ in part)
        positive = sum(label for _, label, _ in part)
        print(f"wrote {path}: {len(part)} sentences, positive={positive} negative={len(part) - positive}")
    print(f"dropped neutral={neutral}")


if __name__ == "__main__":
    main()
