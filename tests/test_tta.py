"""Time to accuracy from metrics records, its table, CSV and figure inside `compare`'s output."""

import csv
import json

import pytest

from fedlora.compare import MethodRun, write_comparison
from fedlora.tta import (default_target, speedup, speedup_sweep, sweep_markdown, sweep_targets, time_to_accuracy,
                         tta_markdown, tta_rows, tta_seed_markdown, tta_seed_rows)


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


def test_rows_need_every_seed_and_the_speedup_is_paired_by_seed():
    hist = {"hier": {0: _records([0.6, 0.8], 5.0), 1: _records([0.8], 5.0)},
            "fedit": {0: _records([0.6, 0.7, 0.8], 10.0), 1: _records([0.6, 0.7, 0.8], 10.0)},
            "slow": {0: _records([0.8], 1.0), 1: _records([0.1], 1.0)}}
    rows = {r["method"]: r for r in tta_rows(hist, 0.8, reference="fedit")}
    assert rows["hier"]["sim_seconds"] == 7.5 and rows["hier"]["round"] == 1.5
    assert rows["slow"]["reached"] == "1/2" and rows["slow"]["sim_seconds"] is None
    # hier: fedit's 30 s ÷ 10 s and ÷ 5 s → ratios 3 and 6; slow missed seed 1: no ratio at all
    assert rows["hier"]["speedup"] == pytest.approx((3 * 6) ** 0.5) and rows["hier"]["paired_seeds"] == 2
    assert rows["slow"]["speedup"] is None and (rows["slow"]["paired_seeds"], rows["slow"]["reached_seeds"]) == (2, 1)
    assert "– (not reached in 1 of 2 seeds)" in tta_markdown(list(rows.values()), 0.8, reference="fedit")
    one = tta_rows({"fedit": {0: hist["fedit"][0]}, "slow": {0: hist["slow"][0]}}, 0.8, reference="fedit")
    assert one[1]["speedup"] == pytest.approx(30.0) and one[1]["speedup_low"] is None  # one seed: no interval
    assert rows["fedit"]["speedup"] == 1.0 == rows["fedit"]["speedup_low"] == rows["fedit"]["speedup_high"]
    assert "speedup" not in tta_rows(hist, 0.8)[0]  # no reference, no ratio
    assert default_target({"a": [_records([0.5, 0.9], 1)], "b": [_records([0.6], 1)]}) == pytest.approx(0.57)
    assert default_target({"a": [_records([None], 1)]}) is None and default_target({}) is None  # nothing evaluated


def test_speedup_is_the_geometric_mean_with_a_t_interval_on_the_log_scale():
    """Ratios 3, 2, 4 over three seeds: geometric mean 24^(1/3) = 2.884; by hand, the logs have
    mean 1.0594 and standard deviation 0.34827, t(0.975, 2) = 4.3027, so the interval is
    exp(1.0594 ± 4.3027 · 0.34827 / √3) = [1.2144, 6.853]."""
    per_seed = {"fedit": {s: _records([0.9], t) for s, t in enumerate((30.0, 20.0, 40.0))},
                "hier": {s: _records([0.9], 10.0) for s in range(3)}}
    got = speedup(per_seed, "hier", "fedit", 0.8)
    assert got["speedup"] == pytest.approx(24 ** (1 / 3), rel=1e-9) and got["paired_seeds"] == 3
    assert got["speedup_low"] == pytest.approx(1.2144, abs=2e-4)
    assert got["speedup_high"] == pytest.approx(6.853, abs=2e-3)
    slower = speedup(per_seed, "fedit", "hier", 0.8)  # the other way round: the reciprocals
    assert slower["speedup"] * got["speedup"] == pytest.approx(1.0)
    assert slower["speedup_low"] == pytest.approx(1 / got["speedup_high"])
    per_seed["hier"][2] = _records([0.5], 10.0)  # seed 2 never reached: no ratio, not a mean of the rest
    assert speedup(per_seed, "hier", "fedit", 0.8) == {"speedup": None, "speedup_low": None, "speedup_high": None,
                                                      "paired_seeds": 3, "reached_seeds": 2}
    del per_seed["hier"][2]  # a seed the method did not run is not paired
    assert speedup(per_seed, "hier", "fedit", 0.8)["speedup"] == pytest.approx(6 ** 0.5)


def test_each_seeds_crossing_is_tabulated():
    per_seed = {"hier": {0: _records([0.6, 0.8], 5.0), 2: _records([0.1], 5.0)}, "fedit": {0: _records([0.9], 2.5)}}
    rows = tta_seed_rows(per_seed, 0.8)
    assert [(r["method"], r["seed"], r["reached"], r["sim_seconds"]) for r in rows] == [
        ("hier", 0, True, 10.0), ("hier", 2, False, None), ("fedit", 0, True, 2.5)]
    table = tta_seed_markdown(rows)
    assert "| method | seed 0 | seed 2 |" in table
    assert "| hier | 10.0 s (round 2) | not reached |" in table and "| fedit | 2.5 s (round 1) | – |" in table


