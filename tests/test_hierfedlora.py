"""HierFedLoRA: near-IID grouping, depth (and where backward stops), τ_g stages, planning, aggregation."""

from collections import Counter

import numpy as np
import pytest
import torch
from safetensors.torch import load_file
from conftest import tiny_tree

from fedlora.algorithms.base import FederationSetup, Update
from fedlora.algorithms.hierfedlora import (
    HierFedLoRA,
    HierFedLoRAOptions,
    distribution,
    label_distance,
    near_iid_groups,
    speed_spread,
)
from fedlora.config import ConfigError, build_config
from fedlora.devices import DeviceProfile
from fedlora.runtime.inprocess import Federation, Simulation
from fedlora.runtime.outputs import read_metrics


def _skewed_table(k=20, classes=4, seed=0):
    """Label skew like the runs: each client holds 2 classes, sizes vary."""
    rng = np.random.default_rng(seed)
    table = np.zeros((k, classes), dtype=int)
    for i in range(k):
        for c in rng.choice(classes, 2, replace=False):
            table[i, c] = rng.integers(20, 200)
    return table


def _mean_distance(table, groups, kind):
    target = distribution(table.sum(0).astype(float))
    return float(np.mean([label_distance(distribution(table[g].sum(0).astype(float)), target, kind)
                          for g in groups]))


@pytest.mark.parametrize("kind", ["kl", "l1"])
def test_grouping_beats_random_groupings(kind):
    for seed in range(3):
        table = _skewed_table(seed=seed)
        groups = near_iid_groups(table.tolist(), 4, None, kind, seed)
        assert sorted(k for g in groups for k in g) == list(range(20)) and all(len(g) <= 5 for g in groups)
        ours = _mean_distance(table, groups, kind)
        rng = np.random.default_rng(100 + seed)
        rand = [_mean_distance(table, np.array_split(rng.permutation(20), 4), kind) for _ in range(200)]
        # measured: far below the typical random grouping, and better than the best of 200
        assert ours < 0.3 * np.mean(rand), (ours, np.mean(rand))
        assert ours < min(rand)
        greedy_only = _mean_distance(table, near_iid_groups(table.tolist(), 4, None, kind, seed, refine=False), kind)
        assert ours <= greedy_only


def test_group_size_cap_and_error():
    table = _skewed_table(k=9).tolist()
    groups = near_iid_groups(table, 3, 4, "kl", 0)
    assert len(groups) == 3 and max(map(len, groups)) <= 4
    with pytest.raises(ValueError, match="cannot hold"):
        near_iid_groups(table, 3, 2, "kl", 0)


def _setup(num_layers=4, devices=None, counts=None, flops=None):
    shapes = {f"model.layers.{i}.self_attn.{m}": (8, 8) for i in range(num_layers) for m in ("q_proj", "v_proj")}
    k = len(counts) if counts else 4
    return FederationSetup(
        module_shapes=shapes, client_max_ranks=[2] * k, num_examples=[10] * k, scaling=1.0, seed=0,
        module_layers={n: int(n.split(".")[2]) for n in shapes}, num_layers=num_layers,
        label_counts=counts or [[10, 0], [0, 10], [10, 0], [0, 10]],
        devices=devices or [], train_flops=flops,
    )


