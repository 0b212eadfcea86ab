"""The four 2025 methods' maths on synthetic tensors (milliseconds, what mutation testing runs):
FedEx-LoRA's residual and its two forms, FedSA-LoRA's shared A and private B, FedSVD's
re-factorisation, RoLoRA's alternation; payloads, accepted shapes, what a client trains and uploads."""

from __future__ import annotations

import pytest
import torch
from test_baselines import RANKS, SHAPES, FakeClient, random_factors, setup, tiny_adapters  # noqa: F401

from fedlora.algorithms.base import DIAGNOSTIC_SECONDS, FederationSetup, Update, data_weights
from fedlora.algorithms.fedex import FedExLoRA, FedExLoRAOptions, identity_pair, residual_factors
from fedlora.algorithms.fedsa import FedSALoRA, FedSALoRAOptions
from fedlora.algorithms.fedsvd import FedSVD, FedSVDOptions, refactor
from fedlora.algorithms.rolora import RoLoRA, RoLoRAOptions

SIZES = (30, 10, 20)
R = min(RANKS)


def ups(keys: str = "AB", rank: int = R, scale: float = 1.0) -> list[Update]:
    out = []
    for k, n in enumerate(SIZES):
        f = random_factors(rank, 10 + k)
        out.append(Update(k, {key: scale * v for key, v in f.items() if key[-1] in keys}, n))
    return out


def by_hand(p, ts):
    return sum(pk * t.double() for pk, t in zip(p, ts))


def close(a, b, tol=1e-5):
    torch.testing.assert_close(a.double(), b.double(), rtol=tol, atol=tol)


# --- FedEx-LoRA -----------------------------------------------------------------------------


@pytest.mark.parametrize("residual", ["factors", "dense", "smaller"])
def test_fedex_state_is_the_average_and_the_merge_is_the_residual(residual):
    algo = FedExLoRA(FedExLoRAOptions(residual=residual), setup())
    u = ups()
    p = data_weights(u)
    agg = algo.aggregate(algo.init_state(), u, server=None)
    for name, (m, n) in SHAPES.items():
        As, Bs = [x.tensors[f"{name}.A"] for x in u], [x.tensors[f"{name}.B"] for x in u]
        A, B = by_hand(p, As), by_hand(p, Bs)
        close(agg.state[f"{name}.A"], A)
        close(agg.state[f"{name}.B"], B)
        R_hand = by_hand(p, [b.double() @ a.double() for a, b in zip(As, Bs)]) - B @ A
        assert float(R_hand.abs().max()) > 0.1
        mB, mA = agg.merge[name]
        close(mB.double() @ mA.double(), R_hand, 1e-4)
        dense = residual == "dense" or (residual == "smaller" and m * n < 4 * R * (m + n))
        keys = {k for k in agg.state if k.startswith(f"{name}.merge.")}
        assert keys == ({f"{name}.merge.W"} if dense else {f"{name}.merge.B", f"{name}.merge.A"})
        if dense:
            close(agg.state[f"{name}.merge.W"], R_hand, 1e-4)
        else:
            assert torch.equal(agg.state[f"{name}.merge.B"], mB) and torch.equal(agg.state[f"{name}.merge.A"], mA)
    assert agg.metrics["client_weight"] == {str(k): pytest.approx(pk) for k, pk in enumerate(p)}
    assert DIAGNOSTIC_SECONDS in agg.metrics
    assert set(algo.eval_factors(agg.state)) == {f"{n}.{f}" for n in SHAPES for f in "AB"}
    assert algo.payload(agg.state, 1).tensors == agg.state  # the residual goes down with the adapter


