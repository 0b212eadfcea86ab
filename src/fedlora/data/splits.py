"""Seeded train/test splits for datasets that ship without one (FPB, Dolly, Alpaca, custom)."""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING

import numpy as np

if TYPE_CHECKING:
    from datasets import Dataset

    from fedlora.config import DataConfig


def seeded_split(keys: Sequence[str], test_fraction: float, seed: int) -> tuple[list[int], list[int]]:
    """(train indices, test indices). Rows with identical `keys` land on the same side, so an
    exact duplicate (FPB and Dolly have a few) never sits in both train and test."""
    unique = sorted(set(keys))
    order = np.random.default_rng(seed).permutation(len(unique))
    n_test = max(1, round(test_fraction * len(unique)))
    test_keys = {unique[i] for i in order[:n_test]}
    train = [i for i, k in enumerate(keys) if k not in test_keys]
    test = [i for i, k in enumerate(keys) if k in test_keys]
    return train, test


def split_off_test(ds: Dataset, d: DataConfig) -> tuple[Dataset, Dataset]:
    """(train, test) of a dataset without a test split: `data.test_fraction` of its distinct
    rows, seeded by `data.split_seed`."""
    text_col = "text" if "text" in ds.column_names else "instruction"
    keys = list(ds[text_col])
    if text_col == "instruction":
        keys = [f"{a}\x00{b}\x00{c}" for a, b, c in zip(keys, ds["input"], ds["response"])]
    train, test = seeded_split(keys, d.test_fraction, d.split_seed)
    return ds.select(train), ds.select(test)