def test_layerwise_aggregation_over_groups_that_trained_each_layer():
    algo = HierFedLoRA(HierFedLoRAOptions(groups=2, plan="fixed", depth=[4, 1]), _setup())
    state = algo.init_state()
    members = algo.members(state)
    assert sorted(map(len, members)) == [2, 2]
    top, bottom = "model.layers.3.self_attn.q_proj", "model.layers.0.self_attn.q_proj"
    updates, expect_top, expect_bottom = [], 0.0, 0.0
    for g, ms in enumerate(members):
        for k in ms:
            n = 10 * (k + 1)
            keys = algo.expected_shapes(state, Update(k, {}, n))
            assert (f"{bottom}.A" in keys) == (g == 0)  # depth 1 group never uploads layer 0
            updates.append(Update(k, {key: torch.full(s, float(k)) for key, s in keys.items()}, n))
    sizes = {g: sum(10 * (k + 1) for k in ms) for g, ms in enumerate(members)}
    for g, ms in enumerate(members):
        mean_g = sum(k * 10 * (k + 1) for k in ms) / sizes[g]  # intra-group FedAvg
        expect_top += mean_g * sizes[g] / sum(sizes.values())
        if g == 0:
            expect_bottom = mean_g
    new = algo.aggregate(state, updates, None).state
    assert torch.allclose(new[f"{top}.A"], torch.full_like(new[f"{top}.A"], expect_top))
    assert torch.allclose(new[f"{bottom}.B"], torch.full_like(new[f"{bottom}.B"], expect_bottom))
    assert not any("/" in key for key in new)  # group copies are gone after the round
    assert int(new["round"]) == 1


def _forward_plus_depth(depth, rank):
    return 1e11 * (1 + depth)  # a forward pass plus one backward unit per trained layer


def test_auto_plan_fits_the_budget_and_gives_fast_groups_more_work():
    slow = DeviceProfile("low", 1e11, 1e6, 1e6, 4)
    fast = DeviceProfile("high", 1e12, 1e8, 1e8, 64)
    algo = HierFedLoRA(HierFedLoRAOptions(groups=2, plan="auto", time_budget=0.6, tau_max=3),
                       _setup(devices=[slow, slow, fast, fast], flops=_forward_plus_depth))
    state = algo.init_state()
    state["groups"] = torch.tensor([0, 0, 1, 1])  # group 0 all slow, group 1 all fast
    (tau_s, d_s), (tau_f, d_f) = algo.plan(state)
    budget = 0.6 * algo.cycle_seconds([0, 1], 4)  # the slowest group's full-depth cycle
    for g, (tau, depth) in enumerate([(tau_s, d_s), (tau_f, d_f)]):
        assert tau * algo.cycle_seconds(algo.members(state)[g], depth) <= budget
    assert (tau_s, d_s) == (1, 1)  # 0.6 of its full-depth time: only the last layer fits
    assert (tau_f, d_f) == (3, 4)  # ten times faster: full depth, τ_max cycles
    # each device is near-IID grouped; with one slow and one fast device per group the plans agree
    mixed = HierFedLoRA(HierFedLoRAOptions(groups=2, plan="auto", time_budget=0.6),
                        _setup(devices=[slow, fast, slow, fast], flops=_forward_plus_depth))
    s2 = mixed.init_state()
    s2["groups"] = torch.tensor([0, 0, 1, 1])
    assert mixed.plan(s2)[0] == mixed.plan(s2)[1]


@pytest.mark.filterwarnings("ignore:Full backward hook")
def test_depth_trains_only_the_last_layers_and_backward_stops(data_dir):
    cfg = build_config(tiny_tree(algorithm={"name": "hierfedlora", "groups": 1, "plan": "fixed", "depth": 1}))
    fed = Federation.build(cfg)
    algo, state = fed.algorithm, fed.algorithm.init_state()
    layers = fed.model.model.layers
    seen = {}
    hooks = [layer.register_forward_hook(lambda m, i, o, j=j: seen.__setitem__(j, o[0].requires_grad
                                                                                if isinstance(o, tuple)
                                                                                else o.requires_grad))
             for j, layer in enumerate(layers)]
    reached = []
    hooks += [layer.register_full_backward_hook(lambda m, gi, go, j=j: reached.append(j))
              for j, layer in enumerate(layers)]
    try:
        update, _ = algo.client_train(fed.client(0, 1), algo.payload(state, 0), {})
    finally:
        for h in hooks:
            h.remove()
        fed.adapters.clear()
    assert seen == {0: False, 1: True}  # layer 0's output needs no gradient: autograd stops above it
    assert set(reached) == {1}
    assert {k.rsplit(".", 1)[0] for k in update.tensors} == {n for n in fed.adapters.layers if ".1." in n}
    assert all(not torch.equal(update.tensors[k], state[k]) for k in update.tensors if k.endswith(".B"))


