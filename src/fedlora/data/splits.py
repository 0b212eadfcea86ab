"""Seeded train/test splits for datasets that ship without one (FPB, Dolly, Alpaca, custom)."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np


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
