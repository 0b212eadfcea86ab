"""AG News topic classification (Zhang et al. 2015), from the local copy or the hub."""

from __future__ import annotations

import csv
import gzip
import html
import re
from collections.abc import Collection
from pathlib import Path
from typing import TYPE_CHECKING

from datasets import Dataset

from fedlora.data.reading import reading_dataset
from fedlora.data.registry import DatasetSpec, Source, register_dataset

if TYPE_CHECKING:
    from fedlora.config import DataConfig

AG_NEWS_FILES = {"train": "ag_news/train_subset_20k.csv.gz", "test": "ag_news/test.csv.gz"}
AG_NEWS_CLASSES = ["World", "Sports", "Business", "Sci/Tech"]


_ENTITY = re.compile(r" ?#(\d+);")


def clean(text: str) -> str:
    """Undo the original CSV's escapes: literal `\\n`, and entities written as ` #39;`."""
    text = text.replace("\\n", " ").replace("\\", " ")
    text = _ENTITY.sub(lambda m: chr(int(m.group(1))), text)
    text = html.unescape(re.sub(r"(?<!&)\b(quot|amp|lt|gt);", r"&\1;", text))
    return " ".join(text.split())


def load_ag_news(split: str, data_dir: Path, hub_name: str | None = None) -> Dataset:
    """Columns `text` (title. description) and `label` (0..3, order of AG_NEWS_CLASSES)."""
    if hub_name is not None:
        from datasets import load_dataset

        return load_dataset(hub_name, split=split).select_columns(["text", "label"])
    path = Path(data_dir) / AG_NEWS_FILES[split]
    texts, labels = [], []
    with gzip.open(path, "rt", encoding="utf-8", newline="") as fh:
        for row in csv.reader(fh):
            label, title, description = row
            texts.append(clean(f"{title.rstrip('. ')}. {description}"))
            labels.append(int(label) - 1)
    return Dataset.from_dict({"text": texts, "label": labels})


def _load(d: DataConfig, exclude: Collection[int]) -> Source:
    with reading_dataset(d):
        return Source(load_ag_news("train", d.data_dir, d.hub_name), load_ag_news("test", d.data_dir, d.hub_name),
                      list(AG_NEWS_CLASSES))


register_dataset(DatasetSpec(
    "ag_news", _load, files=lambda d: [("data.data_dir", d.data_dir / f) for f in AG_NEWS_FILES.values()],
    defaults={"task": "classification"}))