def test_fedex_residual_helpers_by_hand():
    Bs = [torch.tensor([[1.0], [2.0]]), torch.tensor([[0.0], [1.0]])]
    As = [torch.tensor([[1.0, 0.0, 2.0]]), torch.tensor([[3.0, 1.0, 0.0]])]
    p = [0.25, 0.75]
    B = 0.25 * Bs[0] + 0.75 * Bs[1]
    A = 0.25 * As[0] + 0.75 * As[1]
    B_R, A_R = residual_factors(Bs, As, p, B, A)
    assert B_R.shape == (2, 3) and A_R.shape == (3, 3)
    close(B_R @ A_R, 0.25 * Bs[0] @ As[0] + 0.75 * Bs[1] @ As[1] - B @ A)
    assert torch.equal(B_R[:, 2:], -B) and torch.equal(A_R[2:], A)
    wide, tall = torch.randn(2, 5), torch.randn(5, 2)
    (b, a), (b2, a2) = identity_pair(wide), identity_pair(tall)
    assert torch.equal(b, torch.eye(2)) and torch.equal(a, wide)  # the identity on the smaller side
    assert torch.equal(b2, tall) and torch.equal(a2, torch.eye(2))
    square = torch.randn(3, 3)
    assert torch.equal(identity_pair(square)[0], torch.eye(3))


def test_fedex_smaller_rule_and_its_tie():
    algo = FedExLoRA(FedExLoRAOptions(), setup())  # r = 2
    assert algo.dense_cheaper(4, 4, 3)  # 16 < 4·2·8 = 64
    assert not algo.dense_cheaper(64, 64, 3)  # 4096 > 4·2·128 = 1024
    assert not algo.dense_cheaper(8, 8, 1)  # 64 = 2·2·16: a tie goes to the factors
    assert algo.dense_cheaper(8, 7, 1)
    assert FedExLoRA(FedExLoRAOptions(residual="dense"), setup()).dense_cheaper(64, 64, 3)
    assert not FedExLoRA(FedExLoRAOptions(residual="factors"), setup()).dense_cheaper(4, 4, 3)


def test_fedex_client_trains_both_from_the_global_adapter_and_ignores_the_residual(tiny_adapters):
    shapes = tiny_adapters.shapes()
    algo = FedExLoRA(FedExLoRAOptions(), FederationSetup(shapes, [4, 2], [5, 5], 0.5, 0))
    state = algo.init_state()
    name = next(iter(shapes))
    payload = algo.payload({**state, f"{name}.merge.W": torch.ones(shapes[name])}, 0)
    ctx = FakeClient(tiny_adapters)
    update, kept = algo.client_train(ctx, payload, {"x": torch.zeros(1)})
    assert set(update.tensors) == {f"{n}.{f}" for n in shapes for f in "AB"}
    assert len(ctx.seen["params"]) == 2 * len(shapes)  # A and B of every module
    assert torch.equal(update.tensors[f"{name}.A"], state[f"{name}.A"])
    assert kept == {"x": torch.zeros(1)}
    assert algo.expected_shapes({**state, f"{name}.merge.W": torch.ones(1)}, update) == \
        {k: tuple(v.shape) for k, v in state.items()}


# --- FedSA-LoRA -----------------------------------------------------------------------------


@pytest.mark.parametrize("global_b", ["none", "mean"])
def test_fedsa_averages_a_and_b_only_when_asked(global_b):
    algo = FedSALoRA(FedSALoRAOptions(global_b=global_b), setup())
    state = algo.init_state()
    assert set(state) == {f"{n}.{f}" for n in SHAPES for f in ("AB" if global_b == "mean" else "A")}
    if global_b == "mean":
        assert all(float(v.abs().max()) == 0 for k, v in state.items() if k.endswith(".B"))
    u = ups("AB" if global_b == "mean" else "A")
    p = data_weights(u)
    agg = algo.aggregate(state, u, server=None)
    for key in state:
        close(agg.state[key], by_hand(p, [x.tensors[key] for x in u]))
    assert set(agg.state) == set(state)
    assert ("client_weight" in agg.metrics) == (global_b == "mean")
    if global_b == "mean":
        assert agg.metrics["client_weight"] == {str(k): pytest.approx(pk) for k, pk in enumerate(p)}
    assert algo.eval_factors(agg.state) == ({} if global_b == "none" else agg.state)
    assert set(algo.payload(agg.state, 0).tensors) == {f"{n}.A" for n in SHAPES}  # B̄ never goes down
    assert algo.expected_shapes(agg.state, u[0]) == {k: tuple(v.shape) for k, v in state.items()}


