"""What the command groups share (`fedlora ...` and `fedlora flower ...`): their common options,
declared once as argparse parent parsers, the one resolver of a new or resumed run's directory,
and the finished run's summary. Both `cli.py` and `flower/cli.py` import from here, never from
each other.

Heavy modules are imported inside the functions, so `fedlora --help` answers at once.
"""

from __future__ import annotations

import argparse
from datetime import datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any

from fedlora.errors import ConfigError

if TYPE_CHECKING:
    from fedlora.config import RunConfig


def _parent() -> argparse.ArgumentParser:
    return argparse.ArgumentParser(add_help=False)


def config_options(config_help: str, set_help: str = "override a config field") -> argparse.ArgumentParser:
    """CONFIG and --set: the commands that read one config."""
    parent = _parent()
    parent.add_argument("config", help=config_help)
    add_overrides(parent, set_help)
    return parent


def add_overrides(parser: argparse.ArgumentParser, set_help: str) -> None:
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help=set_help)


def run_options(config_help: str, out_default: str, resume_help: str) -> argparse.ArgumentParser:
    """CONFIG (or --resume RUN_DIR), --set and --out: `fedlora run` and `fedlora flower run`,
    whose directory `resolve_run` makes of them."""
    parent = _parent()
    parent.add_argument("config", nargs="?", help=config_help)
    add_overrides(parent, "override a config field, e.g. federation.rounds=3 (repeatable)")
    parent.add_argument("--out", help=f"run directory (default {out_default})")
    parent.add_argument("--resume", metavar="RUN_DIR", help=resume_help)
    return parent


def progress_options() -> argparse.ArgumentParser:
    parent = _parent()
    parent.add_argument("--quiet", action="store_true", help="no progress bars")
    return parent


def study_options(what: str, command: str, seeds_default: str, seeds_help: str) -> argparse.ArgumentParser:
    """--methods, --seeds, --out: the commands that run several methods (`compare`, `tune`)."""
    parent = _parent()
    parent.add_argument("--methods", help="comma-separated methods or variants the config's `methods:` defines "
                        "(default: every registered method that does not opt out of default comparisons)")
    parent.add_argument("--seeds", default=seeds_default, help=seeds_help)
    parent.add_argument("--out", help=f"{what} directory (default runs/{command}-<config name>); rerunning into it resumes")
    return parent


def resolve_run(args: argparse.Namespace, prefix: str = "") -> tuple[Path, RunConfig]:
    """The run directory and config of `run_options`' arguments. --resume RUN_DIR: the saved
    config (or CONFIG) with --set, verified against the run here for a one-line error before
    any model loads (the run checks again); else CONFIG in a new directory, by default
    runs/<prefix><method>-<time>, refused when it already holds a run."""
    from fedlora.config import load_config, parse_overrides
    from fedlora.runtime.rundir import refuse_existing_run, saved_config, verify_run

    if not (args.resume or args.config):
        raise ConfigError("config error: give a CONFIG file (or --resume RUN_DIR)")
    overrides = parse_overrides(args.set)
    if args.resume:
        run_dir = Path(args.resume)
        cfg = load_config(args.config, overrides) if args.config else saved_config(run_dir, overrides)
        verify_run(run_dir, cfg)
        return run_dir, cfg
    cfg = load_config(args.config, overrides)
    run_dir = Path(args.out or f"runs/{prefix}{cfg.algorithm.name}-{datetime.now():%Y%m%d-%H%M%S}")
    refuse_existing_run(run_dir)
    return run_dir, cfg


def print_summary(run_dir: Path, summary: dict[str, Any]) -> None:
    """The finished run's summary; its last line says what to do next."""
    print(f"run directory: {run_dir}")
    for key, value in summary.items():
        print(f"  {key}: {value}")
    print(f"next: fedlora report {run_dir}  (figures)  ·  "
          f"fedlora export {run_dir} --format peft|merged  (use the model)")
