"""Who took part in each round of a run, so that `fedlora run --replay RUN_DIR` repeats it.

A Flower run's rounds depend on more than the seed: a node killed mid-round, a straggler past
the round timeout, a node that lied or lost its state. Every round record in metrics.jsonl
says what reached the server: `screened` (the (stage, client) updates that passed the
per-update checks and went to the norm screen), `clients` (those kept) and, per client,
`state_reset` (its private state was lost and started afresh). Replayed in-process with the
same config and seed, the same sampling then drops exactly the other clients, keeps exactly
those kept, and resets exactly those states: the final adapter equals the Flower run's.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from fedlora.errors import ConfigError
from fedlora.files import RunFileError


@dataclass
class Round:
    screened: set[tuple[int, int]] = field(default_factory=set)
    kept: set[tuple[int, int]] = field(default_factory=set)
    resets: set[int] = field(default_factory=set)


@dataclass
class Participation:
    """Per round, what a recorded run's server received (see the module's docstring)."""

    source: Path
    rounds: dict[int, Round]

    @classmethod
    def read(cls, run_dir: Path) -> Participation:
        from fedlora.runtime.outputs import read_metrics

        run_dir = Path(run_dir)
        if not (run_dir / "metrics.jsonl").exists():
            raise ConfigError(f"config error: --replay {run_dir}: no metrics.jsonl (not a run directory)")
        rounds: dict[int, Round] = {}
        for rec in read_metrics(run_dir):
            if "screened" not in rec:
                raise RunFileError(f"run error: {run_dir}/metrics.jsonl round {rec['round']}: no 'screened' "
                                   "record (written by an older fedlora: it cannot be replayed)")
            try:
                rounds[rec["round"]] = Round(
                    screened={(int(s), int(k)) for s, k in rec["screened"]},
                    kept={(int(c.get("stage", 0)), int(c["id"])) for c in rec["clients"]},
                    resets={int(c["id"]) for c in rec["clients"] if c.get("state_reset")},
                )
            except (TypeError, ValueError, KeyError) as err:
                raise RunFileError(f"run error: {run_dir}/metrics.jsonl round {rec['round']}: "
                                   f"malformed participation ({err})") from None
        return cls(run_dir, rounds)

    def round(self, t: int) -> Round:
        if t not in self.rounds:
            raise ConfigError(f"config error: --replay {self.source}: has no round {t} "
                              f"(it recorded {len(self.rounds)})")
        return self.rounds[t]
