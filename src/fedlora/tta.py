"""Time-to-accuracy: how much simulated time, rounds and uplink a method needs to reach a target.

Read from each run's metrics.jsonl: the first evaluated round whose test accuracy is at least
the target, and the cumulative simulated seconds (`sim_seconds`, the clock in fedlora.clock),
real wall seconds and uplink bytes (all clients) up to and including that round. A method
that never reaches the target reports None ("not reached"), never a guess.
"""

from __future__ import annotations

import csv
import statistics
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from fedlora.plots import accuracy_curves

Records = list[dict[str, Any]]
TTA_KEYS = ("round", "sim_seconds", "wall_seconds", "uplink_bytes")


def time_to_accuracy(records: Records, target: float) -> dict[str, float] | None:
    """Round, cumulative sim seconds, wall seconds and uplink bytes at the first round with
    accuracy >= target; None when no evaluated round reaches it. A cost no record carries
    (a run from before the clock has no `sim_seconds`) is None, not 0."""
    sums = dict.fromkeys(TTA_KEYS[1:], 0.0)
    carried: set[str] = set()
    for rec in records:
        for key in sums:
            if rec.get(key) is not None:
                carried.add(key)
                sums[key] += float(rec[key])
        if rec.get("accuracy") is not None and rec["accuracy"] >= target:
            return {"round": float(rec["round"]), **{k: v if k in carried else None for k, v in sums.items()}}
    return None


def default_target(histories: Mapping[str, list[Records]], share: float = 0.95) -> float | None:
    """`share` × the lowest best accuracy over methods and seeds: a level every run reaches."""
    bests = [max(r["accuracy"] for r in recs if r.get("accuracy") is not None)
             for runs in histories.values() for recs in runs
             if any(r.get("accuracy") is not None for r in recs)]
    return share * min(bests) if bests else None


def tta_rows(histories: Mapping[str, list[Records]], target: float) -> list[dict[str, Any]]:
    """Per method: means over the seeds that reached the target, and how many did. The speed-up
    column is the first method's advantage: this method's sim time ÷ the first method's."""
    rows = []
    for method, runs in histories.items():
        hits = [t for t in (time_to_accuracy(recs, target) for recs in runs) if t is not None]
        row: dict[str, Any] = {"method": method, "reached": f"{len(hits)}/{len(runs)}"}
        every = len(hits) == len(runs) and hits
        for key in TTA_KEYS:
            values = [h[key] for h in hits]
            row[key] = statistics.fmean(values) if every and None not in values else None
        rows.append(row)
    first = rows[0]["sim_seconds"] if rows else None
    for row in rows:
        row["speedup_of_first"] = row["sim_seconds"] / first if first and row["sim_seconds"] else None
    return rows


def _fmt(x: float | None, spec: str, reached: bool) -> str:
    """A missing number: "not reached" when the target was not, "–" when the run lacks that cost."""
    return format(x, spec) if x is not None else "–" if reached else "not reached"


def write_tta(out: Path, histories: Mapping[str, list[Records]], target: float | None,
              setting: str = "", untuned: float | None = None) -> str:
    """tta.csv and the accuracy-vs-simulated-time figure in `out`; returns the markdown section."""
    target = target if target is not None else default_target(histories)
    if target is None:
        return ""
    rows = tta_rows(histories, target)
    with (out / "tta.csv").open("w", newline="") as fh:
        writer = csv.DictWriter(fh, fieldnames=["method", "reached", *TTA_KEYS, "speedup_of_first"])
        writer.writeheader()
        writer.writerows(rows)
    figure = accuracy_vs_sim_time(histories, out / "accuracy_vs_sim_time.png", target, setting, untuned)
    return f"\n## Time to accuracy\n\n{tta_markdown(rows, target)}\n![{figure.stem}]({figure.name})\n"


def tta_markdown(rows: list[dict[str, Any]], target: float) -> str:
    first = rows[0]["method"] if rows else "–"
    lines = [
        (f"Time to accuracy ≥ {target:.4f} (means over seeds; simulated seconds from the device "
         f"profiles; the last column is {first}'s speed-up: this method's simulated time ÷ {first}'s).\n"),
        f"| method | reached | rounds | simulated s | wall s | uplink MB | speed-up of {first} |",
        "|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        up = None if r["uplink_bytes"] is None else r["uplink_bytes"] / 1e6
        speed = "–" if r["speedup_of_first"] is None else f"{r['speedup_of_first']:.2f}×"
        ok = r["round"] is not None
        lines.append(f"| {r['method']} | {r['reached']} | {_fmt(r['round'], '.1f', ok)} "
                     f"| {_fmt(r['sim_seconds'], '.1f', ok)} | {_fmt(r['wall_seconds'], '.0f', ok)} "
                     f"| {_fmt(up, '.2f', ok)} | {speed} |")
    return "\n".join(lines) + "\n"


def accuracy_vs_sim_time(histories: Mapping[str, list[Records]], path: Path, target: float | None = None,
                         setting: str = "", untuned: float | None = None) -> Path:
    """Accuracy against cumulative simulated seconds (the table's unit) on a log axis, so a
    method whose rounds take far longer does not squeeze the others; the target as a line."""
    return accuracy_curves(histories, path, x_key="sim_seconds", x_unit="seconds", target=target,
                           xlabel="cumulative simulated time (s, log scale)", untuned=untuned,
                           title="Time to accuracy", setting=setting)
