"""Time-to-accuracy: how much simulated time, rounds and uplink a method needs to reach a target.

Read from each run's metrics.jsonl: the first evaluated round whose test accuracy is at least
the target, and the cumulative simulated seconds (`sim_seconds`, the clock in fedlora.clock),
real wall seconds and uplink bytes (all clients) up to and including that round. A method
that never reaches the target reports None ("not reached"), never a guess. Against a
reference method (compare's `--reference`, FedIT by default) each method's speed-up is paired
by seed and summarised on the log scale (`speedup`).
"""

from __future__ import annotations

import math
import statistics
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np

from fedlora.plots import accuracy_curves, speedup_by_target
from fedlora.records import accuracies, is_scored
from fedlora.runtime.outputs import write_csv
from fedlora.stats import seed_interval
from fedlora.tables import markdown_table

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
        if is_scored(rec) and rec["accuracy"] >= target:
            return {"round": float(rec["round"]), **{k: v if k in carried else None for k, v in sums.items()}}
    return None


def _accuracies(histories: Mapping[str, list[Records]]) -> list[list[float]]:
    """Each run's evaluated accuracies in round order; a run never evaluated is left out."""
    curves = [accuracies(recs) for runs in histories.values() for recs in runs]
    return [c for c in curves if c]


def default_target(histories: Mapping[str, list[Records]], share: float = 0.95) -> float | None:
    """`share` × the lowest best accuracy over methods and seeds: a level every run reaches."""
    bests = [max(c) for c in _accuracies(histories)]
    return share * min(bests) if bests else None


PerSeed = Mapping[str, Mapping[int, Records]]
"""method → seed → that run's records."""


def tta_seed_rows(per_seed: PerSeed, target: float) -> list[dict[str, Any]]:
    """Per method and seed: the crossing (round and costs), or not reached (None)."""
    rows = []
    for method, runs in per_seed.items():
        for seed, recs in sorted(runs.items()):
            hit = time_to_accuracy(recs, target)
            rows.append({"method": method, "seed": seed, "reached": hit is not None,
                         **{k: hit[k] if hit else None for k in TTA_KEYS}})
    return rows


def speedup(per_seed: PerSeed, method: str, reference: str, target: float) -> dict[str, Any]:
    """The method's speed-up over `reference` to the target on the simulated clock, paired by
    seed (same partition and devices): r_s = t_ref,s / t_method,s; their geometric mean, and
    the 95% Student-t interval of mean log r_s mapped back (ratios multiply: 2× and 0.5×
    average to 1×). Only when both reached the target in every seed both ran: a seed one of
    them missed has no ratio, and dropping it would bias the mean towards the seeds that went
    well (`reached_seeds` < `paired_seeds` says so). One seed: the ratio, no interval."""
    seeds = sorted(set(per_seed[method]) & set(per_seed[reference]))
    ratios, reached = [], 0
    for seed in seeds:
        mine = time_to_accuracy(per_seed[method][seed], target)
        ref = time_to_accuracy(per_seed[reference][seed], target)
        reached += bool(mine and ref)
        if mine and ref and mine["sim_seconds"] and ref["sim_seconds"]:  # runs before the clock have none
            ratios.append(ref["sim_seconds"] / mine["sim_seconds"])
    out: dict[str, Any] = {"speedup": None, "speedup_low": None, "speedup_high": None,
                           "paired_seeds": len(seeds), "reached_seeds": reached}
    if ratios and len(ratios) == len(seeds):
        logs = np.log(ratios)
        out["speedup"] = float(np.exp(logs.mean()))
        if len(ratios) > 1:
            _, low, high = seed_interval(logs)
            out["speedup_low"], out["speedup_high"] = float(np.exp(low)), float(np.exp(high))
    return out


def tta_rows(per_seed: PerSeed, target: float, reference: str | None = None) -> list[dict[str, Any]]:
    """Per method: means over the seeds that reached the target, and how many did; with a
    `reference` that ran, the paired speed-up over it (`speedup`)."""
    rows = []
    for method, runs in per_seed.items():
        hits = [t for t in (time_to_accuracy(recs, target) for recs in runs.values()) if t is not None]
        row: dict[str, Any] = {"method": method, "reached": f"{len(hits)}/{len(runs)}"}
        every = len(hits) == len(runs) and hits
        for key in TTA_KEYS:
            values = [h[key] for h in hits]
            row[key] = statistics.fmean(values) if every and None not in values else None
        if reference in per_seed:
            row.update(speedup(per_seed, method, reference, target))
        rows.append(row)
    return rows


