"""Where the five-seed studies stand (issues 29 and 31), from what is published under docs/.

Run after every `bench/studies_sync.py save`: it reads only the published copies (so the page
says exactly what the repository holds) and writes `docs/results/studies.md` with

- the pilot: each method's validation curve, the plateau round by the rule of
  docs/studies_plan.md (fedlora.records.plateau_round) and the rounds the studies run, with a
  figure (`docs/results/studies_pilot.png`);
- the tuning: the grid, each method's chosen lr and validation accuracy, an end-of-grid choice
  flagged, or how many grid points have finished;
- the main studies: finished runs of all, and their comparison once complete;
- the papers' claims and where the 2025 methods stand (bench/paper_claims.py), pending until
  five seeds are in.

    python bench/studies_report.py [--docs docs]
"""

from __future__ import annotations

import argparse
import csv
import sys
from datetime import date
from pathlib import Path

import yaml

from fedlora.records import plateau_round
from fedlora.runtime.outputs import read_metrics

sys.path.insert(0, str(Path(__file__).resolve().parent))
import paper_claims  # noqa: E402  (bench/ is scripts, not a package)
import study_plan  # noqa: E402

TASKS = paper_claims.TASKS
PLAN = study_plan.load()  # what the lanes run (configs/studies/plan.yaml)


def pilot_curves(docs: Path, task: str) -> dict[str, list[float]]:
    """Per pilot method with a published run, its validation accuracy by round."""
    curves = {}
    for m in PLAN.pilot_methods:
        run = docs / "studies_pilot" / task / m
        if (run / "metrics.jsonl").is_file():
            curves[m] = [r["accuracy"] for r in read_metrics(run) if r.get("accuracy") is not None]
    return curves


def pilot_decision(curves: dict[str, list[float]]) -> int | None:
    """The pilot's round count (the later plateau of the two curves), None while either rises."""
    if set(curves) != set(PLAN.pilot_methods):
        return None
    rounds = [plateau_round(c) for c in curves.values()]
    return None if None in rounds else max(rounds)


def tuning_rows(docs: Path, task: str) -> list[dict[str, str]]:
    table = docs / "studies_tuning" / task / "tuning.csv"
    return list(csv.DictReader(table.read_text().splitlines())) if table.is_file() else []


def finished_points(docs: Path, task: str) -> int:
    return sum(1 for _ in (docs / "studies_tuning" / task).glob("validation/seed_*/*/summary.json"))


def finished_main(docs: Path, task: str) -> int:
    return sum((docs / f"studies_{task}" / f"seed_{s}" / m / "summary.json").is_file()
               for s in PLAN.seeds for m in PLAN.tasks[task].main)


def pilot_section(docs: Path) -> tuple[list[str], dict[str, dict[str, list[float]]]]:
    lines = ["## Round count: the pilot", "",
             f"{' and '.join(paper_claims.NAMES[m] for m in PLAN.pilot_methods)} at seed 0, validation accuracy "
             f"({PLAN.validation_examples} items carved from the training pool) "
             "after every round; the studies stop where both curves have plateaued (the mean of the last "
             f"3 rounds within 0.5 points of the 3 before), at most {PLAN.pilot_max_rounds} rounds, and run at most "
             f"{PLAN.round_cap}.", "",
             "| task | method | validation accuracy by round | plateau round |", "|---|---|---|---|"]
    all_curves = {}
    for task, name in TASKS.items():
        curves = all_curves[task] = pilot_curves(docs, task)
        for m, c in curves.items():
            plateau = plateau_round(c)
            lines.append(f"| {name} | {paper_claims.NAMES[m]} | {', '.join(f'{a:.3f}' for a in c)} | "
                         f"{plateau if plateau else 'still rising'} |")
        decided = pilot_decision(curves)
        rounds = "none published" if not curves else max(len(c) for c in curves.values())
        verdict = (f"**{min(decided, PLAN.round_cap)} rounds** (plateau at {decided})" if decided
                   else f"not decided yet ({rounds} rounds run)")
        lines.append(f"| {name} | *decision* | | {verdict} |")
    dtypes = sorted({yaml.safe_load(c.read_text())["model"]["compute_dtype"]
                     for c in (docs / "studies_pilot").glob("*/*/config.yaml")})
    if dtypes:  # the studies' own dtype may differ (the pilot decides the round count only)
        lines += ["", f"The pilots computed in {' and '.join(dtypes)}; the studies' dtypes are below."]
    return lines, all_curves


