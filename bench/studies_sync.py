"""Carry the long studies from one session's machine to the next through the repository.

A session's machine keeps nothing: its processes are killed when it ends and its /work may be
new next time. The studies (docs/studies_plan.md) need more core-hours than a session has, so
at the end of each session their finished runs are published into docs/ (configs, metrics,
per-item records; no checkpoints) and committed, and at the start of the next one they are
restored into the study folders, where the lanes resume: `fedlora compare` and `fedlora tune`
read finished runs back; the pilot skips the steps whose rounds are in metrics.jsonl.

    python bench/studies_sync.py save    [--studies /work/studies] [--docs docs]
    python bench/studies_sync.py restore [--studies /work/studies] [--docs docs]

A study with nothing new since its publish is left as published (restored at a session's start,
it lacks the tables and figures `restore` does not copy back: publishing it again would delete
them). A study's own tables (comparison.md, tuning.md, figures) are published once they cover the
whole study (the lane's DECIDED or .complete); until then only its runs are. A run still going
when `save` runs is left out (it restarts next session from round 1), and so is a pilot run cut
off while being extended (its summary.json is an earlier segment's).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from fedlora.errors import ConfigError
from fedlora.publish import already_published, publish, restore
from fedlora.runtime.outputs import read_metrics, read_summary

# study folder (under --studies) -> its published copy (under --docs)
STUDIES = {
    "privacy/runs": "privacy_study",
    "evidence/pilot/agnews/fedit": "studies_pilot/agnews/fedit",
    "evidence/pilot/agnews/aflora": "studies_pilot/agnews/aflora",
    "evidence/pilot/fpb/fedit": "studies_pilot/fpb/fedit",
    "evidence/pilot/fpb/aflora": "studies_pilot/fpb/aflora",
    "evidence/tune/agnews": "studies_tuning/agnews",
    "evidence/tune/fpb": "studies_tuning/fpb",
    "evidence/main/agnews": "studies_agnews",
    "evidence/main/fpb": "studies_fpb",
}


def extended_since_summary(run: Path) -> bool:
    """A pilot run resumed with more rounds and cut off: its summary.json is an earlier segment's."""
    if not (run / "summary.json").is_file():
        return False
    rounds = [r["round"] for r in read_metrics(run)]
    return bool(rounds) and read_summary(run).get("rounds") != max(rounds)


def whole(source: Path) -> bool:
    """A folder whose tables cover the whole study: a pilot run's or the privacy study's always;
    a tuning's once decided (DECIDED), a main study's once tabulated (.complete), both marked by
    bench/issue31_lane.sh."""
    if source.parent.name == "tune":
        return (source / "DECIDED").is_file()
    if source.parent.name == "main":
        return (source / ".complete").is_file()
    return True


def save(studies: Path, docs: Path) -> None:
    for study, published in STUDIES.items():
        source = studies / study
        if extended_since_summary(source):
            print(f"{source}: cut off while extending; not saved (its earlier publish, if any, stays)")
            continue
        # only a source with a finished run: publishing none would empty an earlier publish (a
        # pilot rerun from round 1 after a restore has no summary.json until its segment ends)
        if (source / "summary.json").is_file() or any(source.glob("seed_*/*/summary.json")) \
                or any(source.glob("validation/seed_*/*/summary.json")):
            # a study's own tables only once they are the whole study's: until then the last
            # unit's one-method table would stand there as if it were (the runs carry the study)
            tables = whole(source)
            if already_published(source, docs / published, finished_only=True, tables=tables):
                print(f"{source}: nothing new since {docs / published} (kept as it is)")
                continue
            files, size = publish(source, docs / published, finished_only=True, tables=tables)
            print(f"{source} -> {docs / published}: {files} files, {size / 1e6:.1f} MB")


def restore_all(studies: Path, docs: Path) -> None:
    for study, published in STUDIES.items():
        if (docs / published / "published.json").is_file():
            copied = restore(docs / published, studies / study)
            print(f"{docs / published} -> {studies / study}: {copied} files copied")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("action", choices=["save", "restore"])
    parser.add_argument("--studies", type=Path, default=Path("/work/studies"))
    parser.add_argument("--docs", type=Path, default=Path(__file__).resolve().parents[1] / "docs")
    args = parser.parse_args(argv)
    try:
        (save if args.action == "save" else restore_all)(args.studies, args.docs)
    except ConfigError as err:
        print(err, file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