def test_tau_stages_happen_as_configured(data_dir, tmp_path, monkeypatch):
    tree = tiny_tree(algorithm={"name": "hierfedlora", "groups": 2, "plan": "fixed", "tau": [1, 3],
                                "depth": [2, 1]},
                     federation={"rounds": 2, "local_steps": 1})
    calls = []
    original = HierFedLoRA.aggregate_stage

    def spy(self, state, updates, stage):
        calls.append((stage, sorted(u.client_id for u in updates)))
        return original(self, state, updates, stage)

    monkeypatch.setattr(HierFedLoRA, "aggregate_stage", spy)
    sim = Simulation(build_config(tree), tmp_path, progress=False)
    sim.run()
    state = sim.fed.algorithm.init_state()
    members = sim.fed.algorithm.members(state)
    hist = read_metrics(tmp_path)
    for r in hist:
        per_client = Counter(c["id"] for c in r["clients"])
        for g, tau in enumerate([1, 3]):
            assert all(per_client[k] == tau for k in members[g])
            assert sorted({c["stage"] for c in r["clients"] if c["lane"] == g}) == list(range(tau))
        lane_time = {g: sum(max(c["sim_seconds"] for c in r["clients"] if c["lane"] == g and c["stage"] == s)
                            for s in range(tau)) for g, tau in enumerate([1, 3])}
        assert r["server_sim_seconds"] == 0  # HierFedLoRA's server trains nothing: no share on the FLOP clock
        assert r["sim_seconds"] == pytest.approx(max(lane_time.values()))
    # per round: intra-group aggregation after stages 0 and 1 (stage 0 has both groups), then the final one
    per_round = [(0, sorted(members[0] + members[1])), (1, sorted(members[1])), (-1, sorted(members[1]))]
    assert calls == per_round * 2


def test_bad_options_fail_at_construction():
    with pytest.raises(ValueError, match=r"algorithm.tau: need one value per group \(2 groups\), got 3"):
        HierFedLoRA(HierFedLoRAOptions(groups=2, plan="fixed", tau=[1, 2, 3]), _setup())
    with pytest.raises(ValueError, match="algorithm.plan: auto needs device profiles"):
        HierFedLoRA(HierFedLoRAOptions(groups=2), _setup()).init_state()
    bare = FederationSetup(module_shapes=_setup().module_shapes, client_max_ranks=[2] * 4, num_examples=[1] * 4,
                           scaling=1.0, seed=0)  # what `fedlora export` knows
    factors = {f"{n}.{f}": torch.ones(2) for n in bare.module_shapes for f in "AB"}
    assert set(HierFedLoRA(HierFedLoRAOptions(), bare).eval_factors({**factors, "groups": torch.zeros(4)})) == set(factors)
    with pytest.raises(ConfigError, match="algorithm.distance"):
        build_config(tiny_tree(algorithm={"name": "hierfedlora", "distance": "cosine"}))


def test_a_round_whose_last_stage_is_all_rejected_keeps_the_earlier_stages(data_dir, tmp_path, monkeypatch):
    """Group 1 runs two stages; every stage-1 update carries a NaN and is rejected. The round
    must still aggregate what stage 0 produced: exactly the run in which group 1 has τ = 1."""
    def run(taus, out):
        tree = tiny_tree(algorithm={"name": "hierfedlora", "groups": 2, "plan": "fixed", "tau": taus,
                                    "depth": [2, 2]}, federation={"rounds": 1, "local_steps": 1})
        sim = Simulation(build_config(tree), out, progress=False)
        sim.run()
        return sim, read_metrics(out)[0]

    original, seen = HierFedLoRA.client_train, set()

    def poison_second_visits(self, ctx, payload, client_state):
        update, new_state = original(self, ctx, payload, client_state)
        if ctx.client_id in seen:  # a client's second cycle in the round: stage 1
            update.tensors = {k: torch.full_like(t, float("nan")) for k, t in update.tensors.items()}
        seen.add(ctx.client_id)
        return update, new_state

    reference, _ = run([1, 1], tmp_path / "tau1")
    monkeypatch.setattr(HierFedLoRA, "client_train", poison_second_visits)
    sim, record = run([1, 2], tmp_path / "poisoned")
    group1 = sim.fed.algorithm.members(sim.fed.algorithm.init_state())[1]
    assert sorted(r["client"] for r in record["rejected"]) == group1
    assert all(c["stage"] == 0 for c in record["clients"])
    final = load_file(str(tmp_path / "poisoned" / "final_state.safetensors"))
    expected = load_file(str(tmp_path / "tau1" / "final_state.safetensors"))
    init = sim.fed.algorithm.init_state()
    assert any(not torch.equal(final[k], init[k]) for k in sim.fed.algorithm.factor_keys())
    for key in sim.fed.algorithm.factor_keys():
        assert torch.equal(final[key], expected[key]), key


