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
from matplotlib.lines import Line2D
from matplotlib.patches import Patch
from matplotlib.ticker import FixedLocator, FuncFormatter, LogLocator, MaxNLocator, NullFormatter

from fedlora.files import atomic_write, read_json
from fedlora.records import is_scored
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
        if is_scored(rec):
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


SMALL_MULTIPLES_ABOVE = 3
"""More series than this, with seed bands (or speed-up intervals), get one panel each: nine
overlapping 95% bands cannot be told apart."""


def _grid(n: int, cols: int, width: float, height: float, **kw):
    """A figure of n panels in rows of at most `cols`, each width × height inches; unused
    panels are hidden. Returns (fig, the n axes in reading order)."""
    cols = max(1, min(cols, n))
    rows = -(-n // cols)
    fig, axes = plt.subplots(rows, cols, figsize=(width * cols, height * rows + 1.0), squeeze=False, **kw)
    flat = list(axes.flat)
    for ax in flat[n:]:
        ax.set_visible(False)
    return fig, flat[:n]


def _accuracy_axes(ax, x_unit: str | None, xlabel: str, split: str, target: float | None,
                   untuned: float | None) -> None:
    """Reference lines, x axis (rounds or a log unit), labels and grid of one accuracy panel."""
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


def accuracy_curves(runs: Mapping[str, list[Records]], path: Path, x_key: str | None = None,
                    xlabel: str = "round", title: str = "Test accuracy", setting: str = "",
                    x_unit: str | None = None, target: float | None = None,
                    untuned: float | None = None, split: str = "test") -> Path:
    """Accuracy on `split` against rounds, or against the cumulative sum of `x_key` on a log
    axis in `x_unit` ("bytes" or "seconds"), per label; optional target and untuned-model
    lines. Series styles: `series_style`. With several seeds each label's mean has its 95%
    interval as a band; past SMALL_MULTIPLES_ABOVE such labels every label gets a panel of its
    own (its band in colour, the other labels' means in light grey for context, one shared y
    axis), since overlapping bands cannot be read."""
    bands = {label: (i, band, len(seeds)) for i, (label, seeds) in enumerate(runs.items())
             if (band := seed_band([_evaluated(recs, x_key) for recs in seeds])) is not None}
    banded = any(n > 1 for _, _, n in bands.values())
    band_note = "; bands: 95% interval over seeds" if any(len(s) > 1 for s in runs.values()) else ""
    if banded and len(bands) > SMALL_MULTIPLES_ABOVE:
        return _accuracy_small_multiples(bands, path, x_unit, xlabel, split, target, untuned,
                                         title + band_note, setting)
    if len(bands) > DOT_CHART_ABOVE and all(len(band[0]) == 1 for _, band, _ in bands.values()):
        return _accuracy_dot_chart(bands, path, x_unit, xlabel, split, target, untuned, title, setting)
    fig, ax = plt.subplots(figsize=(7.2, 4.2))
    for label, (i, (x, mean, lo, hi), n) in bands.items():
        (line,) = ax.plot(x, mean, ms=3, **series_style(i), label=label + (f" (mean of {n})" if n > 1 else ""))
        if n > 1:
            ax.fill_between(x, lo, hi, alpha=0.15, color=line.get_color(), lw=0)
    _accuracy_axes(ax, x_unit, xlabel, split, target, untuned)
    _title(ax, title + band_note, setting)
    _legend_outside(ax)
    return _save(fig, path)


DOT_CHART_ABOVE = 8
"""More series than this with one evaluated point each (a tuning grid) are drawn as a labelled
dot chart: a column of look-alike markers matched to a long legend cannot be read."""


def _accuracy_dot_chart(bands: Mapping[str, tuple[int, tuple, int]], path: Path, x_unit: str | None,
                        xlabel: str, split: str, target: float | None, untuned: float | None,
                        title: str, setting: str) -> Path:
    """One row per label (in the given order), its accuracy as a dot, the x quantity (round,
    uplink, seconds) written beside it."""
    labels = list(bands)
    fig, ax = plt.subplots(figsize=(7.2, 0.8 + 0.24 * len(labels)))
    for row, label in enumerate(labels):
        i, (x, mean, _, _), _ = bands[label]
        style = series_style(i)
        ax.plot([mean[0]], [row], ls="none", marker=style["marker"], color=style["color"], ms=5)
        where = (f"round {x[0]:g}" if x_unit is None
                 else format_bytes(x[0]) if x_unit == "bytes" else f"{x[0]:.3g} s")
        ax.annotate(f"{mean[0]:.3f} ({where})", (mean[0], row), xytext=(6, 0), textcoords="offset points",
                    va="center", fontsize=7)
    if target is not None:
        ax.axvline(target, color="black", ls="--", lw=1, label=f"target {target:.4g}")
    if untuned is not None:
        ax.axvline(untuned, color="grey", ls=":", lw=1.2, label=f"untuned model {untuned:.4g}")
    ax.set_yticks(range(len(labels)), labels, fontsize=8)
    ax.set_ylim(len(labels) - 0.5, -0.5)  # first label on top
    lo, hi = ax.get_xlim()
    ax.set_xlim(lo, hi + 0.12 * (hi - lo))  # room for the written values
    beside = xlabel.replace(" (log scale)", "").replace(", log scale", "")
    ax.set_xlabel(f"{split} accuracy" + ("" if x_unit is None else f" (beside it: {beside})"))
    ax.grid(alpha=0.3, axis="x")
    _title(ax, title, setting)
    _legend_outside(ax)
    return _save(fig, path)


def _accuracy_small_multiples(bands: Mapping[str, tuple[int, tuple, int]], path: Path, x_unit: str | None,
                              xlabel: str, split: str, target: float | None, untuned: float | None,
                              title: str, setting: str) -> Path:
    """One panel per label: its mean and band in its colour over the others' means in grey."""
    fig, axes = _grid(len(bands), 3, 3.3, 2.5, sharex=True, sharey=True)
    for ax, (label, (i, (x, mean, lo, hi), n)) in zip(axes, bands.items()):
        for other, (_, (ox, omean, _, _), _) in bands.items():
            if other != label:
                ax.plot(ox, omean, color="0.82", lw=0.9, zorder=1, label="the other methods' means")
        (line,) = ax.plot(x, mean, ms=3, zorder=3, **series_style(i), label=f"mean of {n} seeds")
        if n > 1:
            ax.fill_between(x, lo, hi, alpha=0.25, color=line.get_color(), lw=0, zorder=2,
                            label="95% interval over seeds")
        ax.set_title(label, fontsize=9, color=line.get_color())
        _accuracy_axes(ax, x_unit, xlabel, split, target, untuned)
        ax.tick_params(labelsize=7)
    _outer_labels(axes, 3)  # tick labels and axis names on the outer panels only
    seeds = max(n for _, _, n in bands.values())
    handles = {f"a panel's method: mean of {seeds} seeds": Line2D([], [], color="0.3", marker="o", ms=3),
               "its 95% interval over seeds": Patch(color="0.3", alpha=0.25, lw=0),
               "the other methods' means": Line2D([], [], color="0.82", lw=0.9)}
    handles |= {h.get_label(): h for h in axes[0].get_lines() if h.get_label().startswith(("target", "untuned"))}
    fig.legend(handles.values(), handles.keys(), loc="lower center", ncol=len(handles), fontsize=8,
               frameon=False, bbox_to_anchor=(0.5, 0.0))
    fig.suptitle(title + ("\n" + _wrap(setting, 100) if setting else ""), fontsize=10)
    fig.tight_layout(rect=(0, 0.05, 1, 1))
    return _save(fig, path)


SERVER_BOUND_SHARE = 0.5
"""A method whose simulated time is at least this share measured server seconds is marked: its
speed-up is set by this machine's server, not by the simulated devices."""


def speedup_by_target(rows: Sequence[Mapping[str, Any]], path: Path, reference: str, setting: str = "",
                      split: str = "test", labels: Sequence[str] = (),
                      server_share: Mapping[str, float] | None = None) -> Path:
    """Each method's paired speed-up over `reference` (fedlora.tta.speedup_sweep rows) against
    the accuracy target, on a log axis with its 95% interval as error bars; a target a pair did
    not reach in every seed has no point. The line at 1× is parity with the reference. `labels`:
    the comparison's methods in order (reference included), so each keeps its colour from the
    accuracy figures. Past SMALL_MULTIPLES_ABOVE methods each gets a panel (one shared log
    axis). `server_share`: per method, the share of its simulated time that is server seconds
    measured on this machine; at SERVER_BOUND_SHARE or more its points are hollow and it says so."""
    methods = [m for m in dict.fromkeys(r["method"] for r in rows)
               if any(r["speedup"] is not None for r in rows if r["method"] == m)]
    order = list(dict.fromkeys([*labels, *(r["method"] for r in rows)]))
    targets = sorted({r["target"] for r in rows})
    share = dict(server_share or {})
    bars = "; bars: 95% t interval over seeds" if any(r["speedup_low"] is not None for r in rows) else ""
    panels = [[m] for m in methods] if len(methods) > SMALL_MULTIPLES_ABOVE else [methods]
    if len(panels) == 1:
        fig, ax = plt.subplots(figsize=(7.2, 4.2))
        axes = [ax]
    else:
        fig, axes = _grid(len(panels), 2, 4.2, 2.4, sharex=True, sharey=True)
    for ax, shown in zip(axes, panels):
        for j, method in enumerate(shown):
            at = {r["target"]: r for r in rows if r["method"] == method and r["speedup"] is not None}
            picked = [at.get(t) for t in targets]  # a missed target is a gap (NaN), not a line across it
            x = np.array(targets) + (j - (len(shown) - 1) / 2) * 0.004  # side by side
            y = np.array([np.nan if r is None else r["speedup"] for r in picked])
            low = np.array([np.nan if r is None else r["speedup_low"] or r["speedup"] for r in picked])
            high = np.array([np.nan if r is None else r["speedup_high"] or r["speedup"] for r in picked])
            seeds = next(iter(at.values()))["paired_seeds"]
            style = series_style(order.index(method))
            server_bound = share.get(method, 0.0) >= SERVER_BOUND_SHARE
            note = (f"; hollow: {share[method]:.0%} of its simulated time is server seconds measured here"
                    if server_bound else "")
            ax.errorbar(x, y, yerr=[y - low, high - y], ms=4, capsize=3, **style,
                        mfc="white" if server_bound else style["color"],
                        label=method + (f" (geometric mean of {seeds})" if seeds > 1 else "") + note)
            if len(panels) > 1:
                ax.set_title(method + (" · measured server seconds (hollow)" if server_bound else ""),
                             fontsize=9, color=style["color"])
        ax.axhline(1.0, color="black", ls="--", lw=1, label=f"as fast as {reference}")
        ax.set_yscale("log")
        ax.grid(alpha=0.3, which="major")
        ax.set_xlabel(f"{split} accuracy target")
        ax.set_ylabel(f"speed-up over {reference}" + (" (simulated time, log scale)" if len(panels) == 1 else ""))
        if len(panels) > 1:
            ax.tick_params(labelsize=7)
    for ax in axes:
        _ratio_axis(ax)
    if len(panels) > 1:
        _outer_labels(axes, 2)
    what = f"Time-to-accuracy speed-up over {reference} by target (simulated time){bars}"
    if len(panels) == 1:
        _title(axes[0], what, setting)
        _legend_outside(axes[0])
    else:
        bound = [m for m in methods if share.get(m, 0.0) >= SERVER_BOUND_SHARE]
        if bound:
            what += ("\nhollow points (" + ", ".join(bound) + "): most of their simulated time is the server's\n"
                     "seconds measured on this CPU, not the simulated devices'")
        fig.suptitle(what + ("\n" + _wrap(setting, 100) if setting else ""), fontsize=10)
        fig.tight_layout()
    return _save(fig, path)


def _ratio_axis(ax) -> None:
    """A log ratio axis from and to a labelled tick, labelled at 1-2-5 steps ("0.5×", "1×",
    "2×"), or at 1-1.5-2-3-5-7 when it spans less than a decade, so at least three ticks show."""
    lo, hi = ax.get_ylim()
    steps = (1.0, 2.0, 5.0) if hi / lo >= 10 else (1.0, 1.5, 2.0, 3.0, 5.0, 7.0)
    grid = [m * 10.0 ** k for k in range(int(np.floor(np.log10(lo))) - 1, int(np.ceil(np.log10(hi))) + 2)
            for m in steps]
    lo, hi = max(v for v in grid if v <= lo), min(v for v in grid if v >= hi)
    ax.yaxis.set_major_locator(FixedLocator([v for v in grid if lo <= v <= hi]))
    ax.yaxis.set_minor_formatter(NullFormatter())
    ax.yaxis.set_major_formatter(FuncFormatter(lambda v, _: f"{v:g}×"))
    ax.set_ylim(lo, hi)


def _outer_labels(axes: Sequence, cols: int) -> None:
    """Tick labels and axis names only on the left column and on the lowest panel of each
    column (a panel whose neighbour below is missing keeps its x labels)."""
    n = len(axes)
    for i, ax in enumerate(axes):
        bottom, left = i + cols >= n, i % cols == 0
        ax.xaxis.set_tick_params(labelbottom=bottom)
        ax.yaxis.set_tick_params(labelleft=left)
        if not bottom:
            ax.set_xlabel("")
        if not left:
            ax.set_ylabel("")


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


OVERLAP = 0.01
"""Two rank lines closer than this share of the panel's height at every round are drawn on top
of each other."""


def _same_lines(points: Mapping[str, list[tuple[int, float]]], log: bool = True) -> list[list[str]]:
    """Groups (two or more) of clients whose rank lines overlap at every round: closer than
    OVERLAP of the panel's span (in log₂ rank on a log axis), each client joined to the first
    group whose first client it is that close to."""
    scale = (lambda v: float(np.log2(v)) if v > 0 else float("-inf")) if log else float
    values = [scale(v) for pts in points.values() for _, v in pts]
    finite = [v for v in values if np.isfinite(v)]
    tolerance = OVERLAP * (max(finite) - min(finite)) if finite else 0.0
    groups: list[list[str]] = []
    for c, pts in points.items():
        if not pts:
            continue
        for group in groups:
            lead = points[group[0]]
            if [r for r, _ in lead] == [r for r, _ in pts] and all(
                    abs(scale(a) - scale(b)) <= tolerance for (_, a), (_, b) in zip(lead, pts)):
                group.append(c)
                break
        else:
            groups.append([c])
    return [g for g in groups if len(g) > 1]


def _client_names(clients: Sequence[str]) -> str:
    """"clients 6–9" for a consecutive run, else "clients 2, 5, 7"."""
    ids = sorted(int(c) for c in clients)
    if ids == list(range(ids[0], ids[-1] + 1)) and len(ids) > 2:
        return f"clients {ids[0]}–{ids[-1]}"
    return "clients " + ", ".join(map(str, ids))


def ranks_per_client(series: Mapping[str, Records], path: Path, setting: str = "",
                     small_multiples_above: int = 10) -> Path:
    """The rank each client trained at, round by round: a grid of panels, one per label (two
    per row, so it reads at page width). Up to `small_multiples_above` clients share a panel
    (log₂ axis, one legend below); with more, each starting-rank tier (2 to 5 of them) gets its
    own row and legend, since a tier's lines would lie on top of each other on a shared axis.
    Every client has a colour of its own, and clients whose lines coincide are named on the line."""
    clients = sorted({c for recs in series.values() for r in recs for c in r.get("ranks", {})}, key=int)
    colour = dict(zip(clients, _distinct_colours(len(clients))))
    tiers = _rank_tiers(series, clients) if len(clients) > small_multiples_above else []
    if not 1 < len(tiers) <= 5:  # a panel per client would be no easier to read
        tiers = [(None, clients)]
    by_tier = tiers[0][0] is not None
    if by_tier:  # rows are tiers, columns the labels
        rows, cols = len(tiers), len(series)
        fig, grid = plt.subplots(rows, cols, figsize=(4.6 * cols + 1.6, 2.4 * rows + 0.8), squeeze=False, sharex=True)
        cells = [(grid[i][j], label, tier_rank, tier) for j, label in enumerate(series)
                 for i, (tier_rank, tier) in enumerate(tiers)]
    else:
        fig, flat = _grid(len(series), 2, 4.3, 2.9, sharex=True, sharey=True)
        cells = [(ax, label, None, clients) for ax, label in zip(flat, series)]
    overlaps = False
    for ax, label, tier_rank, tier in cells:
        recs = series[label]
        points = {c: [(r["round"], r["ranks"][c]) for r in recs if r.get("ranks", {}).get(c) is not None]
                  for c in tier}
        for c, pts in points.items():
            if pts:
                ax.plot(*zip(*pts), marker=".", color=colour[c], label=f"client {c}")
        for group in _same_lines(points, log=tier_rank is None):
            overlaps = True
            x, y = points[group[0]][-1]
            ax.annotate(f"{_client_names(group)} overlap", (x, y), xytext=(-4, 4), textcoords="offset points",
                        ha="right", va="bottom", fontsize=7, color=colour[group[0]])
        ax.set_title(label if tier_rank is None else f"{label}: clients starting at rank {tier_rank:g}", fontsize=9)
        _round_axis(ax.xaxis)
        if tier_rank is None:  # ranks 4 … 64 on one axis: powers of two
            ax.set_yscale("log", base=2)
            ax.yaxis.set_major_formatter(FuncFormatter(lambda y, _: f"{y:g}"))
        ax.grid(alpha=0.3)
        ax.set_xlabel("round")
        ax.set_ylabel("rank (mean over modules)" if not by_tier else "rank", fontsize=8)
        if by_tier and label == list(series)[-1]:
            _legend_outside(ax, ncol=1 if len(tier) <= 6 else 2)
    if not by_tier:
        _outer_labels([ax for ax, *_ in cells], 2)
        handles = {h.get_label(): h for ax, *_ in cells for h in ax.get_lines()}
        if handles:  # runs that logged no ranks draw no lines: no legend (matplotlib refuses ncol 0)
            fig.legend(handles.values(), handles.keys(), loc="lower center", bbox_to_anchor=(0.5, 0.0),
                       fontsize=8, frameon=False, ncol=min(len(handles), 5))
    note = "\nclients whose lines overlap in every round are named on the line" if overlaps else ""
    fig.suptitle("Rank each client trained at (mean over modules)" + note
                 + ("\n" + _wrap(setting, 100) if setting else ""), fontsize=10)
    legend_rows = 0 if by_tier else -(-len(clients) // 5)
    bottom = (0.2 * legend_rows + 0.1) / fig.get_size_inches()[1] if legend_rows else 0  # inches for the legend
    fig.tight_layout(rect=(0, bottom, 1, 1))
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
