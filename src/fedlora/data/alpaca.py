"""Stanford Alpaca: the server's small public instruction set (AFLoRA's A fine-tuning)."""

from __future__ import annotations

import gzip
import json
from pathlib import Path

import numpy as np

ALPACA_FILE = "alpaca/alpaca_5000.json.gz"

PROMPT = "### Instruction:\n{instruction}\n\n### Response:\n"
PROMPT_WITH_INPUT = "### Instruction:\n{instruction}\n\n### Input:\n{input}\n\n### Response:\n"


def load_alpaca(data_dir: Path) -> list[dict[str, str]]:
    with gzip.open(Path(data_dir) / ALPACA_FILE, "rt", encoding="utf-8") as fh:
        return json.load(fh)


def public_subset(records: list[dict[str, str]], fraction: float, seed: int) -> list[dict[str, str]]:
    """A seeded draw of `fraction` of the records (at least one)."""
    n = max(1, int(fraction * len(records) + 0.5))
    idx = np.random.default_rng(seed).choice(len(records), size=n, replace=False)
    return [records[i] for i in sorted(idx)]


def as_prompt_response(record: dict[str, str]) -> tuple[str, str]:
    template = PROMPT_WITH_INPUT if record.get("input") else PROMPT
    return template.format(**record), record["output"]