def test_speed_weight_groups_devices_of_like_speed_so_fast_groups_do_more():
    """20 devices, 5 fast / 7 mid / 8 slow, label skew: grouping by labels alone puts slow
    devices in every group; speed_weight > 0 gathers like speeds, the plan then gives the fast
    groups more work (τ·d), while groups stay nearer IID than random groupings."""
    table = _skewed_table(seed=1)
    rng = np.random.default_rng(0)
    classes = [DeviceProfile("high", 2e12, 1e7, 1e7, 64)] * 5 + [DeviceProfile("mid", 5e11, 3e6, 6e6, 16)] * 7 \
        + [DeviceProfile("low", 1e11, 6e5, 2.5e6, 4)] * 8
    devices = [classes[i] for i in rng.permutation(20)]

    def build(weight):
        algo = HierFedLoRA(HierFedLoRAOptions(groups=4, speed_weight=weight),
                           _setup(devices=devices, counts=table.tolist(), flops=_forward_plus_depth))
        state = algo.init_state()
        return algo, state, algo.members(state)

    times = np.array([build(0)[0].cycle_seconds([k], 4) for k in range(20)])
    spread = {}
    for weight in (0.0, 0.5):
        algo, state, groups = build(weight)
        assert sorted(k for g in groups for k in g) == list(range(20))
        spread[weight] = np.mean([np.log(times[g].max() / times[g].min()) for g in groups])
        work = sum(tau * depth for tau, depth in algo.plan(state))
        if weight == 0:
            assert all({"low"} <= {devices[k].device_class for k in g} for g in groups)
            label_only, work_label_only = _mean_distance(table, groups, "kl"), work
        else:
            rand = [_mean_distance(table, np.array_split(rng.permutation(20), 4), "kl") for _ in range(200)]
            assert _mean_distance(table, groups, "kl") < np.mean(rand)
            assert _mean_distance(table, groups, "kl") >= label_only
            assert work > work_label_only
    assert spread[0.5] < 0.5 * spread[0.0], spread


def test_aggregate_keeps_untrained_modules_groups_and_reports_depths():
    """Modules no group trained keep their value; groups stay unless regrouping is due; the
    metrics count the aggregated groups and their mean depth."""
    algo = HierFedLoRA(HierFedLoRAOptions(groups=2, plan="fixed", depth=[1, 2]), _setup())
    state = algo.init_state()
    members = algo.members(state)
    updates = []
    for g, ms in enumerate(members[:1]):  # only group 0 (depth 1) reports
        for k in ms:
            keys = algo.expected_shapes(state, Update(k, {}, 10))
            updates.append(Update(k, {key: torch.full(s, 1.0 + k) for key, s in keys.items()}, 10))
    agg = algo.aggregate(state, updates, None)
    low = "model.layers.0.self_attn.q_proj.A"
    assert torch.equal(agg.state[low], state[low])  # no group trained layer 0
    assert torch.equal(agg.state["groups"], state["groups"])
    assert agg.metrics == {"groups_aggregated": 1.0, "mean_depth": 1.0}
    empty = algo.aggregate(state, [], None)
    assert empty.metrics == {"groups_aggregated": 0.0, "mean_depth": 0.0}
    assert all(torch.equal(empty.state[k], state[k]) for k in algo.factor_keys())


