"""PNG figures from runs' metrics: one function per figure, shared by `compare` and `report`.

Each `series` argument maps a label (a method, or one run) to its list of metrics.jsonl
records (one per round); with several seeds, `runs` maps a label to one list per seed and
the figure shows the mean with its 95% interval over seeds (Student t, fedlora.stats;
`seed_band`). Every figure is titled with
what it shows and the setting it was measured in (`setting_caption`); round axes have
integer ticks, byte axes kB/MB, and legends sit outside the axes so they cover no curve.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt
import numpy as np
from matplotlib.ticker import FuncFormatter, LogLocator, MaxNLocator, NullFormatter

from fedlora.files import atomic_write, read_json
from fedlora.runtime.outputs import UNTUNED_FILE, is_fraction, read_config_tree
from fedlora.units import format_bytes

from fedlora.stats import seed_interval

Records = list[dict[str, Any]]
LINE_STYLES = ("-", "--", ":", "-.")
MARKERS = ("o", "s", "^", "D")
SERIES_COLOURS = [c for i, c in enumerate(matplotlib.colormaps["tab10"].colors) if i != 7]
"""tab10 without its grey: the target and untuned-model lines are black and grey."""


def series_style(i: int) -> dict[str, Any]:
    """The i-th series' colour, line style and marker: past 9 series the style and marker
    change too, so up to 36 series look distinct (one-point series by their marker)."""
    turn = i // len(SERIES_COLOURS)
    return {"color": SERIES_COLOURS[i % len(SERIES_COLOURS)], "ls": LINE_STYLES[turn % len(LINE_STYLES)],
            "marker": MARKERS[turn % len(MARKERS)]}


def setting_caption(run_dirs: Sequence[Path], seeds: Sequence[int] | None = None) -> str:
    """One line naming the setting (data, partition, clients, model, budget, seeds), read from
    the first run directory that has a config.yaml; "" when none has."""
    run_dir = next((Path(d) for d in run_dirs if (Path(d) / "config.yaml").exists()), None)
    cfg = read_config_tree(run_dir) if run_dir is not None else {}  # damaged: no caption
    if not cfg:
        return ""
    data, fed = cfg.get("data", {}), cfg.get("federation", {})
    partition = data.get("partition", "")
    if partition == "label_skew":
        partition += f" ({data.get('labels_per_client')} labels/client)"
    elif partition == "dirichlet":
        partition += f" (α={data.get('dirichlet_alpha')})"
    seeds = sorted(set(seeds)) if seeds is not None else [cfg.get("seed", 0)]
    parts = [
        str(data.get("dataset", "")), partition, f"{fed.get('num_clients')} clients",
        str(cfg.get("model", {}).get("name", "")),
        f"{fed.get('rounds')} rounds × {fed.get('local_steps')} local steps",
        f"seed{'s' if len(seeds) > 1 else ''} {','.join(map(str, seeds))}",
    ]
    return " · ".join(p for p in parts if p)


def scored_split(run_dirs: Sequence[Path]) -> str:
    """"validation" when the runs scored a validation carve (`fedlora tune`), else "test"."""
    run_dir = next((Path(d) for d in run_dirs if (Path(d) / "config.yaml").exists()), None)
    data = (read_config_tree(run_dir) if run_dir is not None else {}).get("data")
    return "validation" if isinstance(data, dict) and data.get("validation_examples") else "test"


def untuned_accuracy(run_dirs: Sequence[Path]) -> float | None:
    """The untuned model's test accuracy (`evaluation.untuned: true` writes RUN_DIR/untuned.json);
    None when no run measured it."""
    for d in run_dirs:
        path = Path(d) / UNTUNED_FILE
        if path.exists():
            value = read_json(path)
            accuracy = value.get("accuracy") if isinstance(value, dict) else None
            return float(accuracy) if is_fraction(accuracy) else None
    return None


def seed_band(curves: Sequence[tuple[Sequence[float], Sequence[float]]]
              ) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray] | None:
    """(x, mean, low, high) over seeds' (x, y) curves, cut to the shortest, the band being the
    95% Student-t interval of the mean (one seed: no width); None if a curve is empty."""
    n = min(len(ys) for _, ys in curves)
    if n == 0:
        return None
    x = np.mean([xs[:n] for xs, _ in curves], axis=0)
    y = np.array([ys[:n] for _, ys in curves], dtype=float)
    if len(y) < 2:
        return x, y[0], y[0], y[0]
    mean, low, high = seed_interval(y)
    return x, mean, low, high


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


def _wrap(setting: str, width: int = 80) -> str:
    """The caption broken only between its " · " parts."""
    lines: list[str] = []
    for part in setting.split(" · "):
        if lines and len(lines[-1]) + 3 + len(part) <= width:
            lines[-1] += " · " + part
        else:
            lines.append(part)
    return "\n".join(lines)


def _title(ax, what: str, setting: str) -> None:
    ax.set_title(what + ("\n" + _wrap(setting) if setting else ""), fontsize=10)


def _round_axis(axis) -> None:
    """Integer ticks; called after plotting, since one evaluated round alone would otherwise
    get the default ±0.1 margin and only fractional ticks."""
    axis.set_major_locator(MaxNLocator(integer=True))
    lo, hi = axis.get_data_interval()
    if np.isfinite(lo) and hi - lo < 1:
        limits = axis.axes.set_xlim if axis is axis.axes.xaxis else axis.axes.set_ylim
        limits(lo - 1, hi + 1)


def _log_axis(axis, unit: str) -> None:
    """Log scale ticked at 1, 2, 5 × 10^k, labelled in bytes (kB/MB), seconds or ratios ("×")."""
    axis.set_major_locator(LogLocator(base=10, subs=(1.0, 2.0, 5.0)))
    axis.set_minor_formatter(NullFormatter())
    fmt = {"bytes": lambda x, _: format_bytes(x, None), "×": lambda x, _: f"{x:g}×"}.get(unit, lambda x, _: f"{x:g} s")
    axis.set_major_formatter(FuncFormatter(fmt))


def _legend_outside(ax, **kw) -> None:
    if ax.get_legend_handles_labels()[0]:
        ax.legend(loc="upper left", bbox_to_anchor=(1.01, 1.0), fontsize=8, frameon=False, **kw)


def _save(fig, path: Path) -> Path:
    try:  # atomic, and a link planted at `path` is replaced, never written through
        atomic_write(path, lambda tmp: fig.savefig(tmp, format="png", dpi=120, bbox_inches="tight"))
    finally:
        plt.close(fig)
    return path


def accuracy_curves(runs: Mapping[str, list[Records]], path: Path, x_key: str | None = None,
                    xlabel: str = "round", title: str = "Test accuracy", setting: str = "",
                    x_unit: str | None = None, target: float | None = None,
                    untuned: float | None = None, split: str = "test") -> Path:
    """Accuracy on `split` against rounds, or against the cumulative sum of `x_key` on a log
    axis in `x_unit` ("bytes" or "seconds"), per label; optional target and untuned-model
    lines. Series styles: `series_style`."""
    fig, ax = plt.subplots(figsize=(7.2, 4.2))
    for i, (label, seeds) in enumerate(runs.items()):
        band = seed_band([_evaluated(recs, x_key) for recs in seeds])
        if band is None:
            continue
        x, mean, lo, hi = band
        (line,) = ax.plot(x, mean, ms=3, **series_style(i),
                          label=label + (f" (mean of {len(seeds)})" if len(seeds) > 1 else ""))
        if len(seeds) > 1:
            ax.fill_between(x, lo, hi, alpha=0.15, color=line.get_color(), lw=0)
    if target is not None:
        ax.axhline(target, color="black", ls="--", lw=1, label=f"target {target:.4g}")
    if untuned is not None:
        ax.axhline(untuned, color="grey", ls=":", lw=1.2, label=f"untuned model {untuned:.4g}")
    if x_unit is None:
        _round_axis(ax.xaxis)
    else:
        ax.set_xscale("log")
        _log_axis(ax.xaxis, x_unit)
    ax.set_xlabel(xlabel)
    ax.set_ylabel(f"{split} accuracy")
    ax.grid(alpha=0.3, which="major")
    band_note = "; bands: 95% interval over seeds" if any(len(s) > 1 for s in runs.values()) else ""
    _title(ax, title + band_note, setting)
    _legend_outside(ax)
    return _save(fig, path)


def speedup_by_target(rows: Sequence[Mapping[str, Any]], path: Path, reference: str, setting: str = "",
                      split: str = "test", labels: Sequence[str] = ()) -> Path:
    """Each method's paired speed-up over `reference` (fedlora.tta.speedup_sweep rows) against
    the accuracy target, on a log axis with its 95% interval as error bars; a target a pair did
    not reach in every seed has no point. The line at 1× is parity with the reference. `labels`:
    the comparison's methods in order (reference included), so each keeps its colour from the
    accuracy figures."""
    fig, ax = plt.subplots(figsize=(7.2, 4.2))
    methods = list(dict.fromkeys(r["method"] for r in rows))
    order = list(dict.fromkeys([*labels, *methods]))
    targets = sorted({r["target"] for r in rows})
    for j, method in enumerate(methods):
        at = {r["target"]: r for r in rows if r["method"] == method and r["speedup"] is not None}
        if not at:
            continue
        shown = [at.get(t) for t in targets]  # a missed target is a gap (NaN), not a line across it
        x = np.array(targets) + (j - (len(methods) - 1) / 2) * 0.004  # side by side
        y = np.array([np.nan if r is None else r["speedup"] for r in shown])
        low = np.array([np.nan if r is None else r["speedup_low"] or r["speedup"] for r in shown])
        high = np.array([np.nan if r is None else r["speedup_high"] or r["speedup"] for r in shown])
        seeds = next(iter(at.values()))["paired_seeds"]
        ax.errorbar(x, y, yerr=[y - low, high - y], ms=4, capsize=3, **series_style(order.index(method)),
                    label=method + (f" (geometric mean of {seeds})" if seeds > 1 else ""))
    ax.axhline(1.0, color="black", ls="--", lw=1, label=f"as fast as {reference}")
    ax.set_yscale("log")
    _log_axis(ax.yaxis, "×")
    ax.set_xlabel(f"{split} accuracy target")
    ax.set_ylabel(f"speed-up over {reference} (simulated time, log scale)")
    ax.grid(alpha=0.3, which="major")
    bars = "; bars: 95% t interval over seeds" if any(r["speedup_low"] is not None for r in rows) else ""
    _title(ax, f"Time-to-accuracy speed-up by target{bars}", setting)
    _legend_outside(ax)
    return _save(fig, path)


def metric_by_round(series: Mapping[str, Records], key: str, path: Path, ylabel: str,
                    log: bool = False, title: str = "", setting: str = "", unit: str | None = None) -> Path:
    """One per-round scalar (train loss, bytes, seconds …) per label; `unit="bytes"` labels the
    (log) y axis in kB/MB."""
    fig, ax = plt.subplots(figsize=(7.2, 4.2))
    for label, recs in series.items():
        pts = [(r["round"], r[key]) for r in recs if r.get(key) is not None]
        if pts:
            ax.plot(*zip(*pts), marker="o", ms=3, label=label)
    _round_axis(ax.xaxis)
    ax.set_xlabel("round")
    ax.set_ylabel(ylabel)
    if log:
        ax.set_yscale("log")
        if unit:
            _log_axis(ax.yaxis, unit)
    ax.grid(alpha=0.3)
    _title(ax, title or ylabel, setting)
    _legend_outside(ax)
    return _save(fig, path)


def _distinct_colours(n: int) -> list:
    """tab10 up to 10; up to 20 tab20's dark shades first, then its light ones; beyond, viridis."""
    if n <= 10:
        return [plt.get_cmap("tab10")(i) for i in range(n)]
    if n <= 20:
        order = [*range(0, 20, 2), *range(1, 20, 2)]
        return [plt.get_cmap("tab20")(i) for i in order[:n]]
    return [plt.get_cmap("viridis")(i / (n - 1)) for i in range(n)]


