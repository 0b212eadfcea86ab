"""The aggregation pipeline's stages (issue 30): robust combines on hand-made updates whose answer
is known (ties, even counts, heterogeneous ranks), the stage protocol, and the refusals."""

from __future__ import annotations

import inspect
import math
from types import SimpleNamespace

import pytest
import torch

from fedlora.aggregation import AggregationConfig, AttackConfig, Undefined, Wrapper, build_pipeline, stage_names
from fedlora.aggregation.base import Verdict, screen
from fedlora.aggregation.robust import (
    VIEWS,
    RobustCombine,
    coordinate_median,
    krum_scores,
    krum_select,
    trimmed_mean,
)
from fedlora.aggregation.screening import NormBound
from fedlora.algorithms import ALGORITHMS
from fedlora.algorithms.aflora import AFLoRA, AFLoRAOptions
from fedlora.algorithms.base import Algorithm, FederationSetup, Update, weighted_sum
from fedlora.algorithms.fedit import FedIT, FedITOptions
from fedlora.algorithms.flexlora import FlexLoRA, FlexLoRAOptions
from fedlora.algorithms.flora import FLoRA, FLoRAOptions
from fedlora.algorithms.hetlora import RANKS, HETLoRA, HETLoRAOptions
from fedlora.algorithms.hierfedlora import HierFedLoRA, HierFedLoRAOptions

T = torch.tensor


# -- the statistics ---------------------------------------------------------------------------

def test_median_of_an_odd_count_is_the_middle_value_per_coordinate():
    values = [T([1.0, 50.0]), T([7.0, -3.0]), T([3.0, 2.0])]
    assert torch.equal(coordinate_median(values), T([3.0, 2.0]))


def test_median_of_an_even_count_is_the_mean_of_the_two_middle_values():
    values = [T([1.0, 10.0]), T([4.0, -2.0]), T([2.0, 1e6]), T([100.0, 0.0])]
    # sorted: (1, 2, 4, 100) → 3; (-2, 0, 10, 1e6) → 5
    assert torch.equal(coordinate_median(values), T([3.0, 5.0]))


def test_median_with_ties_and_shapes():
    values = [T([[2.0, 2.0]]), T([[2.0, 5.0]]), T([[9.0, 5.0]])]
    out = coordinate_median(values)
    assert out.shape == (1, 2) and torch.equal(out, T([[2.0, 5.0]]))
    assert torch.equal(coordinate_median([T([4.0, -1.0])]), T([4.0, -1.0]))  # one update: itself


def test_trimmed_mean_of_an_even_count_drops_one_at_each_end():
    values = [T([1.0]), T([2.0]), T([3.0]), T([1000.0])]
    # trim 0.25 of 4 drops one each end: keeps 2 and 3 with weights .2 and .3 → (0.4 + 0.9) / 0.5
    assert torch.allclose(trimmed_mean(values, [0.1, 0.2, 0.3, 0.4], 0.25), T([2.6]))


def test_krum_scores_sum_the_nearest_squared_distances():
    points = [T([0.0]), T([1.0]), T([2.0]), T([10.0]), T([100.0])]
    # f = 1, K = 5: the 2 nearest others. 0: 1 + 4; 1: 1 + 1; 2: 1 + 4; 10: 64 + 81; 100: 8100 + 9604
    assert krum_scores(points, 1) == [5.0, 2.0, 5.0, 145.0, 17704.0]
    assert krum_select([5.0, 2.0, 5.0, 145.0, 17704.0], 1) == [1]
    assert krum_select([5.0, 2.0, 5.0, 145.0, 17704.0], 2) == [0, 1]  # a tie: the lower position
    assert krum_select([5.0, 2.0, 5.0, 145.0, 17704.0], 3) == [0, 1, 2]


def test_krum_neighbour_count_is_at_least_one_and_at_most_the_others():
    # K = 4, f = 1: K − f − 2 = 1 neighbour; vectors are compared whole (all coordinates)
    points = [T([0.0, 0.0]), T([3.0, 4.0]), T([3.0, 0.0]), T([0.0, 4.0])]
    assert krum_scores(points, 1) == [9.0, 9.0, 9.0, 9.0]
    assert krum_scores(points, 5) == [9.0, 9.0, 9.0, 9.0]  # f too large: still one neighbour
    assert krum_scores([T([1.0, 2.0])], 0) == [0.0]  # alone: no neighbour, score 0
    assert krum_scores([T([0.0]), T([2.0]), T([5.0])], 0) == [4.0, 4.0, 9.0]  # K − 2 = 1


