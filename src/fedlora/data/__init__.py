"""Datasets, prompt encoding and client partitions."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

from fedlora.data.ag_news import AG_NEWS_FILES
from fedlora.data.alpaca import ALPACA_FILE
from fedlora.data.dolly import DOLLY_FILE
from fedlora.data.financial_phrasebank import FPB_FILES

if TYPE_CHECKING:
    from fedlora.config import RunConfig


def required_files(cfg: RunConfig) -> list[tuple[str, Path]]:
    """(config field, path) of every local data file this run will read."""
    d = cfg.data
    out: list[tuple[str, Path]] = []
    if d.hub_name is None:
        if d.dataset == "ag_news":
            out += [("data.data_dir", d.data_dir / f) for f in AG_NEWS_FILES.values()]
        elif d.dataset == "financial_phrasebank":
            out.append(("data.data_dir", d.data_dir / FPB_FILES[d.agreement]))
        elif d.dataset == "dolly":
            out.append(("data.data_dir", d.data_dir / DOLLY_FILE))
        elif d.dataset == "alpaca":
            out.append(("data.data_dir", d.data_dir / ALPACA_FILE))
        elif d.train_file is not None:  # none with nodes.local_data: the nodes hold the training data
            out.append(("data.train_file", Path(d.train_file)))
    if d.test_file is not None:
        out.append(("data.test_file", Path(d.test_file)))
    if cfg.evaluation.mmlu and cfg.evaluation.mmlu_hub_name is None:
        out.append(("evaluation.mmlu", d.data_dir / "mmlu" / "test"))
    if cfg.algorithm.uses_public_data and cfg.public_data.hub_name is None:
        out.append(("public_data.dataset", d.data_dir / ALPACA_FILE))
    return out
