"""Time to accuracy from metrics records, its table, CSV and figure inside `compare`'s output."""

import csv
import json

import pytest

from fedlora.compare import MethodRun, write_comparison
from fedlora.tta import default_target, time_to_accuracy, tta_markdown, tta_rows


def _records(accs, sim, up=100, wall=2.0):
    return [{"round": t + 1, "accuracy": a, "sim_seconds": sim, "wall_seconds": wall, "uplink_bytes": up,
             "downlink_bytes": up, "server_seconds": 0.1, "client_cost_percent": 1.0, "train_loss": 1.0,
             "clients": [{"id": 0}]} for t, a in enumerate(accs)]


def test_first_round_reaching_target_with_cumulative_costs():
    recs = _records([0.5, 0.7, 0.65, 0.8], sim=10.0)
    recs[1]["sim_seconds"] = 30.0
    assert time_to_accuracy(recs, 0.7) == {"round": 2.0, "sim_seconds": 40.0, "wall_seconds": 4.0,
                                           "uplink_bytes": 200.0}
    assert time_to_accuracy(recs, 0.9) is None
    recs[0]["accuracy"] = None  # not evaluated: costs still count
    assert time_to_accuracy(recs, 0.75)["sim_seconds"] == 60.0


def test_rows_need_every_seed_and_speedup_is_relative_to_the_first():
    hist = {"hier": [_records([0.6, 0.8], 5.0), _records([0.8], 5.0)],
            "fedit": [_records([0.6, 0.7, 0.8], 10.0)] * 2,
            "slow": [_records([0.8], 1.0), _records([0.1], 1.0)]}
    rows = {r["method"]: r for r in tta_rows(hist, 0.8)}
    assert rows["hier"]["sim_seconds"] == 7.5 and rows["hier"]["round"] == 1.5
    assert rows["fedit"]["speedup_of_first"] == pytest.approx(30.0 / 7.5)
    assert rows["slow"]["reached"] == "1/2" and rows["slow"]["sim_seconds"] is None
    assert default_target({"a": [_records([0.5, 0.9], 1)], "b": [_records([0.6], 1)]}) == pytest.approx(0.57)


def test_a_run_without_the_clock_shows_a_dash_not_zero_seconds():
    old = _records([0.6, 0.9], sim=None)  # metrics written before the simulated clock existed
    for rec in old:
        del rec["sim_seconds"]
    assert time_to_accuracy(old, 0.8) == {"round": 2.0, "sim_seconds": None, "wall_seconds": 4.0,
                                          "uplink_bytes": 200.0}
    rows = tta_rows({"new": [_records([0.9], 3.0)], "old": [old], "never": [_records([0.1], 1.0)]}, 0.8)
    assert rows[1]["sim_seconds"] is None and rows[1]["wall_seconds"] == 4.0
    table = tta_markdown(rows, 0.8)
    assert "| old | 1/1 | 2.0 | – | 4 | 0.00 | – |" in table
    assert "| never | 0/1 | not reached | not reached |" in table


def test_compare_output_has_the_tta_section(tmp_path):
    runs = []
    for method, sim in (("hierfedlora", 5.0), ("fedit", 12.0)):
        d = tmp_path / "seed_0" / method
        d.mkdir(parents=True)
        (d / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in _records([0.5, 0.8, 0.85], sim)))
        (d / "summary.json").write_text("{}")
        runs.append(MethodRun(method, 0, d))
    write_comparison(tmp_path, runs, ["hierfedlora", "fedit"], target=0.8)
    text = (tmp_path / "comparison.md").read_text()
    assert "## Time to accuracy" in text and "accuracy_vs_sim_time.png" in text
    assert (tmp_path / "accuracy_vs_sim_time.png").stat().st_size > 1000
    rows = list(csv.DictReader((tmp_path / "tta.csv").open()))
    assert [float(r["sim_seconds"]) for r in rows] == [10.0, 24.0]
    assert float(rows[1]["speedup_of_first"]) == pytest.approx(2.4)