def test_fedsa_personal_model_is_the_global_a_with_the_clients_own_b():
    algo = FedSALoRA(FedSALoRAOptions(global_b="mean"), setup())
    state = {k: torch.full_like(v, 2.0) for k, v in algo.init_state().items()}
    mine = {f"{n}.B": torch.full((m, R), 7.0) for n, (m, _) in SHAPES.items()}
    personal = algo.personal_factors(state, mine)
    for n, (m, nn) in SHAPES.items():
        assert torch.equal(personal[f"{n}.A"], state[f"{n}.A"]) and torch.equal(personal[f"{n}.B"], mine[f"{n}.B"])
    fresh = algo.personal_factors(state, {})
    assert all(torch.equal(fresh[f"{n}.B"], torch.zeros(m, R)) for n, (m, _) in SHAPES.items())


@pytest.mark.parametrize("global_b", ["none", "mean"])
def test_fedsa_client_trains_a_and_its_own_b_keeps_b_and_uploads_per_option(tiny_adapters, global_b):
    shapes = tiny_adapters.shapes()
    algo = FedSALoRA(FedSALoRAOptions(global_b=global_b), FederationSetup(shapes, [4, 2], [5, 5], 0.5, 0))
    state = algo.init_state()
    own = {f"{n}.B": torch.full((m, 2), 0.5) for n, (m, _) in shapes.items()}

    def step(ctx, reg):
        for p in ctx.seen["params"]:
            p.data.add_(1.0)

    ctx = FakeClient(tiny_adapters, step=step)
    update, kept = algo.client_train(ctx, algo.payload(state, 0), own)
    assert len(ctx.seen["params"]) == 2 * len(shapes)  # A and B both train
    name = next(iter(shapes))
    assert torch.equal(kept[f"{name}.B"], own[f"{name}.B"] + 1)  # started from its own B, kept it
    assert set(kept) == set(own)
    assert torch.equal(update.tensors[f"{name}.A"], state[f"{name}.A"] + 1)
    uploaded = {f"{n}.{f}" for n in shapes for f in ("AB" if global_b == "mean" else "A")}
    assert set(update.tensors) == uploaded
    assert update.metrics["uploaded_params"] == sum(update.tensors[k].numel() for k in uploaded)
    assert update.metrics["trained_params"] == sum(2 * (m + n) for m, n in shapes.values())


# --- FedSVD ---------------------------------------------------------------------------------


def test_refactor_keeps_the_product_and_returns_its_svd():
    g = torch.Generator().manual_seed(0)
    B, A = torch.randn(12, 3, generator=g), torch.randn(3, 10, generator=g)
    new_B, new_A = refactor(B, A)
    close(new_B @ new_A, B @ A, 1e-4)
    close(new_A @ new_A.t(), torch.eye(3), 1e-5)
    U, S, Vh = torch.linalg.svd(B.double() @ A.double(), full_matrices=False)
    close(new_B.norm(dim=0), S[:3], 1e-5)  # decreasing singular values in B's columns
    close(new_A.t() @ new_A, Vh[:3].t() @ Vh[:3], 1e-4)  # A spans the top right singular vectors
    unit = new_B.double() / new_B.double().norm(dim=0)
    close((unit.t() @ U[:, :3]).abs(), torch.eye(3), 1e-4)  # column j is σ_j u_j (up to sign)
    assert new_A.dtype == new_B.dtype == torch.float32