SWEEP_STEP = 0.05


def sweep_targets(per_seed: PerSeed, step: float = SWEEP_STEP) -> list[float]:
    """The targets of the speed-up-by-target table, fixed by the runs' range and not by any
    method's result: every multiple of `step` above the lowest first evaluated accuracy of any
    run (below it every run crosses at once and the ratio only compares one round's clock) and
    at most the highest accuracy any run reached (above it nothing does)."""
    if not step > 0:
        raise ValueError(f"sweep step must be positive, got {step}")
    curves = _accuracies({m: list(runs.values()) for m, runs in per_seed.items()})
    if not curves:
        return []
    low, high = min(c[0] for c in curves), max(max(c) for c in curves)
    first, last = math.floor(low / step + 1e-9) + 1, math.floor(high / step + 1e-9)  # 0.7 / 0.05 = 13.999…
    return [round(k * step, 10) for k in range(first, last + 1)]


def speedup_sweep(per_seed: PerSeed, reference: str, targets: list[float]) -> list[dict[str, Any]]:
    """`speedup` of every other method over `reference` at each target: whether an advantage
    holds across accuracy levels, not only at one threshold crossed by a noisy test subset."""
    return [{"target": target, "method": method, **speedup(per_seed, method, reference, target)}
            for target in targets for method in per_seed if method != reference]


SWEEP_COLUMNS = ["target", "method", "speedup", "speedup_low", "speedup_high", "paired_seeds", "reached_seeds"]


def sweep_markdown(rows: list[dict[str, Any]], reference: str, step: float = SWEEP_STEP) -> str:
    """One row per target, one column per method, each cell as in the time-to-accuracy table."""
    targets = list(dict.fromkeys(r["target"] for r in rows))
    methods = list(dict.fromkeys(r["method"] for r in rows))
    cell = {(r["target"], r["method"]): r for r in rows}
    lines = [f"\n### Speed-up over {reference} by target\n",
             f"The paired speed-up of the table above at every multiple of {step:g} from just above the lowest "
             f"first evaluated accuracy of any run to the highest accuracy any run reached (a range fixed by the "
             f"runs, not by a method's result): one threshold's crossing moves by a round with a few test "
             f"items, this shows whether an advantage holds across the range. Neighbouring targets share "
             f"rounds, so the rows are one curve, not independent tests; at the lowest targets most runs "
             f"cross in their first round and the ratio mostly compares round lengths. Data: `tta_sweep.csv`.\n",
             *markdown_table(["target", *methods],
                             ([f"{t:g}", *(_speedup_cell(cell[(t, m)]) for m in methods)] for t in targets))]
    return "\n".join(lines) + "\n"


def _fmt(x: float | None, spec: str, reached: bool) -> str:
    """A missing number: "not reached" when the target was not, "–" when the run lacks that cost."""
    return format(x, spec) if x is not None else "–" if reached else "not reached"


TTA_COLUMNS = ["method", "reached", *TTA_KEYS, "speedup", "speedup_low", "speedup_high", "paired_seeds",
               "reached_seeds"]


def write_tta(out: Path, per_seed: PerSeed, target: float | None, reference: str | None = "fedit",
              setting: str = "", untuned: float | None = None, split: str = "test") -> str:
    """tta.csv (per method), tta_seeds.csv (per method and seed) and the accuracy-vs-simulated-
    time figure in `out`; returns the markdown section."""
    histories = {m: list(runs.values()) for m, runs in per_seed.items()}
    target = target if target is not None else default_target(histories)
    if target is None:
        return ""
    reference = reference if reference in per_seed else None
    rows = tta_rows(per_seed, target, reference)
    write_csv(out / "tta.csv", TTA_COLUMNS, rows)
    seed_rows = tta_seed_rows(per_seed, target)
    write_csv(out / "tta_seeds.csv", ["method", "seed", "reached", *TTA_KEYS], seed_rows)
    figure = accuracy_vs_sim_time(histories, out / "accuracy_vs_sim_time.png", target, setting, untuned, split)
    text = (f"\n## Time to accuracy\n\n{tta_markdown(rows, target, reference)}\n"
            f"{tta_seed_markdown(seed_rows)}\n![{figure.stem}]({figure.name})\n")
    sweep = speedup_sweep(per_seed, reference, sweep_targets(per_seed)) if reference else []
    if sweep:
        write_csv(out / "tta_sweep.csv", SWEEP_COLUMNS, sweep)
        plot = speedup_by_target(sweep, out / "speedup_vs_target.png", reference, setting, split, list(per_seed))
        text += f"{sweep_markdown(sweep, reference)}\n![{plot.stem}]({plot.name})\n"
    else:  # a rebuild without a reference leaves no stale sweep behind
        for name in ("tta_sweep.csv", "speedup_vs_target.png"):
            (out / name).unlink(missing_ok=True)
    return text


