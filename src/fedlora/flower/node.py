"""A SuperNode's side of a run: its own data, its base kept current on its disk, its state.

A node is warm in two layers (docs/howto/real-nodes.md, Warm nodes). In memory: a ClientApp
handler runs once per message, and under Flower's default isolation in a new process each
time; with a warm node executor (fedlora.flower.executor) that process is a fork of one that
already imported torch, transformers and fedlora and loaded the *fresh* base model, which the
handler finds in place of a load (fedlora.models.keep_warm). That copy is never trained or
merged into (only the forks change theirs), so what makes it the run's current base is the
second layer, on disk, the same under either isolation. Under
state-dir/<run key>/partition-<k>/ the node keeps
  base.safetensors                 the target modules' base weights as of round R (R and their
                                   SHA-256 in its metadata): the node's current base;
  merges/round_NNNN.safetensors    every base update the server sent (catch-up included),
                                   kept to rebuild the base should the snapshot be lost;
  state/round_NNNN.safetensors     the method's private client state after round N (AFLoRA's
                                   λ and mask); the server names the round to continue from.
Per message the node takes the fresh model (warm, or loaded) and reads its own data (the
same work every round),
puts its snapshot back and merges only the rounds it lacks (one, normally), checks the
result against the digest the server sends, and saves the snapshot: its work outside
training does not grow with the round number (no replay of every merge since round 1).

A snapshot or a state that was deleted, altered or left behind is noticed by its digest:
a base is rebuilt from the fresh model and the kept merges (or, lacking those, the node
answers with an error and the server sends every merge next round); a lost state starts
again from the method's initial state and the reply says so (`state-reset`), which the
server logs and `fedlora run --replay` repeats.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from flwr.app import RecordDict

from fedlora.files import RunFileError, atomic_write, load_tensors, sha256_bytes, tensors_to_bytes
from fedlora.flower.records import MERGE_PREFIX, from_arrays
from fedlora.runtime.checkpoint import load_merges, merge_path

log = logging.getLogger("fedlora")

BASE_FILE = "base.safetensors"
_META = "fedlora-node"


class BaseMismatch(RuntimeError):
    """The node cannot rebuild the base the server has: it needs every merge again."""


@dataclass
class NodeStore:
    """This node's files for one server run (one partition)."""

    root: Path

    # -- base updates ---------------------------------------------------------------------------
    def save_merges(self, content: RecordDict) -> None:
        for key, record in content.array_records.items():
            if key.startswith(MERGE_PREFIX):
                path = merge_path(self.root, int(key[len(MERGE_PREFIX):]))
                atomic_write(path, tensors_to_bytes(from_arrays(record)), inside=self.root)

    # -- the base snapshot ----------------------------------------------------------------------
    def load_base(self) -> tuple[int, dict] | None:
        """(round, weights) of the snapshot, None if there is none or it is unreadable or does
        not match its own recorded digest (then it is removed)."""
        path = self.root / BASE_FILE
        if not path.exists():
            return None
        try:
            weights, meta = load_tensors(path, inside=self.root)
            record = json.loads(meta[_META])
            round_ = int(record["round"])
        except (RunFileError, KeyError, ValueError, TypeError) as err:
            log.warning("node base snapshot %s unreadable (%s): rebuilding the base", path, err)
            path.unlink(missing_ok=True)
            return None
        return round_, weights

    def save_base(self, round_: int, weights: dict, digest: str) -> None:
        meta = {_META: json.dumps({"round": round_, "sha256": digest})}
        atomic_write(self.root / BASE_FILE, tensors_to_bytes(weights, meta), inside=self.root)

    def drop_base(self) -> None:
        (self.root / BASE_FILE).unlink(missing_ok=True)

    # -- private client state -------------------------------------------------------------------
    def state_path(self, round_: int) -> Path:
        return self.root / "state" / f"round_{round_:04d}.safetensors"

    def load_state(self, round_: int, expected_sha256: str | None) -> tuple[dict, str | None]:
        """The state after round `round_` ({} for round 0) and, when it cannot be used (missing,
        unreadable, or not the state the server recorded), the reason it starts afresh."""
        if round_ == 0:
            return {}, None
        path = self.state_path(round_)
        if not path.exists():
            return {}, f"client state of round {round_} missing"
        try:
            return load_tensors(path, expected_sha256=expected_sha256, inside=self.root)[0], None
        except RunFileError as err:  # unreadable, or not the state the server recorded (SHA-256)
            return {}, f"client state of round {round_} unusable ({err})"

    def save_state(self, round_: int, state: dict, keep_from: int) -> str:
        """Save the state after `round_`; drop states older than `keep_from` (never needed again).
        Returns its SHA-256 (the server records it, and names it when the state is next used)."""
        path = self.state_path(round_)
        data = tensors_to_bytes(state)
        atomic_write(path, data, inside=self.root)
        for old in path.parent.glob("round_*.safetensors"):
            if int(old.stem.split("_")[1]) < keep_from:
                old.unlink(missing_ok=True)
        return sha256_bytes(data)


def bring_base_up_to_date(store: NodeStore, adapters: Any, through: int, expected: str) -> str:
    """Make the freshly loaded model's base the server's as of round `through` (digest
    `expected`): from the snapshot plus the merges it lacks, else from the fresh base plus every
    kept merge. Saves the snapshot; returns how ("snapshot", "rebuilt"). BaseMismatch when
    neither gives the server's base."""
    from fedlora.runtime.rebuild import base_digest, base_weights, load_base_weights, replay_merges

    fresh = base_weights(adapters)
    snap = store.load_base()
    if snap is not None and snap[0] <= through:
        start, weights = snap
        try:
            load_base_weights(adapters, weights)
            replay_merges(adapters, _merges_after(store, start, through))
            if base_digest(adapters) == expected:
                store.save_base(through, base_weights(adapters), expected)
                return "snapshot"
        except (RunFileError, BaseMismatch) as err:
            log.warning("node base snapshot: %s", err)
        log.warning("node base snapshot of round %d does not give the server's base of round %d: rebuilding",
                    start, through)
    store.drop_base()
    load_base_weights(adapters, fresh)
    replay_merges(adapters, _merges_after(store, 0, through))
    if base_digest(adapters) != expected:
        raise BaseMismatch(f"node base of round {through} differs from the server's (local merges lost or "
                           "altered); resync: send every merge")
    store.save_base(through, base_weights(adapters), expected)
    return "rebuilt"


def _merges_after(store: NodeStore, start: int, through: int) -> list:
    """The kept merges of rounds start+1..through (those that exist: not every round merges)."""
    return load_merges(store.root, through, after=start)