# -- combines around the methods ---------------------------------------------------------------

def fedit_updates(values: list[float], sizes: list[int] | None = None) -> tuple[FedIT, list[Update]]:
    sizes = sizes or [10] * len(values)
    setup = FederationSetup({"w": (2, 3)}, [1] * len(values), sizes, scaling=1.0, seed=0)
    updates = [Update(k, {"w.A": torch.full((1, 3), v), "w.B": torch.full((2, 1), -v)}, n)
               for k, (v, n) in enumerate(zip(values, sizes))]
    return FedIT(FedITOptions(), setup), updates


@pytest.mark.parametrize("values, expected", [([1.0, 2.0, 90.0], 2.0), ([1.0, 2.0, 4.0, 90.0], 3.0)])
def test_median_around_fedit_is_the_median_state_exactly(values, expected):
    method, updates = fedit_updates(values)
    agg = RobustCombine(method, "median").aggregate(method.init_state(), updates, None)
    assert torch.equal(agg.state["w.A"], torch.full((1, 3), expected))
    assert torch.equal(agg.state["w.B"], torch.full((2, 1), -expected))
    assert "client_weight" not in agg.metrics and "delta_share" not in agg.metrics


def test_trimmed_mean_around_fedit_equals_the_statistic_bit_for_bit():
    method, updates = fedit_updates([1.0, 2.0, 3.0, 4.0, 1e6], sizes=[10, 20, 30, 20, 20])
    agg = RobustCombine(method, "trimmed_mean", trim=0.2).aggregate(method.init_state(), updates, None)
    p = [n / 100 for n in (10, 20, 30, 20, 20)]
    assert torch.equal(agg.state["w.A"], trimmed_mean([u.tensors["w.A"] for u in updates], p, 0.2))


def test_krum_hands_the_method_the_most_central_update_and_multi_krum_the_honest_ones():
    method, updates = fedit_updates([1.0, 1.2, 0.9, 1.05, 50.0])
    state = method.init_state()
    krum = RobustCombine(method, "krum", byzantine=1).aggregate(state, updates, None)
    # f = 1: 2 neighbours, squared distances /5 (5 coordinates): 0: .0025 + .01; 1: .0225 + .04;
    # 2: .01 + .0225; 3: .0025 + .0225; 4: far → client 0, then client 3
    assert krum.metrics["krum_selected"] == {"0": 1.0, "1": 0.0, "2": 0.0, "3": 0.0, "4": 0.0}
    assert torch.equal(krum.state["w.A"], method.aggregate(state, [updates[0]], None).state["w.A"])
    multi = RobustCombine(method, "multi_krum", byzantine=1).aggregate(state, updates, None)
    honest = method.aggregate(state, updates[:4], None)  # K − f = 4 kept: the honest four
    assert all(torch.equal(multi.state[k], honest.state[k]) for k in honest.state)
    assert multi.metrics["client_weight"] == honest.metrics["client_weight"]  # the method's own weights
    two = RobustCombine(method, "multi_krum", byzantine=1, select=2).aggregate(state, updates, None)
    assert sorted(k for k, v in two.metrics["krum_selected"].items() if v) == ["0", "3"]


def aflora_hetero() -> tuple[AFLoRA, list[Update]]:
    """r_max 4; client 1 has max rank 2; client 2 pruned columns 1 and 3 (m = 1 row)."""
    setup = FederationSetup({"w": (1, 3)}, [4, 2, 4], [10, 10, 10], scaling=1.0, seed=0)
    method = AFLoRA(AFLoRAOptions(dlf=False), setup)
    updates = [
        Update(0, {"w.B": T([[1.0, 2.0, 3.0, 4.0]]), "w.mask": torch.ones(4)}, 10),
        Update(1, {"w.B": T([[3.0, 5.0]]), "w.mask": torch.ones(2)}, 10),
        Update(2, {"w.B": T([[7.0, 9.0]]), "w.mask": T([1.0, 0.0, 1.0, 0.0])}, 10),
    ]
    return method, updates


