"""What the data must satisfy before training: checked on the pool and test subset a run
really uses, so a wrong file stops with one line instead of a meaningless score."""

from __future__ import annotations

import logging
from collections.abc import Sequence
from typing import TYPE_CHECKING

from fedlora.errors import ConfigError, DataError

if TYPE_CHECKING:
    from fedlora.config import DataConfig

log = logging.getLogger("fedlora")


def train_source(d: DataConfig) -> str:
    """The field (and file) the training pool comes from, for messages."""
    if d.hub_name is not None:
        return f"data.hub_name: {d.hub_name}"
    if d.train_file is not None:
        return f"data.train_file: {d.train_file}"
    return f"data.dataset: {d.dataset} in {d.data_dir}"


def check_examples(d: DataConfig, train: Sequence[int], test: Sequence[int], names: list[str]) -> None:
    """Labels of the training pool and test subset (class, or category of instruction data)."""
    if not len(train):
        raise DataError(f"data error: {train_source(d)}: no training examples (all rows went to the test split?)")
    if not len(test):
        raise DataError(f"data error: {d.test_file or train_source(d)}: no test examples")
    if d.task != "classification":
        return
    words = d.label_words or names
    if len(words) != len(names):
        raise ConfigError(f"config error: data.label_words: {len(words)} words for {len(names)} classes "
                          f"({', '.join(names)}); give one per class, or null for the class names")
    seen = sorted(set(train))
    if len(seen) < 2:
        raise DataError(f"data error: {train_source(d)}: the training data has one class ({names[seen[0]]!r}); "
                        "classification needs at least two")
    unseen = sorted(set(test) - set(seen))
    if unseen:
        test_from = f"data.test_file: {d.test_file}" if d.test_file else train_source(d)
        raise DataError(f"data error: {test_from}: test label {names[unseen[0]]!r} never occurs in the "
                        "training data (no client could learn it)")


def warn_small_clients(sizes: Sequence[int], batch_size: int) -> list[int]:
    """Clients with fewer examples than one batch: their batches repeat examples. Allowed
    (the training is well defined), but said loudly; returns those clients."""
    small = [k for k, n in enumerate(sizes) if n < batch_size]
    if small:
        shown = ", ".join(f"{k} ({sizes[k]})" for k in small[:10]) + (" ..." if len(small) > 10 else "")
        log.warning("federation.batch_size: %d is more than the examples of %d client(s): %s; "
                    "their batches repeat examples (lower batch_size or give them more data)",
                    batch_size, len(small), shown)
    return small
