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

from fedlora.algorithms import ALGORITHMS
from fedlora.config import (
    ConfigError,
    RunConfig,
    build_config,
    dump_config,
    parse_overrides,
    read_tree,
    resolve_data_dir,
)
from fedlora.plots import accuracy_curves, ranks_per_client
from fedlora.runtime.checkpoint import has_checkpoint
from fedlora.runtime.files import read_bounded, read_json
from fedlora.runtime.outputs import environment, read_metrics, write_json
from fedlora.runtime.rundir import MAX_CONFIG_BYTES, verify_run
from fedlora.tta import write_tta

log = logging.getLogger("fedlora")

COLUMNS = [
    "method", "seeds", "final_accuracy_mean", "final_accuracy_std", "best_accuracy_mean",
    "best_accuracy_std", "client_cost_percent", "uplink_bytes_per_client_round",
    "downlink_bytes_per_client_round", "server_seconds_per_round", "wall_seconds",
]


@dataclass
class MethodRun:
    method: str
    seed: int
    run_dir: Path
    error: str | None = None

    @property
    def done(self) -> bool:
        return (self.run_dir / "summary.json").exists()


def parse_methods(text: str) -> list[str]:
    """Method labels: registered methods, or variants the config's `methods:` defines
    (checked by method_configs, which reads the config)."""
    methods = [m.strip() for m in text.split(",") if m.strip()]
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
    per_method = {**(tree.pop("methods", None) or {}), **(variants or {})}

    def algorithm_of(label: str) -> str:  # a variant names its method: {name: hierfedlora, ...}
        return (per_method.get(label) or {}).get("name", label)

    unknown = sorted(m for m in {*per_method, *methods} if algorithm_of(m) not in ALGORITHMS)
    if unknown:
        raise ConfigError(
            f"config error: methods: unknown method(s) {unknown}; choose from {sorted(ALGORITHMS)}, or define a "
            "variant in the config's `methods:` mapping with `name: <method>`"
        )
    base_algo = tree.pop("algorithm", None) or {}
    configs = {}
    for method in methods:
        name = algorithm_of(method)
        options = dict(base_algo) if base_algo.get("name") == name else {}
        options.update(per_method.get(method) or {})
        options["name"] = name
        method_sets = options.pop("set", None) or {}
        if not isinstance(method_sets, dict):
            raise ConfigError(f"config error: methods.{method}.set: expected a mapping like {{federation.lr: 0.003}}")
        for seed in seeds:
            sets = {**parse_overrides(overrides), **method_sets, "algorithm": options, "seed": seed}
            configs[(method, seed)] = resolve_data_dir(build_config(tree, sets), path)
    return configs


def check_not_mixed(cfg: RunConfig, run_dir: Path) -> None:
    """A comparison directory never mixes runs of different configs."""
    saved = run_dir / "config.yaml"
    if saved.exists() and read_bounded(saved, MAX_CONFIG_BYTES).decode(errors="replace") != dump_config(cfg):
        raise ConfigError(f"config error: {run_dir}: holds a run with a different config (use another --out)")


def run_comparison(config: Path, methods: list[str], seeds: list[int], out: Path,
                   overrides: list[str], progress: bool = True, target: float | None = None,
                   variants: dict[str, dict[str, Any]] | None = None) -> list[MethodRun]:
    from fedlora.runtime.inprocess import Simulation

    configs = method_configs(config, methods, seeds, overrides, variants)
    runs = [MethodRun(m, s, out / f"seed_{s}" / m) for s in seeds for m in methods]
    for run in runs:  # every run directory is checked before any run starts
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
        except ConfigError:  # a run directory in use or damaged, a full disk: stop with its one line
            raise
        except Exception as err:  # one failing method must not cost the others their results
            log.exception("%s seed %d failed; continuing with the next method", run.method, run.seed)
            run.error = f"{type(err).__name__}: {err}"
    write_comparison(out, runs, methods, target)
    return runs


# --- tables -------------------------------------------------------------------------------


def _mean(xs: list[float]) -> float | None:
    return statistics.fmean(xs) if xs else None


def _std(xs: list[float]) -> float | None:
    return statistics.stdev(xs) if len(xs) > 1 else (0.0 if xs else None)


def method_row(method: str, histories: list[list[dict[str, Any]]]) -> dict[str, Any]:
    """One table row from the metrics of each seed's run of `method`."""
    finals, bests, costs, walls, up, down, server = [], [], [], [], [], [], []
    for recs in histories:
        accs = [r["accuracy"] for r in recs if r.get("accuracy") is not None]
        if accs:
            finals.append(accs[-1])
            bests.append(max(accs))
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
        "client_cost_percent": _mean(costs),
        "uplink_bytes_per_client_round": _mean(up),
        "downlink_bytes_per_client_round": _mean(down),
        "server_seconds_per_round": _mean(server),
        "wall_seconds": _mean(walls),
    }