def test_the_sweep_spans_the_runs_range_and_pairs_like_the_single_target():
    """Targets: multiples of 0.05 strictly above the lowest first accuracy (0.35 exactly; a run's
    later dip to 0.3 does not count) and up to the highest accuracy reached (0.80 exactly)."""
    per_seed = {"fedit": {0: _records([0.35, 0.6, 0.8], 10.0), 1: _records([0.5, 0.7], 10.0)},
                "hier": {0: _records([0.5, 0.65, 0.78], 4.0), 1: _records([None, 0.62, 0.75], 4.0)}}
    targets = sweep_targets(per_seed)
    assert targets == [0.4, 0.45, 0.5, 0.55, 0.6, 0.65, 0.7, 0.75, 0.8]
    assert sweep_targets({"a": {0: _records([None], 1.0)}}) == []
    assert sweep_targets({"a": {0: _records([0.45, 0.3, 0.7], 1.0)}}) == [0.5, 0.55, 0.6, 0.65, 0.7]  # 0.7/0.05 < 14
    with pytest.raises(ValueError, match="step"):
        sweep_targets(per_seed, step=0)
    rows = speedup_sweep(per_seed, "fedit", targets)
    assert {r["method"] for r in rows} == {"hier"} and [r["target"] for r in rows] == targets  # no self-ratio
    for row in rows:
        assert row == {"target": row["target"], "method": "hier", **speedup(per_seed, "hier", "fedit", row["target"])}
    at = {r["target"]: r for r in rows}
    # 0.7: fedit 30 s and 20 s, hier 12 s and 12 s (seed 1's round 1 unevaluated but timed) → √(2.5 · 5/3)
    assert at[0.7]["speedup"] == pytest.approx((2.5 * 5 / 3) ** 0.5)
    assert at[0.75]["speedup"] is None and at[0.75]["reached_seeds"] == 1  # fedit's seed 1 stops at 0.7
    table = sweep_markdown(rows, "fedit")
    assert "| target | hier |" in table and "| 0.75 | – (not reached in 1 of 2 seeds) |" in table
    assert f"| 0.7 | {at[0.7]['speedup']:.2f}× [" in table and "] (2) |" in table
    one = speedup_sweep({m: {0: runs[0]} for m, runs in per_seed.items()}, "fedit", [0.6])
    assert "| 0.6 | 2.50× (1) |" in sweep_markdown(one, "fedit")
    assert "– (no seed in common)" in sweep_markdown(speedup_sweep({"fedit": {0: per_seed["fedit"][0]},
                                                                   "hier": {1: per_seed["hier"][1]}}, "fedit", [0.6]),
                                                     "fedit")


def test_a_run_without_the_clock_shows_a_dash_not_zero_seconds():
    old = _records([0.6, 0.9], sim=None)  # metrics written before the simulated clock existed
    for rec in old:
        del rec["sim_seconds"]
    assert time_to_accuracy(old, 0.8) == {"round": 2.0, "sim_seconds": None, "wall_seconds": 4.0,
                                          "uplink_bytes": 200.0}
    rows = tta_rows({"new": {0: _records([0.9], 3.0)}, "old": {0: old}, "never": {0: _records([0.1], 1.0)}},
                    0.8, reference="new")
    assert rows[1]["sim_seconds"] is None and rows[1]["wall_seconds"] == 4.0
    table = tta_markdown(rows, 0.8, reference="new")
    assert "| old | 1/1 | 2.0 | – | 4 | 0.00 | – |" in table  # no clock: no ratio
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
    assert float(rows[0]["speedup"]) == pytest.approx(2.4)  # over fedit, the default reference
    assert "| hierfedlora | 1/1 | 2.0 | 10.0 | 4 | 0.00 | 2.40× (1) |" in text
    seeds = list(csv.DictReader((tmp_path / "tta_seeds.csv").open()))
    assert [(r["method"], r["seed"], r["round"]) for r in seeds] == [("hierfedlora", "0", "2.0"), ("fedit", "0", "2.0")]
    sweep = list(csv.DictReader((tmp_path / "tta_sweep.csv").open()))
    assert [(r["target"], r["method"]) for r in sweep] == [("0.55", "hierfedlora"), ("0.6", "hierfedlora"),
                                                          ("0.65", "hierfedlora"), ("0.7", "hierfedlora"),
                                                          ("0.75", "hierfedlora"), ("0.8", "hierfedlora"),
                                                          ("0.85", "hierfedlora")]
    assert "### Speed-up over fedit by target" in text and "speedup_vs_target.png" in text
    assert (tmp_path / "speedup_vs_target.png").stat().st_size > 1000
    write_comparison(tmp_path, runs, ["hierfedlora", "fedit"], target=0.8, reference="nobody")
    assert "No speed-up column" in (tmp_path / "comparison.md").read_text()
    assert not (tmp_path / "tta_sweep.csv").exists() and not (tmp_path / "speedup_vs_target.png").exists()
    write_comparison(tmp_path, runs, ["hierfedlora", "fedit"])  # no --target: 0.95 × the lowest best, 0.85
    assert "Time to accuracy ≥ 0.8075" in (tmp_path / "comparison.md").read_text()
