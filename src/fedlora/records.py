"""A round's record (one line of metrics.jsonl) and the one summary of a run's records.

Every reader (the run's summary.json, `compare`, time to accuracy, `tune`, the figures, the
report) asks here which rounds were scored and what the final and best accuracy are, so that
"missing" means one thing everywhere: a round whose `accuracy` is absent or null was not scored
(an instruction task without MMLU records only a loss).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
from pydantic import BaseModel, ConfigDict, Field

Record = Mapping[str, Any]
"""One round's record as read from metrics.jsonl (checked by runtime.outputs.read_metrics)."""


class RoundRecord(BaseModel):
    """What every round writes to metrics.jsonl, whichever runtime ran it. A method's own
    diagnostics (λ movement, AFLoRA's server losses, HierFedLoRA's tilt, ...) ride along as
    extra fields; the runtime checks each record against this model before writing it."""

    model_config = ConfigDict(extra="allow")

    round: int = Field(ge=0)
    """The round's number."""
    clients: list[dict[str, Any]]
    """One entry per accepted update: `id`, rank, losses, bytes, seconds, FLOPs, stage, lane."""
    rejected: list[dict[str, Any]] = []
    """Updates left out of the round: `client` and `reason`."""
    uplink_bytes: float = Field(ge=0)
    """Bytes the round's clients sent (all clients)."""
    downlink_bytes: float = Field(ge=0)
    """Bytes the server sent the round's clients."""
    wall_seconds: float = Field(ge=0)
    """Real seconds of the whole round."""
    server_seconds: float = Field(ge=0)
    """Real seconds of the server's aggregation (its diagnostics excluded)."""
    sim_seconds: float | None = None
    """The round on the simulated clock (fedlora.clock): the slowest lane plus the server."""
    server_flops: float | None = None
    """FLOPs of the server's training steps this round (AFLoRA's A fine-tuning; 0: none)."""
    server_sim_seconds: float | None = None
    """The server's share of `sim_seconds` (devices.server_time: its FLOPs on devices.server)."""
    train_loss: float | None = None
    """Mean of the accepted clients' training losses (None: no update was accepted)."""
    client_cost_percent: float | None = None
    """Mean client-side cost % (trained or uploaded parameters over the base's)."""
    accuracy: float | None = Field(None, ge=0, le=1)
    """Test (or validation) accuracy of an evaluated round; MMLU's for instruction tasks."""
    test_loss: float | None = None
    """Test loss of an evaluated round (absent: the round was not evaluated)."""
    eval_items: int | None = None
    """Test items the round was evaluated on (federation.eval_subset before the last round)."""
    subset_accuracy: float | None = Field(None, ge=0, le=1)
    """Accuracy on the fixed eval subset (the accuracy curve's point; with eval_subset only)."""
    perplexity: float | None = None
    """Instruction tasks: test perplexity of an evaluated round."""
    devices: list[dict[str, Any]] | None = None
    """Round 1 of a `devices: measured` run (Flower): each client's device as its node reported it
    (`client`, `throughput` FLOP/s, `free_memory` bytes, `uplink_mbps`, `downlink_mbps`, `sources`)."""


def is_scored(record: Record) -> bool:
    """Whether the round has an accuracy: the one test of "missing" every reader uses."""
    return record.get("accuracy") is not None


def scored_rounds(records: Sequence[Record]) -> list[Record]:
    """The rounds with an accuracy, in round order."""
    return [r for r in records if is_scored(r)]


def accuracies(records: Sequence[Record]) -> list[float]:
    """The scored rounds' accuracies, in round order."""
    return [r["accuracy"] for r in scored_rounds(records)]


def loss_evaluated(records: Sequence[Record]) -> list[Record]:
    """The rounds with a test loss (every evaluated round, scored or not), in round order."""
    return [r for r in records if r.get("test_loss") is not None]


@dataclass(frozen=True)
class AccuracySummary:
    """Final and best accuracy of one run; all None when no round was scored."""

    final: float | None
    final_round: int | None
    best: float | None
    best_round: int | None
    """The first round of equal bests."""
    auc: float | None = None
    """The normalised area under the accuracy curve (`accuracy_auc`)."""


def accuracy_summary(records: Sequence[Record]) -> AccuracySummary:
    rounds = scored_rounds(records)
    if not rounds:
        return AccuracySummary(None, None, None, None)
    best = max(rounds, key=lambda r: r["accuracy"])
    return AccuracySummary(rounds[-1]["accuracy"], rounds[-1]["round"], best["accuracy"], best["round"],
                           accuracy_auc(records))


def curve_accuracy(record: Record) -> float | None:
    """A round's point on the accuracy curve: the eval subset's accuracy when the run has one
    (federation.eval_subset: the same items every round), else the round's accuracy."""
    return record.get("subset_accuracy", record.get("accuracy"))


def accuracy_auc(records: Sequence[Record]) -> float | None:
    """Area under the accuracy curve, normalised: the mean over evaluated rounds of
    `curve_accuracy` (with evaluation every round, the area under the per-round step curve ÷
    rounds; 1.0 is a model right from round 1). A secondary metric beside final accuracy: it
    rewards learning early and staying up, and moves less with the stopping round."""
    points = [a for r in records if (a := curve_accuracy(r)) is not None]
    return float(np.mean(points)) if points else None


def plateau_round(curve: Sequence[float], gain: float = 0.005, window: int = 3) -> int | None:
    """The first round (1-based) at which a per-round accuracy curve has stopped rising: the mean
    of its last `window` rounds exceeds the mean of the `window` rounds before them by less than
    `gain` (issue 31's pilot rule, 0.5 points over 3 rounds, on window means so that one noisy
    evaluation neither ends nor prolongs it). None: still rising at the curve's end."""
    c = np.asarray(curve, dtype=np.float64)
    for r in range(2 * window, len(c) + 1):
        if c[r - window:r].mean() - c[r - 2 * window:r - window].mean() < gain:
            return r
    return None


def summarize(method: str, records: Sequence[Record]) -> dict[str, Any]:
    """A run's summary.json: what `fedlora run` prints and the readers of a finished run see."""
    acc = accuracy_summary(records)
    evaluated = loss_evaluated(records)
    last_eval = evaluated[-1] if evaluated else {}
    costs = [r["client_cost_percent"] for r in records if r.get("client_cost_percent") is not None]
    return {
        "method": method,
        "rounds": len(records),
        "final_accuracy": acc.final,
        "best_accuracy": acc.best,
        "best_round": acc.best_round,
        "accuracy_auc": acc.auc,
        "final_test_loss": last_eval.get("test_loss"),
        **({"final_perplexity": last_eval["perplexity"]} if "perplexity" in last_eval else {}),
        "mean_client_cost_percent": float(np.mean(costs)) if costs else None,
        "total_uplink_bytes": int(sum(r["uplink_bytes"] for r in records)),
        "total_downlink_bytes": int(sum(r["downlink_bytes"] for r in records)),
        "wall_seconds": float(sum(r["wall_seconds"] for r in records)),
        "rejected_updates": int(sum(len(r.get("rejected", [])) for r in records)),
        # the privacy spent (fedlora.privacy): ε at δ after the last round
        **{k: records[-1][k] for k in ("privacy_epsilon", "privacy_delta") if records and k in records[-1]},
    }
