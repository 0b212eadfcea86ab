"""Atomic per-round checkpoints, and the log of updates merged into the base model.

The base model is never saved: its merged updates are kept as low-rank factors, one
safetensors file per round, and replayed in order on resume. Replaying the same float
operations in the same order rebuilds bit-identical base weights at a fraction of the
size of a weight dump.

`checkpoint.safetensors` is one file, so it is replaced atomically as a whole: the global
and per-client tensors, and in its metadata a JSON record of the round, sampler state,
history, the resolved config with its SHA-256, the SHA-256 of every merge file, of the
tensors themselves (a flipped byte in a client state is caught, not trained on) and of the
run's partition table. Nothing is pickled (a run directory from elsewhere cannot run code);
every field of the record is validated (`Record`: types and ranges) before it is used; a
resume verifies every merge file and the config against the record (fedlora.runtime.rundir).
`final_state.safetensors` holds exactly the last checkpoint's global state, so its SHA-256 is
the record's `state_sha256`.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Annotated, Any, Literal

import torch
from pydantic import Field, ValidationError
from torch import Tensor

from fedlora.files import (
    RunFileError,
    atomic_write,
    ensure_dir,
    load_tensors,
    parse_json,
    sha256_bytes,
    tensors_sha256,
    tensors_to_bytes,
)
from fedlora.runtime.outputs import record_error
from fedlora.schema import MAX_ROUNDS, MAX_THREADS, Strict

CHECKPOINT = "checkpoint.safetensors"
FINAL_STATE = "final_state.safetensors"
LEGACY_CHECKPOINT = "checkpoint.pt"  # pickled by older versions: refused, never unpickled
MERGES = "merges"
_META_KEY = "fedlora"
_STATE, _CLIENT = "state/", "client/"

__all__ = ["CHECKPOINT", "FINAL_STATE", "Checkpoint", "atomic_write", "has_checkpoint", "load_merges", "merge_path", "save_merge"]


def has_checkpoint(run_dir: Path) -> bool:
    """Whether `run_dir` holds a run (a checkpoint of either format)."""
    return (run_dir / CHECKPOINT).exists() or (run_dir / LEGACY_CHECKPOINT).exists()


Sha256 = Annotated[str, Field(pattern=r"^[0-9a-f]{64}$")]
U128 = Annotated[int, Field(ge=0, lt=2**128)]


class _PCG64Words(Strict):
    state: U128
    inc: U128


class SamplerState(Strict):
    """numpy's PCG64 state, as `Generator.bit_generator.state` gives it."""

    bit_generator: Literal["PCG64"]
    state: _PCG64Words
    has_uint32: int = Field(ge=0, le=1)
    uinteger: int = Field(ge=0, lt=2**32)


class Record(Strict):
    """The checkpoint's JSON record: every field typed and bounded before anything uses it."""

    round: int = Field(ge=0, le=MAX_ROUNDS)
    sampler_state: SamplerState
    history: list[dict[str, Any]]
    threads: int = Field(ge=1, le=MAX_THREADS)
    clients: list[Annotated[int, Field(ge=0)]]
    config: str
    config_sha256: Sha256
    merges_sha256: dict[Annotated[int, Field(ge=1, le=MAX_ROUNDS)], Sha256]
    tensors_sha256: Sha256
    state_sha256: Sha256
    partition_sha256: Sha256 | None = None


def record_problem(rec: Record) -> str | None:
    """What is inconsistent in a well-typed record, or None."""
    if rec.config_sha256 != sha256_bytes(rec.config.encode()):
        return "config_sha256 does not match its config"
    if any(r > rec.round for r in rec.merges_sha256):
        return f"a merge recorded for a round after round {rec.round}"
    if len(rec.history) != rec.round:
        return f"history: {len(rec.history)} records for {rec.round} rounds"
    previous = 0
    for i, entry in enumerate(rec.history):
        problem = record_error(entry, previous)
        if problem is None and entry["round"] != i + 1:
            problem = f"round: {entry['round']} where round {i + 1} belongs"
        if problem is not None:
            return f"history[{i}].{problem}"
        previous = entry["round"]
    return None


