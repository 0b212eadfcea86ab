"""The papers' claims decided one by one on the five-seed studies (issues 29 and 31).

The rule was written before any five-seed result existed (docs/studies_plan.md, "Rules decided
before any result"), and this file applies it to the studies' own runs (`fedlora compare`
folders: OUT/seed_S/METHOD), on the same test items of the same seeds:

- **The AFLoRA paper's claims** (one family): AFLoRA's final test accuracy above FLoRA's,
  FlexLoRA's and HETLoRA's in a non-IID setting (AG News label skew) and an IID one (Financial
  PhraseBank), and each of its components helping (AFLoRA above AFLoRA without DDR, and without
  DLF, on AG News). Δ = claimed winner − other per seed; Student's t over the seeds (the
  calibrated test, fedlora.stats); Holm across the family's eight claims, a claim not yet
  decidable counting as p = 1 so the family never shrinks. **reproduced**: Holm p < 0.05 and
  Δ > 0; **refuted**: Holm p < 0.05 and Δ < 0; **inconclusive** otherwise (the interval says
  which gains the runs rule out). A claim is **pending** until both arms finished five seeds.
  Beside each, not in any verdict, the secondary view: the same difference in accuracy AUC (the
  per-round curve's mean), which says whether the verdict depends on the stopping round.
- **Where the 2025 methods stand** (issue 29; two families, global and personalised accuracy):
  FedEx-LoRA, FedSA-LoRA, FedSVD and RoLoRA each against FedIT and against AFLoRA on AG News;
  no direction is claimed, so **above**, **below** or **no difference shown**, Holm across each
  family's eight comparisons.

HierFedLoRA's claims rest on the time-to-accuracy study (docs/benchmarks.md), not on these.

    python bench/paper_claims.py --agnews DIR --fpb DIR --md docs/results/claims.md
"""

from __future__ import annotations

import argparse
import sys
from dataclasses import dataclass
from pathlib import Path

from fedlora.compare import MethodRun, SeedResult, paired_statistics, personal_finals
from fedlora.personalized import aligned
from fedlora.records import accuracy_auc
from fedlora.runtime.outputs import read_metrics
from fedlora.stats import LEVEL, PairedDifference, holm, paired_difference, seed_interval

SEEDS_NEEDED = 5  # a headline claim needs five seeds (the project's evidence standard)
NAMES = {"aflora": "AFLoRA", "fedit": "FedIT", "ffa": "FFA-LoRA", "flora": "FLoRA", "flexlora": "FlexLoRA",
         "hetlora": "HETLoRA", "aflora-no-ddr": "AFLoRA without DDR", "aflora-no-dlf": "AFLoRA without DLF",
         "fedex": "FedEx-LoRA", "fedsa": "FedSA-LoRA", "fedsvd": "FedSVD", "rolora": "RoLoRA"}
TASKS = {"agnews": "AG News, label skew (non-IID)", "fpb": "Financial PhraseBank, IID"}


@dataclass(frozen=True)
class Comparison:
    """`method` against `other` on `task`; `claim` the paper's words when a direction is claimed."""

    task: str
    method: str
    other: str
    claim: str | None = None


CLAIMS = [
    *(Comparison(task, "aflora", other, f"AFLoRA beats {NAMES[other]} ({'IID' if task == 'fpb' else 'non-IID'})")
      for task in TASKS for other in ("flora", "flexlora", "hetlora")),
    Comparison("agnews", "aflora", "aflora-no-ddr", "DDR (dynamic rank assignment) helps"),
    Comparison("agnews", "aflora", "aflora-no-dlf", "DLF (server fine-tuning of A on public data) helps"),
]
STANDING = [Comparison("agnews", new, ref)
            for new in ("fedex", "fedsa", "fedsvd", "rolora") for ref in ("fedit", "aflora")]


def read_runs(study: Path, method: str) -> list[MethodRun]:
    """The finished runs of `method` in a comparison folder, one per seed."""
    seeds = sorted(int(d.name[5:]) for d in study.glob("seed_*") if d.name[5:].isdigit())
    runs = [MethodRun(method, s, study / f"seed_{s}" / method) for s in seeds]
    return [r for r in runs if r.done]


def global_difference(studies: dict[str, Path], c: Comparison) -> PairedDifference | None:
    """Final test accuracy, c.method − c.other, over the seeds both finished on the same items."""
    if c.task not in studies:
        return None
    results = {m: [SeedResult.read(r) for r in read_runs(studies[c.task], m)] for m in (c.method, c.other)}
    return paired_statistics(results[c.method], results[c.other])


def auc_difference(studies: dict[str, Path], c: Comparison) -> tuple[float, float, float] | None:
    """The secondary view, not in the verdicts: accuracy AUC (the mean of the per-round curve on
    the fixed eval subset: fedlora.records.accuracy_auc), c.method − c.other per seed; (mean, low,
    high) of the 95% t interval, None with fewer than two seeds in both. It says whether a verdict
    on final accuracy would hold at other stopping rounds."""
    if c.task not in studies:
        return None
    auc = {m: {r.seed: accuracy_auc(read_metrics(r.run_dir)) for r in read_runs(studies[c.task], m)}
           for m in (c.method, c.other)}
    seeds = sorted(s for s in auc[c.method] if s in auc[c.other]
                   and auc[c.method][s] is not None and auc[c.other][s] is not None)
    if len(seeds) < 2:
        return None
    mean, low, high = seed_interval([auc[c.method][s] - auc[c.other][s] for s in seeds])
    return float(mean), float(low), float(high)


