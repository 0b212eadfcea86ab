"""Datasets, prompt encoding and client partitions."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

from fedlora.data.ag_news import AG_NEWS_FILES
from fedlora.data.alpaca import ALPACA_FILE

if TYPE_CHECKING:
    from fedlora.config import RunConfig


def required_files(cfg: RunConfig) -> list[tuple[str, Path]]:
    """(config field, path) of every local data file this run will read."""
    out: list[tuple[str, Path]] = []
    if cfg.data.hub_name is None:
        out += [("data.data_dir", cfg.data.data_dir / f) for f in AG_NEWS_FILES.values()]
    if cfg.algorithm.uses_public_data:
        out.append(("public_data.dataset", cfg.data.data_dir / ALPACA_FILE))
    return out
