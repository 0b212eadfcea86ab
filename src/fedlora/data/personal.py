"""Personalised evaluation's data: each client keeps a seeded held-out part of its own shard.

The part comes from the client's training pool (never from the global test set) and is taken
out before any training, so the client never trains on it. Same seed ⇒ same parts, whatever
the method: every method's clients are judged on the same items, so methods can be compared
item by item (paired). An item is named by its row in the run's seeded training pool, which
no two clients share.
"""

from __future__ import annotations

import math

import numpy as np

from fedlora.errors import ConfigError

STREAM = 0x9E75  # the held-out draw's own random stream, apart from partitioning and batches


def personal_holdout(parts: list[list[int]], fraction: float, seed: int) -> tuple[list[list[int]], list[list[int]]]:
    """(training parts, held-out parts): client k holds out round(fraction · |D_k|) of its
    examples, at least 1 and at most |D_k| − 1, drawn with its own seeded stream; both lists
    keep the shard's order."""
    train, held = [], []
    for k, part in enumerate(parts):
        if len(part) < 2:
            raise ConfigError(f"config error: evaluation.personalized: client {k} has {len(part)} example(s); "
                              "each client needs at least 2 (one to train on, one to hold out)")
        count = min(len(part) - 1, max(1, math.floor(fraction * len(part) + 0.5)))
        rng = np.random.default_rng(np.random.SeedSequence([seed, k, STREAM]))
        chosen = set(rng.choice(len(part), size=count, replace=False).tolist())
        held.append([i for j, i in enumerate(part) if j in chosen])
        train.append([i for j, i in enumerate(part) if j not in chosen])
    return train, held
