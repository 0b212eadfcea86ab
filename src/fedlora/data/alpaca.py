"""Stanford Alpaca: the server's small public instruction set (AFLoRA's A fine-tuning), and
an instruction dataset for clients."""

from __future__ import annotations

import gzip
import json
from collections.abc import Collection
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
from datasets import Dataset

from fedlora.data.reading import reading_dataset
from fedlora.data.registry import DatasetSpec, Source, register_dataset
from fedlora.data.splits import split_off_test

if TYPE_CHECKING:
    from fedlora.config import DataConfig

ALPACA_FILE = "alpaca/alpaca_5000.json.gz"
ALPACA_PROMPT = "### Instruction:\n{instruction}\n\n### Response:\n"
ALPACA_PROMPT_WITH_INPUT = "### Instruction:\n{instruction}\n\n### Input:\n{input}\n\n### Response:\n"


def load_alpaca(data_dir: Path, hub_name: str | None = None) -> list[dict[str, str]]:
    """Records with `instruction`, `input` and `output` (the local 5,000 or a hub dataset)."""
    if hub_name is not None:
        from datasets import load_dataset

        return [dict(r) for r in load_dataset(hub_name, split="train")]
    with gzip.open(Path(data_dir) / ALPACA_FILE, "rt", encoding="utf-8") as fh:
        return json.load(fh)


def public_indices(n: int, fraction: float, seed: int) -> list[int]:
    """A seeded draw of `fraction` of n records (at least one), sorted."""
    size = max(1, int(fraction * n + 0.5))
    return sorted(np.random.default_rng(seed).choice(n, size=size, replace=False).tolist())


def heldout_indices(n: int, public: list[int], size: int, seed: int) -> list[int]:
    """A seeded draw of `size` records outside the public set (the server's held-out measure;
    the public draw itself is unchanged), sorted."""
    taken = set(public)
    rest = [i for i in np.random.default_rng([seed, 1]).permutation(n).tolist() if i not in taken]
    return sorted(rest[:size])


def alpaca_dataset(records: list[dict[str, str]]) -> Dataset:
    """Client-side columns `instruction`, `input`, `response`, `label` (0: no categories)."""
    return Dataset.from_dict({
        "instruction": [r["instruction"] for r in records],
        "input": [r.get("input") or "" for r in records],
        "response": [r["output"] for r in records],
        "label": [0] * len(records),
    })


def as_prompt_response(record: dict[str, str]) -> tuple[str, str]:
    template = ALPACA_PROMPT_WITH_INPUT if record.get("input") else ALPACA_PROMPT
    return template.format(**record), record["output"]


def _load(d: DataConfig, exclude: Collection[int]) -> Source:
    """`exclude`: the rows drawn as the server's public set, kept out of the clients' data."""
    with reading_dataset(d):
        records = load_alpaca(d.data_dir, d.hub_name)
        skip = set(exclude)
        full = alpaca_dataset([r for i, r in enumerate(records) if i not in skip])
        return Source(*split_off_test(full, d), ["all"])


register_dataset(DatasetSpec(
    "alpaca", _load, files=lambda d: [("data.data_dir", d.data_dir / ALPACA_FILE)], task="instruction",
    defaults={"task": "instruction", "max_length": 256, "partition": "iid"}))