def test_regroup_every_n_rounds_draws_the_grouping_of_that_epoch():
    counts = _skewed_table(k=9).tolist()  # a table whose epoch-0 and epoch-1 groupings differ
    algo = HierFedLoRA(HierFedLoRAOptions(groups=2, plan="fixed", regroup_every=2), _setup(counts=counts))
    state = algo.init_state()
    expected = {}
    for epoch in (0, 1):
        g = torch.zeros(9, dtype=torch.long)
        for j, ms in enumerate(near_iid_groups(counts, 2, None, "kl", [0, epoch])):
            g[ms] = j
        expected[epoch] = g
    assert not torch.equal(expected[0], expected[1])
    assert torch.equal(state["groups"], expected[0])
    after1 = algo.aggregate(state, [], None).state  # round 1: not due
    assert torch.equal(after1["groups"], expected[0]) and int(after1["round"]) == 1
    after2 = algo.aggregate(after1, [], None).state  # round 2: regroup with epoch 2 // 2 = 1
    assert torch.equal(after2["groups"], expected[1]) and int(after2["round"]) == 2


def test_speed_spread_is_the_log_ratio_of_slowest_to_fastest():
    seconds = np.array([2.0, 1.0, 8.0, 2.0 * np.e ** 2])
    assert speed_spread(seconds, []) == 0.0 and speed_spread(seconds, [2]) == 0.0  # no spread alone
    assert speed_spread(seconds, [0, 3]) == pytest.approx(2.0)  # two devices: ln(2e² / 2)
    assert speed_spread(seconds, [0, 1, 2]) == pytest.approx(np.log(8.0))


def test_stages_and_payload_follow_each_groups_tau_and_its_intermediate_model():
    """τ = (2, 1): stage 0 trains both groups, stage 1 only group 0 (whatever the depths); between
    stages a member receives its group's model (g{g}/...), the other group the global one, with
    (group, τ, d)."""
    algo = HierFedLoRA(HierFedLoRAOptions(groups=2, plan="fixed", tau=[2, 1], depth=[1, 4]), _setup())
    state = algo.init_state()
    g0, g1 = algo.members(state)
    assert algo.stages(state, [0, 1, 2, 3]) == [{0: g0, 1: g1}, {0: g0}]
    assert algo.stages(state, g1) == [{1: g1}]  # only group 1 selected: one stage
    assert algo.stages(state, []) == [{}]
    key = algo.factor_keys()[0]
    mid = algo.aggregate_stage(state, [Update(k, {key: torch.full_like(state[key], 7.0)}, 10) for k in g0], 0)
    p0, p1 = algo.payload(mid, g0[0]), algo.payload(mid, g1[0])
    assert torch.equal(p0.tensors[key], torch.full_like(state[key], 7.0))
    assert torch.equal(p1.tensors[key], state[key])
    assert p0.config == {"group": 0, "tau": 2, "depth": 1} and p1.config == {"group": 1, "tau": 1, "depth": 4}


SLOW = DeviceProfile("low", 1e11, 1e6, 1e6, 4)


def _auto(time_budget, **options):
    """Four like devices: one cycle at depth d takes 1 + d s of compute plus 256·d B up and
    1 KiB down (_forward_plus_depth, rank 2, two 8 × 8 modules per layer)."""
    return HierFedLoRA(HierFedLoRAOptions(groups=2, plan="auto", time_budget=time_budget, **options),
                       _setup(devices=[SLOW] * 4, flops=_forward_plus_depth))


