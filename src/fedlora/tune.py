"""`fedlora tune`: every method's settings chosen the same way, on validation data, on equal budgets.

Protocol (issue 15): a validation set is carved off the training pool (`data.validation_examples`:
no client trains on it and the test set is never evaluated); every method gets the same client
learning-rate grid and at most the same number of method-specific settings (`max_settings`);
each (method, setting, lr) is one run, evaluated on the validation set; the choice is the
highest final validation accuracy (TIE_RULE; tasks without accuracy: lowest loss). The runs are
a `fedlora compare` of variants, one per grid point, so tuning resumes like a comparison.
Outputs: `tuning.md` and `tuning.csv` (grid, scores, choices), `tuned.yaml` (the config with
each method's choice in its `methods:` mapping) and the `fedlora compare` command that runs the
choices on the test set with the same `--set` overrides: the test budget is the tuning budget.

A choice at either end of the lr grid is not a tuned value (the curve may still be rising past
it): `edge_choices` names them, tuning.md says so, and without `allow_edge` no tuned.yaml is
written (a stale one is removed) and the command stops with one line: extend the grid and rerun
into the same directory, where every finished grid point is reused.
"""

from __future__ import annotations

import json
import shlex
from collections.abc import Collection
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from fedlora.compare import method_configs, run_comparison
from fedlora.config import DEFAULT_DATA_DIR, ConfigError, data_folder, read_tree
from fedlora.files import atomic_write
from fedlora.records import loss_evaluated
from fedlora.runtime.outputs import read_metrics, write_csv
from fedlora.tables import markdown_table

DEFAULT_LRS = [1e-3, 3e-3, 1e-2]
TIE_RULE = ("ties (the same validation accuracy, i.e. as many validation items right) go to the lower "
            "validation loss, then to the earlier grid point (settings in the grid's order, lrs in the "
            "grid's order)")


class EdgeChoice(ConfigError):
    """Some method's chosen lr is an end of the grid: nothing is published (exit code 2)."""


@dataclass
class Grid:
    """Client learning rates for every method, and each method's own settings (option mappings)."""

    lrs: list[float] = field(default_factory=lambda: list(DEFAULT_LRS))
    settings: dict[str, list[dict[str, Any]]] = field(default_factory=dict)
    max_settings: int = 1

    def of(self, method: str) -> list[dict[str, Any]]:
        """The method's settings; `{}` (the config's options) when the grid gives none."""
        return self.settings.get(method) or [{}]


def read_grid(path: str | None, methods: list[str]) -> Grid:
    """The `--grid` YAML: `lr: [...]`, `settings: {method: [{option: value}, ...]}`, `max_settings`."""
    if path is None:
        return Grid()
    tree = read_tree(path)
    where = f"config error: --grid {path}"
    unknown = sorted(set(tree) - {"lr", "settings", "max_settings"})
    if unknown:
        raise ConfigError(f"{where}: unknown key {unknown[0]!r} (lr, settings, max_settings)")
    lrs = tree.get("lr", DEFAULT_LRS)
    if (not isinstance(lrs, list) or not lrs or len(set(lrs)) != len(lrs)
            or not all(isinstance(x, (int, float)) and not isinstance(x, bool) and x > 0 for x in lrs)):
        raise ConfigError(f"{where}: lr: expected a list of distinct positive numbers, got {lrs!r}")
    settings = tree.get("settings") or {}
    if not isinstance(settings, dict):
        raise ConfigError(f"{where}: settings: expected a mapping method → list of option mappings")
    for method, items in settings.items():
        if method not in methods:
            raise ConfigError(f"{where}: settings.{method}: not among --methods {','.join(methods)}")
        if not isinstance(items, list) or not items or not all(isinstance(x, dict) for x in items):
            raise ConfigError(f"{where}: settings.{method}: expected a non-empty list of option mappings")
        if any("name" in x or "set" in x for x in items):
            raise ConfigError(f"{where}: settings.{method}: a setting holds the method's options only (no name, set)")
    largest = max([len(v) for v in settings.values()] or [1])
    max_settings = tree.get("max_settings", largest)
    if not isinstance(max_settings, int) or isinstance(max_settings, bool) or max_settings < 1:
        raise ConfigError(f"{where}: max_settings: expected an integer >= 1, got {max_settings!r}")
    if largest > max_settings:
        over = next(m for m, v in settings.items() if len(v) == largest)
        raise ConfigError(f"{where}: settings.{over}: {largest} settings exceed max_settings {max_settings} "
                          "(every method gets the same budget)")
    return Grid([float(x) for x in lrs], {m: [dict(x) for x in v] for m, v in settings.items()}, max_settings)


