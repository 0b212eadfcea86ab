"""Personalised evaluation: the held-out parts on a hand-made partition, the metrics on hand-made
predictions, the pairing across methods, and one tiny comparison where FedSA-LoRA's clients are
judged with the global A and their own B."""

from __future__ import annotations

import numpy as np
import pytest
import yaml
from conftest import tiny_tree

from fedlora.config import ConfigError, build_config
from fedlora.data.personal import personal_holdout
from fedlora.personalized import aligned, personal_comparison, personal_metrics, personal_records, concat_records


def test_each_client_holds_out_a_seeded_part_of_its_own_shard():
    parts = [list(range(10)), [10, 11, 12, 13, 14], [20, 21]]
    train, held = personal_holdout(parts, 0.2, seed=0)
    assert [len(h) for h in held] == [2, 1, 1]  # round(0.2·n), at least one, one left to train on
    for part, t, h in zip(parts, train, held):
        assert sorted(t + h) == part and not set(t) & set(h)  # from the client's own shard only
        assert t == [i for i in part if i in t] and h == [i for i in part if i in h]  # shard order kept
    assert personal_holdout(parts, 0.2, seed=0) == (train, held)  # seeded
    assert any(personal_holdout(parts, 0.2, seed=s)[1] != held for s in range(1, 5))
    assert [len(h) for h in personal_holdout(parts, 0.9, seed=0)[1]] == [9, 4, 1]  # never the whole shard
    with pytest.raises(ConfigError, match="client 1 has 1 example"):
        personal_holdout([[0, 1], [2]], 0.2, seed=0)


def hand_made() -> dict[str, np.ndarray]:
    """Client 0: 2 of 3 right; client 1: 0 of 2; client 2: 1 of 1."""
    return concat_records([
        personal_records(0, [5, 3, 9], np.array([1, 0, 1]), np.array([1, 0, 0])),
        personal_records(1, [7, 1], np.array([0, 1]), np.array([1, 0])),
        personal_records(2, [4], np.array([1]), np.array([1])),
    ])


def test_metrics_are_per_client_accuracy_their_mean_and_the_worst_client():
    m = personal_metrics(hand_made())
    assert m["personal_client_accuracy"] == {"0": pytest.approx(2 / 3), "1": 0.0, "2": 1.0}
    assert m["personal_accuracy"] == pytest.approx((2 / 3 + 0 + 1) / 3)  # unweighted over clients, not 3/6 items
    assert (m["personal_worst_accuracy"], m["personal_worst_client"]) == (0.0, 1)
    tie = concat_records([personal_records(3, [0], np.array([0]), np.array([1])),
                          personal_records(2, [1], np.array([0]), np.array([1]))])
    assert personal_metrics(tie)["personal_worst_client"] == 2  # the lowest id among equals


def test_methods_are_paired_on_the_same_items_whatever_their_order():
    ref = hand_made()
    order = np.array([5, 0, 3, 1, 4, 2])  # the same items, recorded in another order
    other = {k: v[order] for k, v in ref.items()}
    other["personal_correct"] = np.ones(6, dtype=bool)  # every item right
    a, b = aligned(other, ref)
    ids = np.sort(ref["personal_id"])
    assert a.tolist() == [True] * 6 and b.tolist() == [bool(ref["personal_correct"][ref["personal_id"] == i][0]) for i in ids]
    elsewhere = {**other, "personal_id": other["personal_id"] + 100}
    assert aligned(elsewhere, ref) is None  # other items (another seed): never paired
    rows = {r["method"]: r for r in personal_comparison({"all-right": {0: other}, "ref": {0: ref}}, "ref")}
    assert rows["all-right"]["diff"] == pytest.approx(1 - 3 / 6)  # pooled items: 6/6 − 3/6
    assert rows["all-right"]["personal_accuracy"] == 1.0 and "diff" not in rows["ref"]
    assert rows["ref"]["worst_client_accuracy"] == 0.0 and rows["ref"]["worst_clients"] == "1"
    assert rows["all-right"]["mcnemar"] == "0.25"  # 3 discordant pairs, all one way: 2·0.5³
    assert rows["all-right"]["p_value"] is None  # one seed: no t over seeds, only the item bootstrap


def test_personalized_is_refused_for_instruction_tasks():
    with pytest.raises(ConfigError, match="evaluation.personalized: classification tasks only"):
        build_config(tiny_tree(data={"dataset": "dolly"}, evaluation={"personalized": True},
                               algorithm={"name": "fedit"}))


