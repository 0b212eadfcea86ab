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
    needed = _needed_columns(d)
    hub = ("data.hub_name", f"{d.hub_name} (train split)")
    _require(raw_train, needed, *(("data.train_file", d.train_file) if d.train_file else hub))
    if raw_test is not None:
        _require(raw_test, needed, *(("data.test_file", d.test_file) if d.test_file else
                                     ("data.hub_name", f"{d.hub_name} (test split)")))

    # Class / category names: the hub's ClassLabel names, else the sorted distinct values.
    group_col = _group_column(d)
    feature = raw_train.features.get(group_col) if group_col else None
    if feature is not None and hasattr(feature, "names"):
        names = list(feature.names)
    elif group_col:
        values = list(raw_train[group_col]) + (list(raw_test[group_col]) if raw_test is not None else [])
        names = sorted({str(v) for v in values})
    else:
        names = ["all"]
    indexed = feature is not None and hasattr(feature, "names")
    return (_convert(raw_train, d, names, group_col, indexed),
            _convert(raw_test, d, names, group_col, indexed) if raw_test is not None else None, names)


def _group_column(d: DataConfig) -> str | None:
    return d.columns.label if d.task == "classification" else d.columns.category


def _needed_columns(d: DataConfig) -> dict[str, str | None]:
    c = d.columns
    if d.task == "classification":
        return {"text": c.text, "label": c.label}
    return {"instruction": c.instruction, "input": c.input, "response": c.response, "category": c.category}


def _node_group_column(d: DataConfig, names: list[str]) -> str | None:
    """A node file's class (category) column: the configured one, else `category` for
    instruction data with categories (Dolly's, kept so each node's histogram is its own)."""
    return _group_column(d) or ("category" if len(names) > 1 else None)


def _convert(ds: Dataset, d: DataConfig, names: list[str], group_col: str | None, indexed: bool = False,
             where: str | Path = "") -> Dataset:
    """`ds` in our column layout; labels as indices into `names` (`indexed`: they are already)."""
    c = d.columns
    if group_col is None:
        labels = [0] * len(ds)
    elif indexed:
        labels = [int(v) for v in ds[group_col]]
    else:
        index = {name: i for i, name in enumerate(names)}
        labels = []
        for row, v in enumerate(ds[group_col]):
            if str(v) not in index:
                raise DataError(f"data error: {where}: data row {row + 1}: {group_col} {str(v)[:80]!r} is not one of "
                                f"the run's classes ({', '.join(names)})")
            labels.append(index[str(v)])
    if d.task == "classification":
        return Dataset.from_dict({"text": [str(t) for t in ds[c.text]], "label": labels})
    inputs = [str(v or "") for v in ds[c.input]] if c.input else [""] * len(ds)
    return Dataset.from_dict({
        "instruction": [str(v) for v in ds[c.instruction]], "input": inputs,
        "response": [str(v) for v in ds[c.response]], "label": labels,
    })


def load_node_file(path: Path, d: DataConfig, names: list[str]) -> Dataset:
    """A SuperNode's own data file (node config `data-file`) in our column layout: the run's
    columns, labels mapped to the run's class names (an unknown one is a DataError)."""
    ds = _read(Path(path), "node config data-file")
    group_col = _node_group_column(d, names)
    needed = {**_needed_columns(d), **({"category": group_col} if group_col else {})}
    _require(ds, needed, "node config data-file", path)
    return _convert(ds, d, names, group_col, where=f"node config data-file: {path}")


def write_node_file(path: Path, ds: Dataset, d: DataConfig, names: list[str]) -> None:
    """`ds` (our layout) as a JSONL file `load_node_file` reads back with the same config:
    the run's column names, labels by class name."""
    import json

    c, group_col = d.columns, _node_group_column(d, names)
    with open(path, "w", encoding="utf-8") as f:
        for row in ds:
            if d.task == "classification":
                out = {c.text: row["text"], c.label: names[row["label"]]}
            else:
                out = {c.instruction: row["instruction"], c.response: row["response"]}
                if c.input:
                    out[c.input] = row["input"]
                if group_col:
                    out[group_col] = names[row["label"]]
            f.write(json.dumps(out, ensure_ascii=False) + "\n")


def load_test_file(d: DataConfig, names: list[str]) -> Dataset:
    """nodes.local_data: the server's test set alone (data.test_file, or the hub dataset's test
    split), labels mapped to the run's class names."""
    if d.test_file is not None:
        ds, field, where = _read(Path(d.test_file), "data.test_file"), "data.test_file", d.test_file
    else:
        from datasets import load_dataset

        with reading("data.hub_name", d.hub_name):
            ds = load_dataset(d.hub_name, d.hub_config, split="test")
        field, where = "data.hub_name", f"{d.hub_name} (test split)"
    _require(ds, _needed_columns(d), field, where)
    return _convert(ds, d, names, _group_column(d), where=f"{field}: {where}")


def _load(d: DataConfig, exclude: Collection[int]) -> Source:
    train, test, names = load_custom(d)
    if test is None:
        train, test = split_off_test(train, d)
    return Source(train, test, names)


def _needs_a_source(d: DataConfig) -> str | None:
    """A training file or hub dataset; a test file alone is a Flower run's on node-local data
    (nodes.local_data: the RunConfig checks the rest)."""
    if d.train_file is None and d.hub_name is None and d.test_file is None:
        return "dataset custom needs train_file or hub_name"
    return None


register_dataset(DatasetSpec(
    "custom", _load, files=lambda d: [("data.train_file", Path(d.train_file))] if d.train_file else [],
    # its own class names, and a prompt that names no AG News topics
    defaults={"prompt": CUSTOM_PROMPT, "label_words": None}, takes_files=True, check=_needs_a_source))
