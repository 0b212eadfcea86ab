"""`fedlora compare`: every method on the same partitions, test subset, seed and budget.

Methods run one after another in this process, each in its own run directory
(`OUT/seed_S/METHOD/`), so a comparison interrupted at any point resumes where it stopped:
finished runs are read back, an interrupted one continues from its checkpoint. Because the
task is built from the seed alone, every method sees the same client shards and test set.

The config is a normal run config; its `algorithm` section (if any) is used for the method
it names, and an optional top-level `methods:` mapping gives options per method, e.g.
`methods: {aflora: {beta: 1.0}, hetlora: {reg: 0.01}}`. Methods not named run with their
defaults. A key that is not a method's name defines a variant, compared like a method of its
own: `methods: {hier-speed: {name: hierfedlora, speed_weight: 0.1}}` with
`--methods hierfedlora,hier-speed`. A method's (or variant's) `set:` mapping overrides other
config fields for it alone, e.g. `methods: {flora: {set: {federation.lr: 0.01}}}` (what
`fedlora tune` writes for each method's chosen learning rate).

The statistics (fedlora.stats) read each run's per-item records (`eval/round_NNNN.npz`):
intervals on final and best accuracy, and paired differences against a reference method on
the same test items of the same seeds.
"""

from __future__ import annotations

import csv
import logging
import shlex
import statistics
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from fedlora.algorithms import ALGORITHMS
from fedlora.config import (
    MAX_CONFIG_BYTES,
    ConfigError,
    RunConfig,
    build_config,
    dump_config,
    parse_overrides,
    read_tree,
    resolve_data_dir,
)
from fedlora.personalized import has_personal, personal_comparison, personal_table
from fedlora.plots import accuracy_curves, ranks_per_client, scored_split, setting_caption, untuned_accuracy
from fedlora.records import accuracy_summary, scored_rounds
from fedlora.report import SHARE_OF_DELTA_W, mean_per_client
from fedlora.runtime.checkpoint import has_checkpoint
from fedlora.files import atomic_write, is_link_free, read_bounded, safe_name
from fedlora.runtime.outputs import environment, read_eval_items, read_metrics, read_summary, write_csv, write_json
from fedlora.runtime.rundir import changed_fields_in, verify_run
from fedlora.stats import MIN_SEEDS, PairedDifference, item_interval, paired_difference, seed_interval, with_holm
from fedlora.tables import markdown_table
from fedlora.tta import write_tta
from fedlora.units import format_bytes

log = logging.getLogger("fedlora")

MAX_TABLE_BYTES = 10_000_000
"""comparison.md / .csv read back by `fedlora report` (cosmetic: the runs are the source)."""

COLUMNS = [
    "method", "seeds", "final_accuracy_mean", "final_accuracy_std", "best_accuracy_mean",
    "best_accuracy_std", "accuracy_auc_mean", "accuracy_auc_std", "client_cost_percent", "uplink_bytes_per_client_round",
    "downlink_bytes_per_client_round", "server_seconds_per_round", "wall_seconds",
    "final_accuracy_ci_low", "final_accuracy_ci_high", "best_accuracy_ci_low", "best_accuracy_ci_high",
    "interval", "worst_class_accuracy", "worst_client_accuracy", "worst_client",
    "reference", "paired_seeds", "diff_vs_reference", "diff_ci_low", "diff_ci_high", "p_value", "p_holm",
    "significant", "diff_items_low", "diff_items_high", "items_p", "mcnemar_p",
]
"""diff_ci_* and p_value: the primary test (Student t over the seeds' paired differences), p_holm
that p after Holm's adjustment across the table, significant: marked (≥ MIN_SEEDS seeds and
p_holm < 0.05); diff_items_* and items_p: the secondary within-seed item bootstrap."""
STATS_SEED = 0  # the bootstrap's generator: the same runs give the same intervals and p-values


@dataclass
class MethodRun:
    method: str
    seed: int
    run_dir: Path
    error: str | None = None

    @property
    def done(self) -> bool:
        return (self.run_dir / "summary.json").exists()


def default_methods() -> list[str]:
    """What `compare` and `tune` run without --methods: every registered method but those that
    opt out (`Algorithm.compared_by_default`)."""
    return [name for name, cls in ALGORITHMS.items() if cls.compared_by_default]


