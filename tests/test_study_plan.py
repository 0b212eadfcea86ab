"""configs/studies/plan.yaml is the one home of the studies' design: the lane reads it as bash,
the report as Python, and both must see the same lists; every name in it must be a method the
task's config can run (a typo would otherwise surface hours into a session, as a failed unit)."""

import subprocess
from pathlib import Path

import pytest
import yaml
from conftest import bench_module

from fedlora.algorithms import ALGORITHMS

study_plan = bench_module("study_plan")
ROOT = Path(__file__).resolve().parents[1]


def test_every_planned_method_runs_on_its_task():
    plan = study_plan.load()
    assert plan.tasks and plan.seeds and plan.round_cap <= plan.pilot_max_rounds
    for name, task in plan.tasks.items():
        config = ROOT / task.config
        variants = yaml.safe_load(config.read_text()).get("methods") or {}
        for m in task.tuned + plan.pilot_methods:
            assert m in ALGORITHMS or m in variants, f"{name}: {m}"
        for m in task.main_only:  # a variant of a tuned method (it takes that method's tuned settings)
            assert variants.get(m, {}).get("name") in task.tuned, f"{name}: {m}"


def test_the_lane_sees_the_plan_the_report_sees(tmp_path):
    plan = study_plan.load()
    fields = ("METHODS", "MAIN", "EXTRA", "CONFIG", "DTYPE", "HOLD")
    script = study_plan.bash(plan) + "".join(
        f'echo "{t}|' + "|".join(f"${{{f}[{t}]}}" for f in fields) + '"\n' for t in plan.tasks) \
        + 'echo "$PLAN_SEEDS|$PLAN_ROUND_CAP|$PLAN_PILOT_METHODS|$PLAN_TASKS"\n'
    out = subprocess.run(["bash", "-c", script], capture_output=True, text=True, check=True).stdout.splitlines()
    for line, (name, t) in zip(out, plan.tasks.items()):
        assert line == "|".join([name, ",".join(t.tuned), ",".join(t.tuned + t.main_only),
                                 " ".join(f"--set {o}" for o in t.settings), t.config, t.compute_dtype, t.hold])
        assert t.settings[0] == f"model.compute_dtype={t.compute_dtype}" and t.compute_dtype in ("float32", "bfloat16")
    assert out[-1] == f"{','.join(map(str, plan.seeds))}|{plan.round_cap}|{' '.join(plan.pilot_methods)}|" \
                      f"{' '.join(plan.tasks)}"


def test_a_plan_must_pin_each_study_s_dtype(tmp_path):
    """`auto` resolves per machine: a study carried across sessions would mix dtypes."""
    text = study_plan.PLAN.read_text()
    assert "compute_dtype: float32" in text
    bad = tmp_path / "plan.yaml"
    bad.write_text(text.replace("compute_dtype: float32", "compute_dtype: auto", 1))
    with pytest.raises(ValueError, match=r"compute_dtype: float32 or bfloat16, not 'auto'"):
        study_plan.load(bad)