def test_median_around_aflora_takes_the_zero_padded_columns():
    """Padded: [1 2 3 4], [3 5 0 0], [7 0 9 0] → per column median [3 2 3 0] (a padded zero
    counts, as in AFLoRA's own sum)."""
    method, updates = aflora_hetero()
    agg = RobustCombine(method, "median").aggregate(method.init_state(), updates, None)
    assert torch.equal(agg.state["w.B"], T([[3.0, 2.0, 3.0, 0.0]]))
    assert torch.equal(agg.merge["w"][0], agg.state["w.B"])


def test_krum_around_aflora_compares_the_padded_uploads():
    method, updates = aflora_hetero()
    agg = RobustCombine(method, "krum", byzantine=0).aggregate(method.init_state(), updates, None)
    # distances²: 0–1: 4+9+9+16 = 38; 0–2: 36+4+36+16 = 92; 1–2: 16+25+81 = 122; one neighbour each
    assert agg.metrics["krum_score"] == {"0": 38.0, "1": 38.0, "2": 92.0}
    assert agg.metrics["krum_selected"] == {"0": 1.0, "1": 0.0, "2": 0.0}  # tie: the lower position
    assert torch.equal(agg.state["w.B"], T([[1.0, 2.0, 3.0, 4.0]]))


def test_median_around_hetlora_pads_both_factors_and_tracks_the_real_ranks():
    setup = FederationSetup({"w": (2, 2)}, [2, 1, 2], [10, 10, 10], scaling=1.0, seed=0)
    method = HETLoRA(HETLoRAOptions(), setup)
    state = method.init_state()
    updates = [Update(0, {"w.A": T([[1.0, 1.0], [2.0, 2.0]]), "w.B": T([[1.0, 2.0], [1.0, 2.0]])}, 10),
               Update(1, {"w.A": T([[3.0, 3.0]]), "w.B": T([[5.0], [5.0]])}, 10),
               Update(2, {"w.A": T([[0.0, 0.0]]), "w.B": T([[4.0], [4.0]])}, 10)]  # pruned 2 → 1
    agg = RobustCombine(method, "median").aggregate(state, updates, None)
    assert torch.equal(agg.state["w.A"], T([[1.0, 1.0], [0.0, 0.0]]))  # rows: (1,3,0), (2,0,0)
    assert torch.equal(agg.state["w.B"], T([[4.0, 0.0], [4.0, 0.0]]))  # cols: (1,5,4), (2,0,0)
    assert agg.state[RANKS].tolist() == [2, 1, 1]  # from the uploads, not the consensus's r_max
    krum = RobustCombine(method, "krum", byzantine=0).aggregate(state, updates, None)
    assert krum.state[RANKS].tolist() == [2, 1, 1]  # every screened client's rank, selected or not


def test_median_around_flexlora_and_flora_takes_each_clients_product():
    shapes = {"w": (2, 2)}
    setup = FederationSetup(shapes, [2, 1, 1], [10, 20, 30], scaling=1.0, seed=0)
    g = torch.Generator().manual_seed(0)
    updates = [Update(k, {"w.A": torch.randn(r, 2, generator=g), "w.B": torch.randn(2, r, generator=g)}, n)
               for k, (r, n) in enumerate(zip([2, 1, 1], [10, 20, 30]))]
    expected = coordinate_median([u.tensors["w.B"] @ u.tensors["w.A"] for u in updates])
    flora = FLoRA(FLoRAOptions(), setup)
    agg = RobustCombine(flora, "median").aggregate(flora.init_state(), updates, None)
    B, A = agg.merge["w"]
    assert torch.equal(A, torch.eye(2)) and torch.equal(B @ A, expected)  # merged: ΔW exactly
    flex = FlexLoRA(FlexLoRAOptions(svd_dtype="float64"), setup)
    agg = RobustCombine(flex, "median").aggregate(flex.init_state(), updates, None)
    torch.testing.assert_close(agg.state["w.B"] @ agg.state["w.A"], expected)  # an exact SVD, kept whole
    assert "truncation_error_min_rank" in agg.metrics  # the lowest-rank participant's truncation


