"""One entry point over every registered dataset (data.registry): its train and test sets in
our column layout, plus names."""

from __future__ import annotations

from collections.abc import Collection
from typing import TYPE_CHECKING

from fedlora.data.registry import Source, dataset_spec

if TYPE_CHECKING:
    from fedlora.config import DataConfig

__all__ = ["Source", "load_source"]


def load_source(d: DataConfig, exclude: Collection[int] = ()) -> Source:
    """The dataset of `d`; `exclude` drops Alpaca rows (the server's public draw) first. A
    file or hub dataset that cannot be read gives a DataError naming it."""
    return dataset_spec(d.dataset).load(d, exclude)