@pytest.mark.parametrize("every", [1, 2])
def test_fedsvd_averages_b_and_refactors_on_schedule(every):
    algo = FedSVD(FedSVDOptions(refactor_every=every), setup())
    state = algo.init_state()
    assert int(state["round"]) == 1
    for t in (1, 2):
        u = ups("B")
        p = data_weights(u)
        agg = algo.aggregate(state, u, server=None)
        assert int(agg.state["round"]) == t + 1
        for name in SHAPES:
            B = by_hand(p, [x.tensors[f"{name}.B"] for x in u])
            close(agg.state[f"{name}.B"] @ agg.state[f"{name}.A"], B @ state[f"{name}.A"].double(), 1e-4)
            if t % every:
                assert torch.equal(agg.state[f"{name}.A"], state[f"{name}.A"])
                close(agg.state[f"{name}.B"], B)
            else:
                close(agg.state[f"{name}.A"] @ agg.state[f"{name}.A"].t(), torch.eye(R), 1e-5)
        assert agg.metrics["client_weight"] == {str(k): pytest.approx(pk) for k, pk in enumerate(p)}
        state = agg.state
    assert set(algo.payload(state, 0).tensors) == {f"{n}.{f}" for n in SHAPES for f in "AB"}
    assert set(algo.eval_factors(state)) == {f"{n}.{f}" for n in SHAPES for f in "AB"}
    assert algo.expected_shapes(state, u[0]) == {f"{n}.B": (m, R) for n, (m, _) in SHAPES.items()}


@pytest.mark.parametrize("init", ["kaiming", "orthogonal"])
def test_fedsvd_initial_a(init):
    state = FedSVD(FedSVDOptions(init_a=init), setup()).init_state()
    kaiming = FedSVD(FedSVDOptions(), setup()).init_state()
    for name, (m, n) in SHAPES.items():
        A = state[f"{name}.A"]
        assert A.shape == (R, n) and torch.equal(state[f"{name}.B"], torch.zeros(m, R))
        gram = A @ A.t()
        if init == "orthogonal":
            close(gram, torch.eye(R), 1e-5)
            q = torch.linalg.qr(kaiming[f"{name}.A"].t())[0].t()
            close(A, q)  # the seeded kaiming rows, orthonormalised
        else:
            assert float((gram - torch.eye(R)).abs().max()) > 0.1


def test_fedsvd_client_trains_b_only(tiny_adapters):
    shapes = tiny_adapters.shapes()
    algo = FedSVD(FedSVDOptions(), FederationSetup(shapes, [4, 2], [5, 5], 0.5, 0))
    ctx = FakeClient(tiny_adapters)
    update, _ = algo.client_train(ctx, algo.payload(algo.init_state(), 0), {})
    assert set(update.tensors) == {f"{n}.B" for n in shapes}
    assert len(ctx.seen["params"]) == len(shapes)


# --- RoLoRA ---------------------------------------------------------------------------------


def test_rolora_alternates_and_averages_only_the_trained_factor():
    algo = RoLoRA(RoLoRAOptions(), setup())
    state = algo.init_state()
    assert [algo.factor(t) for t in (1, 2, 3)] == ["B", "A", "B"]
    for t, trained in ((1, "B"), (2, "A")):
        assert algo.payload(state, 0).config == {"train": trained}
        assert set(algo.payload(state, 0).tensors) == {f"{n}.{f}" for n in SHAPES for f in "AB"}
        assert algo.expected_shapes(state, None) == {f"{n}.{trained}": tuple(state[f"{n}.{trained}"].shape) for n in SHAPES}
        u = ups(trained)
        p = data_weights(u)
        agg = algo.aggregate(state, u, server=None)
        other = "A" if trained == "B" else "B"
        for name in SHAPES:
            close(agg.state[f"{name}.{trained}"], by_hand(p, [x.tensors[f"{name}.{trained}"] for x in u]))
            assert torch.equal(agg.state[f"{name}.{other}"], state[f"{name}.{other}"])
        assert int(agg.state["round"]) == t + 1
        assert agg.metrics["client_weight"] == {str(k): pytest.approx(pk) for k, pk in enumerate(p)}
        state = agg.state
    assert "round" not in algo.eval_factors(state) and len(algo.eval_factors(state)) == 2 * len(SHAPES)


def test_rolora_tilt_terms_follow_the_trained_factor():
    """delta_share: each client's share of B A; a B round's terms are B_k A, an A round's B A_k."""
    algo = RoLoRA(RoLoRAOptions(first="A"), setup())
    state = {**{k: torch.ones_like(v) for k, v in algo.init_state().items() if k != "round"}, "round": torch.tensor(1)}
    u = ups("A")
    u[1].tensors = {k: 10 * v for k, v in u[1].tensors.items()}  # client 1's A dominates
    shares = algo.aggregate(state, u, server=None).metrics["delta_share"]
    assert max(shares, key=shares.get) == "1"