def _adapts_ranks(method: str) -> bool:
    """Whether the registered `method` changes client ranks by round (False: unknown here)."""
    cls = ALGORITHMS.get(method)
    return bool(cls and cls.adapts_ranks)


def parse_methods(text: str | None) -> list[str]:
    """Method labels: registered methods, or variants the config's `methods:` defines
    (checked by method_configs, which reads the config); None: `default_methods()`."""
    if text is None:
        return default_methods()
    methods = [safe_name(m.strip(), "--methods") for m in text.split(",") if m.strip()]
    if not methods or len(set(methods)) != len(methods):
        raise ConfigError(f"config error: --methods: give distinct method names, got {text!r}")
    return methods


def parse_seeds(text: str) -> list[int]:
    try:
        return [int(s) for s in text.split(",") if s.strip()]
    except ValueError:
        raise ConfigError(f"config error: --seeds: expected integers like 0,1,2, got {text!r}") from None


def method_configs(path: Path, methods: list[str], seeds: list[int], overrides: list[str],
                   variants: dict[str, dict[str, Any]] | None = None) -> dict[tuple[str, int], RunConfig]:
    """One resolved config per (method, seed); every error is reported before any run starts.
    `variants` adds entries to the config's `methods:` mapping (what `fedlora tune` runs)."""
    tree = read_tree(path)
    given = tree.pop("methods", None) or {}
    if not isinstance(given, dict):
        raise ConfigError("config error: methods: expected a mapping label → options")
    per_method = {**given, **(variants or {})}
    for label in [*per_method, *methods]:  # each names a run directory: OUT/seed_S/LABEL
        safe_name(label, "methods")
    if any(v is not None and not isinstance(v, dict) for v in per_method.values()):
        bad = next(k for k, v in per_method.items() if v is not None and not isinstance(v, dict))
        raise ConfigError(f"config error: methods.{bad}: expected a mapping of the method's options")

    def algorithm_of(label: str) -> str:  # a variant names its method: {name: hierfedlora, ...}
        return (per_method.get(label) or {}).get("name", label)

    unknown = sorted(m for m in {*per_method, *methods} if algorithm_of(m) not in ALGORITHMS)
    if unknown:
        raise ConfigError(
            f"config error: methods: unknown method(s) {unknown}; choose from {sorted(ALGORITHMS)}, or define a "
            "variant in the config's `methods:` mapping with `name: <method>`"
        )
    base_algo = tree.pop("algorithm", None) or {}
    command_line = parse_overrides(overrides)
    # --set algorithm.X=v applies to every method, over the config's options (as in `fedlora run`)
    algo_sets = {k.removeprefix("algorithm."): command_line.pop(k) for k in list(command_line)
                 if k.startswith("algorithm.")}
    if "name" in algo_sets:
        raise ConfigError("config error: --set algorithm.name: choose methods with --methods")
    configs = {}
    for method in methods:
        name = algorithm_of(method)
        options = dict(base_algo) if base_algo.get("name") == name else {}
        options.update(per_method.get(method) or {})
        options.update(algo_sets)
        options["name"] = name
        method_sets = options.pop("set", None) or {}
        if not isinstance(method_sets, dict):
            raise ConfigError(f"config error: methods.{method}.set: expected a mapping like {{federation.lr: 0.003}}")
        for seed in seeds:
            sets = {**command_line, **method_sets, "algorithm": options, "seed": seed}
            try:
                configs[(method, seed)] = resolve_data_dir(build_config(tree, sets), path)
            except ConfigError as err:
                if not any(f"algorithm.{k}" in str(err) for k in algo_sets):
                    raise
                raise ConfigError(f"{err} (method {method}: --set algorithm.* applies to every method; "
                                  "give one method's options in the config's methods: mapping)") from None
    return configs


def check_not_mixed(cfg: RunConfig, run_dir: Path) -> None:
    """A comparison directory never mixes runs of different configs. Values are compared,
    not text: a saved config.yaml whose keys another version ordered differently still matches."""
    saved = run_dir / "config.yaml"
    if not saved.exists():
        return
    text = read_bounded(saved, MAX_CONFIG_BYTES).decode(errors="replace")
    if text == dump_config(cfg):
        return
    changed = changed_fields_in(text, cfg)
    if changed is None:
        raise ConfigError(f"config error: {saved}: not a config this version reads (restore it, or use "
                          "another --out)")
    if changed:
        shown = ", ".join(changed[:4]) + (", ..." if len(changed) > 4 else "")
        raise ConfigError(f"config error: {run_dir}: holds a run with a different config ({shown}; use another --out)")