def _rank_tiers(series: Mapping[str, Records], clients: list[str]) -> list[tuple[float, list[str]]]:
    """(rank, clients) groups by the first rank each client trained at (its cap), highest first."""
    first: dict[str, float] = {}
    for recs in series.values():
        for r in recs:
            for c, rank in r.get("ranks", {}).items():
                first.setdefault(c, rank)
    return [(t, [c for c in clients if first[c] == t]) for t in sorted({first[c] for c in clients}, reverse=True)]


def ranks_per_client(series: Mapping[str, Records], path: Path, setting: str = "",
                     small_multiples_above: int = 10) -> Path:
    """The rank each client trained at, round by round, one column per label. Up to
    `small_multiples_above` clients share one panel (log₂ axis, one legend outside); with more,
    each starting-rank tier (2 to 5 of them) gets its own row and legend, since a tier's lines
    would lie on top of each other on a shared axis. Every client has a colour of its own."""
    clients = sorted({c for recs in series.values() for r in recs for c in r.get("ranks", {})}, key=int)
    colour = dict(zip(clients, _distinct_colours(len(clients))))
    tiers = _rank_tiers(series, clients) if len(clients) > small_multiples_above else []
    if not 1 < len(tiers) <= 5:  # a panel per client would be no easier to read
        tiers = [(None, clients)]
    rows, cols = len(tiers), len(series)
    fig, axes = plt.subplots(rows, cols, figsize=(5.6 * cols + 1.6, 3.9 if rows == 1 else 2.4 * rows + 0.8),
                             squeeze=False, sharex=True)
    for j, (label, recs) in enumerate(series.items()):
        for i, (tier_rank, tier) in enumerate(tiers):
            ax = axes[i][j]
            for c in tier:
                pts = [(r["round"], r["ranks"][c]) for r in recs if r.get("ranks", {}).get(c) is not None]
                if pts:
                    ax.plot(*zip(*pts), marker=".", color=colour[c], label=f"client {c}")
            ax.set_title(label if tier_rank is None else f"{label}: clients starting at rank {tier_rank:g}",
                         fontsize=9)
            _round_axis(ax.xaxis)
            if tier_rank is None:  # ranks 4 … 64 on one axis: powers of two
                ax.set_yscale("log", base=2)
                ax.yaxis.set_major_formatter(FuncFormatter(lambda y, _: f"{y:g}"))
            ax.grid(alpha=0.3)
            if tier_rank is not None and j == cols - 1:
                _legend_outside(ax, ncol=1 if len(tier) <= 6 else 2)
        axes[-1][j].set_xlabel("round")
    for row in axes:
        row[0].set_ylabel("rank (mean over modules)" if rows == 1 else "rank")
    if rows == 1:
        handles = {h.get_label(): h for ax in axes.flat for h in ax.get_lines()}
        fig.legend(handles.values(), handles.keys(), loc="center left", bbox_to_anchor=(1.0, 0.5),
                   fontsize=7, frameon=False, ncol=1 if len(handles) <= 12 else 2)
    fig.suptitle("Rank each client trained at (mean over modules)"
                 + ("\n" + _wrap(setting, 100) if setting else ""), fontsize=10)
    fig.tight_layout()
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
