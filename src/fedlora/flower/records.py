"""Our protocol objects ↔ Flower records. Tensors travel as ArrayRecords (lossless for the
float32/int tensors methods exchange), scalars as ConfigRecord/MetricRecord values."""

from __future__ import annotations

import re

from flwr.app import ArrayRecord

from fedlora.algorithms.base import Tensors

MERGE_PREFIX = "merge-"
RUN_KEY = re.compile(r"[0-9a-f]{32}")  # uuid4().hex: also a safe directory name on the client


def checked_run_key(key: object) -> str:
    """The run key, if it is one: it names a directory, so `../x` or `/etc` must never pass."""
    from fedlora.files import safe_name  # (torch-free callers import this module)

    if not isinstance(key, str) or not RUN_KEY.fullmatch(key) or safe_name(key, "run-key") != key:
        raise ValueError(f"run-key {str(key)[:80]!r}: not a run key (32 lowercase hex digits); refused")
    return key


def to_arrays(tensors: Tensors) -> ArrayRecord:
    return ArrayRecord(torch_state_dict={k: v.detach().contiguous() for k, v in tensors.items()})


def from_arrays(record: ArrayRecord) -> Tensors:
    return dict(record.to_torch_state_dict())


def merge_key(round_: int) -> str:
    """RecordDict key of round `round_`'s base update in a catch-up message."""
    return f"{MERGE_PREFIX}{round_:04d}"
