from __future__ import annotations

import os
from pathlib import Path

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("FLWR_TELEMETRY_ENABLED", "0")

ROOT = Path(__file__).resolve().parents[1]
DATA_DIR = ROOT.parent / "shared" / "data"


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