def run_comparison(config: Path, methods: list[str], seeds: list[int], out: Path,
                   overrides: list[str], progress: bool = True, target: float | None = None,
                   variants: dict[str, dict[str, Any]] | None = None,
                   reference: str | None = "fedit") -> list[MethodRun]:
    from fedlora.runtime.inprocess import Simulation

    configs = method_configs(config, methods, seeds, overrides, variants)
    runs = [MethodRun(m, s, out / f"seed_{s}" / m) for s in seeds for m in methods]
    for run in runs:  # every run directory is checked before any run starts
        if not is_link_free(run.run_dir, out):
            raise ConfigError(f"config error: {run.run_dir}: a symbolic link, or inside one (below --out {out}); "
                              "a comparison writes its runs only into real folders")
        if has_checkpoint(run.run_dir) and not run.done:
            verify_run(run.run_dir, configs[(run.method, run.seed)])  # names an edited file first
        check_not_mixed(configs[(run.method, run.seed)], run.run_dir)
        configs[(run.method, run.seed)].check_files()
    out.mkdir(parents=True, exist_ok=True)
    for run in runs:
        if run.done:
            log.info("%s seed %d: finished earlier, reading %s", run.method, run.seed, run.run_dir)
            continue
        resume = has_checkpoint(run.run_dir)
        log.info("%s seed %d: %s in %s", run.method, run.seed, "resuming" if resume else "running", run.run_dir)
        try:
            Simulation(configs[(run.method, run.seed)], run.run_dir, progress=progress).run(resume=resume)
        except ConfigError:  # a bad config or data file, a run directory in use or damaged, a full
            raise            # disk: one line and exit 2, not one traceback per method
        except Exception as err:  # one failing method must not cost the others their results
            log.exception("%s seed %d failed; continuing with the next method", run.method, run.seed)
            run.error = f"{type(err).__name__}: {err}"
    write_comparison(out, runs, methods, target, reference=reference)
    write_json(out / "environment.json", environment())
    return runs


# --- tables -------------------------------------------------------------------------------


def _mean(xs: list[float]) -> float | None:
    return statistics.fmean(xs) if xs else None


def _std(xs: list[float]) -> float | None:
    return statistics.stdev(xs) if len(xs) > 1 else (0.0 if xs else None)


def method_row(method: str, histories: list[list[dict[str, Any]]]) -> dict[str, Any]:
    """One table row from the metrics of each seed's run of `method`."""
    finals, bests, costs, walls, up, down, server, aucs = [], [], [], [], [], [], [], []
    for recs in histories:
        acc = accuracy_summary(recs)
        if acc.final is not None:
            finals.append(acc.final)
            bests.append(acc.best)
        if acc.auc is not None:
            aucs.append(acc.auc)
        participations = sum(len(r["clients"]) for r in recs)
        costs += [r["client_cost_percent"] for r in recs if r.get("client_cost_percent") is not None]
        if participations:
            up.append(sum(r["uplink_bytes"] for r in recs) / participations)
            down.append(sum(r["downlink_bytes"] for r in recs) / participations)
        server += [r["server_seconds"] for r in recs]
        walls.append(sum(r["wall_seconds"] for r in recs))
    return {
        "method": method,
        "seeds": len(histories),
        "final_accuracy_mean": _mean(finals),
        "final_accuracy_std": _std(finals),
        "best_accuracy_mean": _mean(bests),
        "best_accuracy_std": _std(bests),
        "accuracy_auc_mean": _mean(aucs),
        "accuracy_auc_std": _std(aucs),
        "client_cost_percent": _mean(costs),
        "uplink_bytes_per_client_round": _mean(up),
        "downlink_bytes_per_client_round": _mean(down),
        "server_seconds_per_round": _mean(server),
        "wall_seconds": _mean(walls),
    }


# --- statistics ---------------------------------------------------------------------------


