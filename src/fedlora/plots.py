"""PNG figures from runs' metrics: one function per figure, shared by `compare` and `report`.

Each `series` argument maps a label (a method, or one run) to its list of metrics.jsonl
records (one per round); with several seeds, `runs` maps a label to one list per seed and
the figure shows the mean with a min–max band.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt
import numpy as np

Records = list[dict[str, Any]]


def _evaluated(records: Records, x_key: str | None = None) -> tuple[list[float], list[float]]:
    """(x, accuracy) of the evaluated rounds; x is the round, or a cumulative sum of `x_key`."""
    xs, ys, total = [], [], 0.0
    for rec in records:
        if x_key is not None:
            total += float(rec.get(x_key) or 0)
        if rec.get("accuracy") is not None:
            xs.append(total if x_key else rec["round"])
            ys.append(rec["accuracy"])
    return xs, ys


def _save(fig, path: Path) -> Path:
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def accuracy_curves(runs: Mapping[str, list[Records]], path: Path, x_key: str | None = None,
                    xlabel: str = "round", scale: float = 1.0) -> Path:
    """Accuracy against rounds, or against the cumulative sum of `x_key` (×`scale`), per label."""
    fig, ax = plt.subplots(figsize=(6.4, 4.2))
    for label, seeds in runs.items():
        curves = [_evaluated(recs, x_key) for recs in seeds]
        n = min(len(ys) for _, ys in curves)
        if n == 0:
            continue
        x = np.mean([xs[:n] for xs, _ in curves], axis=0) * scale
        y = np.array([ys[:n] for _, ys in curves])
        ax.plot(x, y.mean(0), marker="o", ms=3, label=label)
        if len(seeds) > 1:
            ax.fill_between(x, y.min(0), y.max(0), alpha=0.15)
    ax.set_xlabel(xlabel)
    ax.set_ylabel("test accuracy")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    return _save(fig, path)


def metric_by_round(series: Mapping[str, Records], key: str, path: Path, ylabel: str,
                    log: bool = False) -> Path:
    """One per-round scalar (train loss, bytes, seconds …) per label."""
    fig, ax = plt.subplots(figsize=(6.4, 4.2))
    for label, recs in series.items():
        pts = [(r["round"], r[key]) for r in recs if r.get(key) is not None]
        if pts:
            ax.plot(*zip(*pts), marker="o", ms=3, label=label)
    ax.set_xlabel("round")
    ax.set_ylabel(ylabel)
    if log:
        ax.set_yscale("log")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    return _save(fig, path)


def ranks_per_client(series: Mapping[str, Records], path: Path) -> Path:
    """The rank each client trained at, round by round (one panel per label)."""
    fig, axes = plt.subplots(1, len(series), figsize=(5.2 * len(series), 3.8), squeeze=False)
    for ax, (label, recs) in zip(axes[0], series.items()):
        clients = sorted({c for r in recs for c in r.get("ranks", {})}, key=int)
        for c in clients:
            pts = [(r["round"], r["ranks"][c]) for r in recs if r.get("ranks", {}).get(c) is not None]
            ax.plot(*zip(*pts), marker=".", label=f"client {c}")
        ax.set_title(label)
        ax.set_xlabel("round")
        ax.set_ylabel("rank (mean over modules)")
        ax.set_yscale("log", base=2)
        ax.grid(alpha=0.3)
    axes[0][-1].legend(fontsize=7, ncol=2)
    return _save(fig, path)


def client_metric_by_round(records: Records, key: str, path: Path, ylabel: str) -> Path:
    """A per-client diagnostic (in each round's `clients` list) by round, one line per client."""
    ids = sorted({c["id"] for r in records for c in r.get("clients", []) if c.get(key) is not None})
    series = {
        f"client {cid}": [{"round": r["round"], key: c[key]} for r in records for c in r.get("clients", [])
                          if c["id"] == cid and c.get(key) is not None]
        for cid in ids
    }
    return metric_by_round(series, key, path, ylabel)


def metrics_by_round(records: Records, keys: Mapping[str, str], path: Path, ylabel: str) -> Path:
    """Several per-round scalars of one run (label → key) in one figure."""
    series = {label: [{"round": r["round"], "value": r[key]} for r in records if r.get(key) is not None]
              for label, key in keys.items()}
    return metric_by_round(series, "value", path, ylabel)
