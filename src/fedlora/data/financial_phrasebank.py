"""Financial PhraseBank v1.0 (Malo et al. 2014): financial news sentences, 3 sentiments.

The papers train on FinGPT's sentiment training file, which is not available offline; we
train and test on a seeded split of the PhraseBank itself (see docs/concepts/data.md).
"""

from __future__ import annotations

import gzip
from collections.abc import Collection
from pathlib import Path
from typing import TYPE_CHECKING

from datasets import Dataset

from fedlora.data.reading import reading_dataset
from fedlora.data.registry import DatasetSpec, Source, register_dataset
from fedlora.data.splits import split_off_test

if TYPE_CHECKING:
    from fedlora.config import DataConfig

FPB_FILES = {
    "50": "financial_phrasebank/Sentences_50Agree.txt.gz",
    "66": "financial_phrasebank/Sentences_66Agree.txt.gz",
    "75": "financial_phrasebank/Sentences_75Agree.txt.gz",
    "all": "financial_phrasebank/Sentences_AllAgree.txt.gz",
}
FPB_CLASSES = ["negative", "neutral", "positive"]  # the hub's label ids 0, 1, 2


def load_financial_phrasebank(
    agreement: str, data_dir: Path, hub_name: str | None = None, hub_config: str | None = None
) -> Dataset:
    """Columns `text` and `label` (0..2, order of FPB_CLASSES); every row of the file."""
    if hub_name is not None:
        from datasets import load_dataset

        ds = load_dataset(hub_name, hub_config or f"sentences_{agreement}agree", split="train")
        return ds.rename_column("sentence", "text").select_columns(["text", "label"])
    texts, labels = [], []
    with gzip.open(Path(data_dir) / FPB_FILES[agreement], "rt", encoding="utf-8") as fh:
        for line in fh:
            if not line.strip():
                continue
            text, label = line.rstrip("\n").rsplit("@", 1)
            texts.append(text.strip())
            labels.append(FPB_CLASSES.index(label.strip()))
    return Dataset.from_dict({"text": texts, "label": labels})


def _load(d: DataConfig, exclude: Collection[int]) -> Source:
    with reading_dataset(d):
        full = load_financial_phrasebank(d.agreement, d.data_dir, d.hub_name, d.hub_config)
        return Source(*split_off_test(full, d), list(FPB_CLASSES))


register_dataset(DatasetSpec(
    "financial_phrasebank", _load, files=lambda d: [("data.data_dir", d.data_dir / FPB_FILES[d.agreement])],
    defaults={
        "task": "classification",
        "partition": "iid",
        "prompt": "Classify the sentiment of the financial news sentence as negative, neutral or "
        "positive.\nSentence: {text}\nSentiment:",
        "label_words": ["negative", "neutral", "positive"],
    }))
