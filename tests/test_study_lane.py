"""The study lane's queue (bench/issue31_lane.sh, sourced without running a lane): the units come
in the plan's order, a unit is ready only when its inputs exist, and a task pinned to bfloat16
waits on a CPU without native bfloat16 while the float32 task runs there (docs/studies_plan.md,
"One dtype per study"). Nothing trains here."""

import subprocess
import sys
from pathlib import Path

from conftest import bench_module

ROOT = Path(__file__).resolve().parents[1]
PLAN = bench_module("study_plan").load()


def lane(out: Path, machine: str, script: str) -> list[str]:
    env = {"PATH": "/usr/bin:/bin", "LANE_LIB": "1", "OUT": str(out), "CODE": str(ROOT), "PY": sys.executable,
           "MACHINE_DTYPE": machine}
    run = subprocess.run(["bash", "-c", f'source "{ROOT}/bench/issue31_lane.sh"\n{script}'], env=env,
                         capture_output=True, text=True, check=True)
    return run.stdout.splitlines()


READY = 'units | while read -r k t s m; do if is_ready $k $t $s $m; then echo "$k $t $s $m"; fi; done'


def test_units_follow_the_plan(tmp_path):
    units = lane(tmp_path, "float32", "units")
    first = list(PLAN.tasks)[0]
    assert units[0] == f"pilot {first}" and units[1] == f"tune {first} - {PLAN.tasks[first].tuned[0]}"
    for name, task in PLAN.tasks.items():
        mains = [u for u in units if u.startswith(f"main {name} ")]
        assert len(mains) == len(PLAN.seeds) * len(task.main)
        assert units.index(f"tables {name}") > units.index(mains[-1]) > units.index(f"decide {name}")


def test_a_bfloat16_study_waits_for_a_native_cpu(tmp_path):
    bf16 = [n for n, t in PLAN.tasks.items() if t.compute_dtype == "bfloat16"]
    fp32 = [n for n, t in PLAN.tasks.items() if t.compute_dtype == "float32"]
    assert bf16 and fp32  # the plan as decided; this test is about both kinds
    for name in PLAN.tasks:  # every pilot decided: the tuning units are ready
        (tmp_path / "pilot" / name).mkdir(parents=True)
        (tmp_path / "pilot" / name / "ROUNDS").write_text("10\n")
    unheld = "".join(f'HOLD[{n}]=""\n' for n in PLAN.tasks)  # as once the plan's holds are lifted
    on_avx2 = lane(tmp_path, "float32", unheld + READY)
    on_native = lane(tmp_path, "bfloat16", unheld + READY)
    for name in bf16:
        assert not any(u.split()[1] == name for u in on_avx2)
        assert f"tune {name} - {PLAN.tasks[name].tuned[0]}" in on_native
    for name in fp32:
        tunes = {f"tune {name} - {m}" for m in PLAN.tasks[name].tuned}
        assert tunes <= set(on_avx2) and tunes <= set(on_native)
    # nothing past the tuning is ready before the decision
    assert not any(u.startswith(("main", "decide", "tables")) for u in on_avx2 + on_native)


def test_a_held_study_runs_nothing_anywhere(tmp_path):
    for name in PLAN.tasks:
        (tmp_path / "pilot" / name).mkdir(parents=True)
        (tmp_path / "pilot" / name / "ROUNDS").write_text("10\n")
    held, other = [n for n, t in PLAN.tasks.items() if t.compute_dtype == "float32"][0], list(PLAN.tasks)[0]
    for machine in ("float32", "bfloat16"):
        ready = lane(tmp_path, machine, f'HOLD[{other}]=""\nHOLD[{held}]="a check"\n{READY}')
        assert not any(u.split()[1] == held for u in ready)
        if machine == "bfloat16":  # the other study (bfloat16) runs there: the hold is the held task's only
            assert any(u.split()[1] == other for u in ready)