def test_auto_plan_boundaries():
    # T* = one full-depth cycle: (τ, d) = (1, 4) fits exactly (τ·cycle ≤ T*) and beats (2, 1)
    algo = _auto(1.0)
    state = algo.init_state()
    assert algo.plan(state) == [(1, 4), (1, 4)]
    assert algo.bytes_up(1) == 4 * 2 * 32 and algo.bytes_up(4) == 4 * 2 * 128  # float32 · rank · Σ (m + n)
    # T* below one cycle at the minimum depth: nothing fits, so (1, min_depth): never τ = 0 or depth 0
    assert _auto(0.3).plan(state) == [(1, 1), (1, 1)]
    rows = algo.plan_table(state)
    assert [r["group"] for r in rows] == [0, 1] and [r["members"] for r in rows] == algo.members(state)
    seconds = 1 + 4 + 256 * 4 / 1e6 + 1024 / 1e6  # τ = 1 cycle at depth 4: 5.002048 s
    assert round(seconds, 4) != round(seconds, 5)  # the report rounds to 4 decimals
    assert rows[0] | {"members": None} == {"group": 0, "members": None, "tau": 1, "depth": 4,
                                           "planned_seconds": round(seconds, 4), "device_classes": ["low"]}
    # plan fixed, device profiles but no FLOP model: the plan without timings
    fixed = HierFedLoRA(HierFedLoRAOptions(groups=2, plan="fixed", tau=[2, 1], depth=[3, 1]), _setup(devices=[SLOW] * 4))
    assert [{k: r[k] for k in ("group", "tau", "depth")} for r in fixed.plan_table(fixed.init_state())] == [
        {"group": 0, "tau": 2, "depth": 3}, {"group": 1, "tau": 1, "depth": 1}]
    assert "planned_seconds" not in fixed.plan_table(fixed.init_state())[0]


def test_fixed_plan_refuses_values_that_do_not_fit_the_groups_or_layers():
    with pytest.raises(ValueError, match=r"^algorithm.tau/depth: τ >= 1 and 1 <= d <= 4 required$"):
        HierFedLoRA(HierFedLoRAOptions(groups=2, plan="fixed", depth=[5, 1]), _setup()).init_state()
    with pytest.raises(ValueError, match=r"^algorithm.tau/depth: τ >= 1 and 1 <= d <= 4 required$"):
        HierFedLoRA(HierFedLoRAOptions(groups=2, plan="fixed", tau=[0, 1]), _setup()).init_state()
    algo = HierFedLoRA(HierFedLoRAOptions(groups=2, plan="fixed", tau=[1, 1]), _setup())
    state = algo.init_state() | {"groups": torch.tensor([0, 1, 2, 2])}  # a grouping of 3 groups
    with pytest.raises(ValueError, match=r"^algorithm.tau/depth: need one value per group \(3 groups\)$"):
        algo.plan(state)
    with pytest.raises(ValueError, match=r"^algorithm.depth: need one value per group \(2 groups\), got 3$"):
        HierFedLoRA(HierFedLoRAOptions(groups=2, plan="fixed", depth=[1, 2, 3]), _setup())
    assert HierFedLoRA(HierFedLoRAOptions(groups=2, plan="fixed", rank=1), _setup()).rank == 1


def test_check_setup_names_what_the_runtime_did_not_provide():
    def check(setup=None, **options):
        HierFedLoRA(HierFedLoRAOptions(groups=2, **options), setup or _setup()).check_setup()

    check(plan="fixed", min_depth=4)  # every layer: accepted
    with pytest.raises(ValueError, match=r"^algorithm.min_depth: 5 exceeds the 4 layers$"):
        check(plan="fixed", min_depth=5)
    no_flops = _setup(devices=[SLOW] * 4)
    with pytest.raises(ValueError, match=r"^algorithm.plan: auto needs device profiles and a FLOP model from the runtime$"):
        check(no_flops)
    with pytest.raises(ValueError, match=r"^algorithm.speed_weight: needs device profiles and a FLOP model from the runtime$"):
        check(no_flops, plan="fixed", speed_weight=0.5)
    s = _setup()
    outside = FederationSetup(module_shapes={**s.module_shapes, "lm_head": (8, 8)}, client_max_ranks=s.client_max_ranks,
                              num_examples=s.num_examples, scaling=1.0, seed=0,
                              module_layers={**s.module_layers, "lm_head": None}, num_layers=4,
                              label_counts=s.label_counts)
    with pytest.raises(ValueError, match=r"^model.target_modules: lm_head is not inside a decoder layer \(depth needs one\)$"):
        check(outside, plan="fixed")


