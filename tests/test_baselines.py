"""The baselines' math: FLoRA's exact stacking, FlexLoRA's SVD truncation, HETLoRA's penalty
and pruning, FFA-LoRA's frozen A; and every method end to end on the tiny model."""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import pytest
import torch
from conftest import tiny_tree

from fedlora.adapters import Adapters
from fedlora.algorithms import ALGORITHMS, build_algorithm
from fedlora.algorithms.aflora import AFLoRA, AFLoRAOptions
from fedlora.algorithms.base import FederationSetup, Update, data_weights
from fedlora.algorithms.fedit import FedITOptions
from fedlora.algorithms.ffa import FFALoRA, FFALoRAOptions
from fedlora.algorithms.flexlora import (
    FlexLoRA,
    FlexLoRAOptions,
    full_update,
    svd_factors,
)
from fedlora.algorithms.flora import FLoRA, FLoRAOptions, stack
from fedlora.algorithms.hetlora import (
    TAIL_NORM,
    HETLoRA,
    HETLoRAOptions,
    sparsity_weights,
    tail_start,
)
from fedlora.config import build_config
from fedlora.models import load_base_model
from fedlora.runtime.checkpoint import Checkpoint
from fedlora.runtime.inprocess import Simulation

SHAPES = {"m0": (12, 10), "m1": (6, 10)}
RANKS = [8, 4, 2]


def setup(ranks=RANKS, sizes=(30, 10, 20)) -> FederationSetup:
    return FederationSetup(SHAPES, list(ranks), list(sizes), scaling=0.5, seed=3)


def random_factors(rank: int, seed: int) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    out = {}
    for name, (m, n) in SHAPES.items():
        out[f"{name}.A"] = torch.randn(rank, n, generator=g)
        out[f"{name}.B"] = torch.randn(m, rank, generator=g)
    return out


def updates_at(ranks, sizes=(30, 10, 20)) -> list[Update]:
    return [Update(k, random_factors(r, 10 + k), n) for k, (r, n) in enumerate(zip(ranks, sizes))]


@dataclass
class FakeClient:
    """A ClientContext whose `train` runs a caller-given step on the loaded factors."""

    adapters: Adapters
    client_id: int = 0
    num_examples: int = 10
    lr: float = 0.1
    step: object = None
    seen: dict = field(default_factory=dict)

    def train(self, param_groups, regulariser=None):
        self.seen["params"] = [p for group, _ in param_groups for p in group]
        if self.step is not None:
            self.step(self, regulariser)
        return [0.0]


@pytest.fixture(scope="module")
def tiny_adapters():
    model, _ = load_base_model("tiny-llama", seed=0)
    return Adapters.inject(model, ["q_proj", "v_proj"], scaling=0.5)


# --- FLoRA --------------------------------------------------------------------------------


def test_flora_stack_equals_weighted_sum_of_products():
    ups = updates_at(RANKS)
    p = data_weights(ups)
    for name in SHAPES:
        B, A = stack([u.tensors[f"{name}.A"] for u in ups], [u.tensors[f"{name}.B"] for u in ups], p)
        assert A.shape[0] == B.shape[1] == sum(RANKS)
        expected = sum(pk * u.tensors[f"{name}.B"] @ u.tensors[f"{name}.A"] for pk, u in zip(p, ups))
        torch.testing.assert_close(B @ A, expected, rtol=1e-5, atol=1e-5)


def test_flora_merges_the_stack_and_broadcasts_it():
    algo = FLoRA(FLoRAOptions(), setup())
    state = algo.init_state()
    agg = algo.aggregate(state, updates_at(RANKS), server=None)
    assert int(agg.state["round"]) == 2 and set(agg.merge) == set(SHAPES)
    nxt = algo.payload(agg.state, 0)
    assert nxt.config["round"] == 2
    assert nxt.tensors["m0.merge.A"].shape == (sum(RANKS), 10)  # downlink grows with Σ r_k
    assert algo.eval_factors(agg.state) == {}  # all of it is in the base


