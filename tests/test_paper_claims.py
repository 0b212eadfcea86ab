"""bench/paper_claims.py decides the papers' claims on the five-seed studies by the rule written
before their results: each verdict and Holm p is recomputed here from hand-made runs (global
test items and personalised held-out items), including the claims that must stay pending."""

import json

import numpy as np
import pytest
from conftest import bench_module
from scipy import stats as sps

from fedlora.stats import holm

paper_claims = bench_module("paper_claims")

N = 200  # test items; personalised: 2 clients × 50 held-out items


def _run(run, test_acc, personal_acc=None):
    """A finished run whose final evaluation gets the first round(acc · N) test items right (and
    the first round(acc · 50) held-out items of each client)."""
    (run / "eval").mkdir(parents=True)
    arrays = {"id": np.arange(N), "correct": np.arange(N) < round(test_acc * N)}
    if personal_acc is not None:
        arrays |= {"personal_client": np.repeat([0, 1], 50), "personal_id": np.arange(100) * 7,
                   "personal_label": np.zeros(100, np.int64), "personal_prediction": np.zeros(100, np.int64),
                   "personal_correct": np.tile(np.arange(50) < round(personal_acc * 50), 2)}
    np.savez(run / "eval" / "round_0006.npz", **arrays)
    base = {"clients": [{"id": 0}], "uplink_bytes": 1, "downlink_bytes": 1, "wall_seconds": 1.0, "server_seconds": 0.0}
    last = {**base, "round": 6, "accuracy": float(arrays["correct"].mean())}
    if personal_acc is not None:
        last["personal_accuracy"] = float(arrays["personal_correct"].mean())
    (run / "metrics.jsonl").write_text(json.dumps({**base, "round": 5}) + "\n" + json.dumps(last) + "\n")
    (run / "summary.json").write_text("{}")


def _study(root, accuracy, methods, seeds=range(5), personal=None):
    for s in seeds:
        for m in methods:
            _run(root / f"seed_{s}" / m, accuracy(m, s), None if personal is None else personal(m, s))


JITTER = [0.0, 0.01, -0.01, 0.015, -0.005]


def test_claims_are_decided_by_the_t_test_over_seeds_with_holm_across_all_eight(tmp_path):
    agnews = {"aflora": 0.70, "flora": 0.60, "flexlora": 0.80, "hetlora": 0.70,
              "aflora-no-ddr": 0.70, "aflora-no-dlf": 0.65}
    noise = {"hetlora": [0.02, -0.03, 0.01, 0.03, -0.02], "aflora-no-ddr": [0.0, 0.05, -0.05, 0.04, -0.03]}

    def acc(m, s):  # FLoRA and no-DLF consistently below AFLoRA, FlexLoRA above, the others a wash
        return agnews[m] + JITTER[s] * (m == "aflora") + noise.get(m, [0.0] * 5)[s]

    _study(tmp_path / "agnews", acc, list(agnews))
    _study(tmp_path / "fpb", lambda m, s: 0.8 + 0.01 * s - 0.1 * (m == "hetlora"), ["aflora", "flora", "flexlora", "hetlora"])
    studies = {"agnews": tmp_path / "agnews", "fpb": tmp_path / "fpb"}
    rows = paper_claims.decide(paper_claims.CLAIMS, [paper_claims.global_difference(studies, c) for c in paper_claims.CLAIMS])
    verdict = {(r["comparison"].task, r["comparison"].other): r["verdict"] for r in rows}
    assert verdict[("agnews", "flora")] == "reproduced"
    assert verdict[("agnews", "flexlora")] == "refuted"
    assert verdict[("agnews", "hetlora")] == verdict[("agnews", "aflora-no-ddr")] == "inconclusive"
    assert verdict[("agnews", "aflora-no-dlf")] == "reproduced"
    assert verdict[("fpb", "hetlora")] == "reproduced" and verdict[("fpb", "flora")] == "inconclusive"  # Δ = 0 exactly

    def per_seed(task, m, other):  # the accuracies the runs were built to have, rounded to items
        f = acc if task == "agnews" else (lambda m, s: 0.8 + 0.01 * s - 0.1 * (m == "hetlora"))
        return np.array([round(f(m, s) * N) / N - round(f(other, s) * N) / N for s in range(5)])

    ps = []
    for r in rows:
        c = r["comparison"]
        d = per_seed(c.task, c.method, c.other)
        assert r["diff"].mean == pytest.approx(d.mean()) and r["diff"].seeds == 5
        ps.append((1.0 if np.all(d == 0) else 0.0) if np.ptp(d) < 1e-12 else sps.ttest_1samp(d, 0).pvalue)
    assert [r["p_holm"] for r in rows] == pytest.approx(holm(ps))
    md = paper_claims.markdown(rows, [], [])
    flex = next(line for line in md.splitlines() if line.startswith("| AFLoRA beats FlexLoRA (non-IID) |"))
    assert "| -0.098 [" in flex and flex.endswith("| **refuted** | – |") and "Holm across these 8" in md