@dataclass
class SeedResult:
    """What one finished run gives the statistics: its metrics and the per-item records of its
    final and its best evaluation (None when the run saved none)."""

    seed: int
    history: list[dict[str, Any]]
    final: dict[str, np.ndarray] | None
    best: dict[str, np.ndarray] | None

    @classmethod
    def read(cls, run: MethodRun) -> SeedResult:
        history = read_metrics(run.run_dir)
        acc = accuracy_summary(history)
        if acc.final_round is None:
            return cls(run.seed, history, None, None)
        return cls(run.seed, history, _scored_items(run.run_dir, acc.final_round),
                   _scored_items(run.run_dir, acc.best_round))

    @property
    def scored(self) -> bool:
        """Whether any round of the run was evaluated with an accuracy."""
        return bool(scored_rounds(self.history))

    @property
    def final_record(self) -> dict[str, Any]:
        return scored_rounds(self.history)[-1]


def _scored_items(run_dir: Path, round_: int) -> dict[str, np.ndarray] | None:
    """`id` and `correct` of the items the run's accuracy is computed on (MMLU's questions for an
    instruction task judged on MMLU), or None without per-item records."""
    items = read_eval_items(run_dir, round_)
    if items is None:
        return None
    for ids, correct in (("id", "correct"), ("mmlu_id", "mmlu_correct")):
        if ids in items and correct in items and items[ids].shape == items[correct].shape:
            return {"id": items[ids], "correct": items[correct]}
    return None


def _interval(values: list[float], items: list[dict[str, np.ndarray] | None]) -> tuple[Any, Any, str]:
    """(low, high, how): Student t over seeds, or with one seed the bootstrap over test items."""
    if len(values) > 1:
        _, low, high = seed_interval(np.array(values))
        return float(low), float(high), "t over seeds"
    if len(values) == 1 and items[0] is not None:
        return (*item_interval(items[0]["correct"], STATS_SEED), "bootstrap over items")
    return None, None, ""


def accuracy_statistics(results: list[SeedResult]) -> dict[str, Any]:
    """Per method: the 95% intervals of final and best accuracy, the worst class's and worst
    client's accuracy of the final evaluation (means over seeds) and the worst client of each seed."""
    ran = [r for r in results if r.scored]
    summaries = [accuracy_summary(r.history) for r in ran]
    f_low, f_high, how = _interval([s.final for s in summaries], [r.final for r in ran])
    b_low, b_high, _ = _interval([s.best for s in summaries], [r.best for r in ran])
    per_class = [r.final_record.get("class_accuracy") for r in ran]
    worst_class = [min(measured) for measured in ([v for v in c.values() if isinstance(v, int | float)]
                                                  for c in per_class if isinstance(c, dict)) if measured]
    worst_client = [r.final_record for r in ran if r.final_record.get("worst_client_accuracy") is not None]
    return {
        "final_accuracy_ci_low": f_low, "final_accuracy_ci_high": f_high,
        "best_accuracy_ci_low": b_low, "best_accuracy_ci_high": b_high, "interval": how,
        "worst_class_accuracy": _mean(worst_class),
        "worst_client_accuracy": _mean([r["worst_client_accuracy"] for r in worst_client]),
        "worst_client": ";".join(str(r["worst_client"]) for r in worst_client),
    }


def paired_statistics(results: list[SeedResult], reference: list[SeedResult]) -> PairedDifference | None:
    """Final accuracy of a method minus the reference's, over the seeds where both saved per-item
    records of the same test items; None when there is no such seed."""
    ref = {r.seed: r.final for r in reference if r.final is not None}
    pairs = [(r.final["correct"], ref[r.seed]["correct"]) for r in results
             if r.final is not None and r.seed in ref and np.array_equal(r.final["id"], ref[r.seed]["id"])]
    if not pairs:
        return None
    return paired_difference([a for a, _ in pairs], [b for _, b in pairs], STATS_SEED)


def personal_finals(runs: list[MethodRun]) -> dict[str, dict[int, dict[str, np.ndarray]]]:
    """Per method and seed, the personalised per-item records of the run's last evaluation that
    has them (`evaluation.personalized`); methods without any are left out."""
    out: dict[str, dict[int, dict[str, np.ndarray]]] = {}
    for run in runs:
        if not run.done:
            continue
        rounds = [r["round"] for r in read_metrics(run.run_dir) if r.get("personal_accuracy") is not None]
        items = read_eval_items(run.run_dir, rounds[-1]) if rounds else None
        if has_personal(items):
            out.setdefault(run.method, {})[run.seed] = items
    return out