def _fmt_bytes(x: float | None) -> str:
    if x is None:
        return "–"
    for unit, size in (("GB", 1e9), ("MB", 1e6), ("kB", 1e3)):
        if x >= size:
            return f"{x / size:.2f} {unit}"
    return f"{x:.0f} B"


def _pm(mean: float | None, std: float | None, n: int) -> str:
    if mean is None:
        return "–"
    return f"{mean:.4f} ± {std:.4f}" if n > 1 else f"{mean:.4f}"


def markdown_table(rows: list[dict[str, Any]]) -> str:
    head = ("| method | seeds | final accuracy | best accuracy | client cost % | uplink / client / round "
            "| downlink / client / round | server s / round | wall s / run |")
    lines = [head, "|" + "---|" * 9]
    for r in rows:
        cost = "–" if r["client_cost_percent"] is None else f"{r['client_cost_percent']:.4f}"
        server = "–" if r["server_seconds_per_round"] is None else f"{r['server_seconds_per_round']:.3f}"
        wall = "–" if r["wall_seconds"] is None else f"{r['wall_seconds']:.0f}"
        lines.append(
            f"| {r['method']} | {r['seeds']} | {_pm(r['final_accuracy_mean'], r['final_accuracy_std'], r['seeds'])} "
            f"| {_pm(r['best_accuracy_mean'], r['best_accuracy_std'], r['seeds'])} | {cost} "
            f"| {_fmt_bytes(r['uplink_bytes_per_client_round'])} | {_fmt_bytes(r['downlink_bytes_per_client_round'])} "
            f"| {server} | {wall} |"
        )
    return "\n".join(lines) + "\n"


def write_comparison(out: Path, runs: list[MethodRun], methods: list[str],
                     target: float | None = None) -> list[dict[str, Any]]:
    """comparison.csv, comparison.md and the PNG figures from the finished runs in `out`
    (with time to `target` accuracy on the simulated clock: fedlora.tta)."""
    histories: dict[str, list[list[dict[str, Any]]]] = {m: [] for m in methods}
    algorithm = {}  # label → method (a variant's label differs from its method's name)
    for run in runs:
        if run.done:
            histories[run.method].append(read_metrics(run.run_dir))
            algorithm[run.method] = read_json(run.run_dir / "summary.json").get("method", run.method)
    rows = [method_row(m, h) for m, h in histories.items() if h]
    with (out / "comparison.csv").open("w", newline="") as fh:
        writer = csv.DictWriter(fh, fieldnames=COLUMNS)
        writer.writeheader()
        writer.writerows(rows)

    done = {m: h for m, h in histories.items() if h}
    figures = []
    if done:
        figures.append(accuracy_curves(done, out / "accuracy_vs_round.png"))
        figures.append(accuracy_curves(done, out / "accuracy_vs_uplink.png", x_key="uplink_bytes",
                                       xlabel="cumulative uplink, all clients (MB)", scale=1e-6))
        ranked = {m: h[0] for m, h in done.items() if algorithm[m] in ("aflora", "hetlora")}
        if ranked:
            figures.append(ranks_per_client(ranked, out / "ranks_per_client.png"))

    failed = [r for r in runs if r.error]
    first = next((r for r in runs if r.done), None)
    cfg_note = f"`{first.run_dir.relative_to(out)}/config.yaml`" if first else "each run's config.yaml"
    text = [
        "# Comparison\n",
        f"Command: `{shlex.join(['fedlora', *sys.argv[1:]])}`\n" if sys.argv[1:2] == ["compare"] else "",
        (f"Seeds: {sorted({r.seed for r in runs})}. Every method ran on the same client partition, test "
         f"subset and budget; the resolved configs are in each run directory (e.g. {cfg_note}).\n"),
        ("Accuracy is on the test subset after the last round (final) and the best evaluated round "
         "(best); ± is the standard deviation over seeds. Client cost is the paper's metric: "
         "parameters a client trains or uploads over the base model's parameter count, averaged over "
         "clients and rounds. Bytes are float32 tensors as sent; server seconds include any server-side "
         "training (AFLoRA's A fine-tuning) and SVDs (FlexLoRA).\n"),
        markdown_table(rows),
        *(f"\n![{p.stem}]({p.name})\n" for p in figures),
        write_tta(out, done, target) if done else "",
    ]
    if failed:
        text.append("\n## Failed runs\n\n" + "".join(f"- {r.method} seed {r.seed}: {r.error}\n" for r in failed))
    (out / "comparison.md").write_text("\n".join(t for t in text if t))
    write_json(out / "environment.json", environment())
    return rows