def test_the_configured_cap_and_distance_reach_the_grouping():
    counts = [[9, 6, 6], [8, 5, 7], [8, 2, 0], [3, 2, 8], [9, 0, 4], [8, 1, 7]]  # a table where both matter
    default = near_iid_groups(counts, 2, None, "kl", [0, 0])
    for cap, distance in ((4, "kl"), (None, "l1")):
        algo = HierFedLoRA(HierFedLoRAOptions(groups=2, plan="fixed", group_size_cap=cap, distance=distance),
                           _setup(counts=counts))
        expected = near_iid_groups(counts, 2, cap, distance, [0, 0])
        assert expected != default and algo.members(algo.init_state()) == expected


def test_distribution_label_distance_and_the_default_cap():
    assert distribution(np.array([1, 3])).tolist() == [0.25, 0.75]
    assert distribution(np.array([1, 0])).tolist() == [1.0, 0.0]
    none = distribution(np.array([0, 0]))
    assert none.tolist() == [0.0, 0.0] and none.dtype == float  # no labels: zeros (a distribution), not 0/0
    p, q = np.array([0.5, 0.5, 0.0]), np.array([0.25, 0.25, 0.5])
    assert label_distance(p, q, "l1") == pytest.approx(1.0)  # Σ |p − q|
    assert label_distance(p, q, "kl") == pytest.approx(np.log(2))  # Σ p ln(p / q), 0 ln 0 = 0
    table = [[5, 1], [1, 5], [3, 3], [4, 2], [2, 4]]
    assert sorted(map(len, near_iid_groups(table, 2, None, "kl", 0))) == [2, 3]  # cap ⌈5 / 2⌉ = 3


def test_speed_enters_the_grouping_only_with_a_weight_and_the_times():
    counts = _skewed_table(k=8).tolist()
    labels_only = near_iid_groups(counts, 2, None, "kl", 0)
    seconds = [1.0, 50.0, 1.0, 50.0, 1.0, 50.0, 1.0, 50.0]
    assert near_iid_groups(counts, 2, None, "kl", 0, seconds=seconds) == labels_only  # no weight
    assert near_iid_groups(counts, 2, None, "kl", 0, speed_weight=0.5) == labels_only  # no times


def test_init_state_logs_the_plan_and_counts_rounds_in_integers(caplog):
    algo = HierFedLoRA(HierFedLoRAOptions(groups=2, plan="fixed", tau=[2, 1]), _setup())
    with caplog.at_level("INFO", logger="fedlora"):
        state = algo.init_state()
    assert caplog.messages == [f"hierfedlora group {row}" for row in algo.plan_table(state)]
    assert state["round"].dtype == torch.long and int(state["round"]) == 0
    s = _setup()
    no_labels = FederationSetup(module_shapes=s.module_shapes, client_max_ranks=s.client_max_ranks,
                                num_examples=s.num_examples, scaling=1.0, seed=0, module_layers=s.module_layers,
                                num_layers=4)
    with pytest.raises(ValueError, match="^algorithm: hierfedlora needs each client's label counts for grouping$"):
        HierFedLoRA(HierFedLoRAOptions(groups=2, plan="fixed"), no_labels).init_state()


def test_greedy_pass_by_hand():
    """refine=False, L1 to the global (½, ½), cap 3. Largest first: c0 (3, 2) and c4 (0, 3) (before
    c1 in the seeded tie order) seed the groups; c1 (2, 1) joins c0 (L1 ¼ vs ⅓), c2 (1, 0) too
    (⅓ vs ½) and fills it; c3 takes the room left."""
    table = [[3, 2], [2, 1], [1, 0], [0, 0], [0, 3]]
    assert near_iid_groups(table, 2, None, "l1", 0, refine=False) == [[0, 1, 2], [3, 4]]