def paired_columns(diff: PairedDifference | None, reference: str) -> dict[str, Any]:
    if diff is None:
        return {"reference": reference}
    return {
        "reference": reference, "paired_seeds": diff.seeds, "diff_vs_reference": diff.mean,
        "diff_ci_low": diff.low, "diff_ci_high": diff.high, "p_value": diff.p_value, "p_holm": diff.p_holm,
        "significant": diff.significant, "diff_items_low": diff.items_low, "diff_items_high": diff.items_high,
        "items_p": diff.items_p, "mcnemar_p": ";".join(f"{p:.4g}" for p in diff.mcnemar),
    }


def _ci(low: float | None, high: float | None) -> str:
    return "" if low is None else f" [{low:.4f}, {high:.4f}]"


def statistics_table(rows: list[dict[str, Any]], reference: str | None) -> str:
    """Intervals, worst class / client, and paired differences against the reference: the
    primary test over seeds (* marks Holm-adjusted p < 0.05 with ≥ MIN_SEEDS seeds), then the
    secondary within-seed views (item bootstrap, McNemar per seed)."""
    ref = reference or "–"
    header = ["method", "seeds", "final accuracy [95% CI]", "best accuracy [95% CI]", "interval", "worst class",
              "worst client (which)", f"Δ final vs {ref} [95% t CI over seeds]", "p (t)", "p (Holm)",
              "within-seed: Δ items only [95%]", "within-seed: McNemar p per seed"]
    table = []

    def num(x: Any) -> str:
        return "–" if x is None else f"{x:.4f}"

    for r in rows:
        def acc(key: str) -> str:
            return "–" if r[f"{key}_mean"] is None else f"{r[f'{key}_mean']:.4f}{_ci(r[f'{key}_ci_low'], r[f'{key}_ci_high'])}"
        wc = "–" if r["worst_class_accuracy"] is None else f"{r['worst_class_accuracy']:.4f}"
        wl = "–" if r["worst_client_accuracy"] is None else f"{r['worst_client_accuracy']:.4f} ({r['worst_client']})"
        if r.get("diff_vs_reference") is not None:
            star = "*" if r["significant"] else ""
            diff = f"{r['diff_vs_reference']:+.4f}{star}{_ci(r['diff_ci_low'], r['diff_ci_high'])}"
            p, holm_p, mc = num(r["p_value"]), num(r["p_holm"]), r["mcnemar_p"]
            items = _ci(r["diff_items_low"], r["diff_items_high"]).strip()
        else:
            diff, p, holm_p, items, mc = ("reference" if r["method"] == reference else "–"), "–", "–", "–", "–"
        table.append([r["method"], r["seeds"], acc("final_accuracy"), acc("best_accuracy"), r["interval"] or "–",
                      wc, wl, diff, p, holm_p, items, mc])
    return "\n".join(markdown_table(header, table)) + "\n"


def class_table(results: dict[str, list[SeedResult]]) -> str:
    """Per method, each class's accuracy in the final evaluation, mean over the seeds that
    measured it: where a method's errors concentrate under label skew. With several seeds, each
    seed's row too: a seed's partition decides which classes the high-rank clients hold, and one
    seed's collapse on a class hides in the mean."""
    finals = {m: [(r.seed, c) for r in rs if r.scored and isinstance(c := r.final_record.get("class_accuracy"), dict)]
              for m, rs in results.items()}
    classes = list(dict.fromkeys(c for per_seed in finals.values() for _, acc in per_seed for c in acc))
    if not classes:
        return ""

    def cell(values: list[Any]) -> str:
        mean = _mean([v for v in values if isinstance(v, int | float)])
        return "–" if mean is None else f"{mean:.4f}"

    lines = ["## Per-class accuracy\n", "Final evaluation, mean over seeds.\n",
             *markdown_table(["method", *classes],
                             ([m, *(cell([a.get(c) for _, a in per_seed]) for c in classes)]
                              for m, per_seed in finals.items() if per_seed))]
    if any(len(per_seed) > 1 for per_seed in finals.values()):
        lines += ["", "Per seed (each seed has its own partition, `seed_S/METHOD/partition.json`).\n",
                  *markdown_table(["method", "seed", *classes],
                                  ([m, seed, *(cell([a.get(c)]) for c in classes)]
                                   for m, per_seed in finals.items() for seed, a in per_seed))]
    return "\n".join(lines) + "\n"