def test_rolora_client_trains_the_named_factor(tiny_adapters):
    shapes = tiny_adapters.shapes()
    algo = RoLoRA(RoLoRAOptions(), FederationSetup(shapes, [4, 2], [5, 5], 0.5, 0))
    state = algo.init_state()
    for t, f in ((1, "B"), (2, "A")):
        ctx = FakeClient(tiny_adapters)
        update, _ = algo.client_train(ctx, algo.payload({**state, "round": torch.tensor(t)}, 0), {})
        assert set(update.tensors) == {f"{n}.{f}" for n in shapes}
        assert len(ctx.seen["params"]) == len(shapes)
        assert update.metrics["rank"] == 2


@pytest.mark.parametrize("cls,options", [(FedExLoRA, FedExLoRAOptions), (FedSALoRA, FedSALoRAOptions),
                                         (FedSVD, FedSVDOptions), (RoLoRA, RoLoRAOptions)])
def test_one_rank_the_weakest_clients_or_the_requested(cls, options):
    assert cls(options(), setup()).rank == min(RANKS)
    assert cls(options(rank=1), setup()).rank == 1
    with pytest.raises(ValueError, match="algorithm.rank: 4 exceeds the smallest client max rank 2"):
        cls(options(rank=4), setup())
    assert cls.homogeneous


def test_fedex_keeps_a_float32_state_from_uploads_of_another_dtype():
    """Clients may upload float64 (or half) factors: the state and the residual the base is merged
    with stay float32, with the same values."""
    algo = FedExLoRA(FedExLoRAOptions(residual="factors"), setup())
    dense = FedExLoRA(FedExLoRAOptions(residual="dense"), setup())
    u = [Update(x.client_id, {k: v.double() for k, v in x.tensors.items()}, x.num_examples) for x in ups()]
    p = data_weights(u)
    for agg in (algo.aggregate(algo.init_state(), u, server=None), dense.aggregate(dense.init_state(), u, server=None)):
        assert all(t.dtype == torch.float32 for t in agg.state.values())
        assert all(t.dtype == torch.float32 for pair in agg.merge.values() for t in pair)
        for name in SHAPES:
            As, Bs = [x.tensors[f"{name}.A"] for x in u], [x.tensors[f"{name}.B"] for x in u]
            R_hand = by_hand(p, [b @ a for a, b in zip(As, Bs)]) - by_hand(p, Bs) @ by_hand(p, As)
            mB, mA = agg.merge[name]
            close(mB.double() @ mA.double(), R_hand, 1e-4)


def test_rolora_first_a_alternates_from_a():
    algo = RoLoRA(RoLoRAOptions(first="A"), setup())
    assert [algo.factor(t) for t in (1, 2, 3, 4)] == ["A", "B", "A", "B"]


def test_rolora_tilt_is_each_clients_term_of_the_product():
    """B round: client k's term is p_k B_k A; A round: p_k B A_k (the diagnostics by hand)."""
    from fedlora.diagnostics import aggregation_tilt

    algo = RoLoRA(RoLoRAOptions(), setup())
    state = {k: (torch.randn_like(v) if k != "round" else v) for k, v in algo.init_state().items()}
    for t, trained in ((1, "B"), (2, "A")):
        state["round"] = torch.tensor(t)
        u = ups(trained)
        p = data_weights(u)
        got = algo.aggregate(state, u, server=None).metrics["delta_share"]
        terms = [[(pk, x.tensors[f"{n}.B"] if trained == "B" else state[f"{n}.B"],
                   state[f"{n}.A"] if trained == "B" else x.tensors[f"{n}.A"]) for pk, x in zip(p, u)] for n in SHAPES]
        expected = aggregation_tilt([x.client_id for x in u], terms)["delta_share"]
        assert got == pytest.approx(expected)
