"""Packaged Rotten Tomatoes sentence-sentiment data for demos and tests (works offline).

See ``fish_peft/data/README.md`` for provenance, labelling rule and licence.
"""

import gzip
import random
from importlib.resources import files


def load_rotten_tomatoes() -> list[tuple[str, int]]:
    """Return the 10,043 ``(sentence, label)`` pairs (1 positive, 0 negative) in file order."""
    raw = files("fish_peft.data").joinpath("rotten_tomatoes.tsv.gz").read_bytes()
    lines = gzip.decompress(raw).decode("utf-8").splitlines()[1:]
    return [(sentence, int(label)) for sentence, label, _ in (line.split("\t") for line in lines)]


def split_rotten_tomatoes(
    validation_size: int = 1000, seed: int = 0
) -> tuple[list[tuple[str, int]], list[tuple[str, int]]]:
    """Shuffle deterministically with ``random.Random(seed)`` and return ``(train, validation)``."""
    data = load_rotten_tomatoes()
    random.Random(seed).shuffle(data)
    return data[validation_size:], data[:validation_size]