def tuning_section(docs: Path) -> list[str]:
    lines = ["## Tuning", "",
             "One seed, 500 validation items, the studies' rounds; choice by final validation accuracy "
             "(ties: lower validation loss, then the earlier grid point); a choice at an end of the grid "
             "extends it for every method.", ""]
    for task, name in TASKS.items():
        rows = tuning_rows(docs, task)
        chosen = [r for r in rows if r["chosen"] == "True"]
        total = len(PLAN.tasks[task].tuned)
        if len(chosen) < total:  # (a table of fewer methods is one method's unit, not the decision)
            n = finished_points(docs, task)
            lines.append(f"- {name}: {n} grid point{'' if n == 1 else 's'} finished; not decided yet.")
            continue
        lrs = sorted({float(r["lr"]) for r in rows})
        picks = ", ".join(f"{paper_claims.NAMES[r['method']]} {float(r['lr']):g}"
                          f"{' (grid end)' if float(r['lr']) in (lrs[0], lrs[-1]) else ''} "
                          f"({float(r['validation_accuracy']):.3f})" for r in chosen)
        lines.append(f"- {name}: grid {', '.join(f'{x:g}' for x in lrs)}; chosen lr (validation accuracy): {picks}. "
                     f"[tuning.md](../studies_tuning/{task}/tuning.md)")
    return lines


def main_section(docs: Path) -> list[str]:
    lines = ["## The five-seed studies", ""]
    for task, name in TASKS.items():
        methods, seeds = PLAN.tasks[task].main, len(PLAN.seeds)
        done, total = finished_main(docs, task), seeds * len(methods)
        link = (f"; [comparison.md](../studies_{task}/comparison.md)"
                if done == total and (docs / f"studies_{task}" / "comparison.md").is_file() else "")
        lines.append(f"- {name}: {done} of {total} runs finished ({len(methods)} methods × {seeds} seeds, "
                     f"{PLAN.tasks[task].compute_dtype}){link}.")
    return lines


def figure(all_curves: dict[str, dict[str, list[float]]], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import MaxNLocator

    fig, axes = plt.subplots(1, len(TASKS), figsize=(9, 3.6), sharey=True)
    for ax, (task, name) in zip(axes, TASKS.items()):
        curves = all_curves[task]
        for m, c in curves.items():  # one colour per method, whichever curves are published
            ax.plot(range(1, len(c) + 1), c, marker="o", color=f"C{PLAN.pilot_methods.index(m)}",
                    label=paper_claims.NAMES[m])
        decided = pilot_decision(curves)
        if decided:
            ax.axvline(decided, color="grey", linestyle="--", label=f"plateau: round {decided}")
            if decided > PLAN.round_cap:
                ax.axvline(PLAN.round_cap, color="black", linestyle=":",
                           label=f"the studies stop: round {PLAN.round_cap}")
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.set_title(name, fontsize=9)
        ax.set_xlabel("round")
        ax.grid(alpha=0.3)
        if curves:
            ax.legend(fontsize=8)
        else:
            ax.text(0.5, 0.5, "not run yet", ha="center", transform=ax.transAxes)
    axes[0].set_ylabel("validation accuracy (500 items)")
    fig.suptitle("The round-count pilot, seed 0, SmolLM2-135M", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def report(docs: Path) -> str:
    pilot, curves = pilot_section(docs)
    studies = {task: docs / f"studies_{task}" for task in TASKS if (docs / f"studies_{task}").is_dir()}
    figure(curves, docs / "results" / "studies_pilot.png")
    return "\n".join([
        "# The five-seed studies: where they stand", "",
        f"Generated {date.today().isoformat()} by `bench/studies_report.py` from the runs published under "
        "`docs/` (plan, rules and commands: [studies plan](../studies_plan.md)). Every figure below comes "
        "from those files; a run still going when they were saved is not counted.", "",
        *pilot, "", "![pilot curves](studies_pilot.png)", "", *tuning_section(docs), "", *main_section(docs), "",
        "## The papers' claims", "", paper_claims.report(studies)])


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--docs", type=Path, default=Path(__file__).resolve().parents[1] / "docs")
    args = parser.parse_args(argv)
    out = args.docs / "results" / "studies.md"
    out.write_text(report(args.docs))
    print(f"wrote {out} and {args.docs / 'results' / 'studies_pilot.png'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
