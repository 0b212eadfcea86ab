"""What a SuperNode says about itself in its `query` reply, and the server's check of it.

A node that holds its own data (node config `data-file`) is the only one who knows how many
examples it has and of which classes; the server needs both (the example count weights the
node's update; the label histogram feeds HierFedLoRA's grouping and the per-client metrics).
Nothing a node says is trusted: a report is checked like an update (`NodeReport.from_record`)
and a refused one is logged with its reason; the node then serves no partition.

To add a measured capability (throughput, free memory, link rate): a field here, its record
key in `to_record`, and its check in `from_record`, refusing what cannot be true.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

PARTITION, NUM_PARTITIONS = "partition-id", "num-partitions"
EXAMPLES, LABEL_COUNTS = "num-examples", "label-counts"


class InvalidReport(ValueError):
    """A node's report that cannot be true or does not fit the run; the message says why."""


@dataclass(frozen=True)
class NodeReport:
    """A node's identity and, when it serves its own data, what that data is."""

    partition: int
    num_partitions: int
    examples: int | None = None
    """How many training examples the node holds (None: it cuts a shard of the shared data)."""
    label_counts: tuple[int, ...] | None = None
    """Examples per class (or category), in the run's class order."""

    @property
    def local_data(self) -> bool:
        return self.examples is not None

    def to_record(self) -> dict[str, Any]:
        out: dict[str, Any] = {PARTITION: self.partition, NUM_PARTITIONS: self.num_partitions}
        if self.local_data:
            out.update({EXAMPLES: self.examples, LABEL_COUNTS: list(self.label_counts or ())})
        return out

    @classmethod
    def from_record(cls, info: dict[str, Any], num_clients: int, num_classes: int | None = None,
                    max_examples: int | None = None) -> NodeReport:
        """The report in a `query` reply's `info` record, checked against the run: its partition
        is one of the run's; with `num_classes` (a run on node-local data) it must carry an
        example count in 1..max_examples and one non-negative count per known class summing to it."""
        k, n = info.get(PARTITION), info.get(NUM_PARTITIONS)
        if not (_is_int(k) and _is_int(n)):
            raise InvalidReport(f"malformed partition answer ({PARTITION}={k!r}, {NUM_PARTITIONS}={n!r})")
        if n != num_clients or not 0 <= k < n:
            raise InvalidReport(f"{PARTITION}={k} {NUM_PARTITIONS}={n} does not fit federation.num_clients="
                                f"{num_clients}")
        if num_classes is None:
            return cls(k, n)
        examples, counts = info.get(EXAMPLES), info.get(LABEL_COUNTS)
        if examples is None:
            raise InvalidReport(f"partition {k}: no {EXAMPLES} (the run needs nodes with data-file=PATH)")
        if not _is_int(examples) or examples < 1:
            raise InvalidReport(f"partition {k}: {EXAMPLES}={examples!r} is not a positive integer")
        if max_examples is not None and examples > max_examples:
            raise InvalidReport(f"partition {k}: {EXAMPLES}={examples} exceeds nodes.max_examples={max_examples}")
        if not isinstance(counts, list) or not all(_is_int(c) and c >= 0 for c in counts):
            raise InvalidReport(f"partition {k}: {LABEL_COUNTS} is not a list of non-negative integers")
        if len(counts) != num_classes:
            raise InvalidReport(f"partition {k}: {LABEL_COUNTS} has {len(counts)} classes; the run knows "
                                f"{num_classes}")
        if sum(counts) != examples:
            raise InvalidReport(f"partition {k}: {LABEL_COUNTS} sum to {sum(counts)}, not {EXAMPLES}={examples}")
        return cls(k, n, examples, tuple(counts))


def _is_int(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)
