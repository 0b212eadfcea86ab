"""Datasets, prompt encoding and client partitions."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

from fedlora.data.alpaca import ALPACA_FILE
from fedlora.data.registry import dataset_spec

if TYPE_CHECKING:
    from fedlora.config import RunConfig


def required_files(cfg: RunConfig) -> list[tuple[str, Path]]:
    """(config field, path) of every local data file this run will read."""
    d = cfg.data
    out: list[tuple[str, Path]] = []
    if d.hub_name is None:
        out += dataset_spec(d.dataset).files(d)
    if d.test_file is not None:
        out.append(("data.test_file", Path(d.test_file)))
    if cfg.evaluation.mmlu and cfg.evaluation.mmlu_hub_name is None:
        out.append(("evaluation.mmlu", d.data_dir / "mmlu" / "test"))
    if cfg.algorithm.uses_public_data and cfg.public_data.hub_name is None:
        out.append(("public_data.dataset", d.data_dir / ALPACA_FILE))
    return out
