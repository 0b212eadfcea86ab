"""The studies' design (configs/studies/plan.yaml), for the lane and the report alike.

    python bench/study_plan.py bash   # the plan as bash assignments, for bench/issue31_lane.sh
"""

from __future__ import annotations

import shlex
import sys
from dataclasses import dataclass
from pathlib import Path

import yaml

PLAN = Path(__file__).resolve().parents[1] / "configs" / "studies" / "plan.yaml"


@dataclass(frozen=True)
class Task:
    config: str
    compute_dtype: str  # the whole study's, on every machine that runs it (float32 or bfloat16)
    overrides: list[str]
    tuned: list[str]  # tuned on the grid, then in the main study
    main_only: list[str]  # in the main study only (with a tuned method's settings)
    hold: str = ""  # why no unit of this task may run yet ("" when they may)

    @property
    def main(self) -> list[str]:
        return self.tuned + self.main_only

    @property
    def settings(self) -> list[str]:
        """Every command's `--set` values for this task: the dtype pin, then the overrides."""
        return [f"model.compute_dtype={self.compute_dtype}", *self.overrides]


@dataclass(frozen=True)
class Plan:
    seeds: list[int]
    round_cap: int
    pilot_methods: list[str]
    pilot_max_rounds: int
    validation_examples: int
    grid_extensions: int
    tasks: dict[str, Task]


def load(path: Path = PLAN) -> Plan:
    raw = yaml.safe_load(path.read_text())
    pilot = raw["pilot"]
    for name, t in raw["tasks"].items():
        if t["compute_dtype"] not in ("float32", "bfloat16"):  # `auto` would differ between machines
            raise ValueError(f"tasks.{name}.compute_dtype: float32 or bfloat16, not {t['compute_dtype']!r}")
    return Plan(seeds=list(raw["seeds"]), round_cap=int(raw["round_cap"]), pilot_methods=list(pilot["methods"]),
                pilot_max_rounds=int(pilot["max_rounds"]), validation_examples=int(pilot["validation_examples"]),
                grid_extensions=int(raw["grid_extensions"]),
                tasks={name: Task(t["config"], t["compute_dtype"], list(t["overrides"]), list(t["tuned"]),
                                  list(t["main_only"]), str(t.get("hold") or "")) for name, t in raw["tasks"].items()})


def bash(plan: Plan) -> str:
    """Assignments the lane evals: PLAN_* scalars and per-task associative arrays."""
    q = shlex.quote
    lines = [f"PLAN_SEEDS={q(','.join(map(str, plan.seeds)))}", f"PLAN_ROUND_CAP={plan.round_cap}",
             f"PLAN_PILOT_CAP={plan.pilot_max_rounds}",
             f"PLAN_PILOT_METHODS={q(' '.join(plan.pilot_methods))}", f"PLAN_VALIDATION={plan.validation_examples}",
             f"PLAN_EXTEND={plan.grid_extensions}", f"PLAN_TASKS={q(' '.join(plan.tasks))}",
             "declare -A CONFIG METHODS MAIN EXTRA DTYPE HOLD"]
    for name, t in plan.tasks.items():
        lines += [f"CONFIG[{name}]={q(t.config)}", f"METHODS[{name}]={q(','.join(t.tuned))}",
                  f"MAIN[{name}]={q(','.join(t.main))}",
                  f"EXTRA[{name}]={q(' '.join(f'--set {o}' for o in t.settings))}",
                  f"DTYPE[{name}]={t.compute_dtype}", f"HOLD[{name}]={q(t.hold)}"]
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    if sys.argv[1:] != ["bash"]:
        sys.exit("usage: python bench/study_plan.py bash")
    try:
        print(bash(load()), end="")
    except (OSError, yaml.YAMLError, KeyError, TypeError, ValueError) as err:  # one line, the lane stops
        sys.exit(f"{PLAN}: not a study plan ({type(err).__name__}: {str(err).splitlines()[0] if str(err) else ''})")
