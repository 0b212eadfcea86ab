"""The dataset registry: a dataset is one module that registers itself; the config's choices,
defaults and rules, `check_files` and the loader all come from it (docs/howto/add-a-dataset.md)."""

from __future__ import annotations

import importlib
import sys
from types import SimpleNamespace

import pytest
from conftest import tiny_tree

from fedlora.config import ConfigError, DataConfig, build_config
from fedlora.data import registry, required_files
from fedlora.data.sources import load_source
from fedlora.data.task import build_task, check_data
from fedlora.models import tiny_tokenizer

# The module docs/howto/add-a-dataset.md shows, written outside the package.
TOY_MODULE = '''
"""Toy weather reports: "sunny" or "rainy", from one small CSV file in data_dir."""

import csv

from datasets import Dataset

from fedlora.data.reading import reading_dataset
from fedlora.data.registry import DatasetSpec, Source, register_dataset
from fedlora.data.splits import split_off_test

FILE = "toy_weather/reports.csv"
CLASSES = ["sunny", "rainy"]


def load(d, exclude):
    with reading_dataset(d):  # an unreadable file: one line naming data.data_dir and the file
        with open(d.data_dir / FILE, newline="") as fh:
            rows = list(csv.DictReader(fh))
        full = Dataset.from_dict({"text": [r["report"] for r in rows],
                                  "label": [CLASSES.index(r["weather"]) for r in rows]})
        return Source(*split_off_test(full, d), CLASSES)


register_dataset(DatasetSpec(
    "toy_weather", load,
    files=lambda d: [("data.data_dir", d.data_dir / FILE)],
    defaults={"task": "classification", "partition": "iid", "label_words": CLASSES,
              "prompt": "Weather report: {text}\\nWeather:"},
    task="classification",
))
'''


@pytest.fixture
def toy_dataset(tmp_path, monkeypatch):
    """The toy module on sys.path (outside src/fedlora), imported; the registry and the module
    cache are restored afterwards."""
    monkeypatch.setattr(registry, "_REGISTRY", dict(registry.registered_datasets()))
    (tmp_path / "plugins").mkdir()
    (tmp_path / "plugins" / "toy_weather_dataset.py").write_text(TOY_MODULE)
    monkeypatch.syspath_prepend(str(tmp_path / "plugins"))
    monkeypatch.delitem(sys.modules, "toy_weather_dataset", raising=False)
    importlib.import_module("toy_weather_dataset")
    data = tmp_path / "data"
    (data / "toy_weather").mkdir(parents=True)
    lines = ["report,weather"] + [f"{w} clouds {i % 7} wind {i % 5},{'sunny' if i % 2 else 'rainy'}"
                                  for i, w in enumerate(["few", "many"] * 40)]
    (data / "toy_weather" / "reports.csv").write_text("\n".join(lines) + "\n")
    return data


def test_a_dataset_registered_from_outside_validates_and_loads(toy_dataset):
    cfg = build_config(tiny_tree(data={"dataset": "toy_weather", "data_dir": str(toy_dataset),
                                       "train_examples": None, "test_examples": 16},
                                 federation={"num_clients": 2, "client_max_ranks": [4, 2]},
                                 algorithm={"name": "fedit"}))
    # its defaults fill what the config leaves out; the rest of `data:` is as given
    assert (cfg.data.partition, cfg.data.label_words) == ("iid", ["sunny", "rainy"])
    assert cfg.data.prompt.startswith("Weather report:")
    assert required_files(cfg) == [("data.data_dir", toy_dataset / "toy_weather" / "reports.csv")]
    cfg.check_files()
    src = load_source(cfg.data)
    assert src.names == ["sunny", "rainy"] and len(src.train) + len(src.test) == 80
    pool = check_data(cfg)
    assert sum(len(p) for p in pool.parts) == len(pool.train) and len(pool.parts) == 2
    # the tiny test tokenizer knows few words: label words it can tell apart
    tiny = build_config(cfg.model_dump(mode="json"), {"data.label_words": ["positive", "negative"]})
    task = build_task(tiny, tiny_tokenizer())
    assert len(task.clients) == 2 and len(task.test) == 16 and task.names == ["sunny", "rainy"]


def test_a_registered_dataset_brings_its_rules_and_files(toy_dataset):
    with pytest.raises(ConfigError, match="data: dataset toy_weather is classification data"):
        build_config(tiny_tree(data={"dataset": "toy_weather", "task": "instruction"}))
    with pytest.raises(ConfigError, match="data.train_file: only for dataset custom"):
        build_config(tiny_tree(data={"dataset": "toy_weather", "train_file": "x.csv"}))
    (toy_dataset / "toy_weather" / "reports.csv").unlink()
    cfg = build_config(tiny_tree(data={"dataset": "toy_weather", "data_dir": str(toy_dataset)}))
    with pytest.raises(ConfigError, match=r"data.data_dir: file not found: .*toy_weather/reports.csv"):
        cfg.check_files()


def test_unknown_dataset_names_every_registered_one(toy_dataset):
    with pytest.raises(ConfigError, match="data.dataset: Input should be .*'toy_weather'"):
        build_config(tiny_tree(data={"dataset": "imdb"}))
    assert "toy_weather" in DataConfig.model_json_schema()["properties"]["dataset"]["enum"]


def test_a_name_is_registered_once(toy_dataset):
    taken = registry.DatasetSpec("ag_news", lambda d, exclude: None)
    with pytest.raises(ValueError, match="already registered by fedlora.data.ag_news"):
        registry.register_dataset(taken)


def test_installed_packages_register_through_entry_points(monkeypatch, caplog):
    monkeypatch.setattr(registry, "_REGISTRY", dict(registry.registered_datasets()))
    monkeypatch.setattr(registry, "_discovered", False)
    spec = registry.DatasetSpec("from_entry_point", lambda d, exclude: None)
    point = SimpleNamespace(name="good", value="good_pkg.data", load=lambda: registry.register_dataset(spec))
    broken = SimpleNamespace(name="broken", value="broken_pkg.data", load=lambda: 1 / 0)
    monkeypatch.setattr(registry, "entry_points",
                        lambda group: [broken, point] if group == registry.ENTRY_POINTS else [])
    assert registry.dataset_spec("from_entry_point") is spec
    assert "dataset plugin broken = broken_pkg.data not loaded: division by zero" in caplog.text
    assert {"ag_news", "alpaca", "custom", "dolly", "financial_phrasebank"} <= set(registry.registered_datasets())
