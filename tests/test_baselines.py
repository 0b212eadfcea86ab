"""The baselines' math: FLoRA's exact stacking, FlexLoRA's SVD truncation, HETLoRA's penalty
and pruning, FFA-LoRA's frozen A; and every method end to end on the tiny model."""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import pytest
import torch
from conftest import tiny_tree

from fedlora.adapters import Adapters
from fedlora.aggregation.robust import RobustCombine
from fedlora.algorithms import ALGORITHMS, build_algorithm
import fedlora.algorithms.aflora as aflora_module
from fedlora.algorithms.aflora import AFLoRA, AFLoRAOptions, a_change, prune_mask
from fedlora.algorithms.base import (
    DIAGNOSTIC_SECONDS,
    FederationSetup,
    InvalidUpdate,
    Update,
    data_weights,
    factor_shapes,
    first_non_finite,
)
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
        self.seen["params"] = [p for group, *_ in param_groups for p in group]
        self.seen["groups"] = param_groups
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
        algorithm={"name": method, **LEARNING_OPTIONS.get(method, {})},
    ))
    return Simulation(cfg, out, progress=False).run()


LEARNING_OPTIONS = {"fedsa": {"global_b": "mean"}}
"""FedSA-LoRA's default global model is the base (B stays on the clients): its learning shows in
the global model only with the clients' mean B (tests/test_personalized.py judges its clients)."""


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
    with pytest.raises(ValueError, match=r"^algorithm\.min_rank: .*exceeds the smallest client max rank"):
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


# --- edge cases and contracts the mutation run found untested (docs/mutation.md) ----------


def test_sparsity_weights_normalise_and_fall_back_to_uniform():
    assert sparsity_weights([0.1, 0.3]) == pytest.approx([0.25, 0.75])  # Σ norms < 1: still w ∝ norm
    assert sparsity_weights([2.0, 6.0]) == pytest.approx([0.25, 0.75])
    assert sparsity_weights([0.0, 0.0, 0.0, 0.0]) == [0.25] * 4  # every update zero: uniform, no 0/0


def _hetlora_client(tiny_adapters, options, state, rank=8, step=None):
    algo = HETLoRA(options, FederationSetup(tiny_adapters.shapes(), [rank], [10], 0.5, 0))
    payload = algo.payload(algo.init_state(), 0)
    payload.tensors.update(_random_payload(tiny_adapters, rank))
    ctx = FakeClient(tiny_adapters, step=step)
    update, new_state = algo.client_train(ctx, payload, state)
    return payload, update, new_state


def test_hetlora_ceil_rounding_is_the_tail_the_client_measures_and_prunes_to(tiny_adapters):
    """tail_rounding: ceil: t = ⌈0.7 · 8⌉ = 6 (floor: 5); the tail norm and the pruned rank use it."""
    opts = HETLoRAOptions(gamma=0.7, tail_rounding="ceil")
    payload, update, _ = _hetlora_client(tiny_adapters, opts, {TAIL_NORM: torch.tensor(1e9)})
    assert update.metrics["next_rank"] == 6
    names = tiny_adapters.shapes()
    by_hand = sum(float(payload.tensors[f"{n}.A"][6:].norm() * payload.tensors[f"{n}.B"][:, 6:].norm()) for n in names)
    assert update.metrics["tail_norm"] == pytest.approx(by_hand, rel=1e-5)
    assert update.client_id == 0 and update.num_examples == 10


def test_hetlora_prunes_only_when_the_tail_norm_strictly_falls(tiny_adapters):
    """An unchanged tail norm (the previous round's, bit for bit) keeps the rank."""
    opts = HETLoRAOptions(gamma=0.75)
    _, first, state = _hetlora_client(tiny_adapters, opts, {})
    _, second, _ = _hetlora_client(tiny_adapters, opts, state)
    assert second.metrics["tail_norm"] == first.metrics["tail_norm"]
    assert second.metrics["next_rank"] == 8


