"""The dataset registry: every dataset a config can name, beside the method registry.

A dataset is one module that describes itself with one call, `register_dataset(DatasetSpec(...))`:
its name, how to load it, which local files it reads, and the config defaults it brings. The
config's `data.dataset` choices and per-dataset defaults, `check_files` and the loader all ask
here, so adding a dataset edits nothing else (docs/howto/add-a-dataset.md).

Where registrations come from, on first use: every module of the `fedlora.data` package (the
built-in datasets), the `fedlora.datasets` entry points of installed packages, and any module
that was imported before and called `register_dataset` itself.
"""

from __future__ import annotations

import importlib
import logging
import pkgutil
from collections.abc import Callable, Collection, Mapping
from dataclasses import dataclass, field
from importlib.metadata import entry_points
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

if TYPE_CHECKING:
    from datasets import Dataset

    from fedlora.config import DataConfig

log = logging.getLogger("fedlora")

ENTRY_POINTS = "fedlora.datasets"
"""Entry-point group of installed packages that bring datasets (each names a module)."""


@dataclass
class Source:
    """A dataset as fedlora trains on it. Classification data has columns `text`, `label`;
    instruction data `instruction`, `input`, `response` and `label` (its category index, 0
    when it has none). `label` is what the partitioners split on."""

    train: Dataset
    test: Dataset
    names: list[str]
    """Class names (classification) or category names (instruction data)."""


Loader = Callable[["DataConfig", Collection[int]], Source]
"""(data config, rows to exclude) -> the train and test sets. Only the Alpaca loader has rows
to exclude (the server's public draw); others ignore the argument."""


def no_files(d: DataConfig) -> list[tuple[str, Path]]:
    return []


@dataclass(frozen=True)
class DatasetSpec:
    name: str
    """What `data.dataset` says."""
    load: Loader
    """Reads the data (local copy, or `data.hub_name`); an unreadable file raises a DataError
    naming the field and the file (see data.reading)."""
    files: Callable[[DataConfig], list[tuple[str, Path]]] = no_files
    """(config field, path) of every local file `load` reads when there is no hub_name:
    checked before a run starts."""
    defaults: Mapping[str, Any] = field(default_factory=dict)
    """`data:` fields the dataset fills in when the config leaves them out (task, prompt,
    label_words, partition, max_length, ...)."""
    task: Literal["classification", "instruction"] | None = None
    """The one task the data serves (None: either, as the config says)."""
    takes_files: bool = False
    """Whether it reads `data.train_file` / `data.test_file` (refused for the others)."""
    check: Callable[[DataConfig], str | None] | None = None
    """What else a config must give for this dataset: the problem, or None."""


_REGISTRY: dict[str, DatasetSpec] = {}
_discovered = False


def register_dataset(spec: DatasetSpec) -> DatasetSpec:
    """Add a dataset (call it at the import of the module that defines it). Registering the
    same name again from the same module (a re-import) replaces it; from another module it is
    an error, so two datasets never silently share a name."""
    known = _REGISTRY.get(spec.name)
    if known is not None and known.load.__module__ != spec.load.__module__:
        raise ValueError(f"dataset {spec.name!r} is already registered by {known.load.__module__}")
    _REGISTRY[spec.name] = spec
    return spec


def _discover() -> None:
    """Import the package's own data modules and the installed entry points, once."""
    global _discovered
    if _discovered:
        return
    _discovered = True
    package = importlib.import_module("fedlora.data")
    for module in pkgutil.iter_modules(package.__path__, "fedlora.data."):
        importlib.import_module(module.name)
    for entry in entry_points(group=ENTRY_POINTS):
        try:
            entry.load()
        except Exception as err:  # noqa: BLE001 - someone else's code: report, keep going
            log.warning("dataset plugin %s = %s not loaded: %s", entry.name, entry.value, err)


def registered_datasets() -> dict[str, DatasetSpec]:
    """Every dataset a config can name, by name (sorted)."""
    _discover()
    return dict(sorted(_REGISTRY.items()))


def dataset_spec(name: str) -> DatasetSpec:
    """The registered dataset `name` (the config validated it, so a KeyError is a bug)."""
    _discover()
    return _REGISTRY[name]