def test_flora_clients_draw_fresh_a_each_round(tiny_adapters):
    shapes = tiny_adapters.shapes()
    algo = FLoRA(FLoRAOptions(), FederationSetup(shapes, [4, 2], [5, 5], 0.5, 0))
    drawn = []
    for round_ in (1, 2):
        ctx = FakeClient(tiny_adapters)
        update, _ = algo.client_train(ctx, algo.payload({"round": torch.tensor(round_)}, 0), {})
        drawn.append(next(v for k, v in update.tensors.items() if k.endswith(".A")))
    assert drawn[0].shape[0] == 4 and not torch.equal(drawn[0], drawn[1])


# --- FlexLoRA -----------------------------------------------------------------------------


@pytest.mark.parametrize("rank", [1, 2, 4, 8])
def test_flexlora_truncation_error_is_the_discarded_singular_values(rank):
    ups = updates_at(RANKS)
    p = data_weights(ups)
    delta = full_update([u.tensors["m0.B"] for u in ups], [u.tensors["m0.A"] for u in ups], p, torch.float64)
    B, A, S = svd_factors(delta, rank)
    err = torch.linalg.norm(delta - B @ A)
    assert math.isclose(float(err), float(S[rank:].norm()), rel_tol=1e-9)
    assert float(err) > 0  # rank(ΔW) ≤ Σ r_k = 14 > 8: truncation loses something


def test_flexlora_global_is_the_exact_weighted_sum_and_clients_get_truncations():
    algo = FlexLoRA(FlexLoRAOptions(), setup())
    ups = updates_at(RANKS)
    agg = algo.aggregate(algo.init_state(), ups, server=None)
    p = data_weights(ups)
    for name in SHAPES:
        expected = sum(pk * u.tensors[f"{name}.B"] @ u.tensors[f"{name}.A"] for pk, u in zip(p, ups))
        torch.testing.assert_close(agg.state[f"{name}.B"] @ agg.state[f"{name}.A"], expected, rtol=1e-4, atol=1e-4)
    for k, r in enumerate(RANKS):
        pay = algo.payload(agg.state, k).tensors
        assert pay["m0.B"].shape == (12, r) and pay["m0.A"].shape == (r, 10)
        # the truncation is the best rank-r approximation: its error is Σ's tail
        S = torch.linalg.svdvals(agg.state["m0.B"] @ agg.state["m0.A"])
        err = torch.linalg.norm(agg.state["m0.B"] @ agg.state["m0.A"] - pay["m0.B"] @ pay["m0.A"])
        assert math.isclose(float(err), float(S[r:].norm()), rel_tol=1e-3, abs_tol=1e-4)
    assert 0 < agg.metrics["truncation_error_min_rank"] < 1


# --- HETLoRA ------------------------------------------------------------------------------


def test_hetlora_tail_start_floor_and_ceil():
    assert tail_start(64, 0.99) == 63 and tail_start(4, 0.99) == 3
    assert tail_start(64, 0.99, "ceil") == 64  # the literal ⌈γ r⌉: an empty tail


def _random_payload(adapters: Adapters, rank: int) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(1)
    out = {}
    for name, (m, n) in adapters.shapes().items():
        out[f"{name}.A"] = torch.randn(rank, n, generator=g)
        out[f"{name}.B"] = torch.randn(m, rank, generator=g)
    return out


