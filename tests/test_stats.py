"""fedlora.stats and the statistics of `fedlora compare`, on synthetic predictions with known
answers: a real difference is found and covered, identical predictions give 0 and p = 1."""

from __future__ import annotations

import csv
import io

import numpy as np
import pytest

from fedlora.compare import MethodRun, write_comparison
from fedlora.config import ConfigError
from fedlora.runtime.outputs import read_eval_items, read_metrics, write_eval_items, write_json, write_metrics
from fedlora.stats import (
    bootstrap_means,
    bootstrap_p_value,
    item_interval,
    mcnemar_exact,
    paired_difference,
    seed_interval,
)

N = 500


def _reference(seed: int, accuracy: float = 0.8) -> np.ndarray:
    """A reference method's correctness: exactly `accuracy` · N items right, in seeded places."""
    right = np.zeros(N, dtype=bool)
    right[np.random.default_rng(seed).permutation(N)[: int(accuracy * N)]] = True
    return right


def _better(reference: np.ndarray, gain: float) -> np.ndarray:
    """The reference's predictions plus `gain` · N items it got wrong: exactly +gain better."""
    out = reference.copy()
    out[np.flatnonzero(~reference)[: int(gain * N)]] = True
    return out


def test_seed_interval_is_student_t_by_hand():
    mean, low, high = seed_interval(np.array([0.80, 0.82, 0.84]))
    half = 4.302652729749464 * 0.02 / np.sqrt(3)  # t_{0.975, 2} · s / √3
    assert mean == pytest.approx(0.82) and (low, high) == pytest.approx((0.82 - half, 0.82 + half))
    _, low, high = seed_interval(np.array([[0.5, 0.7], [0.5, 0.9]]))  # per column (rounds)
    assert low[0] == high[0] == 0.5 and low[1] < 0.8 < high[1]
    with pytest.raises(ValueError):
        seed_interval(np.array([0.8]))


def test_one_seed_item_bootstrap_matches_the_binomial_spread():
    right = _reference(0, 0.8)
    low, high = item_interval(right, seed=0)
    se = np.sqrt(0.8 * 0.2 / N)
    assert low == pytest.approx(0.8 - 1.96 * se, abs=0.006) and high == pytest.approx(0.8 + 1.96 * se, abs=0.006)
    assert item_interval(right, seed=0) == (low, high)  # seeded
    assert item_interval(np.ones(20), seed=0) == (1.0, 1.0)


def test_known_difference_is_covered_and_significant():
    refs = [_reference(s) for s in range(3)]
    better = [_better(r, 0.1) for r in refs]
    diff = paired_difference(better, refs, seed=0)
    assert diff.mean == pytest.approx(0.1) and diff.seeds == 3
    assert diff.low == pytest.approx(0.1) == pytest.approx(diff.high)  # the same +0.1 in every seed: no spread
    assert diff.p_value == 0.0 and diff.significant  # an infinite t
    assert diff.items_low < 0.1 < diff.items_high and diff.items_low > 0.05 and diff.items_p < 0.001
    assert all(p < 1e-10 for p in diff.mcnemar)  # 50 discordant items, all one way: 2 · 2^-50
    assert paired_difference(better, refs, seed=0) == diff  # deterministic
    against = paired_difference(refs, better, seed=0)
    assert against.mean == pytest.approx(-0.1) and against.items_high < 0 and against.significant


def test_identical_predictions_give_zero_and_p_one():
    refs = [_reference(s) for s in range(3)]
    diff = paired_difference(refs, [r.copy() for r in refs], seed=0)
    assert (diff.mean, diff.low, diff.high, diff.p_value) == (0.0, 0.0, 0.0, 1.0)
    assert (diff.items_low, diff.items_high, diff.items_p) == (0.0, 0.0, 1.0)
    assert diff.mcnemar == (1.0, 1.0, 1.0) and not diff.significant


def test_one_seed_has_no_primary_test_and_no_mark():
    ref = _reference(0)
    diff = paired_difference([_better(ref, 0.1)], [ref], seed=0)
    se = np.sqrt(0.1 * 0.9 / N)  # the paired differences are 1 on 50 items, 0 elsewhere
    assert diff.items_low == pytest.approx(0.1 - 1.96 * se, abs=0.006)
    assert diff.items_high == pytest.approx(0.1 + 1.96 * se, abs=0.006)
    assert diff.low is diff.high is diff.p_value is None and not diff.significant