def test_every_method_declares_or_refuses_each_stage():
    """A method added later is refused by a combine until someone declares its view."""
    for name in ALGORITHMS:
        assert (RobustCombine.acts_on(name) is None) == (name in ("hierfedlora", "fedex"))
        assert NormBound.acts_on(name)
    assert RobustCombine.acts_on("newmethod") is None and NormBound.acts_on("newmethod")
    assert set(VIEWS) == set(ALGORITHMS) - {"hierfedlora", "fedex"}


def test_an_undefined_combination_is_refused_with_one_line_before_any_work():
    setup = FederationSetup({"w": (2, 2)}, [2, 2], [10, 10], scaling=1.0, seed=0, module_layers={"w": 0},
                            num_layers=1)
    with pytest.raises(Undefined, match=r"^aggregation.combine: RobustCombine is undefined for hierfedlora: "):
        RobustCombine(HierFedLoRA(HierFedLoRAOptions(), setup), "median")


# -- the protocol -------------------------------------------------------------------------------

def config(**sections) -> SimpleNamespace:
    return SimpleNamespace(aggregation=AggregationConfig(**sections.get("aggregation", {})),
                           attack=AttackConfig(**sections.get("attack", {})), seed=0,
                           federation=SimpleNamespace(num_clients=4))


def test_no_defence_is_the_bare_method_and_stages_nest_in_order():
    method, _ = fedit_updates([1.0, 2.0])
    assert build_pipeline(method, config(aggregation={"norm_bound": None})) is method
    full = build_pipeline(method, config(aggregation={"combine": "krum"},
                                         attack={"kind": "sign_flip", "attackers": 1}))
    assert stage_names(full)[1:] == ["norm bound 10 (reject)", "krum (f=1)"]
    assert stage_names(full)[0].startswith("sign_flip by clients [")
    assert full.method is method and full.name == "fedit" and full.rank == method.rank  # reaches through


def test_a_wrapper_overrides_every_method_of_the_protocol():
    """A protocol method a wrapper forgot would run the base class's default on the wrapper."""
    protocol = {n for n, v in vars(Algorithm).items() if inspect.isfunction(v) and not n.startswith("_")} - {"tilt"}
    assert protocol <= set(vars(Wrapper)), protocol - set(vars(Wrapper))
    setup = FederationSetup({"w": (1, 3)}, [4, 2], [10, 10], scaling=1.0, seed=0)
    wrapped = NormBound(AFLoRA(AFLoRAOptions(), setup), bound=10.0, action="reject")
    assert (wrapped.trains, wrapped.unbounded_keys, wrapped.Options) == ("B+lam", (".mask",), AFLoRAOptions)


def test_screening_verdicts_pass_inward_and_join_notes():
    method, updates = fedit_updates([1.0, 1.0, 1.0, 1e6])

    class Tagger(Wrapper):
        DEFAULT = "anything"

        def screen(self, updates):
            return self.pass_inward([Verdict(u, f"seen {u.client_id}") for u in updates])

    inner = NormBound(Tagger(method), bound=10.0, action="clip")
    verdicts = screen(inner, updates)
    assert [v.note for v in verdicts[:3]] == ["seen 0", "seen 1", "seen 2"]
    assert verdicts[3].note.startswith("update norm ") and verdicts[3].note.endswith("; seen 3")
    rejecting = NormBound(Tagger(method), bound=10.0, action="reject")
    verdicts = screen(rejecting, updates)
    assert verdicts[3].update is None and "seen" not in verdicts[3].note  # rejected: never reaches inner
    assert [v.update for v in screen(method, updates)] == updates  # a bare method keeps all


def test_the_norm_bound_still_screens_per_round_with_a_robust_combine_inside():
    method, updates = fedit_updates([1.0, 1.0, 1.0, 1e6])
    pipeline = build_pipeline(method, config(aggregation={"combine": "median"}))
    kept = [v.update for v in screen(pipeline, updates) if v.update is not None]
    assert [u.client_id for u in kept] == [0, 1, 2]
    assert math.isclose(float(pipeline.aggregate(method.init_state(), kept, None).state["w.A"][0, 0]), 1.0)


def test_weighted_sum_with_one_update_of_weight_one_is_the_identity():
    """Why the consensus update is exact: zeros + 1.0 · t is t, bit for bit."""
    t = torch.randn(5, 7, generator=torch.Generator().manual_seed(3))
    assert torch.equal(weighted_sum([t], [1.0]), t)