def tilt_tables(histories: dict[str, list[list[dict[str, Any]]]]) -> str:
    """Per method (its seeds' metrics), each client's aggregation weight p_k and share of ΔW
    (docs/concepts/methods/aflora.md, "Aggregation tilt"), each the mean over the rounds the client took part in, then
    over seeds: which clients the aggregate leans towards, beside the per-class table's effect."""
    clients = sorted({c for hs in histories.values() for h in hs for r in h
                      if isinstance(r.get("client_weight"), dict) for c in r["client_weight"]},
                     key=lambda c: (len(c), c))  # ids in numeric order
    if not clients:
        return ""
    lines = ["## Aggregation tilt\n",
             f"Each client's aggregation weight p_k and its share of ΔW, mean over the rounds it took part in, "
             f"then over seeds. {SHARE_OF_DELTA_W}\n"]
    for key, title in (("client_weight", "weight p_k"), ("delta_share", "share of ΔW")):
        rows = []
        for m, hs in histories.items():
            cells = [_mean([v for h in hs if (v := mean_per_client(h, key, c)) is not None]) for c in clients]
            if any(v is not None for v in cells):
                rows.append([m, *("–" if v is None else f"{v:.3f}" for v in cells)])
        lines += [*markdown_table([title, *(f"client {c}" for c in clients)], rows), ""]
    return "\n".join(lines)


STATISTICS_NOTE = (
    "## Accuracy statistics\n\n"
    "95% intervals: with several seeds, Student's t over the seeds' accuracies (assumes independent, "
    "roughly normal seeds; few seeds give wide intervals, left unclipped: a bound past 1 shows how "
    "wide); with one seed, the percentile bootstrap over {split} items (assumes independent items; it "
    "ignores training-seed variance). Worst class: the lowest per-class accuracy; worst client: the "
    "lowest accuracy re-weighted to a client's label mix (client id per seed); both of the final "
    "evaluation, means over seeds. Δ: final accuracy minus the reference's on the same {split} items, "
    "mean over seeds. **Primary test** (the one the marks use): the paired t test over seeds (each "
    "seed's mean difference is one observation), its 95% interval beside Δ, p (t) its two-sided "
    "p-value and p (Holm) that p after Holm's correction across this table's comparisons; * marks "
    "p (Holm) < 0.05 with at least {min_seeds} paired seeds. Its false-positive rate is 5% with 3-5 "
    "seeds whatever the seed-to-seed spread (tests/test_calibration.py; docs/concepts/statistics.md "
    "gives its power). **Secondary, within-seed views** (no marks): \"Δ items only\" resamples the "
    "{split} items of each seed with the seeds fixed (10,000 resamples, seeded): the test-set noise of "
    "these trained models, blind to training-seed variance; McNemar: the exact test per seed on the "
    "items exactly one of the two methods gets right (conditional on the trained models).\n"
)


def _pm(mean: float | None, std: float | None, n: int) -> str:
    if mean is None:
        return "–"
    return f"{mean:.4f} ± {std:.4f}" if n > 1 else f"{mean:.4f}"


def results_table(rows: list[dict[str, Any]]) -> str:
    """The comparison's main table: accuracy (final, best, AUC), cost, bytes and time per method."""
    header = ["method", "seeds", "final accuracy", "best accuracy", "accuracy AUC", "client cost %",
              "uplink / client / round", "downlink / client / round", "server s / round", "wall s / run"]
    table = []
    for r in rows:
        cost = "–" if r["client_cost_percent"] is None else f"{r['client_cost_percent']:.4f}"
        server = "–" if r["server_seconds_per_round"] is None else f"{r['server_seconds_per_round']:.3f}"
        wall = "–" if r["wall_seconds"] is None else f"{r['wall_seconds']:.0f}"
        table.append([r["method"], r["seeds"], _pm(r["final_accuracy_mean"], r["final_accuracy_std"], r["seeds"]),
                      _pm(r["best_accuracy_mean"], r["best_accuracy_std"], r["seeds"]),
                      _pm(r["accuracy_auc_mean"], r["accuracy_auc_std"], r["seeds"]), cost,
                      format_bytes(r["uplink_bytes_per_client_round"]),
                      format_bytes(r["downlink_bytes_per_client_round"]), server, wall])
    return "\n".join(markdown_table(header, table)) + "\n"


