"""Atomic per-round checkpoints, and the log of updates merged into the base model.

The base model is never saved: its merged updates are kept as low-rank factors, one
safetensors file per round, and replayed in order on resume. Replaying the same float
operations in the same order rebuilds bit-identical base weights at a fraction of the
size of a weight dump.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file
from torch import Tensor

CHECKPOINT = "checkpoint.pt"
MERGES = "merges"


def atomic_write(path: Path, write) -> None:
    """Write through a temporary file and rename: a crash leaves the old file or the new one."""
    tmp = path.with_name(path.name + ".tmp")
    write(tmp)
    with open(tmp, "rb") as fh:
        os.fsync(fh.fileno())
    os.replace(tmp, path)


@dataclass
class Checkpoint:
    round: int
    state: dict[str, Tensor]
    client_states: dict[int, dict[str, Tensor]]
    sampler_state: dict[str, Any]
    history: list[dict[str, Any]] = field(default_factory=list)
    threads: int = 1  # torch threads: reduction order, hence the last bits, depends on it

    def save(self, run_dir: Path) -> None:
        payload = {
            "round": self.round,
            "state": self.state,
            "client_states": self.client_states,
            "sampler_state": self.sampler_state,
            "history": self.history,
            "threads": self.threads,
        }
        atomic_write(run_dir / CHECKPOINT, lambda p: torch.save(payload, p))

    @classmethod
    def load(cls, run_dir: Path) -> Checkpoint:
        path = run_dir / CHECKPOINT
        if not path.exists():
            raise FileNotFoundError(f"resume: no {CHECKPOINT} in {run_dir}")
        return cls(**torch.load(path, weights_only=False))


def merge_path(run_dir: Path, round_: int) -> Path:
    return run_dir / MERGES / f"round_{round_:04d}.safetensors"


def save_merge(run_dir: Path, round_: int, merge: dict[str, tuple[Tensor, Tensor]]) -> None:
    (run_dir / MERGES).mkdir(parents=True, exist_ok=True)
    tensors = {}
    for name, (B, A) in merge.items():
        tensors[f"{name}.B"] = B.contiguous()
        tensors[f"{name}.A"] = A.contiguous()
    atomic_write(merge_path(run_dir, round_), lambda p: save_file(tensors, str(p)))


def load_merges(run_dir: Path, up_to_round: int) -> list[dict[str, tuple[Tensor, Tensor]]]:
    """Merges of rounds 1..up_to_round in order (rounds without a merge are skipped)."""
    out = []
    for t in range(1, up_to_round + 1):
        path = merge_path(run_dir, t)
        if not path.exists():
            continue
        flat = load_file(str(path))
        names = sorted({k.rsplit(".", 1)[0] for k in flat})
        out.append({n: (flat[f"{n}.B"], flat[f"{n}.A"]) for n in names})
    return out
