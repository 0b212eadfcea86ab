"""A run's model rebuilt from what it keeps: the base as loaded, the merges, the state.

A run never saves its base weights. What it learned is the base updates merged round by
round (`merges/round_NNNN.safetensors`, each verified against the checkpoint's SHA-256) and
the method's global state (`final_state.safetensors`, or the checkpoint's). Replaying the
merges in round order onto a freshly loaded base repeats the server's float operations, so
the rebuilt base equals the server's bit for bit. Every reader goes through here: a resumed
run, `fedlora eval --run`, `fedlora export`, and a Flower node catching up on its base.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import torch
from torch import Tensor

from fedlora.files import RunFileError
from fedlora.runtime.checkpoint import Checkpoint, load_merges
from fedlora.runtime.rundir import verify_run

if TYPE_CHECKING:
    from fedlora.adapters import Adapters
    from fedlora.config import RunConfig

Factors = dict[str, tuple[Tensor, Tensor]]  # module → (B, A): one round's base update


@dataclass
class SavedRun:
    """What a run directory holds of its model, read and verified."""

    checkpoint: Checkpoint
    merges: list[Factors]
    """The base updates in round order."""
    final_state: dict[str, Tensor] | None = None
    """The method's global state after the last round (None: not asked for)."""


def read_run(run_dir: Path, cfg: RunConfig | None = None, final: bool = False) -> SavedRun:
    """The run's checkpoint and verified merges (and its final state with `final`). With `cfg`,
    the run must be one `cfg` may continue (`verify_run`: a resume, an export); without, only
    the files are checked (`eval --run` may evaluate on other data)."""
    run_dir = Path(run_dir)
    if cfg is not None:
        ckpt, merges = verify_run(run_dir, cfg)
    else:
        ckpt = Checkpoint.load(run_dir)
        merges = load_merges(run_dir, ckpt.round, ckpt.merges)
    state = ckpt.load_final_state(run_dir) if final else None  # its SHA-256 is the checkpoint's record
    return SavedRun(ckpt, merges, state)


def replay_merges(adapters: Adapters, merges: Iterable[Factors]) -> None:
    """Bring a base up to date: each round's update merged in round order (the server's own
    operations, hence its weights bit for bit)."""
    for merge in merges:
        adapters.merge(merge)


def base_weights(adapters: Adapters) -> dict[str, Tensor]:
    """The base weights merges change (the target modules'), as CPU copies: a node's snapshot
    of its current base."""
    return {name: layer.base.weight.detach().to("cpu", copy=True) for name, layer in adapters.layers.items()}


def load_base_weights(adapters: Adapters, weights: dict[str, Tensor]) -> None:
    """Put a snapshot back (names and shapes must be the model's: else a RunFileError)."""
    if sorted(weights) != sorted(adapters.layers):
        raise RunFileError("run error: base snapshot: its modules are not the model's target modules")
    for name, layer in adapters.layers.items():
        w = layer.base.weight
        if weights[name].shape != w.shape or weights[name].dtype != w.dtype:
            raise RunFileError(f"run error: base snapshot: {name} has shape {tuple(weights[name].shape)} "
                               f"{weights[name].dtype}, the model {tuple(w.shape)} {w.dtype}")
        with torch.no_grad():
            w.copy_(weights[name])


def base_digest(adapters: Adapters) -> str:
    """SHA-256 of the base weights merges change: the server sends its own with every round, so
    a node whose base drifted (a snapshot deleted, altered or left behind) knows it."""
    h = hashlib.sha256()
    for name in sorted(adapters.layers):
        h.update(name.encode())
        h.update(adapters.layers[name].base.weight.detach().to("cpu").contiguous().numpy().tobytes())
    return h.hexdigest()
