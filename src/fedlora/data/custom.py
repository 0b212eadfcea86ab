"""Bring your own data: a CSV / JSON / JSONL file or a hub dataset, plus its column names."""

from __future__ import annotations

from collections.abc import Collection
from pathlib import Path
from typing import TYPE_CHECKING

from datasets import Dataset

from fedlora.data.reading import reading
from fedlora.data.registry import DatasetSpec, Source, register_dataset
from fedlora.data.splits import split_off_test
from fedlora.errors import DataError

if TYPE_CHECKING:
    from fedlora.config import DataConfig

CUSTOM_PROMPT = "Classify the text.\nText: {text}\nLabel:"

DATA_FILE_BUILDERS = {".csv": "csv", ".json": "json", ".jsonl": "json"}
"""Readers (`datasets` builders) of a custom data file, by suffix (before an optional .gz)."""


def data_file_builder(path: Path) -> str | None:
    """The builder that reads `path`, None for a format fedlora does not read."""
    suffixes = [s.lower() for s in Path(path).suffixes if s.lower() != ".gz"]
    return DATA_FILE_BUILDERS.get(suffixes[-1] if suffixes else "")


MAX_DATA_BYTES = 4_000_000_000
"""A data file, uncompressed: AG News' training set is 30 MB; a gzip bomb stops here."""
MAX_LINE_BYTES = 16_000_000
"""One line (a CSV row, a JSON Lines record, or a whole .json document)."""
MAX_COLUMNS = 1000
"""A CSV header: the parser allocates per column (10⁶ columns cost gigabytes)."""


def _scan(path: Path, field: str, builder: str) -> None:
    """Limits checked by streaming the file once, counting the bytes actually read, before
    any parser allocates for it: total size, line length, CSV columns, JSON depth and
    containers; a file with no data at all gives one line instead of the parser's error."""
    from fedlora.files import json_limits_error

    def refuse(problem: str) -> DataError:
        return DataError(f"data error: {field}: {path}: {problem}")

    total, lines, header = 0, 0, None
    with reading(field, path), _open_data(path) as fh:
        while line := fh.readline(MAX_LINE_BYTES + 1):
            total += len(line)
            if total > MAX_DATA_BYTES:
                raise refuse(f"more than {MAX_DATA_BYTES:,} bytes of data")
            if len(line) > MAX_LINE_BYTES and not line.endswith(b"\n"):
                raise refuse(f"line {lines + 1} is longer than {MAX_LINE_BYTES:,} bytes")
            if not line.strip():
                continue
            lines += 1
            if builder == "csv" and header is None:
                header = line
                columns = header.count(b",") + 1
                if columns > MAX_COLUMNS:
                    raise refuse(f"the header has {columns} columns, more than {MAX_COLUMNS}")
            elif builder == "json" and (problem := json_limits_error(line)) is not None:
                raise refuse(f"line {lines}: {problem}")
    if not lines:
        raise refuse("no data rows (the file is empty)")


def _open_data(path: Path):
    import gzip

    return gzip.open(path, "rb") if path.suffix.lower() == ".gz" else open(path, "rb")


def _read(path: Path, field: str) -> Dataset:
    """A CSV / JSON / JSONL file (the config checked its suffix); unreadable: a DataError."""
    from datasets import load_dataset

    builder = data_file_builder(path)
    if builder is None or not path.is_file():
        raise DataError(f"data error: {field}: {path}: not a .csv, .json or .jsonl file")
    _scan(path, field, builder)
    with reading(field, path):
        ds = load_dataset(builder, data_files=str(path), split="train")
    if len(ds) == 0:
        raise DataError(f"data error: {field}: {path}: no data rows")
    return ds


def _require(ds: Dataset, columns: dict[str, str | None], field: str, where: str | Path) -> None:
    """Every configured column exists, and its cells are filled (an empty CSV cell would
    otherwise become the text or class "None")."""
    for key, name in columns.items():
        if name is None:
            continue
        if name not in ds.column_names:
            raise DataError(f"data error: data.columns.{key}: {where} has no column {name!r} "
                            f"(columns: {', '.join(ds.column_names)})")
        if key == "input":
            continue  # an empty input is normal
        empty = next((i for i, v in enumerate(ds[name]) if v is None), None)
        if empty is not None:
            raise DataError(f"data error: {field}: {where}: data row {empty + 1} has no value in column {name!r}")


def load_custom(d: DataConfig) -> tuple[Dataset, Dataset | None, list[str]]:
    """(train, test or None, class/category names) in our column layout: classification
    `text`, `label`; instruction `instruction`, `input`, `response`, `label` (category index)."""
    if d.hub_name is not None:
        from datasets import load_dataset

        with reading("data.hub_name", d.hub_name):
            raw_train = load_dataset(d.hub_name, d.hub_config, split="train")
            raw_test = load_dataset(d.hub_name, d.hub_config, split="test") if d.test_file is None else None
    else:
        assert d.train_file is not None
        raw_train = _read(Path(d.train_file), "data.train_file")
        raw_test = None
    if d.test_file is not None:
        raw_test = _read(Path(d.test_file), "data.test_file")
    c = d.columns
    group_col = c.label if d.task == "classification" else c.category
    needed = ({"text": c.text, "label": c.label} if d.task == "classification" else
              {"instruction": c.instruction, "input": c.input, "response": c.response, "category": c.category})
    hub = ("data.hub_name", f"{d.hub_name} (train split)")
    _require(raw_train, needed, *(("data.train_file", d.train_file) if d.train_file else hub))
    if raw_test is not None:
        _require(raw_test, needed, *(("data.test_file", d.test_file) if d.test_file else
                                     ("data.hub_name", f"{d.hub_name} (test split)")))

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


def _load(d: DataConfig, exclude: Collection[int]) -> Source:
    train, test, names = load_custom(d)
    if test is None:
        train, test = split_off_test(train, d)
    return Source(train, test, names)


def _needs_a_source(d: DataConfig) -> str | None:
    return "dataset custom needs train_file or hub_name" if d.train_file is None and d.hub_name is None else None


register_dataset(DatasetSpec(
    "custom", _load, files=lambda d: [("data.train_file", Path(d.train_file))] if d.train_file else [],
    # its own class names, and a prompt that names no AG News topics
    defaults={"prompt": CUSTOM_PROMPT, "label_words": None}, takes_files=True, check=_needs_a_source))