@pytest.mark.parametrize("reg,given", [(0.0, False), (0.5, True)])
def test_hetlora_passes_the_penalty_only_when_reg_is_positive(tiny_adapters, reg, given):
    seen = {}
    _hetlora_client(tiny_adapters, HETLoRAOptions(reg=reg), {}, step=lambda ctx, r: seen.update(r=r))
    assert (seen["r"] is not None) == given


def test_hetlora_expected_shapes_follow_the_uploaded_rank_within_bounds():
    algo = HETLoRA(HETLoRAOptions(min_rank=2), setup())  # client ranks 8, 4, 2
    state = algo.init_state()

    def shapes(rank, client=1, A_shape=None):
        tensors = random_factors(rank, 0)
        if A_shape is not None:
            tensors["m0.A"] = torch.zeros(A_shape)
        return algo.expected_shapes(state, Update(client, tensors, 10))

    assert shapes(4) == factor_shapes(SHAPES, 4)  # its current rank
    algo.validate(state, Update(1, random_factors(3, 0), 10))  # the server's ranks bound the upload
    assert shapes(2) == {"m0.A": (2, 10), "m0.B": (12, 2), "m1.A": (2, 10), "m1.B": (6, 2)}  # min_rank
    with pytest.raises(InvalidUpdate, match=r"^rank 5 outside \[2, 4\] \(ranks only shrink\)$"):
        shapes(5)
    with pytest.raises(InvalidUpdate, match=r"^rank 1 outside \[2, 4\]"):
        shapes(1)
    with pytest.raises(InvalidUpdate, match="^m0.A: missing or not a matrix$"):
        shapes(4, A_shape=(4, 10, 1))
    with pytest.raises(InvalidUpdate, match="^m0.A: missing or not a matrix$"):
        algo.expected_shapes(state, Update(1, {}, 10))
    assert set(algo.eval_factors(state)) == set(factor_shapes(SHAPES, 8))  # the ranks are not factors


def test_expected_shapes_of_the_fixed_rank_methods():
    """FLoRA, FlexLoRA: A and B at the client's max rank; FedIT at the common rank; FFA-LoRA: B only."""
    s = setup()
    for cls, opts in ((FLoRA, FLoRAOptions()), (FlexLoRA, FlexLoRAOptions())):
        algo = cls(opts, s)
        state = algo.init_state()
        assert algo.expected_shapes(state, Update(1, {}, 10)) == {
            "m0.A": (4, 10), "m0.B": (12, 4), "m1.A": (4, 10), "m1.B": (6, 4)}
    fedit = build_algorithm(FedITOptions(), s)
    assert fedit.expected_shapes(fedit.init_state(), Update(0, {}, 10)) == factor_shapes(SHAPES, 2)
    ffa = FFALoRA(FFALoRAOptions(), s)
    assert ffa.expected_shapes(ffa.init_state(), Update(0, {}, 10)) == {"m0.B": (12, 2), "m1.B": (6, 2)}


