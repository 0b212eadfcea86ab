"""Databricks Dolly 15k: instruction data in 8 categories (FedIT partitions by category)."""

from __future__ import annotations

import gzip
import json
from collections.abc import Collection
from pathlib import Path
from typing import TYPE_CHECKING

from datasets import Dataset

from fedlora.data.reading import reading_dataset
from fedlora.data.registry import DatasetSpec, Source, register_dataset
from fedlora.data.splits import split_off_test

if TYPE_CHECKING:
    from fedlora.config import DataConfig

DOLLY_FILE = "dolly/databricks-dolly-15k.jsonl.gz"
DOLLY_CATEGORIES = [
    "brainstorming", "classification", "closed_qa", "creative_writing",
    "general_qa", "information_extraction", "open_qa", "summarization",
]


def load_dolly(data_dir: Path, hub_name: str | None = None) -> Dataset:
    """Columns `instruction`, `input` (Dolly's `context`), `response`, `category`, and
    `label` (category index, order of DOLLY_CATEGORIES)."""
    if hub_name is not None:
        from datasets import load_dataset

        records = list(load_dataset(hub_name, split="train"))
    else:
        with gzip.open(Path(data_dir) / DOLLY_FILE, "rt", encoding="utf-8") as fh:
            records = [json.loads(line) for line in fh if line.strip()]
    return Dataset.from_dict({
        "instruction": [r["instruction"] for r in records],
        "input": [r.get("context") or "" for r in records],
        "response": [r["response"] for r in records],
        "category": [r["category"] for r in records],
        "label": [DOLLY_CATEGORIES.index(r["category"]) for r in records],
    })


def _load(d: DataConfig, exclude: Collection[int]) -> Source:
    with reading_dataset(d):
        full = load_dolly(d.data_dir, d.hub_name).remove_columns("category")
        return Source(*split_off_test(full, d), list(DOLLY_CATEGORIES))


register_dataset(DatasetSpec(
    "dolly", _load, files=lambda d: [("data.data_dir", d.data_dir / DOLLY_FILE)], task="instruction",
    defaults={"task": "instruction", "max_length": 256, "partition": "category_skew"}))