def test_claims_short_of_five_seeds_stay_pending_and_count_as_p_one(tmp_path):
    methods = ["aflora", "flora", "flexlora", "hetlora"]
    _study(tmp_path, lambda m, s: 0.7 + 0.1 * (m == "aflora") + JITTER[s] * (m == "flora"), methods, seeds=range(4))
    rows = paper_claims.decide(paper_claims.CLAIMS, [paper_claims.global_difference({"agnews": tmp_path}, c)
                                                     for c in paper_claims.CLAIMS])
    assert {r["verdict"] for r in rows} == {"pending (4 of 5 seeds)", "pending (0 of 5 seeds)"}
    assert all(r["p_holm"] is None for r in rows)
    _study(tmp_path, lambda m, s: 0.8 - 0.1 * (m != "aflora"), methods, seeds=[4])  # the fifth seed lands
    diffs = [paper_claims.global_difference({"agnews": tmp_path}, c) for c in paper_claims.CLAIMS]
    rows = paper_claims.decide(paper_claims.CLAIMS, diffs)
    decided = [r for r in rows if r["p_holm"] is not None]
    assert len(decided) == 3  # AG News' three baselines; the ablations and FPB are still pending
    p = diffs[0].p_value
    assert decided[0]["p_holm"] == pytest.approx(holm([p, diffs[1].p_value, diffs[2].p_value] + [1.0] * 5)[0])


def test_a_seed_scored_on_other_items_is_not_paired(tmp_path):
    _study(tmp_path, lambda m, s: 0.7 + 0.05 * (m == "aflora") + JITTER[s], ["aflora", "flora"])
    np.savez(tmp_path / "seed_3" / "flora" / "eval" / "round_0006.npz", id=np.arange(1, N + 1), correct=np.ones(N, bool))
    d = paper_claims.global_difference({"agnews": tmp_path}, paper_claims.CLAIMS[0])
    assert d.seeds == 4
    assert paper_claims.decide(paper_claims.CLAIMS[:1], [d])[0]["verdict"] == "pending (4 of 5 seeds)"