def write_comparison(out: Path, runs: list[MethodRun], methods: list[str],
                     target: float | None = None, reference: str | None = "fedit",
                     command: str | None = None) -> list[dict[str, Any]]:
    """comparison.csv, comparison.md and the PNG figures from the finished runs in `out`
    (with time to `target` accuracy on the simulated clock: fedlora.tta, and paired differences
    against `reference` when it ran). `command` is the command line recorded in comparison.md
    (default: this process's, if it is `compare`)."""
    if command is None and sys.argv[1:2] == ["compare"]:
        command = shlex.join(["fedlora", *sys.argv[1:]])
    results: dict[str, list[SeedResult]] = {m: [] for m in methods}
    algorithm = {}  # label → method (a variant's label differs from its method's name)
    for run in runs:
        if run.done:
            results[run.method].append(SeedResult.read(run))
            algorithm[run.method] = str(read_summary(run.run_dir).get("method", run.method))
    histories = {m: [r.history for r in rs] for m, rs in results.items()}
    has_reference = bool(results.get(reference or ""))
    rows = []
    for m, rs in results.items():
        if not rs:
            continue
        row = {**method_row(m, histories[m]), **accuracy_statistics(rs)}
        rows.append(row)
    if has_reference:  # Holm across the table's comparisons with the reference
        others = [r for r in rows if r["method"] != reference]
        diffs = with_holm([paired_statistics(results[r["method"]], results[reference]) for r in others])
        for r, diff in zip(others, diffs):
            r.update(paired_columns(diff, reference))
    write_csv(out / "comparison.csv", COLUMNS, rows)

    done = {m: h for m, h in histories.items() if h}
    finished = [r.run_dir for r in runs if r.done]
    setting = setting_caption(finished, [r.seed for r in runs if r.done])
    untuned = untuned_accuracy(finished)
    split = scored_split(finished)  # a tuning comparison scores its validation carve
    figures = []
    if done:
        figures.append(accuracy_curves(done, out / "accuracy_vs_round.png", setting=setting, untuned=untuned,
                                       split=split, title=f"{split.capitalize()} accuracy by round"))
        figures.append(accuracy_curves(done, out / "accuracy_vs_uplink.png", x_key="uplink_bytes", x_unit="bytes",
                                       xlabel="cumulative uplink, all clients (log scale)", setting=setting,
                                       untuned=untuned, split=split,
                                       title=f"{split.capitalize()} accuracy by uplink traffic"))
        ranked = {m: rs[0] for m, rs in results.items() if rs and _adapts_ranks(algorithm[m])}
        if ranked:  # one seed's clients (each seed has its own partition): the caption names that seed
            shown = setting_caption(finished, [r.seed for r in ranked.values()])
            figures.append(ranks_per_client({m: r.history for m, r in ranked.items()}, out / "ranks_per_client.png",
                                            setting=shown))

    failed = [r for r in runs if r.error]
    first = next((r for r in runs if r.done), None)
    cfg_note = f"`{first.run_dir.relative_to(out)}/config.yaml`" if first else "each run's config.yaml"
    text = [
        "# Comparison\n",
        f"Command: `{command}`\n" if command else "",
        (f"Seeds: {sorted({r.seed for r in runs})}. Every method ran on the same client partition, {split} "
         f"subset and budget; the resolved configs are in each run directory (e.g. {cfg_note}).\n"),
        (f"Accuracy is on the {split} subset after the last round (final) and the best evaluated round "
         "(best); accuracy AUC (secondary) is the mean accuracy over the evaluated rounds, on the fixed "
         "eval subset when the runs have one (federation.eval_subset): the normalised area under the "
         "accuracy curve; ± is the standard deviation over seeds. Client cost is the paper's metric: "
         "parameters a client trains or uploads over the base model's parameter count, averaged over "
         "clients and rounds. Bytes are float32 tensors as sent; server seconds include any server-side "
         "training (AFLoRA's A fine-tuning) and SVDs (FlexLoRA).\n"),
        results_table(rows),
        STATISTICS_NOTE.format(split=split, min_seeds=MIN_SEEDS),
        (f"No paired differences: the reference method {reference!r} has no finished run here "
         "(choose one with --reference).\n" if reference and not has_reference else ""),
        statistics_table(rows, reference if has_reference else None),
        class_table(results),
        personal_table(personal_comparison(personal_finals(runs), reference), reference),
        tilt_tables(histories),
        *(f"\n![{p.stem}]({p.name})\n" for p in figures),
        write_tta(out, {m: {r.seed: r.history for r in rs} for m, rs in results.items() if rs},
                  target, reference, setting, untuned, split) if done else "",
    ]
    if failed:
        text.append("\n## Failed runs\n\n" + "".join(f"- {r.method} seed {r.seed}: {r.error}\n" for r in failed))
    atomic_write(out / "comparison.md", "\n".join(t for t in text if t))
    return rows