def test_validate_accepts_a_well_formed_update_and_names_what_is_wrong():
    algo = FlexLoRA(FlexLoRAOptions(), setup())  # client 2 has rank 2
    state = algo.init_state()
    good = random_factors(2, 0)

    def check(tensors, num_examples=1):
        algo.validate(state, Update(2, tensors, num_examples))

    check(good, num_examples=1)  # one example is enough
    with pytest.raises(InvalidUpdate, match=r"^num_examples must be >= 1, got 0$"):
        check(good, num_examples=0)
    with pytest.raises(InvalidUpdate, match=r"^m1.B: dtype torch.int64, expected a real floating-point tensor$"):
        check({**good, "m1.B": torch.zeros(6, 2, dtype=torch.long)})
    with pytest.raises(InvalidUpdate, match=r"^m1.B: dtype list, expected a real floating-point tensor$"):
        check({**good, "m1.B": [[0.0] * 2] * 6})
    with pytest.raises(InvalidUpdate, match=r"^tensor names differ: missing \['m1.A'\], unexpected \[\]$"):
        check({k: v for k, v in good.items() if k != "m1.A"})
    with pytest.raises(InvalidUpdate, match=r"^tensor names differ: missing \[\], unexpected \['x'\]$"):
        check({**good, "x": torch.zeros(1)})
    extra = {f"x{i}": torch.zeros(1) for i in range(4)}
    with pytest.raises(InvalidUpdate, match=r"^tensor names differ: missing \['m0.A', 'm0.B', 'm1.A'\], "
                                            r"unexpected \['x0', 'x1', 'x2'\]$"):  # three of each
        check(extra)
    with pytest.raises(InvalidUpdate, match=r"^m0.A: shape \(3, 10\), expected \(2, 10\)$"):
        check({**good, "m0.A": torch.zeros(3, 10)})
    bad = good["m1.A"].clone()
    bad[1, 3] = float("nan")
    with pytest.raises(InvalidUpdate, match=r"^m1.A: contains NaN or Inf$"):
        check({**good, "m1.A": bad})


def test_first_non_finite_checks_every_float_and_complex_tensor_in_float32():
    nan = torch.tensor([1.0, float("nan")])
    assert first_non_finite({"i": torch.ones(2, dtype=torch.long), "x": nan}) == "x"  # an int tensor is skipped
    assert first_non_finite({"c": torch.tensor([complex(1, float("inf"))])}) == "c"
    # finite in float64, infinite once aggregated in float32
    assert first_non_finite({"a": torch.ones(2), "big": torch.tensor([1e300], dtype=torch.float64)}) == "big"
    assert first_non_finite({"a": torch.ones(2), "i": torch.ones(2, dtype=torch.long)}) is None


def test_single_stage_default():
    algo = build_algorithm(FedITOptions(), setup())
    assert algo.stages(algo.init_state(), [2, 0]) == [{0: [2, 0]}]  # one stage, one lane, every client
    with pytest.raises(NotImplementedError, match="^fedit has single-stage rounds$"):
        algo.aggregate_stage({}, [], 0)


# --- FlexLoRA edge cases --------------------------------------------------------------------


def test_flexlora_float64_svd_keeps_a_float32_state_and_an_exact_zero_error():
    """One participant of rank 2: ΔW has rank 2, so its rank-2 truncation loses nothing; in
    float64 the relative error is ~1e-16 (float32: ~1e-7); the state is float32 either way."""
    ups = [Update(2, random_factors(2, 5), 20)]
    for svd_dtype, bound in (("float64", 1e-12), ("float32", 1e-5)):
        algo = FlexLoRA(FlexLoRAOptions(svd_dtype=svd_dtype), setup())
        agg = algo.aggregate(algo.init_state(), ups, server=None)
        assert all(t.dtype == torch.float32 for t in agg.state.values())
        assert agg.metrics["truncation_error_min_rank"] < bound
        for name in SHAPES:
            expected = ups[0].tensors[f"{name}.B"] @ ups[0].tensors[f"{name}.A"]
            torch.testing.assert_close(agg.state[f"{name}.B"] @ agg.state[f"{name}.A"], expected,
                                       rtol=1e-4, atol=1e-4)


def test_flexlora_truncation_metric_is_the_mean_relative_tail_over_modules():
    ups = updates_at(RANKS)
    algo = FlexLoRA(FlexLoRAOptions(), setup())
    agg = algo.aggregate(algo.init_state(), ups, server=None)
    p = data_weights(ups)
    errors = []
    for name in SHAPES:
        S = torch.linalg.svdvals(sum(pk * u.tensors[f"{name}.B"] @ u.tensors[f"{name}.A"] for pk, u in zip(p, ups)))
        errors.append(float(S[2:].norm() / S.norm()))  # the smallest participant has rank 2
    assert agg.metrics["truncation_error_min_rank"] == pytest.approx(sum(errors) / 2, rel=1e-4)


