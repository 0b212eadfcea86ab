from __future__ import annotations

import importlib.util
import os
import sys
from pathlib import Path
from types import ModuleType

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("FLWR_TELEMETRY_ENABLED", "0")

ROOT = Path(__file__).resolve().parents[1]
# FEDLORA_DATA_DIR: where the shared data is when the tests run from a copy (mutmut's mutants/)
DATA_DIR = Path(os.environ.get("FEDLORA_DATA_DIR", ROOT.parent / "shared" / "data"))


def bench_module(name: str) -> ModuleType:
    """bench/NAME.py imported as module NAME (bench/ is scripts, not a package); registered in
    sys.modules so its dataclasses resolve their annotations."""
    spec = importlib.util.spec_from_file_location(name, ROOT / "bench" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    spec.loader.exec_module(module)
    return module


def tiny_tree(**sections) -> dict:
    """A small, fast config on the tiny random Llama; sections update keys (`algorithm`
    is replaced whole, since its keys depend on the method)."""
    tree = {
        "seed": 0,
        "model": {"name": "tiny-llama", "compute_dtype": "float32"},
        "data": {"data_dir": str(DATA_DIR), "train_examples": 400, "test_examples": 48, "max_length": 32},
        "federation": {"num_clients": 4, "client_max_ranks": [8, 4, 4, 2], "rounds": 2,
                       "local_steps": 2, "batch_size": 4, "lr": 0.01},
        "algorithm": {"name": "aflora", "server_steps": 2},
    }
    for key, value in sections.items():
        if key != "algorithm" and isinstance(value, dict) and isinstance(tree.get(key), dict):
            tree[key] = {**tree[key], **value}
        else:
            tree[key] = value
    return tree


@pytest.fixture
def data_dir() -> Path:
    if not DATA_DIR.exists():
        pytest.skip(f"shared data not found at {DATA_DIR}")
    return DATA_DIR


def write_synthetic_task(folder: Path, train: int = 400, test: int = 64) -> dict:
    """A trivially learnable two-class task the tiny tokenizer knows: the text is six letters
    from a-h ("positive") or from s-z ("negative"). Returns the config's `data` section.
    Faster to load than AG News, and a model that learns anything gets it right."""
    import json
    import random

    letters = {"positive": "abcdefgh", "negative": "stuvwxyz"}
    for name, n, seed in (("train", train, 0), ("test", test, 1)):
        rng = random.Random(seed)
        with open(folder / f"{name}.jsonl", "w") as f:
            for i in range(n):
                label = ("positive", "negative")[i % 2]
                text = " ".join(rng.choice(letters[label]) for _ in range(6))
                f.write(json.dumps({"text": text, "label": label}) + "\n")
    return {"dataset": "custom", "train_file": str(folder / "train.jsonl"),
            "test_file": str(folder / "test.jsonl"), "label_words": ["positive", "negative"],
            "prompt": "{text} Sentiment :", "train_examples": None, "test_examples": test}


@pytest.fixture(scope="session")
def synthetic_task(tmp_path_factory) -> dict:
    return write_synthetic_task(tmp_path_factory.mktemp("synthetic"))
