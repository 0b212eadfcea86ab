"""`fedlora report DIR --publish DEST`: copy what a citation needs out of a run or comparison.

A study's directory holds checkpoints, merged updates and locks (59 MB for a 2-round AFLoRA
run on SmolLM2) beside the small files a reader needs to check a claim: each run's resolved config,
environment, partition, metrics, summary and per-item records, and the comparison's tables
and figures. Only those are copied, by name (an allow-list), with the tree kept, so
`docs/NAME` can be committed and re-read by `fedlora report docs/NAME`. Symbolic links are
never followed: a run directory is outside input.
"""

from __future__ import annotations

import shutil
from pathlib import Path

from fedlora.errors import ConfigError

RUN_FILES = ("config.yaml", "environment.json", "partition.json", "metrics.jsonl", "summary.json", "report.md")
"""Per run: what it was, where it ran, what it saw, what it measured."""
TOP_FILES = ("comparison.md", "comparison.csv", "tta.csv", "tta_seeds.csv", "environment.json")
"""Per comparison: its tables (figures are its top-level *.png)."""


def _run_dirs(root: Path) -> list[Path]:
    """The run directories under `root`: itself (one run) or `seed_*/<method>/` (a comparison)."""
    if (root / "metrics.jsonl").is_file():
        return [root]
    return sorted(p.parent for p in root.glob("seed_*/*/metrics.jsonl"))


def citeable_files(root: Path) -> list[Path]:
    """The files under `root` a citation needs, as paths relative to it."""
    chosen = [*root.glob("*.png"), *(root / name for name in TOP_FILES)]
    for run in _run_dirs(root):
        chosen += [run / name for name in RUN_FILES]
        chosen += run.glob("eval/round_*.npz")
        chosen += run.glob("figures/*.png")  # a single run's `fedlora report`
    inside = root.resolve()
    return sorted({p.relative_to(root) for p in chosen
                   if p.is_file() and not p.is_symlink() and p.resolve().is_relative_to(inside)})


def publish(source: Path, dest: Path) -> tuple[int, int]:
    """Copy `citeable_files(source)` into `dest` (created; files already there are replaced).
    Returns (files, bytes)."""
    source, target = source.resolve(), dest.resolve()
    if target == source or source in target.parents or target in source.parents:
        raise ConfigError(f"config error: --publish {dest}: must lie outside {source} and not contain it")
    files = citeable_files(source)
    size = 0
    for rel in files:
        (target / rel).parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(source / rel, target / rel)
        size += (source / rel).stat().st_size
    return len(files), size