def test_fedsa_clients_are_judged_with_global_a_and_their_own_b_and_compared_with_fedit(synthetic_task, tmp_path):
    """A tiny two-method comparison: the recorded held-out predictions are recomputed here from
    the checkpoint (global A, each client's private B for FedSA-LoRA; the global model for
    FedIT), the held-out items are the same for both and never in a client's training shard,
    and comparison.md pairs them."""
    from fedlora.compare import run_comparison
    from fedlora.evaluate import predict_classes
    from fedlora.runtime.checkpoint import Checkpoint
    from fedlora.runtime.inprocess import Federation
    from fedlora.runtime.outputs import read_eval_items, read_metrics

    tree = tiny_tree(data={**synthetic_task, "train_examples": 60, "test_examples": 8},
                     federation={"num_clients": 3, "client_max_ranks": [4, 4, 2], "rounds": 1,
                                 "local_steps": 2, "batch_size": 4, "lr": 0.05},
                     evaluation={"personalized": True, "personal_fraction": 0.25})
    tree.pop("algorithm")
    config = tmp_path / "cfg.yaml"
    config.write_text(yaml.safe_dump(tree))
    runs = run_comparison(config, ["fedsa", "fedit"], [0], tmp_path / "cmp", [], progress=False)
    assert all(r.done and not r.error for r in runs)
    recorded = {}
    for method in ("fedsa", "fedit"):
        run_dir = tmp_path / "cmp" / "seed_0" / method
        record = read_metrics(run_dir)[-1]
        items = read_eval_items(run_dir, 1)
        recorded[method] = items
        assert record["personal_accuracy"] == pytest.approx(personal_metrics(items)["personal_accuracy"])
        ckpt = Checkpoint.load(run_dir)
        fed = Federation.build(build_config({**tree, "algorithm": {"name": method}}))
        pool_rows = set(np.concatenate([items["personal_id"]]).tolist())
        assert sorted(pool_rows) == sorted(i for ids in fed.task.personal_ids for i in ids)
        assert sum(len(c) + len(p) for c, p in zip(fed.task.clients, fed.task.personal)) == 60
        assert [len(p) for p in fed.task.personal] == [max(1, int(0.25 * (len(c) + len(p)) + 0.5))
                                                       for c, p in zip(fed.task.clients, fed.task.personal)]
        for k in range(3):
            if method == "fedsa":  # the global A with client k's private B, by hand
                factors = {**{n: t for n, t in ckpt.state.items() if n.endswith(".A")},
                           **{n: t for n, t in ckpt.client_states[k].items() if n.endswith(".B")}}
                assert any(float(t.abs().max()) > 0 for n, t in factors.items() if n.endswith(".B"))
            else:
                factors = ckpt.state
            fed.adapters.load(factors)
            preds, _ = predict_classes(fed.model, fed.task.personal[k], fed.task.label_ids, fed.pad_id,
                                       fed.cfg.federation.eval_batch_size, fed.cfg.model.compute_dtype)
            fed.adapters.clear()
            mine = items["personal_client"] == k
            assert items["personal_prediction"][mine].tolist() == preds.tolist()
            assert items["personal_id"][mine].tolist() == fed.task.personal_ids[k]
        del fed
    assert np.array_equal(recorded["fedsa"]["personal_id"], recorded["fedit"]["personal_id"])  # same items
    md = (tmp_path / "cmp" / "comparison.md").read_text()
    assert "## Personalised accuracy" in md
    line = next(x for x in md.splitlines() if x.startswith("| fedsa |") and x.count("|") == 9)
    a, b = aligned(recorded["fedsa"], recorded["fedit"])
    assert f"{a.mean() - b.mean():+.4f}" in line  # Δ pooled vs fedit, on the same items


def test_the_flower_runtime_refuses_personalized_in_one_line(tmp_path):
    from fedlora.flower.server_app import FlowerRun

    cfg = build_config(tiny_tree(evaluation={"personalized": True}, algorithm={"name": "fedsa"}))
    with pytest.raises(ConfigError, match="evaluation.personalized: in-process runtime only"):
        FlowerRun(cfg, tmp_path / "run", grid=None)


def test_personal_rounds_last_evaluates_the_held_out_parts_after_the_last_round_only(tmp_path, synthetic_task):
    """`personal_rounds: last` (a study evaluating every round on a test subset): the held-out
    parts are scored after the last round, with their per-item records, and at no earlier round."""
    from fedlora.runtime.inprocess import Simulation
    from fedlora.runtime.outputs import read_eval_items, read_metrics

    cfg = build_config(tiny_tree(data={**synthetic_task, "train_examples": 40, "test_examples": 8},
                                 federation={"num_clients": 2, "client_max_ranks": [4, 2], "rounds": 2,
                                             "local_steps": 1, "batch_size": 4, "eval_every": 1},
                                 evaluation={"personalized": True, "personal_rounds": "last"}))
    Simulation(cfg, tmp_path / "run", progress=False).run()
    first, last = read_metrics(tmp_path / "run")
    assert "accuracy" in first and "personal_accuracy" not in first
    assert "personal_accuracy" in last and set(last["personal_client_accuracy"]) == {"0", "1"}
    assert "personal_id" not in read_eval_items(tmp_path / "run", 1)
    assert last["personal_accuracy"] == pytest.approx(
        personal_metrics(read_eval_items(tmp_path / "run", 2))["personal_accuracy"])