def _speedup_cell(row: dict[str, Any]) -> str:
    """"ratio× [interval] (seeds)", or why there is none."""
    if row.get("speedup") is None:
        if not row.get("paired_seeds"):
            return "– (no seed in common)"
        missed = row["paired_seeds"] - row.get("reached_seeds", 0)
        return f"– (not reached in {missed} of {row['paired_seeds']} seeds)" if missed > 0 else "–"
    interval = (f" [{row['speedup_low']:.2f}, {row['speedup_high']:.2f}]"
                if row.get("speedup_low") is not None else "")
    return f"{row['speedup']:.2f}×{interval} ({row['paired_seeds']})"


def tta_markdown(rows: list[dict[str, Any]], target: float, reference: str | None = None) -> str:
    about = (f" The last column is the speed-up over {reference} on the simulated clock, paired by seed: "
             f"{reference}'s time ÷ the method's, geometric mean over the seeds, [95% Student-t interval of the mean "
             f"log ratio], (seeds); > 1: faster than {reference}; shown only when both reached the target in "
             f"every seed."
             if reference else " No speed-up column: the reference method did not run (--reference).")
    header = ["method", "reached", "rounds", "simulated s", "wall s", "uplink MB"]
    table = []
    for r in rows:
        up = None if r["uplink_bytes"] is None else r["uplink_bytes"] / 1e6
        ok = r["round"] is not None
        table.append([r["method"], r["reached"], _fmt(r["round"], ".1f", ok), _fmt(r["sim_seconds"], ".1f", ok),
                      _fmt(r["wall_seconds"], ".0f", ok), _fmt(up, ".2f", ok),
                      *([_speedup_cell(r)] if reference else [])])
    lines = [
        f"Time to accuracy ≥ {target:.4f} (means over seeds; simulated seconds from the device profiles).{about}\n",
        *markdown_table([*header, *([f"speed-up over {reference}"] if reference else [])], table),
    ]
    return "\n".join(lines) + "\n"


def tta_seed_markdown(seed_rows: list[dict[str, Any]]) -> str:
    """Each seed's crossing: simulated seconds (round), the numbers the means and ratios come from."""
    seeds = sorted({r["seed"] for r in seed_rows})
    methods = list(dict.fromkeys(r["method"] for r in seed_rows))
    cell = {(r["method"], r["seed"]): r for r in seed_rows}

    def show(r: dict[str, Any] | None) -> str:
        if r is None:
            return "–"
        if not r["reached"]:
            return "not reached"
        sim = "–" if r["sim_seconds"] is None else f"{r['sim_seconds']:.1f} s"
        return f"{sim} (round {r['round']:.0f})"

    lines = ["Per seed: simulated seconds to the target (round).\n",
             *markdown_table(["method", *(f"seed {s}" for s in seeds)],
                             ([m, *(show(cell.get((m, s))) for s in seeds)] for m in methods))]
    return "\n".join(lines) + "\n"


def accuracy_vs_sim_time(histories: Mapping[str, list[Records]], path: Path, target: float | None = None,
                         setting: str = "", untuned: float | None = None, split: str = "test") -> Path:
    """Accuracy against cumulative simulated seconds (the table's unit) on a log axis, so a
    method whose rounds take far longer does not squeeze the others; the target as a line."""
    return accuracy_curves(histories, path, x_key="sim_seconds", x_unit="seconds", target=target,
                           xlabel="cumulative simulated time (s, log scale)", untuned=untuned,
                           title="Time to accuracy", setting=setting, split=split)