def test_seed_spread_widens_the_t_interval_not_the_within_seed_one():
    """Seeds whose differences are 0, 0.1 and 0.2: the primary t interval shows the spread;
    the within-seed view (items only, seeds fixed) stays about ±0.03 around 0.1: it is blind to it."""
    refs = [_reference(s, 0.7) for s in range(3)]
    diff = paired_difference([_better(r, g) for r, g in zip(refs, (0.0, 0.1, 0.2))], refs, seed=0)
    assert diff.mean == pytest.approx(0.1)
    half = 4.302652729749464 * 0.1 / np.sqrt(3)  # t interval of the per-seed differences 0, .1, .2
    assert (diff.low, diff.high) == pytest.approx((0.1 - half, 0.1 + half))
    assert diff.p_value == pytest.approx(0.2254, abs=1e-3) and not diff.significant  # t = √3, df 2
    assert 0.06 < diff.items_low < 0.1 < diff.items_high < 0.14 and diff.items_p < 0.001


def test_two_seeds_are_tested_but_never_marked():
    refs = [_reference(s) for s in range(2)]
    diff = paired_difference([_better(r, 0.1) for r in refs], refs, seed=0)
    assert diff.p_value == 0.0 and not diff.significant  # MIN_SEEDS is 3


def test_mcnemar_and_p_value_by_hand():
    a = np.array([1] * 8 + [0] * 2 + [1] * 5, dtype=bool)  # 8 only a, 2 only b, 5 both
    b = np.array([0] * 8 + [1] * 2 + [1] * 5, dtype=bool)
    assert mcnemar_exact(a, b) == pytest.approx(2 * (1 + 10 + 45) / 1024)
    assert mcnemar_exact(a.astype(float), b.astype(float)) == mcnemar_exact(a, b)  # 0/1 scores read back
    assert bootstrap_p_value(np.zeros(99)) == 1.0
    assert bootstrap_p_value(np.ones(99)) == pytest.approx(2 / 100)
    assert bootstrap_p_value(np.r_[-np.ones(9), np.ones(90)]) == pytest.approx(2 * 10 / 100)


def test_paired_difference_rejects_unpaired_input():
    """Named errors: numpy's own broadcast error would also be a ValueError, so match the text."""
    with pytest.raises(ValueError, match="non-empty and of equal length"):
        paired_difference([np.ones(3)], [np.ones(4)])
    with pytest.raises(ValueError, match="non-empty and of equal length"):
        paired_difference([np.ones(0)], [np.ones(0)])
    with pytest.raises(ValueError, match="one .method, reference. pair of arrays per seed"):
        paired_difference([np.ones(3)], [])
    with pytest.raises(ValueError, match="at least two seeds"):
        seed_interval(np.array([0.8]))


def test_hierarchical_replicates_follow_the_seed_draws_exactly():
    """Items constant within each seed (seed s scores s/2 on every item): a replicate's value is
    then exactly the mean of its drawn seeds' scores, so the seed level can be checked draw by
    draw against the same generator, including draws that leave a seed out; the within-seed
    view keeps every seed in every replicate."""
    per_seed = [np.full(7, s / 2) for s in range(3)]
    reps = bootstrap_means(per_seed, np.random.default_rng(5), resamples=40, resample_seeds=True)
    drawn = np.random.default_rng(5).integers(0, 3, size=(40, 3))
    assert np.array_equal(reps, (drawn / 2).mean(1))
    assert any(not (row == 0).any() for row in drawn)  # some replicate never drew seed 0
    one = bootstrap_means(per_seed, np.random.default_rng(0), resamples=1, resample_seeds=True)  # seeds 2, 1, 1:
    assert one.tolist() == [(1.0 + 0.5 + 0.5) / 3]  # seed 0 never drawn at all, the others still count
    assert bootstrap_means(per_seed, np.random.default_rng(5), resamples=40).tolist() == [0.5] * 40


def test_within_seed_interval_is_exactly_the_quantiles_of_its_replicates():
    """Rebuilt by hand from the same generator: catches a wrong tail, a dropped confidence or
    resample count; and two seeds already get the t interval of their differences."""
    refs = [_reference(s) for s in range(2)]
    method = [_better(refs[0], 0.1), _better(refs[1], 0.04)]
    diff = paired_difference(method, refs, seed=7, confidence=0.9, resamples=300)
    reps = bootstrap_means([m.astype(float) - r for m, r in zip(method, refs)], np.random.default_rng(7), 300)
    assert (diff.items_low, diff.items_high) == tuple(np.quantile(reps, [0.05, 0.95]))
    assert diff.items_p == bootstrap_p_value(reps)
    half = 6.313751514675041 * 0.03  # t_{0.95, 1} · s/√2, s/√2 = |0.1 − 0.04| / 2
    assert (diff.low, diff.high) == pytest.approx((0.07 - half, 0.07 + half))


