"""bench/privacy_study.py reads the privacy study's nine arms: the contrasts it publishes are
recomputed here from hand-made per-item records (within ε, the cost of privacy, the difference
in differences), with Holm over each family."""

import json

import numpy as np
import pytest
from conftest import bench_module
from scipy import stats as sps

privacy_study = bench_module("privacy_study")

ARMS = [m + e for e in ("", "-eps8", "-eps2") for m in ("fedit", "ffa", "aflora")]


def _study(root, accuracy, arms=ARMS, seeds=range(3)):
    """Runs whose final evaluation gets the first round(acc * 100) of 100 items right."""
    for seed in seeds:
        for arm in arms:
            run = root / f"seed_{seed}" / arm
            (run / "eval").mkdir(parents=True)
            correct = np.arange(100) < round(accuracy(arm, seed) * 100)
            np.savez(run / "eval" / "round_0004.npz", id=np.arange(100), correct=correct)
            base = {"clients": [{"id": 0}], "uplink_bytes": 1, "downlink_bytes": 1, "wall_seconds": 1.0,
                    "server_seconds": 0.0}  # what every runtime records every round
            last = {**base, "round": 4, "accuracy": float(correct.mean())}
            if "eps" in arm:
                last |= {"privacy_epsilon": 7.9 - seed, "privacy_noise_multiplier": 0.7, "privacy_clip_norm": 0.05}
            (run / "metrics.jsonl").write_text(json.dumps({**base, "round": 3}) + "\n" + json.dumps(last) + "\n")
            (run / "summary.json").write_text("{}")


def test_contrasts_are_paired_over_seeds_with_holm_per_family(tmp_path):
    base = {"fedit": 0.80, "ffa": 0.78, "aflora": 0.76}
    cost = {"": 0.0, "-eps8": 0.10, "-eps2": 0.30}
    ffa_bonus = {"": 0.0, "-eps8": 0.05, "-eps2": 0.10}  # FFA-LoRA loses less under DP

    def accuracy(arm, seed):
        m, _, e = arm.partition("-")
        e = "-" + e if e else ""
        return base[m] - cost[e] + (ffa_bonus[e] if m == "ffa" else 0.0) + [0.0, 0.02, -0.01][seed] * (m == "ffa")

    _study(tmp_path, accuracy)
    seeds, scores, privacy = privacy_study.read_study(tmp_path)
    assert seeds == [0, 1, 2] and privacy["ffa-eps8"]["privacy_epsilon"] == pytest.approx(7.9)
    methods, costs, learned = privacy_study.comparisons(seeds, scores, np.array([0.5, 0.52, 0.49]))
    row = {r["what"]: r for r in methods + costs + learned}
    acc = lambda arm: np.array([accuracy(arm, s) for s in range(3)])  # noqa: E731
    did = (acc("ffa-eps2") - acc("ffa")) - (acc("fedit-eps2") - acc("fedit"))
    assert row["FFA-LoRA's cost − FedIT's cost at ε = 2"]["mean"] == pytest.approx(did.mean(), abs=1e-9)
    assert did.mean() == pytest.approx(0.10, abs=1e-9)
    within = acc("ffa-eps8") - acc("fedit-eps8")
    assert row["FFA-LoRA − FedIT at ε = 8"]["p"] == pytest.approx(sps.ttest_1samp(within, 0).pvalue)
    assert row["FedIT at ε = 2 − at ∞"]["mean"] == pytest.approx(-0.30)
    assert len(methods) == 10 and len(costs) == 6
    ps = sorted(r["p"] for r in methods)
    assert min(r["p_holm"] for r in methods) == pytest.approx(min(1.0, ps[0] * 10))
    assert row["FedIT at ε = 2 − the untuned model"]["mean"] == pytest.approx(0.5 - np.mean([0.5, 0.52, 0.49]))
    assert len(learned) == 9
    md = privacy_study.markdown(seeds, scores, privacy, methods, costs, learned, np.array([0.5, 0.52, 0.49]))
    assert "| FFA-LoRA | 8 | 7.90 | 0.700 | 0.0500 |" in md and "| untuned model (no training) |" in md


def test_arms_scored_on_other_items_are_refused(tmp_path):
    _study(tmp_path, lambda arm, seed: 0.5)
    np.savez(tmp_path / "seed_1" / "ffa" / "eval" / "round_0004.npz", id=np.arange(1, 101), correct=np.ones(100, bool))
    with pytest.raises(SystemExit, match="seed_1/ffa: scored on other test items"):
        privacy_study.read_study(tmp_path)


def test_fedsvd_joins_when_its_three_arms_finished_at_every_seed(tmp_path):
    _study(tmp_path, lambda arm, seed: 0.5 + 0.01 * seed)
    svd = ["fedsvd", "fedsvd-eps8", "fedsvd-eps2"]
    _study(tmp_path, lambda arm, seed: 0.6 - 0.02 * seed, svd, seeds=(0, 1))
    seeds, scores, _ = privacy_study.read_study(tmp_path)
    assert seeds == [0, 1, 2] and "fedsvd" not in scores  # seed 2 has no FedSVD yet
    _study(tmp_path, lambda arm, seed: 0.6 - 0.02 * seed, svd, seeds=(2,))
    seeds, scores, _ = privacy_study.read_study(tmp_path)
    methods, costs, _ = privacy_study.comparisons(seeds, scores)
    assert len(methods) == 15 and len(costs) == 8
    row = {r["what"]: r for r in methods}["FedSVD − FedIT at ε = 8"]
    assert row["mean"] == pytest.approx(np.mean([0.1 - 0.03 * s for s in range(3)]))