def test_flexlora_zero_updates_give_a_zero_state_and_no_error_metric():
    zero = [Update(k, {key: torch.zeros_like(t) for key, t in random_factors(r, 0).items()}, 10)
            for k, r in enumerate(RANKS)]
    algo = FlexLoRA(FlexLoRAOptions(), setup())
    agg = algo.aggregate(algo.init_state(), zero, server=None)
    assert "truncation_error_min_rank" not in agg.metrics  # no relative error of a zero update (not 0/0)
    assert "delta_share" not in agg.metrics  # every term is zero: no shares either
    assert all(float((agg.state[f"{n}.B"] @ agg.state[f"{n}.A"]).abs().max()) == 0 for n in SHAPES)


# --- AFLoRA client and server contracts -----------------------------------------------------


def _aflora_client_round(tiny_adapters, step=None, **options):
    """One client (max rank 4) from a hand-made λ [3, 0.1, 2, 0.5], all dims active; the fake
    client does not train, so the trained λ is the given one."""
    algo = AFLoRA(AFLoRAOptions(**options), FederationSetup(tiny_adapters.shapes(), [4], [10], 0.5, 0))
    names = list(tiny_adapters.shapes())
    state = {f"{n}.lam": torch.tensor([3.0, 0.1, 2.0, 0.5]) for n in names}
    state |= {f"{n}.mask": torch.ones(4) for n in names}
    ctx = FakeClient(tiny_adapters, client_id=0, step=step)
    update, new_state = algo.client_train(ctx, algo.payload(algo.init_state(), 0), state)
    return algo, names, update, new_state


# paper-literal, β = 1: λ² = 9, .01, 4, .25; σ = 3.64: dims 0 and 2 survive
PRUNED = [1.0, 0.0, 1.0, 0.0]


def test_aflora_ddr_prunes_the_next_rounds_mask_and_uploads_the_trained_one(tiny_adapters):
    algo, names, update, new_state = _aflora_client_round(tiny_adapters, beta=1.0, pruning_rule="paper-literal")
    for n in names:
        assert new_state[f"{n}.mask"].tolist() == PRUNED and new_state[f"{n}.mask"].dtype == torch.float32
        assert update.tensors[f"{n}.mask"].tolist() == [1.0] * 4  # upload_mask: trained
        torch.testing.assert_close(new_state[f"{n}.lam"], torch.tensor([3.0, 0.1, 2.0, 0.5]))  # λ persists
    assert update.client_id == 0 and update.metrics["next_rank"] == 2 and update.metrics["pruned"] == 2 * len(names)
    algo.validate(algo.init_state(), update)


def test_aflora_without_ddr_keeps_the_mask(tiny_adapters):
    _, names, update, new_state = _aflora_client_round(tiny_adapters, beta=1.0, pruning_rule="paper-literal", ddr=False)
    assert all(new_state[f"{n}.mask"].tolist() == [1.0] * 4 for n in names)
    assert update.metrics["next_rank"] == 4


def test_aflora_upload_mask_pruned_sends_the_surviving_columns(tiny_adapters):
    algo, names, update, _ = _aflora_client_round(tiny_adapters, beta=1.0, pruning_rule="paper-literal",
                                                  upload_mask="pruned")
    for n in names:
        assert update.tensors[f"{n}.mask"].tolist() == PRUNED
        assert update.tensors[f"{n}.B"].shape[1] == 2
    algo.validate(algo.init_state(), update)  # a float 0/1 mask the server accepts


def test_aflora_lambda_resets_to_its_init_when_it_does_not_persist(tiny_adapters):
    _, names, _, new_state = _aflora_client_round(tiny_adapters, lambda_persist=False, lambda_init=0.7)
    assert all(torch.equal(new_state[f"{n}.lam"], torch.full((4,), 0.7)) for n in names)