@dataclass
class Point:
    """One grid point: a method, one of its settings, one learning rate, and its validation scores."""

    method: str
    setting: int
    options: dict[str, Any]
    lr: float
    accuracy: float | None = None
    loss: float | None = None
    error: str | None = None
    chosen: bool = False

    @property
    def label(self) -> str:
        return f"{self.method}-s{self.setting}-lr{self.lr:g}"


def grid_points(grid: Grid, methods: list[str]) -> list[Point]:
    return [Point(m, i, opts, lr) for m in methods for i, opts in enumerate(grid.of(m)) for lr in grid.lrs]


def validation_scores(history: list[dict[str, Any]]) -> tuple[float | None, float | None]:
    """(accuracy, loss) of the last evaluated round, on the validation set."""
    evaluated = loss_evaluated(history)
    if not evaluated:
        return None, None
    last = evaluated[-1]
    return last.get("accuracy"), last["test_loss"]


def choose(points: list[Point]) -> dict[str, Point]:
    """Per method, the point with the highest validation accuracy (ties: lower loss, then grid
    order); without accuracies, the lowest loss. Failed points never win."""
    best: dict[str, Point] = {}
    for p in points:
        if p.error is not None or (p.accuracy is None and p.loss is None):
            continue

        def key(q: Point) -> tuple[float, float]:
            acc = q.accuracy if q.accuracy is not None else float("-inf")
            return acc, -(q.loss if q.loss is not None else float("inf"))

        if p.method not in best or key(p) > key(best[p.method]):
            best[p.method] = p
    for p in best.values():
        p.chosen = True
    return best


def edge_choices(grid: Grid, chosen: dict[str, Point]) -> dict[str, str]:
    """Method → "lowest" / "highest" when its chosen lr is that end of the lr grid (with one or
    two lrs every choice is an end)."""
    low, high = min(grid.lrs), max(grid.lrs)
    out = {}
    for m, p in chosen.items():
        if len(grid.lrs) == 1:
            out[m] = "only"
        elif p.lr in (low, high):
            out[m] = "lowest" if p.lr == low else "highest"
    return out


def tuned_variants(tree: dict[str, Any], tuned: Collection[str]) -> list[str]:
    """The config's variants of tuned methods (`methods: {aflora-no-ddr: {name: aflora, ddr: false}}`):
    an ablation runs with its method's tuned settings plus its own change."""
    return [label for label, entry in (tree.get("methods") or {}).items()
            if label not in tuned and isinstance(entry, dict) and entry.get("name") in tuned]


def tuned_tree(config: Path, chosen: dict[str, Point]) -> dict[str, Any]:
    """The config with each method's chosen options and lr in its `methods:` entry (and under
    each variant of it, whose own options win), the data folder made absolute (tuned.yaml lives
    elsewhere) and no validation carve (test runs)."""
    tree = read_tree(config)
    data = dict(tree.get("data") or {})
    data["data_dir"] = str(data_folder(Path(data.get("data_dir", DEFAULT_DATA_DIR)), config))
    data.pop("validation_examples", None)
    tree["data"] = data
    per_method = dict(tree.get("methods") or {})
    for method, p in chosen.items():
        entry = dict(per_method.get(method) or {})
        sets = dict(entry.get("set") or {})
        sets["federation.lr"] = p.lr
        per_method[method] = {**entry, **p.options, "set": sets}
    for label in tuned_variants(tree, chosen):
        entry, tuned = per_method[label], per_method[per_method[label]["name"]]
        per_method[label] = {**{k: v for k, v in tuned.items() if k != "name"}, **entry,
                             "set": {**tuned["set"], **(entry.get("set") or {})}}
    tree["methods"] = per_method
    return tree