def test_hetlora_penalty_has_the_gradient_of_the_tail_norm(tiny_adapters):
    shapes = tiny_adapters.shapes()
    reg, rank = 0.5, 4
    algo = HETLoRA(HETLoRAOptions(reg=reg, gamma=0.5), FederationSetup(shapes, [rank], [10], 0.5, 0))
    grads = {}

    def step(ctx, regulariser):
        assert regulariser is not None
        regulariser().backward()
        for name, layer in ctx.adapters.layers.items():
            grads[name] = (layer.A.detach().clone(), layer.B.detach().clone(), layer.A.grad.clone(), layer.B.grad.clone())

    payload = algo.payload(algo.init_state(), 0)
    payload.tensors.update(_random_payload(tiny_adapters, rank))
    algo.client_train(FakeClient(tiny_adapters, step=step), payload, {})
    start = tail_start(rank, 0.5)
    for A, B, gA, gB in grads.values():
        a_t, b_t = A[start:].norm(), B[:, start:].norm()
        torch.testing.assert_close(gB[:, start:], reg * a_t * B[:, start:] / b_t)
        torch.testing.assert_close(gA[start:], reg * b_t * A[start:] / a_t)
        assert float(gB[:, :start].abs().max()) == 0 and float(gA[:start].abs().max()) == 0


@pytest.mark.parametrize("previous,pruned", [(None, False), (1e9, True), (1e-9, False)])
def test_hetlora_prunes_when_the_tail_norm_falls(tiny_adapters, previous, pruned):
    shapes = tiny_adapters.shapes()
    algo = HETLoRA(HETLoRAOptions(gamma=0.75), FederationSetup(shapes, [8], [10], 0.5, 0))
    payload = algo.payload(algo.init_state(), 0)
    payload.tensors.update(_random_payload(tiny_adapters, 8))
    state = {} if previous is None else {TAIL_NORM: torch.tensor(previous)}
    update, new_state = algo.client_train(FakeClient(tiny_adapters), payload, state)
    expected = 6 if pruned else 8
    assert update.metrics["next_rank"] == expected
    assert all(t.shape[0 if k.endswith(".A") else 1] == expected for k, t in update.tensors.items())
    assert float(new_state[TAIL_NORM]) == pytest.approx(update.metrics["tail_norm"])
    agg = algo.aggregate(algo.init_state(), [update], server=None)
    assert int(agg.state["ranks"][0]) == expected
    assert algo.payload(agg.state, 0).config["rank"] == expected


def test_hetlora_server_pads_and_weights_by_update_norm():
    algo = HETLoRA(HETLoRAOptions(), setup())
    ups = updates_at(RANKS)
    agg = algo.aggregate(algo.init_state(), ups, server=None)
    norms = [float(torch.linalg.norm(u.tensors["m0.B"] @ u.tensors["m0.A"])) for u in ups]
    w = sparsity_weights(norms)
    expected_A = sum(wk * torch.nn.functional.pad(u.tensors["m0.A"], (0, 0, 0, 8 - r)) for wk, u, r in zip(w, ups, RANKS))
    expected_B = sum(wk * torch.nn.functional.pad(u.tensors["m0.B"], (0, 8 - r)) for wk, u, r in zip(w, ups, RANKS))
    torch.testing.assert_close(agg.state["m0.A"], expected_A)
    torch.testing.assert_close(agg.state["m0.B"], expected_B)


# --- FFA-LoRA -----------------------------------------------------------------------------


def test_ffa_lora_trains_b_only_and_a_never_changes(data_dir, tmp_path):
    cfg = build_config(tiny_tree(algorithm={"name": "ffa"}))
    sim = Simulation(cfg, tmp_path, progress=False)
    sim.run()
    algo = sim.fed.algorithm
    fresh = FFALoRA(FFALoRAOptions(), algo.setup)
    assert all(torch.equal(algo.A[k], fresh.A[k]) for k in fresh.A)  # redrawn from the seed alone
    state = Checkpoint.load(tmp_path).state
    assert all(k.endswith(".B") for k in state) and any(v.abs().sum() > 0 for v in state.values())
    evaluated = algo.eval_factors(state)
    assert all(torch.equal(evaluated[k], fresh.A[k]) for k in fresh.A)
    ctx = FakeClient(sim.fed.adapters)
    algo.client_train(ctx, algo.payload(state, 0), {})
    assert all(p.shape[1] == algo.rank for p in ctx.seen["params"])  # only B (m × r) is trainable