@pytest.mark.parametrize("gamma,given", [(0.0, False), (0.5, True)])
def test_aflora_passes_the_column_norm_regulariser_only_when_gamma_is_positive(tiny_adapters, gamma, given):
    seen = {}
    _aflora_client_round(tiny_adapters, step=lambda ctx, r: seen.update(r=r), gamma=gamma)
    assert (seen["r"] is not None) == given


def test_prune_mask_boundaries_and_dtype():
    mask = torch.ones(4)
    # λ² equal to the threshold survives (eq. 8: ≥): β = 0 keeps even λ = 0 (literal rule), and
    # zscore with β = 0 keeps λ² = mean (λ² = 1, 49, 25, 25: mean 25)
    assert prune_mask(torch.tensor([0.0, 1.0, 2.0, 3.0]), mask, 0.0, 1, "paper-literal").tolist() == [1, 1, 1, 1]
    assert prune_mask(torch.tensor([1.0, 7.0, 5.0, 5.0]), mask, 0.0, 1, "zscore").tolist() == [0, 1, 1, 1]
    out = prune_mask(torch.tensor([1.0, 7.0, 5.0, 5.0]), mask, 0.0, 1, "zscore")
    assert out.dtype == mask.dtype  # the mask stays a float tensor (uploaded, validated as such)


class FakeServer:
    """A ServerContext whose public steps double A (A_FT = 2 A) and whose held-out losses are 3, 2, 1."""

    def __init__(self, adapters):
        self.adapters = adapters
        self.heldout = iter([3.0, 2.0, 1.0])

    def train_public(self, param_groups, steps, batch_size):
        with torch.no_grad():
            for group in param_groups:
                for p in group[0]:
                    p.mul_(2.0)
        return [1.0, 3.0]

    def heldout_loss(self):
        return next(self.heldout)


def test_a_change_is_relative_over_all_modules_together():
    """‖A_FT − A‖_F / ‖A‖_F with both norms over every module: module q (norm 5) moves by 5,
    module v (norm 5) not at all, so √(25 / 50), not the mean of per-module ratios (0.5)."""
    A = {"q": torch.tensor([[3.0, 0.0], [0.0, 4.0]]), "v": torch.tensor([[0.0, 5.0]])}
    moved = {"q": A["q"] + torch.tensor([[0.0, 3.0], [4.0, 0.0]]), "v": A["v"].clone()}
    assert a_change(A, moved) == pytest.approx(0.5 ** 0.5)
    assert a_change(A, {k: -v for k, v in A.items()}) == pytest.approx(2.0)  # A_FT = −A moves by 2‖A‖
    assert a_change(A, A) == 0.0


def test_aflora_server_fuses_a_and_reports_its_steps(tiny_adapters):
    shapes = tiny_adapters.shapes()
    algo = AFLoRA(AFLoRAOptions(alpha=0.25), FederationSetup(shapes, [4], [10], 0.5, 0))
    state = algo.init_state()
    update = Update(0, {f"{n}.B": torch.ones(m, 4) for n, (m, _) in shapes.items()}
                    | {f"{n}.mask": torch.ones(4) for n in shapes}, 10)
    agg = algo.aggregate(state, [update], FakeServer(tiny_adapters))
    for n in shapes:  # A' = α A + (1 − α) 2A
        torch.testing.assert_close(agg.state[f"{n}.A"], 1.75 * state[f"{n}.A"])
        torch.testing.assert_close(agg.merge[n][1], agg.state[f"{n}.A"])
    assert agg.metrics["server_loss"] == 2.0  # mean of the public steps' losses
    assert agg.metrics["server_a_change"] == pytest.approx(1.0)  # ‖2A − A‖ / ‖A‖
    assert (agg.metrics["server_heldout_before"], agg.metrics["server_heldout_ft"],
            agg.metrics["server_heldout_after"]) == (3.0, 2.0, 1.0)