def personal_difference(studies: dict[str, Path], c: Comparison) -> PairedDifference | None:
    """Personalised accuracy (each client's held-out items), pooled, c.method − c.other per seed."""
    if c.task not in studies:
        return None
    final = personal_finals(read_runs(studies[c.task], c.method) + read_runs(studies[c.task], c.other))
    a, b = final.get(c.method, {}), final.get(c.other, {})
    pairs = [p for s in sorted(a) if s in b and (p := aligned(a[s], b[s])) is not None]
    return paired_difference([x for x, _ in pairs], [y for _, y in pairs]) if pairs else None


def decide(comparisons: list[Comparison], diffs: list[PairedDifference | None],
           aucs: list[tuple[float, float, float] | None] | None = None) -> list[dict]:
    """One row per comparison with its Holm p over the whole family (undecidable ones count as
    p = 1) and its verdict under the rule of the module's docstring; `aucs` ride along
    (secondary, never in a verdict)."""
    ready = [d is not None and d.seeds >= SEEDS_NEEDED and d.p_value is not None for d in diffs]
    adjusted = holm([d.p_value if ok else 1.0 for d, ok in zip(diffs, ready)])
    rows = []
    for c, d, ok, p_holm, auc in zip(comparisons, diffs, ready, adjusted, aucs or [None] * len(diffs)):
        row = {"comparison": c, "diff": d, "p_holm": p_holm if ok else None, "auc": auc}
        if not ok:
            row["verdict"] = f"pending ({d.seeds if d else 0} of {SEEDS_NEEDED} seeds)"
        elif p_holm < LEVEL:
            up = d.mean > 0
            row["verdict"] = ("reproduced" if up else "refuted") if c.claim else ("above" if up else "below")
        else:
            row["verdict"] = "inconclusive" if c.claim else "no difference shown"
        rows.append(row)
    return rows


def _table(rows: list[dict], first: str) -> list[str]:
    lines = [f"| {first} | task | Δ, mean [95% t interval over seeds] | seeds | p (t) | p (Holm) | verdict "
             "| secondary: Δ accuracy AUC [95% t] |", "|---|---|---|---|---|---|---|---|"]
    for r in rows:
        c, d = r["comparison"], r["diff"]
        what = c.claim or f"{NAMES[c.method]} − {NAMES[c.other]}"
        if d is None or d.low is None:
            delta, p = "–", "–"
        else:
            delta, p = f"{d.mean:+.3f} [{d.low:+.3f}, {d.high:+.3f}]", f"{d.p_value:.3f}"
        p_holm = "–" if r["p_holm"] is None else f"{r['p_holm']:.3f}"
        auc = "–" if r.get("auc") is None else "{:+.3f} [{:+.3f}, {:+.3f}]".format(*r["auc"])
        lines.append(f"| {what} | {TASKS[c.task]} | {delta} | {d.seeds if d else 0} | {p} | {p_holm} "
                     f"| **{r['verdict']}** | {auc} |")
    return lines


def markdown(claims: list[dict], standing_global: list[dict], standing_personal: list[dict]) -> str:
    lines = ["**The AFLoRA paper's claims** (Δ: the claimed winner's final test accuracy minus the "
             "other's, per seed, same test items; Student's t over seeds; Holm across these "
             f"{len(claims)}; a claim is decided with {SEEDS_NEEDED} seeds. Reproduced / refuted: Holm p < 0.05 "
             "in / against the claimed direction; inconclusive otherwise):", "",
             *_table(claims, "claim"), "",
             f"**Where the 2025 methods stand, global model** (final test accuracy; Holm across these {len(standing_global)}):",
             "", *_table(standing_global, "comparison"), "",
             "**Where the 2025 methods stand, personalised** (each client's held-out items with the model it would "
             f"use, pooled; Holm across these {len(standing_personal)}):", "", *_table(standing_personal, "comparison")]
    return "\n".join(lines) + "\n"


def report(studies: dict[str, Path]) -> str:
    """The three tables of the studies found (task -> comparison folder)."""
    claims = decide(CLAIMS, [global_difference(studies, c) for c in CLAIMS],
                    [auc_difference(studies, c) for c in CLAIMS])
    standing_global = decide(STANDING, [global_difference(studies, c) for c in STANDING],
                             [auc_difference(studies, c) for c in STANDING])
    standing_personal = decide(STANDING, [personal_difference(studies, c) for c in STANDING])
    return markdown(claims, standing_global, standing_personal)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--agnews", type=Path, help="the AG News five-seed comparison folder")
    parser.add_argument("--fpb", type=Path, help="the Financial PhraseBank five-seed comparison folder")
    parser.add_argument("--md", type=Path, required=True)
    args = parser.parse_args(argv)
    studies = {task: path for task in TASKS if (path := getattr(args, task)) is not None}
    for task, path in studies.items():
        if not path.is_dir():
            print(f"--{task} {path}: not a folder", file=sys.stderr)
            return 2
    args.md.write_text(report(studies))
    print(f"wrote {args.md}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
