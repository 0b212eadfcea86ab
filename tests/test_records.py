"""The one round record and the one summary every reader uses (fedlora.records)."""

from __future__ import annotations

from pathlib import Path

import pytest
from pydantic import ValidationError

from fedlora.compare import method_row
from fedlora.files import read_json
from fedlora.records import RoundRecord, accuracies, accuracy_summary, loss_evaluated, summarize
from fedlora.runtime.outputs import read_metrics, write_metrics
from fedlora.tta import default_target, time_to_accuracy
from fedlora.tune import validation_scores

DOCS = Path(__file__).resolve().parents[1] / "docs"


def _record(round_: int, **fields) -> dict:
    return {"round": round_, "clients": [], "rejected": [], "uplink_bytes": 10, "downlink_bytes": 20,
            "wall_seconds": 1.0, "server_seconds": 0.5, "client_cost_percent": 1.0, **fields}


# round 1 not evaluated, 2 scored, 3 evaluated with a null accuracy, 4 and 5 tie for best, 6 has only a loss
HISTORY = [
    _record(1),
    _record(2, accuracy=0.5, test_loss=1.0),
    _record(3, accuracy=None, test_loss=0.9),
    _record(4, accuracy=0.7, test_loss=0.8),
    _record(5, accuracy=0.7, test_loss=0.7),
    _record(6, accuracy=0.6, test_loss=0.6, perplexity=2.0),
    _record(7),
]


def test_accuracy_summary_reads_missing_and_null_alike():
    acc = accuracy_summary(HISTORY)
    assert (acc.final, acc.final_round, acc.best, acc.best_round) == (0.6, 6, 0.7, 4)  # first of equal bests
    assert accuracies(HISTORY) == [0.5, 0.7, 0.7, 0.6]
    assert [r["round"] for r in loss_evaluated(HISTORY)] == [2, 3, 4, 5, 6]
    none = accuracy_summary([_record(1), _record(2, accuracy=None, test_loss=1.0)])
    assert (none.final, none.best, none.best_round) == (None, None, None)


def test_every_reader_agrees_with_the_summary():
    summary = summarize("fedit", HISTORY)
    assert (summary["final_accuracy"], summary["best_accuracy"], summary["best_round"]) == (0.6, 0.7, 4)
    assert summary["final_test_loss"] == 0.6 and summary["final_perplexity"] == 2.0
    row = method_row("fedit", [HISTORY])
    assert (row["final_accuracy_mean"], row["best_accuracy_mean"]) == (0.6, 0.7)
    assert default_target({"fedit": [HISTORY]}, share=1.0) == 0.7
    assert time_to_accuracy(HISTORY, 0.7)["round"] == 4.0
    assert validation_scores(HISTORY) == (0.6, 0.6)


def test_summary_equals_every_published_summary():
    """summarize() over a published run's metrics.jsonl gives its summary.json, key for key
    (runs published before a key existed are compared on the keys they have)."""
    published = sorted(DOCS.rglob("summary.json"))
    assert len(published) > 20
    for path in published:
        want = read_json(path)
        got = summarize(want["method"], read_metrics(path.parent))
        assert {k: got.get(k) for k in want} == want, path


def test_write_metrics_checks_each_record_against_the_round_record(tmp_path):
    write_metrics(tmp_path, HISTORY)
    assert read_metrics(tmp_path) == HISTORY
    for bad in ({"accuracy": 1.5}, {"uplink_bytes": None}, {"clients": "0,1"}, {"round": -1}):
        with pytest.raises(ValidationError):
            write_metrics(tmp_path / "bad", [{**HISTORY[1], **bad}])
    extra = _record(1, lambda_moved=0.1)
    assert RoundRecord.model_validate(extra).model_extra == {"lambda_moved": 0.1}
