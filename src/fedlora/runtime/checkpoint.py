"""Atomic per-round checkpoints, and the log of updates merged into the base model.

The base model is never saved: its merged updates are kept as low-rank factors, one
safetensors file per round, and replayed in order on resume. Replaying the same float
operations in the same order rebuilds bit-identical base weights at a fraction of the
size of a weight dump.

`checkpoint.safetensors` is one file, so it is replaced atomically as a whole: the global
and per-client tensors, and in its metadata a JSON record of the round, sampler state,
history, the resolved config with its SHA-256 and the SHA-256 of every merge file. Nothing
is pickled (a run directory from elsewhere cannot run code); a resume verifies every merge
file and the config against the record (fedlora.runtime.rundir).
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from torch import Tensor

from fedlora.files import (
    RunFileError,
    atomic_write,
    load_tensors,
    sha256_bytes,
    tensors_to_bytes,
)

CHECKPOINT = "checkpoint.safetensors"
LEGACY_CHECKPOINT = "checkpoint.pt"  # pickled by older versions: refused, never unpickled
MERGES = "merges"
_META_KEY = "fedlora"
_STATE, _CLIENT = "state/", "client/"

__all__ = ["CHECKPOINT", "Checkpoint", "atomic_write", "has_checkpoint", "load_merges", "merge_path", "save_merge"]


def has_checkpoint(run_dir: Path) -> bool:
    """Whether `run_dir` holds a run (a checkpoint of either format)."""
    return (run_dir / CHECKPOINT).exists() or (run_dir / LEGACY_CHECKPOINT).exists()


@dataclass
class Checkpoint:
    round: int
    state: dict[str, Tensor]
    client_states: dict[int, dict[str, Tensor]]
    sampler_state: dict[str, Any]
    history: list[dict[str, Any]] = field(default_factory=list)
    threads: int = 1  # torch threads: reduction order, hence the last bits, depends on it
    config: str = ""  # the resolved config (config.yaml's text) the rounds so far ran with
    merges: dict[int, str] = field(default_factory=dict)  # round → SHA-256 of its merge file

    @property
    def config_sha256(self) -> str:
        return sha256_bytes(self.config.encode())

    def save(self, run_dir: Path) -> None:
        tensors = {_STATE + k: v for k, v in self.state.items()}
        for client, st in self.client_states.items():
            tensors.update({f"{_CLIENT}{client}/{k}": v for k, v in st.items()})
        record = {
            "round": self.round, "sampler_state": self.sampler_state, "history": self.history,
            "threads": self.threads, "clients": sorted(self.client_states),
            "config": self.config, "config_sha256": self.config_sha256,
            "merges_sha256": {str(r): h for r, h in sorted(self.merges.items())},
        }
        atomic_write(run_dir / CHECKPOINT, tensors_to_bytes(tensors, {_META_KEY: json.dumps(record)}))

    @classmethod
    def load(cls, run_dir: Path) -> Checkpoint:
        """The run's checkpoint, or a one-line RunFileError: missing, legacy pickle, damaged."""
        path = run_dir / CHECKPOINT
        if not path.exists():
            if (run_dir / LEGACY_CHECKPOINT).exists():
                raise RunFileError(
                    f"run error: {run_dir / LEGACY_CHECKPOINT}: an old pickled checkpoint; it is not loaded "
                    "(unpickling a file can run code): rerun this run from the start")
            raise RunFileError(f"run error: {path}: file not found (nothing to resume in {run_dir})")
        tensors, meta = load_tensors(path)
        try:
            rec = json.loads(meta[_META_KEY])
            clients = {int(c): {} for c in rec["clients"]}
            state = {}
            for key, value in tensors.items():
                if key.startswith(_STATE):
                    state[key[len(_STATE):]] = value
                else:
                    client, name = key[len(_CLIENT):].split("/", 1)
                    clients[int(client)][name] = value
            ckpt = cls(
                round=int(rec["round"]), state=state, client_states=clients, sampler_state=rec["sampler_state"],
                history=list(rec["history"]), threads=int(rec["threads"]), config=str(rec["config"]),
                merges={int(r): str(h) for r, h in rec["merges_sha256"].items()},
            )
        except (KeyError, ValueError, TypeError, AttributeError) as err:
            raise RunFileError(f"run error: {path}: damaged checkpoint record ({type(err).__name__}: {err})") from None
        if rec.get("config_sha256") != ckpt.config_sha256 or any(r > ckpt.round for r in ckpt.merges):
            raise RunFileError(f"run error: {path}: inconsistent checkpoint record (edited?)")
        return ckpt


def merge_path(run_dir: Path, round_: int) -> Path:
    return run_dir / MERGES / f"round_{round_:04d}.safetensors"


def save_merge(run_dir: Path, round_: int, merge: dict[str, tuple[Tensor, Tensor]]) -> str:
    """Write round `round_`'s merge; its SHA-256 (recorded in the next checkpoint)."""
    (run_dir / MERGES).mkdir(parents=True, exist_ok=True)
    tensors = {}
    for name, (B, A) in merge.items():
        tensors[f"{name}.B"] = B
        tensors[f"{name}.A"] = A
    data = tensors_to_bytes(tensors)
    atomic_write(merge_path(run_dir, round_), data)
    return sha256_bytes(data)


def load_merges(run_dir: Path, up_to_round: int, expected: dict[int, str] | None = None, after: int = 0,
                ) -> list[dict[str, tuple[Tensor, Tensor]]]:
    """Merges in round order. With `expected` (a checkpoint's round → SHA-256), exactly those
    rounds, each verified (a missing, altered or swapped file stops with one line naming it);
    without, every merge file of rounds after+1..up_to_round that exists (a Flower node's own)."""
    if expected is None:
        rounds = [t for t in range(after + 1, up_to_round + 1) if merge_path(run_dir, t).exists()]
    else:
        rounds = sorted(t for t in expected if t <= up_to_round)
    out = []
    for t in rounds:
        path = merge_path(run_dir, t)
        if expected is not None and not path.exists():
            raise RunFileError(f"run error: {path}: missing (the checkpoint records a merge for round {t})")
        flat, _ = load_tensors(path, expected_sha256=None if expected is None else expected[t])
        names = sorted({k.rsplit(".", 1)[0] for k in flat})
        try:
            out.append({n: (flat[f"{n}.B"], flat[f"{n}.A"]) for n in names})
        except KeyError as err:
            raise RunFileError(f"run error: {path}: no tensor {err.args[0]}") from None
    return out
