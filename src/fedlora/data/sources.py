"""One entry point over every dataset: train and test sets in our column layout, plus names.

Classification data has columns `text`, `label`; instruction data `instruction`, `input`,
`response` and `label` (its category index, 0 when it has none). `label` is what the
partitioners split on.
"""

from __future__ import annotations

from collections.abc import Collection
from dataclasses import dataclass
from typing import TYPE_CHECKING

from datasets import Dataset

from fedlora.data.ag_news import AG_NEWS_CLASSES, load_ag_news
from fedlora.data.alpaca import alpaca_dataset, load_alpaca
from fedlora.data.custom import load_custom
from fedlora.data.dolly import DOLLY_CATEGORIES, load_dolly
from fedlora.data.financial_phrasebank import FPB_CLASSES, load_financial_phrasebank
from fedlora.data.reading import reading
from fedlora.data.splits import seeded_split

if TYPE_CHECKING:
    from fedlora.config import DataConfig


@dataclass
class Source:
    train: Dataset
    test: Dataset
    names: list[str]
    """Class names (classification) or category names (instruction data)."""


def _split(ds: Dataset, d: DataConfig) -> tuple[Dataset, Dataset]:
    text_col = "text" if "text" in ds.column_names else "instruction"
    keys = list(ds[text_col])
    if text_col == "instruction":
        keys = [f"{a}\x00{b}\x00{c}" for a, b, c in zip(keys, ds["input"], ds["response"])]
    train, test = seeded_split(keys, d.test_fraction, d.split_seed)
    return ds.select(train), ds.select(test)


def load_source(d: DataConfig, exclude: Collection[int] = ()) -> Source:
    """The dataset of `d`; `exclude` drops Alpaca rows (the server's public draw) first. A
    file or hub dataset that cannot be read gives a DataError naming it."""
    if d.dataset == "custom":
        train, test, names = load_custom(d)
        if test is None:
            train, test = _split(train, d)
        return Source(train, test, names)
    field, what = ("data.hub_name", d.hub_name) if d.hub_name else ("data.data_dir", d.data_dir / d.dataset)
    with reading(field, what):
        return _load_builtin(d, exclude)


def _load_builtin(d: DataConfig, exclude: Collection[int]) -> Source:
    if d.dataset == "ag_news":
        return Source(load_ag_news("train", d.data_dir, d.hub_name),
                      load_ag_news("test", d.data_dir, d.hub_name), list(AG_NEWS_CLASSES))
    if d.dataset == "financial_phrasebank":
        full = load_financial_phrasebank(d.agreement, d.data_dir, d.hub_name, d.hub_config)
        return Source(*_split(full, d), list(FPB_CLASSES))
    if d.dataset == "dolly":
        full = load_dolly(d.data_dir, d.hub_name).remove_columns("category")
        return Source(*_split(full, d), list(DOLLY_CATEGORIES))
    if d.dataset == "alpaca":
        records = load_alpaca(d.data_dir, d.hub_name)
        skip = set(exclude)
        full = alpaca_dataset([r for i, r in enumerate(records) if i not in skip])
        return Source(*_split(full, d), ["all"])
    raise ValueError(f"unknown dataset {d.dataset!r}")
