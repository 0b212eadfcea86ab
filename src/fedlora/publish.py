"""`fedlora report DIR --publish DEST`: copy what a citation needs out of a run or comparison.

A study's directory holds checkpoints, merged updates and locks (59 MB for a 2-round AFLoRA
run on SmolLM2) beside the small files a reader needs to check a claim: each run's resolved
config, environment, partition, metrics, summary and per-item records, and the comparison's
tables and figures. Only those are copied, by name (an allow-list), with the tree kept, so
`docs/NAME` can be committed and re-read by `fedlora report docs/NAME`. `DEST/published.json`
lists what was copied, with SHA-256s; publishing again replaces exactly those files, so a copy
never mixes two studies, and a DEST that holds anything else is refused. `restore` copies a
publish's runs back into a study directory, so a study resumes on another machine. Both trees are outside
input: a file is taken only if it and its folders resolve inside the source, and nothing is
written through a symbolic link in DEST.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

from fedlora.errors import ConfigError
from fedlora.files import atomic_write, sha256_file
from fedlora.runtime.outputs import UNTUNED_FILE

RUN_FILES = ("config.yaml", "environment.json", "partition.json", "metrics.jsonl", "summary.json",
             UNTUNED_FILE, "report.md")
"""Per run: what it was, where it ran, what it saw, what it measured (and the untuned model's
score, the figures' reference line)."""
TOP_FILES = ("comparison.md", "comparison.csv", "tta.csv", "tta_seeds.csv", "tta_sweep.csv", "environment.json",
             "tuning.md", "tuning.csv", "tuned.yaml")
"""Per comparison (or `fedlora tune` directory): its tables (figures are its top-level *.png)."""
MANIFEST = "published.json"


def _run_dirs(root: Path) -> list[Path]:
    """The run directories under `root`: itself (one run), `seed_*/<method>/` (a comparison) or
    `validation/seed_*/<grid point>/` (a `fedlora tune` directory)."""
    if (root / "metrics.jsonl").is_file():
        return [root]
    return sorted(p.parent for pattern in ("seed_*/*/metrics.jsonl", "validation/seed_*/*/metrics.jsonl")
                  for p in root.glob(pattern))


def citeable_files(root: Path, finished_only: bool = False, tables: bool = True) -> list[Path]:
    """The files under `root` a citation needs, as paths relative to it: regular files that
    resolve inside `root` (a link, or a folder linked from outside, is skipped). With
    `finished_only`, runs without summary.json are left out (a study still running); without
    `tables`, the folder's own tables and figures are (written for part of a study only)."""
    chosen = [*root.glob("*.png"), *(root / name for name in TOP_FILES)] if tables else []
    for run in _run_dirs(root):
        if finished_only and not (run / "summary.json").is_file():
            continue
        chosen += [run / name for name in RUN_FILES]
        chosen += run.glob("eval/round_*.npz")
        chosen += run.glob("figures/*.png")  # a single run's `fedlora report`
    inside = root.resolve()
    return sorted({p.relative_to(root) for p in chosen
                   if p.is_file() and not p.is_symlink() and p.resolve().is_relative_to(inside)})


def _safe_destination(target: Path, rel: Path) -> Path:
    """target/rel, refusing a path that leaves `target` or whose folders are symbolic links (a
    link at the file itself is harmless: it is unlinked or renamed over, never followed)."""
    if rel.is_absolute() or ".." in rel.parts:
        raise ConfigError(f"config error: --publish: {target / MANIFEST} lists {rel}, outside it")
    for depth in range(1, len(rel.parts)):
        if (target / Path(*rel.parts[:depth])).is_symlink():
            raise ConfigError(f"config error: --publish: {target / Path(*rel.parts[:depth])} is a "
                              "symbolic link; publish into a plain folder")
    return target / rel


def _previous_files(target: Path) -> list[Path]:
    """What an earlier publish into `target` copied (its manifest); [] for an empty or new
    folder; a folder holding anything else is refused, so nothing of the user's is replaced."""
    if not target.exists() or not any(target.iterdir()):
        return []
    try:
        files = _manifest(target)
    except ConfigError:
        raise ConfigError(f"config error: --publish {target}: not empty and not an earlier publish "
                          f"(no readable {MANIFEST}); choose a new folder") from None
    return [_safe_destination(target, Path(rel)) for rel in files]


def _manifest(target: Path) -> dict[str, str]:
    """An earlier publish's files (relative path -> SHA-256), from its manifest."""
    try:
        files = json.loads((target / MANIFEST).read_text())["files"]
        if not all(isinstance(k, str) and isinstance(v, str) for k, v in files.items()):
            raise TypeError
        return files
    except (OSError, ValueError, KeyError, TypeError, AttributeError):
        raise ConfigError(f"config error: {target / MANIFEST}: missing or not a fedlora publish manifest") from None


def already_published(source: Path, dest: Path, finished_only: bool = False, tables: bool = True) -> bool:
    """Whether the publish in `dest` holds every file `publish` would copy from `source`, byte
    for byte: nothing new to publish (a study restored from `dest` and not run since, which
    lacks what `restore` leaves out, its tables and figures)."""
    if not (dest / MANIFEST).is_file():
        return False
    listed = _manifest(dest)
    files = citeable_files(source, finished_only, tables)
    return all(listed.get(str(rel)) == sha256_file(source / rel) for rel in files)


def publish(source: Path, dest: Path, finished_only: bool = False, tables: bool = True) -> tuple[int, int]:
    """Copy `citeable_files(source)` into `dest`, replacing an earlier publish there (the files
    its manifest lists are removed first). Returns (files, bytes)."""
    source, target = source.resolve(), Path(os.path.abspath(dest))
    if target.is_symlink():
        raise ConfigError(f"config error: --publish {dest}: a symbolic link; publish into a plain folder")
    resolved = target.resolve()
    if resolved == source or source in resolved.parents or resolved in source.parents:
        raise ConfigError(f"config error: --publish {dest}: must lie outside {source} and not contain it")
    previous = _previous_files(target)
    for old in previous:
        old.unlink(missing_ok=True)  # unlink removes a link itself, never its target
    for folder in sorted({p for old in previous for p in old.parents if target in p.parents},
                         key=lambda p: len(p.parts), reverse=True):
        try:  # the earlier publish's folders left empty (a run no longer in the study)
            folder.rmdir()
        except OSError:  # not empty, or not a plain folder
            pass
    files = citeable_files(source, finished_only, tables)
    listed = {}
    for rel in files:
        out = _safe_destination(target, rel)
        out.parent.mkdir(parents=True, exist_ok=True)
        # checked again after mkdir: a folder on the way may have been swapped for a link meanwhile;
        # the rename replaces a link at the file itself, never writing through it
        atomic_write(_safe_destination(target, rel), lambda tmp, rel=rel: shutil.copyfile(source / rel, tmp),
                     inside=target)
        listed[str(rel)] = sha256_file(out)
    manifest = json.dumps({"source": str(source), "files": listed}, indent=1) + "\n"
    atomic_write(_safe_destination(target, Path(MANIFEST)), manifest, inside=target)
    return len(files), sum((source / rel).stat().st_size for rel in files)


def restore(published: Path, study: Path) -> int:
    """Copy a publish back into a study directory, so that `fedlora compare` or `tune` rerun into
    `study` reads its finished runs back instead of running them again (a study carried from one
    machine to the next in the repository). Only the runs' files are copied (a comparison's
    tables and figures are rebuilt by the rerun); files `study` already has are kept; every file
    copied must match its SHA-256 in the manifest. Returns the number of files copied."""
    copied = 0
    for rel, digest in _manifest(published).items():
        if Path(rel).name == rel and (rel in TOP_FILES or rel.endswith(".png")):
            continue
        src = _safe_destination(published, Path(rel))
        if src.is_symlink() or not src.is_file() or sha256_file(src) != digest:
            raise ConfigError(f"config error: {src}: missing, a link, or not the file "
                              f"{published / MANIFEST} lists (SHA-256 differs)")
        out = _safe_destination(study, Path(rel))
        if out.exists() or out.is_symlink():
            continue
        out.parent.mkdir(parents=True, exist_ok=True)
        atomic_write(_safe_destination(study, Path(rel)), lambda tmp, src=src: shutil.copyfile(src, tmp),
                     inside=study)
        copied += 1
    return copied