def run_tuning(config: Path, methods: list[str], grid: Grid, out: Path, validation_examples: int,
               seed: int, test_seeds: list[int], overrides: list[str], progress: bool = True,
               allow_edge: bool = False) -> str:
    """Run (or resume) every grid point on the validation set; write the tables and tuned.yaml;
    return the `fedlora compare` command for the test runs (the same overrides: the same
    budget). An lr choice at the grid's edge raises EdgeChoice after the tables, unless `allow_edge`."""
    points = grid_points(grid, methods)
    tree = read_tree(config)
    per_method = tree.get("methods") or {}
    ablations = tuned_variants(tree, methods)  # run after tuning, with its choices
    method_configs(config, ablations, [seed], [])  # a bad option names itself now, not after the grid
    variants = {}
    for p in points:
        entry = per_method.get(p.method) or {}  # the config's options for this method (or variant)
        variants[p.label] = {**entry, **p.options, "name": entry.get("name", p.method),
                             "set": {**(entry.get("set") or {}), "federation.lr": p.lr}}
    runs = run_comparison(
        config, [p.label for p in points], [seed], out / "validation",
        # MMLU is a test set too: tuning scores only the validation carve
        [*overrides, f"data.validation_examples={validation_examples}", "evaluation.mmlu=false"], progress=progress,
        variants=variants, reference=None,  # grid points are compared by their scores, not pairwise
    )
    for p, run in zip(points, runs):
        p.error = run.error
        if run.done:
            p.accuracy, p.loss = validation_scores(read_metrics(run.run_dir))
    chosen = choose(points)
    edges = edge_choices(grid, chosen)
    publish = allow_edge or not edges
    tuned = out / "tuned.yaml"
    to_test = [m for m in methods if m in chosen] + tuned_variants(tree, chosen)
    command = shlex.join([
        "fedlora", "compare", str(tuned), "--methods", ",".join(to_test),
        "--seeds", ",".join(map(str, test_seeds)), "--out", str(out / "test"),
        *(w for o in overrides for w in ("--set", o)),
    ])
    if publish:
        atomic_write(tuned, yaml.safe_dump(tuned_tree(config, chosen), sort_keys=False))
        method_configs(tuned, to_test, test_seeds, overrides)  # the printed command's configs are valid
    else:
        tuned.unlink(missing_ok=True)  # never leave an earlier grid's choices looking current
    write_tables(out, grid, points, chosen, methods, validation_examples, seed, overrides,
                 command if publish else None, edges)
    if not publish:
        where = ", ".join(f"{m} (lr {chosen[m].lr:g}, the {end})" for m, end in edges.items())
        raise EdgeChoice(f"tune: chosen at the lr grid's edge: {where}; extend lr in --grid past it and rerun "
                         f"into {out} (finished grid points are reused), or pass --allow-edge; tuning.md lists "
                         "the scores, no tuned.yaml was written")
    return command


CSV_COLUMNS = ["method", "setting", "options", "lr", "validation_accuracy", "validation_loss", "chosen", "error"]


def _fmt(x: float | None) -> str:
    return "–" if x is None else f"{x:.4f}"


def write_tables(out: Path, grid: Grid, points: list[Point], chosen: dict[str, Point], methods: list[str],
                 validation_examples: int, seed: int, overrides: list[str], command: str | None,
                 edges: dict[str, str] | None = None) -> None:
    write_csv(out / "tuning.csv", CSV_COLUMNS, ({
        "method": p.method, "setting": p.setting, "options": json.dumps(p.options, sort_keys=True),
        "lr": p.lr, "validation_accuracy": p.accuracy, "validation_loss": p.loss,
        "chosen": p.chosen, "error": p.error or "",
    } for p in points))
    runs = {m: sum(p.method == m for p in points) for m in methods}
    text = [
        "# Tuning\n",
        (f"Validation: {validation_examples} examples carved off the training pool (seed {seed}); no client "
         "trains on them and the test set is never evaluated. Every method gets the client lr grid "
         f"{grid.lrs} and at most {grid.max_settings} method-specific setting(s); choice by final "
         f"validation accuracy; {TIE_RULE}. Overrides of the tuning runs, and of the test runs (the "
         f"same budget): {' '.join(overrides) or 'none'}. Runs in "
         f"`validation/seed_{seed}/<method>-s<setting>-lr<lr>/`.\n"),
        "Runs per method: " + ", ".join(f"{m} {n}" for m, n in runs.items()) + ".\n",
        *markdown_table(
            ["method", "setting", "options", "lr", "validation accuracy", "validation loss", "chosen"],
            ([p.method, f"s{p.setting}", f"`{json.dumps(p.options, sort_keys=True)}`", f"{p.lr:g}", _fmt(p.accuracy),
              _fmt(p.loss), "**yes**" if p.chosen else ("failed" if p.error else "")] for p in points)),
        "\n## Chosen\n",
        *markdown_table(
            ["method", "options", "lr", "validation accuracy"],
            [*([m, f"`{json.dumps(p.options, sort_keys=True)}`", f"{p.lr:g}", _fmt(p.accuracy)]
               for m, p in chosen.items()),
             *([m, "no run finished", "–", "–"] for m in methods if m not in chosen)]),
        "\n## Edge of the grid\n",
        ("No method's lr choice is an end of the grid.\n" if not edges else
         "Chosen at an end of the lr grid (the score may still rise past it; extend the grid):\n\n"
         + "".join(f"- {m}: lr {chosen[m].lr:g}, the {end} of {grid.lrs}\n" for m, end in edges.items())),
        "\n## Test runs\n",
        (f"The chosen settings are in `tuned.yaml`; on the test set, with the tuning's overrides:\n\n"
         f"```\n{command}\n```\n" if command else
         "Not published: a choice is at the grid's edge (above), so no tuned.yaml was written.\n"),
    ]
    atomic_write(out / "tuning.md", "\n".join(text))

