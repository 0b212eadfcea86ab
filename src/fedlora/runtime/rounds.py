"""Round bookkeeping shared by every runtime (in-process, Flower): accepting a client's update.

The transports differ only in how a payload reaches a client and how its update comes
back; the server validates it and records it here, the same way whichever way it came,
so a Flower run and an in-process run of the same config produce the same numbers.

Nothing a client sends is trusted: `accept_update` checks one update on its own (dtype,
names, shapes, finiteness, its metrics, its example count against the server's partition
table), `screen_norms` has the aggregation pipeline screen the updates of one round (stage)
against each other (fedlora.aggregation: the norm bound relative to their median). A refused update is logged with its reason and
listed in the round's `rejected` record of metrics.jsonl; the round goes on with the others.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass, field, replace
from typing import Any

from fedlora.aggregation import screen
from fedlora.algorithms.base import InvalidUpdate, Message, Tensors, Update
from fedlora.costs import cost_percent, tensor_bytes

log = logging.getLogger("fedlora")

REQUIRED_METRICS = ("train_loss", "trained_params", "uploaded_params")


@dataclass
class Accepted:
    """An update that passed the per-update checks, its per-client record, and (in-process)
    the client's new private state, kept only if the update also passes the round's checks."""

    update: Update
    record: dict[str, Any]
    client_state: Tensors | None = None


@dataclass
class Job:
    """One client's turn in a stage: its lane (group), id and payload."""

    lane: int
    client: int
    payload: Message


@dataclass
class Result:
    """What a transport brings back for one job: the update (in-process also the client's new
    private state), or the reason there is none (`failure`: no node, no reply, a client error)."""

    update: Update | None = None
    failure: str | None = None
    seconds: float = 0.0
    flops: float = 0.0
    """Training FLOPs the client reports (the simulated clock's input)."""
    client_state: Tensors | None = None
    record: dict[str, Any] = field(default_factory=dict)
    """Fields the transport adds to the client's record (Flower: the client state's digest)."""


def reject(round_: int, client: int, reason: str, rejected: list[dict[str, Any]]) -> None:
    """Log a refused update (or a failed client) and list it in the round's `rejected`."""
    log.warning("round %d: rejected the update of client %d: %s", round_, client, reason)
    rejected.append({"client": client, "reason": reason})


def check_metrics(metrics: dict[str, Any]) -> None:
    """The client's reported metrics feed the round's records and costs: finite numbers, the
    required ones present, parameter counts not negative."""
    missing = [k for k in REQUIRED_METRICS if k not in metrics]
    if missing:
        raise InvalidUpdate(f"metrics: {missing[0]} missing")
    for key, value in metrics.items():
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
            raise InvalidUpdate(f"metrics: {key}={value!r} is not a finite number")
    for key in ("trained_params", "uploaded_params"):
        if metrics[key] < 0:
            raise InvalidUpdate(f"metrics: {key}={metrics[key]!r} is negative")


def accept_update(
    fed: Any, state: Tensors, round_: int, update: Update, payload: Message, seconds: float,
    rejected: list[dict[str, Any]],
) -> dict[str, Any] | None:
    """Validate one client's update; its per-client record, or None (logged in `rejected`).
    The example count that weights it is the server's own (partition table); a client
    reporting another is refused."""
    expected = fed.algorithm.setup.num_examples[update.client_id]
    try:
        if isinstance(update.num_examples, bool) or update.num_examples != expected:
            raise InvalidUpdate(f"num_examples {update.num_examples!r} differs from the partition table's {expected}")
        fed.algorithm.validate(state, update)
        check_metrics(update.metrics)
    except InvalidUpdate as err:
        reject(round_, update.client_id, str(err), rejected)
        return None
    m = update.metrics
    standard = {"rank", "next_rank", "train_loss", "trained_params", "uploaded_params"}
    return {
        "id": update.client_id,
        "rank": m.get("rank"),
        "next_rank": m.get("next_rank", m.get("rank")),
        "train_loss": m.get("train_loss"),
        "trained_params": int(m["trained_params"]),
        "uploaded_params": int(m["uploaded_params"]),
        "cost_percent": cost_percent(m["trained_params"], m["uploaded_params"], fed.total_params),
        "uplink_bytes": tensor_bytes(update.tensors),
        "downlink_bytes": tensor_bytes(payload.tensors),
        "seconds": seconds,
        **{k: v for k, v in m.items() if k not in standard},  # a method's diagnostics (AFLoRA's λ)
    }


def screen_norms(fed: Any, round_: int, accepted: list[Accepted], rejected: list[dict[str, Any]]) -> list[Accepted]:
    """The pipeline's screening of one round's (stage's) accepted updates (config `aggregation`,
    e.g. the norm bound): a rejected update is logged and listed in `rejected`; a changed one (a
    clip) replaces the original, noted as `clipped` in its client record."""
    verdicts = screen(fed.algorithm, [a.update for a in accepted])
    kept: list[Accepted] = []
    for a, verdict in zip(accepted, verdicts):
        client = a.update.client_id
        if verdict.update is None:
            reject(round_, client, verdict.note, rejected)
        elif verdict.note:
            log.warning("round %d: clipped the update of client %d: %s", round_, client, verdict.note)
            kept.append(replace(a, update=verdict.update, record={**a.record, "clipped": verdict.note}))
        else:
            kept.append(replace(a, update=verdict.update))
    return kept
