"""What a SuperNode says about itself in its `query` reply, and the server's check of it.

A node that holds its own data (node config `data-file`) is the only one who knows how many
examples it has and of which classes; the server needs both (the example count weights the
node's update; the label histogram feeds HierFedLoRA's grouping and the per-client metrics).
Nothing a node says is trusted: a report is checked like an update (`NodeReport.from_record`)
and a refused one is logged with its reason; the node then serves no partition.

A run with `devices: measured` also asks each node what it can do (a `Capability`: training
throughput, free memory, link rates, each measured on the node or declared in its node
config); the server refuses figures that cannot be true (not a finite positive number, beyond
any device, of the wrong type) with the reason, logged like any refused report.

To add a measured capability: a field of `Capability`, its record key in `to_record`, and its
check in `capability_from_record`, refusing what cannot be true.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

from fedlora.devices import MAX_LINK_MBPS, MAX_MEMORY, MAX_THROUGHPUT, SOURCES

PARTITION, NUM_PARTITIONS = "partition-id", "num-partitions"
EXAMPLES, LABEL_COUNTS = "num-examples", "label-counts"
THROUGHPUT, FREE_MEMORY, UPLINK, DOWNLINK = "throughput", "free-memory", "uplink-mbps", "downlink-mbps"
SOURCES_KEY = "capability-sources"
CAPABILITY_LIMITS = {THROUGHPUT: MAX_THROUGHPUT, FREE_MEMORY: MAX_MEMORY, UPLINK: MAX_LINK_MBPS,
                     DOWNLINK: MAX_LINK_MBPS}
"""Each figure's record key and the largest value a real device could report."""
FIELD_OF = {THROUGHPUT: "throughput", FREE_MEMORY: "free_memory", UPLINK: "uplink_mbps", DOWNLINK: "downlink_mbps"}


class InvalidReport(ValueError):
    """A node's report that cannot be true or does not fit the run; the message says why."""


@dataclass(frozen=True)
class Capability:
    """What a node can do: the figures of `devices: measured` (fedlora.devices.MeasuredDevice)."""

    throughput: float
    """Training throughput in FLOP/s."""
    free_memory: float | None = None
    """Free memory in bytes."""
    uplink_mbps: float | None = None
    downlink_mbps: float | None = None
    """Link rates in Mbit/s (None: not known to the node; the server assumes the reference preset's)."""
    sources: tuple[tuple[str, str], ...] = ()
    """(figure, how) pairs: `measured` on the node or `declared` in its node config."""

    def to_record(self) -> dict[str, Any]:
        out: dict[str, Any] = {}
        for key, name in FIELD_OF.items():
            if getattr(self, name) is not None:
                out[key] = float(getattr(self, name))
        out[SOURCES_KEY] = [f"{name}={how}" for name, how in self.sources]
        return out


def capability_from_record(info: dict[str, Any], partition: int) -> Capability:
    """A node's capability figures, refused (InvalidReport, with the reason) unless each is a
    finite number in (0, the most any device has]; throughput is required, the rest optional."""
    values: dict[str, float | None] = {}
    for key, limit in CAPABILITY_LIMITS.items():
        value = info.get(key)
        if value is None and key != THROUGHPUT:
            values[FIELD_OF[key]] = None
            continue
        if value is None:
            raise InvalidReport(f"partition {partition}: no {THROUGHPUT} (the run has devices: measured)")
        shown = repr(value)[:80]
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise InvalidReport(f"partition {partition}: {key}={shown} is not a number")
        try:
            number = float(value)
        except OverflowError:  # an integer beyond any float
            number = math.inf if value > 0 else -math.inf
        if math.isnan(number) or number <= 0 or (number == math.inf and isinstance(value, float)):
            raise InvalidReport(f"partition {partition}: {key}={shown} is not a finite positive number")
        if number > limit:
            raise InvalidReport(f"partition {partition}: {key}={number:g} exceeds what any device has ({limit:g})")
        values[FIELD_OF[key]] = number
    raw = info.get(SOURCES_KEY, [])
    if not isinstance(raw, list) or not all(isinstance(x, str) and len(x) <= 40 for x in raw):
        raise InvalidReport(f"partition {partition}: {SOURCES_KEY} is not a list of short strings")
    sources = []
    for item in raw:
        name, _, how = item.partition("=")
        if name not in FIELD_OF.values() or how not in SOURCES[:2] or values.get(name) is None:
            raise InvalidReport(f"partition {partition}: {SOURCES_KEY}: {item!r} names no reported figure "
                                "as measured or declared")
        sources.append((name, how))
    return Capability(sources=tuple(sources), **values)  # type: ignore[arg-type]


@dataclass(frozen=True)
class NodeReport:
    """A node's identity and, when it serves its own data, what that data is (and, when the
    run asks, what the node can do)."""

    partition: int
    num_partitions: int
    examples: int | None = None
    """How many training examples the node holds (None: it cuts a shard of the shared data)."""
    label_counts: tuple[int, ...] | None = None
    """Examples per class (or category), in the run's class order."""
    capability: Capability | None = None
    """Throughput, memory and link rates (a run with `devices: measured` asks for them)."""

    @property
    def local_data(self) -> bool:
        return self.examples is not None

    @property
    def data(self) -> tuple[int | None, tuple[int, ...] | None]:
        """What the node holds: a node that rejoins must hold the same."""
        return self.examples, self.label_counts

    def to_record(self) -> dict[str, Any]:
        out: dict[str, Any] = {PARTITION: self.partition, NUM_PARTITIONS: self.num_partitions}
        if self.local_data:
            out.update({EXAMPLES: self.examples, LABEL_COUNTS: list(self.label_counts or ())})
        if self.capability is not None:
            out.update(self.capability.to_record())
        return out

    @classmethod
    def from_record(cls, info: dict[str, Any], num_clients: int, num_classes: int | None = None,
                    max_examples: int | None = None, capability: bool = False) -> NodeReport:
        """The report in a `query` reply's `info` record, checked against the run: its partition
        is one of the run's; with `num_classes` (a run on node-local data) it must carry an
        example count in 1..max_examples and one non-negative count per known class summing to it;
        with `capability` (or when the record carries a throughput) the figures must be possible."""
        k, n = info.get(PARTITION), info.get(NUM_PARTITIONS)
        if not (_is_int(k) and _is_int(n)):
            raise InvalidReport(f"malformed partition answer ({PARTITION}={k!r}, {NUM_PARTITIONS}={n!r})")
        if n != num_clients or not 0 <= k < n:
            raise InvalidReport(f"{PARTITION}={k} {NUM_PARTITIONS}={n} does not fit federation.num_clients="
                                f"{num_clients}")
        cap = capability_from_record(info, k) if capability or any(key in info for key in CAPABILITY_LIMITS) else None
        if num_classes is None:
            return cls(k, n, capability=cap)
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
        return cls(k, n, examples, tuple(counts), cap)


def _is_int(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)