def test_item_interval_is_seeded_and_uses_its_arguments():
    x = np.random.default_rng(3).normal(size=200)  # continuous: quantiles differ between streams
    assert item_interval(x) == item_interval(x, seed=0) == item_interval(x, seed=0)
    assert item_interval(x, seed=1) != item_interval(x, seed=0)
    low, high = item_interval(x)
    narrow = item_interval(x, confidence=0.5)
    assert low < narrow[0] < narrow[1] < high
    assert item_interval(x, resamples=500) != (low, high)
    se = x.std(ddof=1) / np.sqrt(len(x))  # the percentile interval is about mean ± 1.96 SE
    assert (low, high) == pytest.approx((x.mean() - 1.96 * se, x.mean() + 1.96 * se), abs=0.2 * se)
    assert item_interval(np.array([0.7])) == (0.7, 0.7)  # one test item: no spread to resample


# --- `fedlora compare` tables from synthetic runs -----------------------------------------


def _fake_run(root, method, seed, correct, ids=None):
    """A finished run directory with one evaluated round and its per-item records."""
    run = MethodRun(method, seed, root / f"seed_{seed}" / method)
    run.run_dir.mkdir(parents=True)
    record = {
        "round": 1, "accuracy": float(correct.mean()), "test_loss": 1.0, "clients": [{"id": 0}],
        "client_cost_percent": 0.1, "uplink_bytes": 10, "downlink_bytes": 10, "server_seconds": 0.1,
        "wall_seconds": 1.0, "sim_seconds": 1.0, "class_accuracy": {"a": 0.9, "b": 0.6},
        "worst_client_accuracy": 0.7, "worst_client": 3,
    }
    write_metrics(run.run_dir, [record])
    write_json(run.run_dir / "summary.json", {"method": method})
    ids = np.arange(len(correct)) if ids is None else ids
    write_eval_items(run.run_dir, 1, {"id": ids, "correct": correct, "prediction": correct.astype(np.int64),
                                      "label": np.ones(len(correct), dtype=np.int64)})
    return run


def test_compare_writes_intervals_and_paired_differences(tmp_path):
    runs = []
    for s in range(3):
        ref = _reference(s)
        runs += [_fake_run(tmp_path, "fedit", s, ref), _fake_run(tmp_path, "flexlora", s, _better(ref, 0.1)),
                 _fake_run(tmp_path, "flora", s, ref.copy())]
    write_comparison(tmp_path, runs, ["fedit", "flexlora", "flora"])
    rows = {r["method"]: r for r in csv.DictReader((tmp_path / "comparison.csv").open())}
    assert rows["fedit"]["diff_vs_reference"] == ""  # the reference itself
    flex, flora = rows["flexlora"], rows["flora"]
    assert float(flex["diff_vs_reference"]) == pytest.approx(0.1) and flex["significant"] == "True"
    assert float(flex["diff_items_low"]) < 0.1 < float(flex["diff_items_high"]) and float(flex["p_value"]) == 0
    assert float(flora["diff_vs_reference"]) == 0 and float(flora["p_value"]) == 1 and flora["significant"] == "False"
    assert float(flex["p_holm"]) == 0 and float(flora["p_holm"]) == 1
    assert flex["interval"] == "t over seeds" and flex["paired_seeds"] == "3"
    assert float(flex["final_accuracy_ci_low"]) == pytest.approx(0.9) == float(flex["final_accuracy_ci_high"])
    assert float(flex["diff_ci_low"]) == pytest.approx(0.1) == pytest.approx(float(flex["diff_ci_high"]))
    assert float(flex["worst_class_accuracy"]) == 0.6 and flex["worst_client"] == "3;3;3"
    md = (tmp_path / "comparison.md").read_text()
    assert "| flexlora | 3 |" in md and "+0.1000*" in md and "+0.0000 " in md and "Δ final vs fedit" in md
    assert "| method | a | b |" in md and "| flora | 0.9000 | 0.6000 |" in md