def _recorded_command(md: Path) -> list[str] | None:
    """The words of comparison.md's recorded `Command:` line; [] when there is none, None when
    it cannot be read or split."""
    if not md.exists():
        return []
    try:
        text = read_bounded(md, MAX_TABLE_BYTES).decode()
        line = next((x for x in text.splitlines() if x.startswith("Command: `")), None)
        return shlex.split(line.removeprefix("Command: `").rstrip("`")) if line else []
    except (UnicodeDecodeError, ValueError):
        return None


def _with_flag(words: list[str], flag: str, value: str) -> list[str]:
    """`words` with `flag value` set: replaced where it is, else appended."""
    if flag in words[:-1]:
        i = words.index(flag)
        return [*words[:i + 1], value, *words[i + 2:]]
    return [*words, flag, value]


def rebuild_comparison(out: Path, target: float | None = None, reference: str | None = None
                       ) -> list[dict[str, Any]]:
    """A comparison directory's tables and figures again from its finished runs' metrics,
    without training (`fedlora report COMPARE_DIR`). Methods keep comparison.csv's order, the
    recorded command line and its --target and --reference are kept unless `target` or
    `reference` is given; the command recorded then carries the values the tables used."""
    out, given_target, given_reference = Path(out), target, reference
    seeds = sorted(int(d.name[5:]) for d in out.glob("seed_*") if d.is_dir() and d.name[5:].isdigit())
    if not seeds:
        raise FileNotFoundError(f"report: {out}: no seed_*/ run directories (not a comparison directory)")
    found = sorted({d.name for s in seeds for d in (out / f"seed_{s}").iterdir() if (d / "metrics.jsonl").exists()})
    table = out / "comparison.csv"
    try:
        listed = [r.get("method") for r in csv.DictReader(read_bounded(table, MAX_TABLE_BYTES).decode().splitlines())
                  ] if table.exists() else []
    except (UnicodeDecodeError, csv.Error):
        listed = []  # the order is cosmetic: found order then
    methods = [m for m in listed if m in found] + [m for m in found if m not in listed]
    words = _recorded_command(out / "comparison.md")
    if words is None and target is None:
        raise ConfigError(f"run error: {out / 'comparison.md'}: its Command line is damaged; give --target")
    words = words or []
    try:
        if target is None and "--target" in words[:-1]:
            target = float(words[words.index("--target") + 1])
    except ValueError:
        raise ConfigError(f"run error: {out / 'comparison.md'}: its Command line's --target is damaged; "
                          "give --target") from None
    if reference is None:
        reference = words[words.index("--reference") + 1] if "--reference" in words[:-1] else "fedit"
    elif reference not in methods:
        raise ConfigError(f"config error: --reference {reference}: not a method of {out} ({', '.join(methods)})")
    for flag, value in (("--target", given_target), ("--reference", given_reference)):  # what the tables used
        if value is not None and words:
            words = _with_flag(words, flag, str(value))
    command = shlex.join(words) if words else None
    runs = [MethodRun(m, s, out / f"seed_{s}" / m) for s in seeds for m in methods]
    return write_comparison(out, runs, methods, target, reference, command)