def test_aflora_adds_its_held_out_seconds_to_a_tilt_that_was_not_measured(tiny_adapters):
    """The tilt always reports its seconds, and a trimmed mean around AFLoRA drops the per-client
    tilt (one consensus update: no sum of clients), so AFLoRA's server step never meets a missing key."""
    shapes = tiny_adapters.shapes()
    setup_ = FederationSetup(shapes, [4], [10], 0.5, 0)
    algo = RobustCombine(AFLoRA(AFLoRAOptions(), setup_), "trimmed_mean", trim=0.2)
    update = Update(0, {f"{n}.B": torch.ones(m, 4) for n, (m, _) in shapes.items()}
                    | {f"{n}.mask": torch.ones(4) for n in shapes}, 10)
    metrics = algo.aggregate(algo.init_state(), [update], FakeServer(tiny_adapters)).metrics
    assert "client_weight" not in metrics and metrics[DIAGNOSTIC_SECONDS] >= 0.0


def test_aflora_expected_shapes_follow_the_uploaded_mask():
    algo = AFLoRA(AFLoRAOptions(min_rank=2), setup())  # client 1: max rank 4
    state = algo.init_state()

    def shapes(mask, B_cols=None):
        mask = torch.tensor(mask)
        cols = int(mask.sum()) if B_cols is None else B_cols
        tensors = {f"{n}.mask": mask for n in SHAPES} | {f"{n}.B": torch.ones(m, cols) for n, (m, _) in SHAPES.items()}
        return algo.expected_shapes(state, Update(1, tensors, 10))

    assert shapes([1.0, 0.0, 1.0, 0.0]) == {"m0.mask": (4,), "m0.B": (12, 2), "m1.mask": (4,), "m1.B": (6, 2)}
    assert shapes([1.0] * 4)["m0.B"] == (12, 4)
    with pytest.raises(InvalidUpdate, match=r"^m0.mask: expected shape \(4,\)$"):
        shapes([1.0] * 3)
    with pytest.raises(InvalidUpdate, match=r"^m0.mask: expected shape \(4,\)$"):
        algo.expected_shapes(state, Update(1, {}, 10))
    for bad in ([1.0, 2.0, 0.0, 0.0], [1.0, 0.5, 1.0, 0.0]):
        with pytest.raises(InvalidUpdate, match="^m0.mask: entries must be 0 or 1$"):
            shapes(bad)
    with pytest.raises(InvalidUpdate, match="^m0.mask: rank 1 below min_rank 2$"):
        shapes([0.0, 0.0, 1.0, 0.0])


def test_flora_fresh_a_is_reproducible_from_seed_round_and_client(tiny_adapters):
    """The same (seed, round, client) draws the same A (a resumed run equals an uninterrupted
    one); another client or seed draws another."""
    shapes = tiny_adapters.shapes()

    def drawn(seed, client):
        algo = FLoRA(FLoRAOptions(), FederationSetup(shapes, [4, 4], [5, 5], 0.5, seed))
        update, _ = algo.client_train(FakeClient(tiny_adapters, client_id=client),
                                      algo.payload({"round": torch.tensor(1)}, client), {})
        return next(v for k, v in update.tensors.items() if k.endswith(".A"))

    torch.manual_seed(0)
    first = drawn(0, 0)
    torch.manual_seed(1)  # the global generator plays no part
    assert torch.equal(drawn(0, 0), first)
    assert not torch.equal(drawn(0, 1), first) and not torch.equal(drawn(1, 0), first)



def test_flora_stack_is_float32_whatever_the_uploads_dtype():
    ups = updates_at(RANKS)
    p = data_weights(ups)
    As, Bs = [u.tensors["m0.A"] for u in ups], [u.tensors["m0.B"] for u in ups]
    B, A = stack([a.half() for a in As], [b.half() for b in Bs], p)
    assert A.dtype == B.dtype == torch.float32
    exact = stack([a.half().float() for a in As], [b.half().float() for b in Bs], p)
    assert torch.equal(B, exact[0]) and torch.equal(A, exact[1])  # p · A_k not rounded to half