def test_compare_marks_only_what_survives_holm_across_the_table(tmp_path):
    """Per-seed gains 0.02, 0.04, 0.03 give t p = 0.035: marked alone, but not beside a second
    such comparison (Holm: 2 × 0.035 = 0.070)."""
    def runs_of(methods):
        out = []
        for s, gain in enumerate((0.02, 0.04, 0.03)):
            ref = _reference(s)
            out += [_fake_run(tmp_path / "-".join(methods), "fedit", s, ref)]
            out += [_fake_run(tmp_path / "-".join(methods), m, s, _better(ref, gain)) for m in methods]
        return out

    for methods, holm_p, marked in ((["flora"], 0.0351, "True"), (["flora", "flexlora"], 0.0702, "False")):
        out = tmp_path / "-".join(methods)
        write_comparison(out, runs_of(methods), ["fedit", *methods])
        rows = {r["method"]: r for r in csv.DictReader((out / "comparison.csv").open())}
        for m in methods:
            assert float(rows[m]["p_value"]) == pytest.approx(0.0351, abs=5e-4)
            assert float(rows[m]["p_holm"]) == pytest.approx(holm_p, abs=1e-3) and rows[m]["significant"] == marked
        assert ("+0.0300*" in (out / "comparison.md").read_text()) == (marked == "True")


def test_per_class_table_averages_each_class_over_the_seeds_that_measured_it(tmp_path):
    ref = _reference(0)
    runs = [_fake_run(tmp_path, "fedit", s, ref) for s in range(2)]
    runs.append(_fake_run(tmp_path, "fedit", 2, ref))
    for run, classes in zip(runs, ({"a": 0.9, "b": 0.5}, {"a": 0.7, "b": None}, "damaged")):
        record = read_metrics(run.run_dir)[0]
        write_metrics(run.run_dir, [{**record, "class_accuracy": classes}])
    write_comparison(tmp_path, runs, ["fedit"])
    md = (tmp_path / "comparison.md").read_text()
    assert "| fedit | 0.8000 | 0.5000 |" in md
    per_seed = md.split("| method | seed | a | b |")[1].split("\n\n")[0]  # seed 2's damaged record: no row
    assert per_seed.splitlines()[2:] == ["| fedit | 0 | 0.9000 | 0.5000 |", "| fedit | 1 | 0.7000 | – |"]


def test_per_class_table_has_no_per_seed_rows_for_one_seed(tmp_path):
    run = _fake_run(tmp_path, "fedit", 0, _reference(0))
    write_metrics(run.run_dir, [{**read_metrics(run.run_dir)[0], "class_accuracy": {"a": 0.9}}])
    write_comparison(tmp_path, [run], ["fedit"])
    md = (tmp_path / "comparison.md").read_text()
    assert "| fedit | 0.9000 |" in md and "| method | seed |" not in md


def test_tilt_tables_average_each_client_over_its_rounds_then_over_seeds(tmp_path):
    ref = _reference(0)
    runs = [_fake_run(tmp_path, m, s, ref) for m in ("aflora", "fedit") for s in range(2)]
    tilts = {  # (aflora seed 0, seed 1): client 10 only in seed 0's second round
        0: [{"client_weight": {"2": 0.2, "10": 0.8}, "delta_share": {"2": 0.1, "10": 0.9}},
            {"client_weight": {"2": 0.4}, "delta_share": {"2": 0.3}}],
        1: [{"client_weight": {"2": 0.6}, "delta_share": {"2": 0.5}}],
    }
    for run in runs[:2]:
        record = read_metrics(run.run_dir)[0]
        write_metrics(run.run_dir, [{**record, "round": t + 1, **tilt} for t, tilt in enumerate(tilts[run.seed])])
    write_comparison(tmp_path, runs, ["aflora", "fedit"])
    md = (tmp_path / "comparison.md").read_text()
    assert "| weight p_k | client 2 | client 10 |" in md  # numeric order, not "10" < "2"
    assert "| aflora | 0.450 | 0.800 |" in md  # client 2: seed means 0.3 and 0.6; client 10: seed 0 only
    assert "| aflora | 0.350 | 0.900 |" in md  # shares: (0.2 + 0.5) / 2
    tilt = md.split("## Aggregation tilt")[1].split("\n\n![")[0]
    assert "| fedit | " not in tilt  # logged no tilt