# --- all methods --------------------------------------------------------------------------


LEARNED = 0.8  # accuracy every method reaches on the synthetic task (measured 0.92-1.0; lr ≈ 0: ≈ 0.1)


def learning_run(task: dict, method: str, lr: float, out) -> dict:
    """3 rounds × 10 steps of batch 8 on the two-class synthetic task, 2 clients of ranks 4 and 2."""
    cfg = build_config(tiny_tree(
        data={**task, "partition": "iid"},
        federation={"num_clients": 2, "client_max_ranks": [4, 2], "rounds": 3, "local_steps": 10,
                    "batch_size": 8, "lr": lr, "eval_every": 3},
        algorithm={"name": method},
    ))
    return Simulation(cfg, out, progress=False).run()


@pytest.mark.parametrize("method", sorted(ALGORITHMS))
def test_every_method_runs_end_to_end(data_dir, synthetic_task, tmp_path, method):
    summary = learning_run(synthetic_task, method, 0.05, tmp_path)
    assert summary["rounds"] == 3 and summary["final_accuracy"] >= LEARNED, summary["final_accuracy"]
    assert summary["rejected_updates"] == 0 and summary["total_uplink_bytes"] > 0


def test_the_learning_bound_fails_without_learning(data_dir, synthetic_task, tmp_path):
    """The bound above is not met by an untrained model (lr ≈ 0): it measures learning."""
    assert learning_run(synthetic_task, "fedit", 1e-12, tmp_path)["final_accuracy"] < LEARNED


def test_homogeneous_rank_cannot_exceed_the_weakest_client():
    with pytest.raises(ValueError, match="smallest client max rank"):
        build_algorithm(FFALoRAOptions(rank=4), setup(ranks=[8, 4, 2]))


@pytest.mark.parametrize("method", ["aflora", "hetlora"])
def test_min_rank_may_equal_but_not_exceed_the_smallest_max_rank(method):
    options = {"aflora": AFLoRAOptions, "hetlora": HETLoRAOptions}[method]
    build_algorithm(options(min_rank=2), setup(ranks=[8, 4, 2]))  # equal: accepted
    with pytest.raises(ValueError, match="algorithm.min_rank: .*exceeds the smallest client max rank"):
        build_algorithm(options(min_rank=3), setup(ranks=[8, 4, 2]))


def test_fedit_takes_the_requested_rank_and_aflora_draws_a_from_the_seed():
    assert build_algorithm(FedITOptions(rank=1), setup()).rank == 1
    a, b = (AFLoRA(AFLoRAOptions(row_norm=2.0), setup()).init_state() for _ in range(2))
    assert all(torch.equal(a[k], b[k]) for k in a)  # seeded
    torch.testing.assert_close(a["m0.A"].norm(dim=1), torch.full((8,), 2.0))


def test_aflora_paper_literal_weighting_reaches_the_aggregate():
    algo = AFLoRA(AFLoRAOptions(weighting="paper-literal", dlf=False), setup())
    ups = []
    for k, (r, d) in enumerate(zip(RANKS, (30, 10, 20))):
        ups.append(Update(k, {f"{n}.B": torch.ones(m, r) for n, (m, _) in SHAPES.items()}
                          | {f"{n}.mask": torch.ones(r) for n in SHAPES}, d))
    B = algo.aggregate(algo.init_state(), ups, server=None).state["m0.B"]
    logs = [math.log1p(r) for r in RANKS]
    p = [lg / sum(logs) * d / 60 for lg, d in zip(logs, (30, 10, 20))]  # Σ p < 1
    torch.testing.assert_close(B[0], torch.tensor([sum(p[k] for k, r in enumerate(RANKS) if j < r) for j in range(8)]))