def test_the_2025_methods_stand_on_global_and_personalised_items_separately(tmp_path):
    methods = ["fedit", "aflora", "fedex", "fedsa", "fedsvd", "rolora"]
    test = {"fedit": 0.80, "aflora": 0.70, "fedex": 0.80, "fedsa": 0.60, "fedsvd": 0.75, "rolora": 0.75}
    own = {"fedit": 0.80, "aflora": 0.70, "fedex": 0.80, "fedsa": 0.96, "fedsvd": 0.70, "rolora": 0.70}
    _study(tmp_path, lambda m, s: test[m] + JITTER[s] * (m == "fedsa"), methods,
           personal=lambda m, s: own[m] + [0.0, 0.02, -0.02, 0.0, 0.02][s] * (m == "fedsa"))
    studies = {"agnews": tmp_path}
    glob = paper_claims.decide(paper_claims.STANDING, [paper_claims.global_difference(studies, c) for c in paper_claims.STANDING])
    pers = paper_claims.decide(paper_claims.STANDING, [paper_claims.personal_difference(studies, c) for c in paper_claims.STANDING])
    g = {(r["comparison"].method, r["comparison"].other): r for r in glob}
    p = {(r["comparison"].method, r["comparison"].other): r for r in pers}
    assert g[("fedsa", "fedit")]["verdict"] == "below" and p[("fedsa", "fedit")]["verdict"] == "above"
    assert g[("fedex", "fedit")]["verdict"] == "no difference shown"
    assert g[("fedsvd", "aflora")]["verdict"] == "above" and p[("fedsvd", "aflora")]["verdict"] == "no difference shown"
    assert p[("fedsa", "fedit")]["diff"].mean == pytest.approx(np.mean([round((0.96 + j) * 50) / 50 - 0.8
                                                                        for j in [0.0, 0.02, -0.02, 0.0, 0.02]]))
    md = paper_claims.markdown([], glob, pers)
    assert "| FedSA-LoRA − FedIT | AG News, label skew (non-IID) |" in md


def test_the_command_writes_the_tables_and_refuses_a_missing_folder(tmp_path, capsys):
    _study(tmp_path / "a", lambda m, s: 0.7, ["aflora", "flora"], seeds=range(2))
    out = tmp_path / "claims.md"
    assert paper_claims.main(["--agnews", str(tmp_path / "a"), "--md", str(out)]) == 0
    assert "pending (2 of 5 seeds)" in out.read_text()
    assert paper_claims.main(["--fpb", str(tmp_path / "nowhere"), "--md", str(out)]) == 2
    assert "--fpb" in capsys.readouterr().err


def test_the_secondary_auc_column_is_the_curves_not_the_final_accuracy(tmp_path):
    """Equal final accuracy, but AFLoRA's curve was higher earlier: the verdict (final accuracy)
    stays inconclusive while the secondary column shows the AUC gap, paired over seeds."""
    base = {"clients": [{"id": 0}], "uplink_bytes": 1, "downlink_bytes": 1, "wall_seconds": 1.0, "server_seconds": 0.0}
    early = {"aflora": [0.6, 0.62, 0.58], "flora": [0.4, 0.41, 0.39]}  # round 1's subset accuracy per seed
    for s in range(3):
        for m in ("aflora", "flora"):
            run = tmp_path / f"seed_{s}" / m
            (run / "eval").mkdir(parents=True)
            np.savez(run / "eval" / "round_0002.npz", id=np.arange(N), correct=np.arange(N) < 140)
            records = [{**base, "round": 1, "accuracy": early[m][s], "subset_accuracy": early[m][s]},
                       {**base, "round": 2, "accuracy": 0.7, "subset_accuracy": 0.7}]
            (run / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
            (run / "summary.json").write_text("{}")
    studies, claim = {"agnews": tmp_path}, paper_claims.CLAIMS[0]
    mean, low, high = paper_claims.auc_difference(studies, claim)
    per_seed = [(early["aflora"][s] + 0.7) / 2 - (early["flora"][s] + 0.7) / 2 for s in range(3)]
    assert mean == pytest.approx(np.mean(per_seed)) and low < mean < high
    assert high - low == pytest.approx(2 * sps.t.ppf(0.975, 2) * sps.sem(per_seed))
    md = paper_claims.report(studies)
    row = next(line for line in md.splitlines() if line.startswith("| AFLoRA beats FLoRA (non-IID) |"))
    assert "| +0.000 [" in row and row.endswith(f"| +{mean:.3f} [{low:+.3f}, {high:+.3f}] |")
