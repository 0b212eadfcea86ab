"""Accuracy broken down: per class, the confusion matrix, and per client (worst-client).

Non-IID training can hurt some classes while the overall accuracy hides it. A client's
accuracy is the global model's test accuracy re-weighted to that client's label mix:
Σ_c π_kc · acc_c, with π_k the share of each class in client k's training data (the
partition table, as in partition.json). It is what client k would measure on a test set
drawn like its own data. Classes absent from the test subset have no accuracy; a client's
mix is renormalised over the classes that have one.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np


def confusion_matrix(labels: np.ndarray, predictions: np.ndarray, num_classes: int) -> np.ndarray:
    """counts[true, predicted]."""
    flat = np.asarray(labels, dtype=np.int64) * num_classes + np.asarray(predictions, dtype=np.int64)
    return np.bincount(flat, minlength=num_classes * num_classes).reshape(num_classes, num_classes)


def class_accuracy(confusion: np.ndarray) -> np.ndarray:
    """Recall of each class (NaN for a class with no test item)."""
    totals = confusion.sum(1)
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(totals > 0, np.diag(confusion) / np.maximum(totals, 1), np.nan)


def client_accuracy(per_class: np.ndarray, partition: Sequence[Sequence[int]]) -> np.ndarray:
    """Per client: Σ_c π_kc · acc_c over the classes with test items (π renormalised over
    them); NaN for a client holding none of those classes."""
    counts = np.asarray(partition, dtype=np.float64)[:, : len(per_class)]
    known = ~np.isnan(per_class)
    mix = counts[:, known]
    totals = mix.sum(1)
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(totals > 0, mix @ per_class[known] / np.maximum(totals, 1), np.nan)


def _finite_or_none(x: float) -> float | None:
    return None if np.isnan(x) else float(x)


def classification_breakdown(
    labels: np.ndarray, predictions: np.ndarray, names: Sequence[str], partition: Sequence[Sequence[int]]
) -> dict[str, Any]:
    """The metrics.jsonl fields: `class_accuracy` {name: acc}, `confusion` (rows: true class,
    columns: predicted, in `names` order), `client_accuracy` (per client), and the minimum
    over clients, `worst_client_accuracy`, with its `worst_client`."""
    confusion = confusion_matrix(labels, predictions, len(names))
    per_class = class_accuracy(confusion)
    out: dict[str, Any] = {
        "class_accuracy": {n: _finite_or_none(a) for n, a in zip(names, per_class)},
        "confusion": confusion.tolist(),
    }
    if len(partition):
        clients = client_accuracy(per_class, partition)
        out["client_accuracy"] = [_finite_or_none(a) for a in clients]
        if not np.isnan(clients).all():
            worst = int(np.nanargmin(clients))
            out.update(worst_client_accuracy=float(clients[worst]), worst_client=worst)
    return out
