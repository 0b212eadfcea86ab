"""bench/studies_report.py says where the studies stand from the published runs alone: the pilot's
decision by the plateau rule, each method's tuned lr with a grid end flagged, the count of
finished runs, and the claims (pending until five seeds)."""

import json

import numpy as np
from conftest import bench_module

studies_report = bench_module("studies_report")

BASE = {"clients": [{"id": 0}], "uplink_bytes": 1, "downlink_bytes": 1, "wall_seconds": 1.0, "server_seconds": 0.0}


def _run(run, curve):
    (run / "eval").mkdir(parents=True)
    (run / "metrics.jsonl").write_text("".join(json.dumps({**BASE, "round": r, "accuracy": a}) + "\n"
                                               for r, a in enumerate(curve, 1)))
    np.savez(run / "eval" / f"round_{len(curve):04d}.npz", id=np.arange(10), correct=np.arange(10) < 5)
    (run / "summary.json").write_text("{}")


def test_the_page_reports_pilot_tuning_and_progress(tmp_path):
    docs = tmp_path
    (docs / "results").mkdir()
    rising = [0.5, 0.6, 0.7, 0.75, 0.8, 0.85, 0.88, 0.9, 0.92]
    flat = [0.5, 0.7, 0.8, 0.81, 0.81, 0.81, 0.812, 0.81, 0.811]  # rounds 6-8 within 0.5 points of 3-5 at 8
    _run(docs / "studies_pilot/fpb/fedit", flat)
    _run(docs / "studies_pilot/fpb/aflora", flat[:6] + [0.7, 0.82, 0.81])  # at 7: the dip ends the rise
    _run(docs / "studies_pilot/agnews/fedit", rising)
    (docs / "studies_pilot/agnews/fedit/config.yaml").write_text("model:\n  compute_dtype: bfloat16\n")
    tune = docs / "studies_tuning/fpb"
    tune.mkdir(parents=True)
    rows = ["method,setting,options,lr,validation_accuracy,validation_loss,chosen,error"]
    for m, pick in zip(studies_report.PLAN.tasks["fpb"].tuned, [0.01, 0.03, 0.001, 0.003, 0.01, 0.01]):
        rows += [f"{m},0,{{}},{lr},{0.8 if lr == pick else 0.7},1.0,{lr == pick}," for lr in (0.001, 0.003, 0.01, 0.03)]
    (tune / "tuning.csv").write_text("\n".join(rows) + "\n")
    partial = docs / "studies_tuning/agnews"  # one method's unit wrote its own table: no decision yet
    partial.mkdir(parents=True)
    (partial / "tuning.csv").write_text(rows[0] + "\n" + "\n".join(r for r in rows[1:] if r.startswith("aflora,")) + "\n")
    _run(partial / "validation/seed_0/aflora-s0-lr0.01", [0.7])
    for s in range(2):
        for m in ("aflora", "fedit", "flora"):
            _run(docs / f"studies_fpb/seed_{s}/{m}", [0.6, 0.7])
    assert studies_report.main(["--docs", str(docs)]) == 0
    page = (docs / "results/studies.md").read_text()
    assert "| Financial PhraseBank, IID | FedIT | 0.500, 0.700" in page and ", 0.811 | 8 |" in page
    assert ", 0.810 | 7 |" in page  # AFLoRA's own plateau; the decision is the later of the two
    assert "| Financial PhraseBank, IID | *decision* | | **8 rounds** (plateau at 8) |" in page
    assert "| AG News, label skew (non-IID) | *decision* | | not decided yet (9 rounds run) |" in page
    assert "| AG News, label skew (non-IID) | FedIT | 0.500, 0.600" in page and "| still rising |" in page
    assert "FedIT 0.03 (grid end) (0.800)" in page and "AFLoRA 0.01 (0.800)" in page
    assert "FFA-LoRA 0.001 (grid end)" in page
    assert "- AG News, label skew (non-IID): 1 grid point finished; not decided yet." in page
    assert "Financial PhraseBank, IID: 6 of 30 runs finished" in page and "AG News, label skew (non-IID): 0 of 60" in page
    assert "pending (2 of 5 seeds)" in page
    assert "The pilots computed in bfloat16;" in page
    assert "(6 methods × 5 seeds, float32)" in page  # the FPB study's dtype, from the plan
    assert (docs / "results/studies_pilot.png").stat().st_size > 10_000


def test_a_plateau_past_the_cap_runs_the_capped_rounds(tmp_path):
    curve = [0.1 * r for r in range(1, 7)] + [0.7] * 8  # flat from round 7: rounds 10-12 = 7-9 at 12
    for m in ("fedit", "aflora"):
        _run(tmp_path / "studies_pilot/agnews" / m, curve)
    lines, _ = studies_report.pilot_section(tmp_path)
    assert "| AG News, label skew (non-IID) | *decision* | | **10 rounds** (plateau at 12) |" in lines