def test_compare_one_seed_and_no_reference(tmp_path):
    ref = _reference(0)
    runs = [_fake_run(tmp_path, "flexlora", 0, _better(ref, 0.1)), _fake_run(tmp_path, "flora", 0, ref)]
    write_comparison(tmp_path, runs, ["flexlora", "flora"])  # default reference fedit did not run
    rows = {r["method"]: r for r in csv.DictReader((tmp_path / "comparison.csv").open())}
    assert rows["flora"]["interval"] == "bootstrap over items"
    assert float(rows["flora"]["final_accuracy_ci_low"]) < 0.8 < float(rows["flora"]["final_accuracy_ci_high"])
    assert rows["flexlora"]["diff_vs_reference"] == ""
    assert "reference method 'fedit' has no finished run" in (tmp_path / "comparison.md").read_text()

    write_comparison(tmp_path, runs, ["flexlora", "flora"], reference="flora")
    rows = {r["method"]: r for r in csv.DictReader((tmp_path / "comparison.csv").open())}
    assert float(rows["flexlora"]["diff_vs_reference"]) == pytest.approx(0.1)
    assert rows["flexlora"]["interval"] == "bootstrap over items"


def test_compare_pairs_only_the_same_test_items(tmp_path):
    ref = _reference(0)
    runs = [_fake_run(tmp_path, "fedit", 0, ref),
            _fake_run(tmp_path, "flora", 0, ref, ids=np.arange(N) + 1)]  # another test subset
    write_comparison(tmp_path, runs, ["fedit", "flora"])
    row = {r["method"]: r for r in csv.DictReader((tmp_path / "comparison.csv").open())}["flora"]
    assert row["reference"] == "fedit" and row["diff_vs_reference"] == ""


def test_eval_records_round_trip_without_pickle(tmp_path):
    items = {"id": np.arange(3), "correct": np.array([True, False, True]),
             "logprob": np.zeros((3, 2), dtype=np.float32), "mmlu_subject": np.array(["a", "b", "a"])}
    write_eval_items(tmp_path, 7, items)
    path = tmp_path / "eval" / "round_0007.npz"
    with np.load(path, allow_pickle=False) as npz:
        assert sorted(npz.files) == sorted(items) and all(np.array_equal(npz[k], v) for k, v in items.items())
    assert not list((tmp_path / "eval").glob("*.tmp"))
    path.write_bytes(path.read_bytes()[:40])  # truncated: one line naming the file, no traceback
    with pytest.raises(ConfigError, match="round_0007.npz: not a readable per-item record"):
        read_eval_items(tmp_path, 7)
    assert read_eval_items(tmp_path, 8) is None


def test_eval_records_that_are_too_large_or_lie_about_their_shape_are_refused(tmp_path, monkeypatch):
    import zipfile

    from fedlora.runtime import outputs

    write_eval_items(tmp_path, 1, {"correct": np.ones(1000, dtype=bool)})
    monkeypatch.setattr(outputs, "MAX_EVAL_BYTES", 999)  # 1000 bools and a header are over it
    with pytest.raises(ConfigError, match="round_0001.npz: per-item records over 999 bytes"):
        read_eval_items(tmp_path, 1)
    monkeypatch.undo()
    header = np.lib.format.header_data_from_array_1_0(np.ones(4))
    header["shape"] = (10**15,)  # 8 PB declared, 32 bytes present
    member = io.BytesIO()
    np.lib.format.write_array_header_1_0(member, header)
    member.write(np.ones(4).tobytes())
    with zipfile.ZipFile(outputs.eval_items_path(tmp_path, 2), "w") as archive:
        archive.writestr("correct.npy", member.getvalue())
    with pytest.raises(ConfigError, match="round_0002.npz: not a readable per-item record"):
        read_eval_items(tmp_path, 2)


def test_randomly_damaged_eval_records_always_give_one_line(tmp_path):
    write_eval_items(tmp_path, 1, {"id": np.arange(200), "correct": np.arange(200) % 3 == 0})
    path = tmp_path / "eval" / "round_0001.npz"
    good = path.read_bytes()
    rng = np.random.default_rng(0)
    for _ in range(200):  # flip a few bytes: zlib, zip and npy-header errors must all become one line
        damaged = bytearray(good)
        for i in rng.integers(0, len(good), 3):
            damaged[i] ^= 0xFF
        path.write_bytes(bytes(damaged))
        try:
            read_eval_items(tmp_path, 1)
        except ConfigError as err:
            assert "round_0001.npz" in str(err)
