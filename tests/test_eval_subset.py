"""Evaluation every round on a fixed seeded subset, the whole test subset at the end, and the
area under the accuracy curve (issue 31)."""

from __future__ import annotations

import json

import numpy as np
import pytest
from conftest import tiny_tree

from fedlora.config import ConfigError, build_config
from fedlora.evaluate import subset_positions
from fedlora.records import accuracy_auc, plateau_round
from fedlora.runtime.outputs import read_eval_items, read_metrics


def test_subset_is_seeded_by_the_test_set_alone_and_sorted():
    a = subset_positions(500, 100)
    assert np.array_equal(a, subset_positions(500, 100)) and len(set(a.tolist())) == 100
    assert np.all(np.diff(a) > 0) and a.max() < 500
    assert not np.array_equal(a, np.arange(100))  # drawn, not the first items
    assert subset_positions(500, 500) is None and subset_positions(500, None) is None


def test_auc_is_the_mean_of_the_curve_preferring_the_subset():
    history = [{"accuracy": 0.5}, {"round": 2}, {"accuracy": 0.7}, {"accuracy": 0.9, "subset_accuracy": 0.8}]
    assert accuracy_auc(history) == pytest.approx((0.5 + 0.7 + 0.8) / 3)
    assert accuracy_auc([{"round": 1}]) is None


def test_every_round_on_the_subset_and_the_whole_test_set_last(data_dir, tmp_path):
    from fedlora.runtime.inprocess import Simulation

    tree = tiny_tree(algorithm={"name": "fedit"}, federation={"rounds": 3, "local_steps": 1, "eval_subset": 10})
    Simulation(build_config(tree), tmp_path, progress=False).run()
    history = read_metrics(tmp_path)
    assert [r["eval_items"] for r in history] == [10, 10, 48]
    positions = subset_positions(48, 10)
    last = read_eval_items(tmp_path, 3)
    for t in (1, 2):
        items = read_eval_items(tmp_path, t)
        assert np.array_equal(items["id"], last["id"][positions])  # the same items every round
        assert history[t - 1]["subset_accuracy"] == history[t - 1]["accuracy"] == pytest.approx(items["correct"].mean())
    assert history[2]["accuracy"] == pytest.approx(last["correct"].mean())  # the whole test subset
    assert history[2]["subset_accuracy"] == pytest.approx(last["correct"][positions].mean())
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert summary["accuracy_auc"] == pytest.approx(np.mean([r["subset_accuracy"] for r in history]))
    assert summary["final_accuracy"] == history[2]["accuracy"]


def test_eval_subset_must_be_positive():
    with pytest.raises(ConfigError, match="federation.eval_subset"):
        build_config(tiny_tree(federation={"eval_subset": 0}))


def test_plateau_round_compares_three_round_means():
    rising = [0.5, 0.6, 0.7, 0.75, 0.8, 0.85, 0.86, 0.87, 0.87]
    # means: rounds 4-6 0.800 vs 1-3 0.600; 5-7 0.837 vs 2-4 0.683; ...; 7-9 0.8667 vs 4-6 0.8 (+6.7 points)
    assert plateau_round(rising) is None
    flat = [*rising, 0.87, 0.868, 0.872]  # rounds 10-12 mean 0.870 vs 7-9 0.8667: +0.33 points
    assert plateau_round(flat) == 12
    assert plateau_round([0.8] * 6) == 6 and plateau_round([0.8] * 5) is None  # needs two full windows
    assert plateau_round([0.5, 0.6, 0.7, 0.6, 0.5, 0.4]) == 6  # falling counts as not rising
