"""Our protocol objects ↔ Flower records. Tensors travel as ArrayRecords (lossless for the
float32/int tensors methods exchange), scalars as ConfigRecord/MetricRecord values."""

from __future__ import annotations

from flwr.app import ArrayRecord

from fedlora.algorithms.base import Tensors

MERGE_PREFIX = "merge-"


def to_arrays(tensors: Tensors) -> ArrayRecord:
    return ArrayRecord(torch_state_dict={k: v.detach().contiguous() for k, v in tensors.items()})


def from_arrays(record: ArrayRecord) -> Tensors:
    return dict(record.to_torch_state_dict())


def merge_key(round_: int) -> str:
    """RecordDict key of round `round_`'s base update in a catch-up message."""
    return f"{MERGE_PREFIX}{round_:04d}"
