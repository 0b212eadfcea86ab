"""Bring your own data: a CSV / JSON / JSONL file or a hub dataset, plus its column names."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

from datasets import Dataset

if TYPE_CHECKING:
    from fedlora.config import DataConfig

_BUILDERS = {".csv": "csv", ".json": "json", ".jsonl": "json"}


def _read(path: Path) -> Dataset:
    from datasets import load_dataset

    suffixes = [s for s in path.suffixes if s != ".gz"]
    builder = _BUILDERS.get(suffixes[-1] if suffixes else "")
    if builder is None:
        raise ValueError(f"data.train_file: {path}: expected .csv, .json or .jsonl (optionally .gz)")
    return load_dataset(builder, data_files=str(path), split="train")


def _require(ds: Dataset, names: list[str | None], where: str) -> None:
    missing = [n for n in names if n is not None and n not in ds.column_names]
    if missing:
        raise ValueError(f"data.columns: {where} has no column {missing[0]!r} (has {ds.column_names})")


def load_custom(d: DataConfig) -> tuple[Dataset, Dataset | None, list[str]]:
    """(train, test or None, class/category names) in our column layout: classification
    `text`, `label`; instruction `instruction`, `input`, `response`, `label` (category index)."""
    if d.hub_name is not None:
        from datasets import load_dataset

        raw_train = load_dataset(d.hub_name, d.hub_config, split="train")
        raw_test = load_dataset(d.hub_name, d.hub_config, split="test") if d.test_file is None else None
    else:
        assert d.train_file is not None
        raw_train = _read(Path(d.train_file))
        raw_test = None
    if d.test_file is not None:
        raw_test = _read(Path(d.test_file))
    c = d.columns
    group_col = c.label if d.task == "classification" else c.category
    needed = [c.text, c.label] if d.task == "classification" else [c.instruction, c.input, c.response, c.category]
    for ds, where in ((raw_train, "the train data"), (raw_test, "the test data")):
        if ds is not None:
            _require(ds, needed, where)

    # Class / category names: the hub's ClassLabel names, else the sorted distinct values.
    feature = raw_train.features.get(group_col) if group_col else None
    if feature is not None and hasattr(feature, "names"):
        names = list(feature.names)
    elif group_col:
        values = list(raw_train[group_col]) + (list(raw_test[group_col]) if raw_test is not None else [])
        names = sorted({str(v) for v in values})
    else:
        names = ["all"]

    def convert(ds: Dataset) -> Dataset:
        if group_col is None:
            labels = [0] * len(ds)
        elif feature is not None and hasattr(feature, "names"):
            labels = [int(v) for v in ds[group_col]]
        else:
            labels = [names.index(str(v)) for v in ds[group_col]]
        if d.task == "classification":
            return Dataset.from_dict({"text": [str(t) for t in ds[c.text]], "label": labels})
        inputs = [str(v or "") for v in ds[c.input]] if c.input else [""] * len(ds)
        return Dataset.from_dict({
            "instruction": [str(v) for v in ds[c.instruction]], "input": inputs,
            "response": [str(v) for v in ds[c.response]], "label": labels,
        })

    return convert(raw_train), convert(raw_test) if raw_test is not None else None, names