def check_state(state: dict[str, Tensor], module_shapes: dict[str, tuple[int, int]], where: Path | str) -> None:
    """A state read back (global or a client's) must fit the model before it is used: every
    float finite, and every factor of an adapted module W (m × n) shaped A (r × n), B (m × r)
    with one r per module. One line naming the tensor, never a shape error in the adapters."""
    ranks: dict[str, int] = {}
    for key, tensor in sorted(state.items()):
        if tensor.is_floating_point() and not bool(torch.isfinite(tensor).all()):
            raise RunFileError(f"run error: {where}: tensor {key}: NaN or Inf")
        module, _, factor = key.rpartition(".")
        if module not in module_shapes or factor not in ("A", "B"):
            continue
        m, n = module_shapes[module]
        dims = tensor.shape
        fits = len(dims) == 2 and (dims[1] == n if factor == "A" else dims[0] == m)
        r = int(dims[0] if factor == "A" else dims[-1]) if fits else -1
        if not fits or ranks.setdefault(module, r) != r:
            raise RunFileError(f"run error: {where}: tensor {key}: shape {tuple(dims)} does not fit the module "
                               f"({m}×{n}; A is r×{n}, B is {m}×r)")


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
    partition_sha256: str | None = None  # of partition.json (export weighs clients by it)

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
            "tensors_sha256": tensors_sha256(tensors),
            "state_sha256": tensors_sha256(self.state),  # = final_state.safetensors's bytes
            "partition_sha256": self.partition_sha256,
        }
        atomic_write(run_dir / CHECKPOINT, tensors_to_bytes(tensors, {_META_KEY: json.dumps(record)}))

    @classmethod
    def load(cls, run_dir: Path) -> Checkpoint:
        """The run's checkpoint, or a one-line RunFileError: missing, legacy pickle, damaged,
        a record out of range or inconsistent, tensors other than the record's."""
        path = run_dir / CHECKPOINT
        if not path.exists() and not path.is_symlink():
            if (run_dir / LEGACY_CHECKPOINT).exists():
                raise RunFileError(
                    f"run error: {run_dir / LEGACY_CHECKPOINT}: an old pickled checkpoint; it is not loaded "
                    "(unpickling a file can run code): rerun this run from the start")
            raise RunFileError(f"run error: {path}: file not found (nothing to resume in {run_dir})")
        tensors, meta = load_tensors(path)
        if not isinstance(meta.get(_META_KEY), str):
            raise RunFileError(f"run error: {path}: damaged checkpoint record (no record)")
        try:
            rec = Record.model_validate(parse_json(meta[_META_KEY], f"{path} (its record)"))
        except ValidationError as err:
            first = err.errors()[0]
            where = ".".join(str(p) for p in first["loc"])
            raise RunFileError(f"run error: {path}: damaged checkpoint record ({where}: {first['msg']})") from None
        problem = record_problem(rec)
        if problem is not None:
            raise RunFileError(f"run error: {path}: inconsistent checkpoint record ({problem}; edited?)")
        if tensors_sha256(tensors) != rec.tensors_sha256:
            raise RunFileError(f"run error: {path}: its tensors were altered since it was written (SHA-256 differs "
                               "from its record)")
        clients: dict[int, dict[str, Tensor]] = {c: {} for c in rec.clients}
        state = {}
        for key, value in tensors.items():
            if key.startswith(_STATE):
                state[key[len(_STATE):]] = value
                continue
            client, _, name = key.removeprefix(_CLIENT).partition("/")
            if not key.startswith(_CLIENT) or not client.isdigit() or int(client) not in clients or not name:
                raise RunFileError(f"run error: {path}: unexpected tensor {key[:80]!r}")
            clients[int(client)][name] = value
        if tensors_sha256(state) != rec.state_sha256:
            raise RunFileError(f"run error: {path}: inconsistent checkpoint record (state_sha256; edited?)")
        return cls(
            round=rec.round, state=state, client_states=clients,
            sampler_state=rec.sampler_state.model_dump(), history=rec.history, threads=rec.threads,
            config=rec.config, merges=dict(rec.merges_sha256), partition_sha256=rec.partition_sha256,
        )

    def load_final_state(self, run_dir: Path) -> dict[str, Tensor]:
        """final_state.safetensors, verified: its SHA-256 must be this checkpoint's state's."""
        path = run_dir / FINAL_STATE
        if not path.exists() and not path.is_symlink():
            raise RunFileError(f"run error: {path}: file not found (the run did not finish)")
        return load_tensors(path, expected_sha256=tensors_sha256(self.state))[0]


def merge_path(run_dir: Path, round_: int) -> Path:
    return run_dir / MERGES / f"round_{round_:04d}.safetensors"


def save_merge(run_dir: Path, round_: int, merge: dict[str, tuple[Tensor, Tensor]]) -> str:
    """Write round `round_`'s merge; its SHA-256 (recorded in the next checkpoint)."""
    ensure_dir(run_dir / MERGES, run_dir)
    tensors = {}
    for name, (B, A) in merge.items():
        tensors[f"{name}.B"] = B
        tensors[f"{name}.A"] = A
    data = tensors_to_bytes(tensors)
    atomic_write(merge_path(run_dir, round_), data, inside=run_dir)
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
        flat, _ = load_tensors(path, expected_sha256=None if expected is None else expected[t], inside=run_dir)
        names = sorted({k.rsplit(".", 1)[0] for k in flat})
        try:
            out.append({n: (flat[f"{n}.B"], flat[f"{n}.A"]) for n in names})
        except KeyError as err:
            raise RunFileError(f"run error: {path}: no tensor {err.args[0]}") from None
    return out