def _b_at_training(tiny_adapters, client, seed=0, **options):
    """The B a client starts training from (captured when `train` is called)."""
    algo = AFLoRA(AFLoRAOptions(**options), FederationSetup(tiny_adapters.shapes(), [4, 4], [10, 10], 0.5, seed))
    seen = {}

    def step(ctx, _):
        seen.update({n: layer.B.detach().clone() for n, layer in ctx.adapters.layers.items()})

    algo.client_train(FakeClient(tiny_adapters, client_id=client, step=step), algo.payload(algo.init_state(), client), {})
    return seen


def test_aflora_b_init_unit_starts_from_seeded_unit_columns(tiny_adapters):
    unit = {"b_init": "unit", "lambda_init": 0.0, "lambda_persist": False}
    torch.manual_seed(0)
    first = _b_at_training(tiny_adapters, 0, **unit)
    for B in first.values():
        assert B.shape[1] == 4
        torch.testing.assert_close(B.norm(dim=0), torch.ones(4))
    torch.manual_seed(1)  # seeded by (seed, client) alone, not the global generator
    again = _b_at_training(tiny_adapters, 0, **unit)
    assert all(torch.equal(first[n], again[n]) for n in first)
    other_client, other_seed = _b_at_training(tiny_adapters, 1, **unit), _b_at_training(tiny_adapters, 0, 1, **unit)
    assert all(not torch.equal(first[n], other_client[n]) and not torch.equal(first[n], other_seed[n]) for n in first)
    assert all(float(B.abs().max()) == 0 for B in _b_at_training(tiny_adapters, 0).values())  # zeros (paper)


@pytest.mark.parametrize("optimizer", ["adam", "sgd"])
def test_aflora_lambda_group_names_its_optimizer_and_lr(tiny_adapters, optimizer):
    seen = {}
    _aflora_client_round(tiny_adapters, step=lambda ctx, _: seen.update(ctx.seen), lambda_optimizer=optimizer,
                         lambda_lr=0.25)
    B_group, lam_group = seen["groups"]
    assert all(p.dim() == 2 for p in B_group[0]) and B_group[1] == 0.1  # B at the client's lr
    assert all(p.dim() == 1 for p in lam_group[0]) and lam_group[1] == 0.25
    assert lam_group[2:] == (("sgd",) if optimizer == "sgd" else ())  # Adam is the default


def test_aflora_pruning_check_measures_ddrs_masks_with_a_client_seeded_generator(tiny_adapters, monkeypatch):
    calls = []

    def spy(layers, pruned, loss, generator, draws):
        calls.append((layers, pruned, loss, generator.initial_seed(), draws))
        return result

    monkeypatch.setattr(aflora_module, "pruning_loss_increase", spy)
    result = (0.5, 0.25)
    algo = AFLoRA(AFLoRAOptions(beta=1.0, pruning_rule="paper-literal", pruning_check=3),
                  FederationSetup(tiny_adapters.shapes(), [4, 4], [10, 10], 0.5, 5))
    names = list(tiny_adapters.shapes())
    state = {f"{n}.lam": torch.tensor([3.0, 0.1, 2.0, 0.5]) for n in names} | {f"{n}.mask": torch.ones(4) for n in names}
    ctx = FakeClient(tiny_adapters, client_id=1)
    ctx.loss = lambda: 1.0
    update, _ = algo.client_train(ctx, algo.payload(algo.init_state(), 1), state)
    layers, pruned, loss, seed, draws = calls[0]
    assert layers == [tiny_adapters.layers[n] for n in names] and loss is ctx.loss
    assert [m.tolist() for m in pruned] == [PRUNED] * len(names) and seed == 5 + 1 and draws == 3
    assert (update.metrics["prune_loss_ddr"], update.metrics["prune_loss_random"]) == result
    result = None  # DDR pruned nothing: no such metrics
    update, _ = algo.client_train(ctx, algo.payload(algo.init_state(), 1), state)
    assert "prune_loss_ddr" not in update.metrics and "prune_loss_random" not in update.metrics
