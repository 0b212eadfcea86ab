"""Who may write a run directory, and what a resume may continue from.

One process at a time: `run_lock` holds an exclusive `flock` on RUN_DIR/run.lock for the whole
run (the OS drops it when the process dies, so a killed run never blocks the next one).
A resume continues only from files it can vouch for (`verify_run`): the checkpoint
(safetensors, no pickle), every merge file it records (SHA-256), and the config, which must
be the checkpoint's; the one change allowed is more rounds (`--set federation.rounds=N`).
"""

from __future__ import annotations

import fcntl
import logging
import os
import shutil
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from torch import Tensor

from fedlora.config import BAD_YAML, MAX_CONFIG_BYTES, ConfigError, RunConfig, build_config, dump_config, load_yaml
from fedlora.runtime.checkpoint import CHECKPOINT, Checkpoint, has_checkpoint, load_merges
from fedlora.files import RunFileError, atomic_write, open_regular, read_bounded, sha256_bytes

LOCK = "run.lock"
CONFIG = "config.yaml"
EXTENSIBLE = {"federation.rounds"}
LOCK_POLL_SECONDS = 0.5

log = logging.getLogger("fedlora")


@contextmanager
def run_lock(run_dir: Path, wait: float = 0.0) -> Iterator[None]:
    """Exclusive use of `run_dir` while the block runs; a second process stops with one line
    naming the holder's pid, after waiting up to `wait` seconds for it to let go (a resumed
    Flower run waits for the ServerApp of a killed SuperLink to find that out and exit).
    A directory this call created is removed again if the block wrote nothing into it (a
    bad config or data file found before the run starts leaves no trace)."""
    created = not run_dir.exists()
    run_dir.mkdir(parents=True, exist_ok=True)
    fd = open_regular(run_dir / LOCK, os.O_RDWR, create=True)  # a planted link is refused, never truncated
    deadline, waited = time.monotonic() + wait, False
    while True:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            break
        except BlockingIOError:
            if time.monotonic() < deadline:
                if not waited:
                    log.info("run.lock of %s is held by %s; waiting up to %.0f s for it", run_dir,
                             _holder(fd), wait)
                    waited = True
                time.sleep(min(LOCK_POLL_SECONDS, max(0.0, deadline - time.monotonic())))
                continue
            who = _holder(fd)
            os.close(fd)
            raise RunFileError(f"run error: {run_dir}: another fedlora process ({who}) is writing this run "
                               f"directory (it holds {run_dir / LOCK}); wait for it to end or choose another "
                               "--out") from None
    try:
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)  # for a human asking "who?"; the lock is the flock
        yield
    finally:
        fcntl.flock(fd, fcntl.LOCK_UN)
        os.close(fd)
        if created and [p.name for p in run_dir.iterdir()] == [LOCK]:
            shutil.rmtree(run_dir, ignore_errors=True)


def _holder(fd: int) -> str:
    """Who holds the lock, from the pid its holder wrote (for the message; the flock decides)."""
    text = os.pread(fd, 32, 0).decode("ascii", "replace").strip()
    return f"pid {text}" if text.isdigit() else "another process"


def refuse_existing_run(run_dir: Path) -> None:
    """A new run never writes over a run directory that holds a checkpoint."""
    if has_checkpoint(run_dir):
        raise ConfigError(f"config error: --out {run_dir}: holds a run already (use --resume {run_dir})")


def saved_config(run_dir: Path, overrides: dict[str, Any] | None = None) -> RunConfig:
    """The config a `--resume RUN_DIR [--set ...]` continues with: the checkpoint's own (the
    config the finished rounds ran with), with the overrides applied; checked by verify_run."""
    return _recorded_config(run_dir, Checkpoint.load(run_dir), overrides)


def _recorded_config(run_dir: Path, ckpt: Checkpoint, overrides: dict[str, Any] | None = None) -> RunConfig:
    try:
        tree = load_yaml(ckpt.config)
        cfg = build_config(tree if isinstance(tree, dict) else {}, overrides)
    except ConfigError:
        raise  # a readable record this version does not accept: the field is named
    except BAD_YAML:
        raise RunFileError(f"run error: {run_dir / CHECKPOINT}: damaged config record") from None
    if ckpt.round > cfg.federation.rounds and not overrides:
        raise RunFileError(f"run error: {run_dir / CHECKPOINT}: round {ckpt.round} is past the run's "
                           f"{cfg.federation.rounds} rounds (edited?)")
    return cfg


def changed_fields(old: RunConfig, new: RunConfig) -> list[str]:
    """Dotted names of the config fields whose values differ."""
    a, b = _flatten(old.model_dump(mode="json")), _flatten(new.model_dump(mode="json"))
    return sorted(k for k in a.keys() | b.keys() if a.get(k) != b.get(k))


def _flatten(tree: Any, prefix: str = "") -> dict[str, Any]:
    if isinstance(tree, dict) and tree:
        out: dict[str, Any] = {}
        for key, value in tree.items():
            out.update(_flatten(value, f"{prefix}{key}."))
        return out
    return {prefix.rstrip("."): tree}


def verify_run(run_dir: Path, cfg: RunConfig) -> tuple[Checkpoint, list[dict[str, tuple[Tensor, Tensor]]]]:
    """The checkpoint and its verified merges, if `cfg` may continue the run in `run_dir`;
    else one line naming the file or the config fields at fault. Writes nothing."""
    ckpt = Checkpoint.load(run_dir)
    saved = _recorded_config(run_dir, ckpt)
    wanted = dump_config(cfg)
    on_disk = read_bounded(run_dir / CONFIG, MAX_CONFIG_BYTES)
    # `wanted` too: an extension interrupted after writing config.yaml, before its next checkpoint
    if sha256_bytes(on_disk) not in (ckpt.config_sha256, sha256_bytes(wanted.encode())):
        raise RunFileError(f"run error: {run_dir / CONFIG}: edited since the checkpoint (SHA-256 differs "
                           f"from the record{_edited_fields(saved, on_disk.decode(errors='replace'))}); restore it")
    changed = changed_fields(saved, cfg)
    grown = cfg.federation.rounds > saved.federation.rounds
    if set(changed) - EXTENSIBLE or (changed and not grown):
        raise ConfigError(
            f"config error: --resume {run_dir}: the config differs from the run's in {', '.join(changed)}; "
            "a resume may only raise federation.rounds (e.g. --set federation.rounds=N)")
    return ckpt, load_merges(run_dir, ckpt.round, ckpt.merges)


def adopt_config(run_dir: Path, ckpt: Checkpoint, cfg: RunConfig) -> None:
    """After verify_run allowed an extension: config.yaml, then the checkpoint's record
    (at its next save), name the new rounds (a crash between the two is accepted on resume)."""
    wanted = dump_config(cfg)
    if ckpt.config != wanted:
        atomic_write(run_dir / CONFIG, wanted)
        ckpt.config = wanted


def changed_fields_in(text: str, cfg: RunConfig) -> list[str] | None:
    """The fields in which the config written in `text` (a config.yaml) differs from `cfg`;
    None when `text` is no config this version reads."""
    try:
        tree = load_yaml(text)
        return changed_fields(build_config(tree), cfg) if isinstance(tree, dict) else None
    except BAD_YAML:
        return None


def _edited_fields(saved: RunConfig, text: str) -> str:
    fields = changed_fields_in(text, saved)
    return f"; changed: {', '.join(fields)}" if fields else ""
