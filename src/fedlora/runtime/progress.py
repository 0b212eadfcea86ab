"""What a run prints while it works: one line per round, and progress bars that share the
log's console, so a log line is printed above the bars instead of inside them."""

from __future__ import annotations

import logging
from typing import Any

from rich.console import Console
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    TextColumn,
    TimeElapsedColumn,
    TimeRemainingColumn,
)

from fedlora.records import is_scored
from fedlora.units import format_bytes

CONSOLE = Console(stderr=True)
"""Every log line and progress bar of the process goes through this console."""


class ConsoleHandler(logging.Handler):
    """A logging handler printing plain, unwrapped lines on CONSOLE (above live bars)."""

    def emit(self, record: logging.LogRecord) -> None:
        try:
            CONSOLE.print(self.format(record), markup=False, highlight=False, soft_wrap=True)
        except Exception:  # logging must never stop a run
            self.handleError(record)


def setup_logging(level: int = logging.INFO) -> None:
    handler = ConsoleHandler()
    handler.setFormatter(logging.Formatter("%(levelname)s %(name)s: %(message)s"))
    logging.basicConfig(level=level, handlers=[handler])
    for noisy in ("transformers", "datasets", "httpx", "filelock"):
        logging.getLogger(noisy).setLevel(logging.ERROR)


def progress_bars(enabled: bool = True) -> Progress:
    return Progress(
        TextColumn("{task.description:>8}"), BarColumn(), MofNCompleteColumn(),
        TimeElapsedColumn(), TextColumn("ETA"), TimeRemainingColumn(),
        console=CONSOLE, disable=not enabled, transient=False,
    )


def _span(values: list[float]) -> str:
    lo, hi = min(values), max(values)
    return f"{lo:g}" if lo == hi else f"{lo:g}–{hi:g}"


def round_line(record: dict[str, Any], rounds: int) -> str:
    """One line summing up a finished round (its metrics.jsonl record)."""
    parts = []
    if record.get("train_loss") is not None:
        parts.append(f"train loss {record['train_loss']:.4f}")
    ranks = [float(r) for r in (record.get("ranks") or {}).values()]
    if ranks:
        parts.append(f"ranks {_span([round(r, 1) for r in ranks])}")
    parts.append(f"up {format_bytes(record.get('uplink_bytes'))}")
    parts.append(f"down {format_bytes(record.get('downlink_bytes'))}")
    parts.append(f"{record.get('wall_seconds', 0.0):.1f} s")
    if record.get("sim_seconds") is not None:
        parts.append(f"simulated {record['sim_seconds']:.1f} s")
    if is_scored(record):
        name = "MMLU accuracy" if record.get("perplexity") is not None else "accuracy"
        parts.append(f"{name} {record['accuracy']:.4f}")
    if record.get("test_loss") is not None:
        parts.append(f"test loss {record['test_loss']:.4f}")
    if record.get("perplexity") is not None:
        parts.append(f"perplexity {record['perplexity']:.2f}")
    if record.get("rejected"):
        parts.append(f"{len(record['rejected'])} update(s) rejected")
    return f"round {record['round']}/{rounds}: " + " · ".join(parts)
