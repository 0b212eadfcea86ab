"""End-to-end exactness of FedEx-LoRA, FedSA-LoRA, FedSVD and RoLoRA, as tests/test_exactness_e2e.py
does for the others: one (or two) rounds on the tiny model, from real client training through
upload and aggregation to the merged base or the new global adapter. Each expected value is
the method's formula (docs/concepts/methods/) recomputed here from the uploaded tensors with
plain torch: no helper of the method is called."""

from __future__ import annotations

import pytest
import torch
from test_exactness_e2e import RANKS, Round, build, close, far, scaling  # noqa: F401  (build: fixture)

R = min(RANKS)  # every new method trains at the weakest client's rank


def weighted(p: list[float], ts: list[torch.Tensor]) -> torch.Tensor:
    return sum(pk * t.double() for pk, t in zip(p, ts))


def next_round(rnd: Round, t: int) -> Round:
    """Round t from rnd's aggregated state: every client trains again, the server aggregates."""
    fed, algo = rnd.fed, rnd.fed.algorithm
    rnd.state, rnd.updates, rnd.payloads = rnd.agg.state, [], []
    states = list(rnd.client_states)
    for k in range(len(RANKS)):
        payload = algo.payload(rnd.state, k)
        update, states[k] = algo.client_train(fed.client(k, t), payload, states[k])
        fed.adapters.clear()
        rnd.payloads.append(payload)
        rnd.updates.append(update)
    rnd.client_states = states
    rnd.before = rnd.weights()
    rnd.agg = algo.aggregate(rnd.state, rnd.updates, fed.server(t))
    if rnd.agg.merge:
        fed.adapters.merge(rnd.agg.merge)
    rnd.after = rnd.weights()
    return rnd


@pytest.mark.parametrize("residual", ["factors", "dense"])
def test_fedex_folds_the_residual_so_the_update_is_the_average_of_products(build, monkeypatch, residual):
    fed = build("fedex", residual=residual)
    rnd = Round(fed, monkeypatch)
    s = scaling(fed)
    for name, (m, n) in rnd.modules.items():
        As, Bs = rnd.uploaded_factors(name)
        assert all(a.shape == (R, n) for a in As) and all(torch.equal(a, rnd.trained[k][f"{name}.A"]) for k, a in enumerate(As))
        A_bar, B_bar = weighted(rnd.p, As), weighted(rnd.p, Bs)
        close(rnd.agg.state[f"{name}.A"], A_bar.float())
        close(rnd.agg.state[f"{name}.B"], B_bar.float())
        ideal = weighted(rnd.p, [b.double() @ a.double() for a, b in zip(As, Bs)])
        residual_by_hand = ideal - B_bar @ A_bar
        assert float(residual_by_hand.abs().max()) > 1e-6  # FedIT's interference is really there
        rnd.assert_base_moved_by(name, (s * residual_by_hand).float())  # W ← W + s R
        total = rnd.after[name].double() - rnd.before[name].double() + s * rnd.agg.state[f"{name}.B"].double() @ rnd.agg.state[f"{name}.A"].double()
        torch.testing.assert_close(total, s * ideal, rtol=1e-4, atol=1e-6)  # exact: the average of products
        assert far((s * B_bar @ A_bar).float(), (s * ideal).float())
        if residual == "dense":  # what round 2's payload carries for a client's own base
            close(rnd.agg.state[f"{name}.merge.W"], residual_by_hand.float())
        else:
            B_R, A_R = rnd.agg.state[f"{name}.merge.B"], rnd.agg.state[f"{name}.merge.A"]
            assert B_R.shape == (m, (len(RANKS) + 1) * R) and A_R.shape == ((len(RANKS) + 1) * R, n)
            torch.testing.assert_close((B_R.double() @ A_R.double()), residual_by_hand, rtol=1e-4, atol=1e-6)
    nxt = fed.algorithm.payload(rnd.agg.state, 0).tensors
    per_module = {"dense": lambda m, n: m * n, "factors": lambda m, n: (len(RANKS) + 1) * R * (m + n)}[residual]
    assert sum(v.numel() for k, v in nxt.items() if ".merge." in k) == sum(per_module(m, n) for m, n in rnd.modules.values())
    assert set(fed.algorithm.eval_factors(rnd.agg.state)) == {f"{n}.{f}" for n in rnd.modules for f in "AB"}
    for k in range(3):
        rnd.assert_metrics(k, R, sum(R * (m + n) for m, n in rnd.modules.values()))


def test_fedex_smaller_picks_the_cheaper_residual_per_module(build):
    fed = build("fedex")
    algo = fed.algorithm
    assert algo.dense_cheaper(4, 4, 3) and not algo.dense_cheaper(64, 64, 3)
    assert 4 * 4 < 4 * R * (4 + 4) and 64 * 64 > 4 * R * (64 + 64)  # the rule by hand: m n < (K+1) r (m + n)
    assert not algo.dense_cheaper(8, 8, 1) and algo.dense_cheaper(4, 3, 1)  # 64 = 64: factors; 12 < 28


@pytest.mark.parametrize("global_b", ["none", "mean"])
def test_fedsa_averages_a_only_and_each_client_keeps_its_b(build, monkeypatch, global_b):
    fed = build("fedsa", global_b=global_b)
    rnd = Round(fed, monkeypatch)
    for name, (m, n) in rnd.modules.items():
        As = [rnd.upload(k, f"{name}.A") for k in range(3)]
        assert all(torch.equal(a, rnd.trained[k][f"{name}.A"]) for k, a in enumerate(As))
        close(rnd.agg.state[f"{name}.A"], weighted(rnd.p, As).float())
        assert far(rnd.agg.state[f"{name}.A"], sum(As) / 3)
        for k in range(3):  # B never left the client: it is its private state, as trained
            assert torch.equal(rnd.client_states[k][f"{name}.B"], rnd.trained[k][f"{name}.B"])
            mine = fed.algorithm.personal_factors(rnd.agg.state, rnd.client_states[k])
            assert torch.equal(mine[f"{name}.A"], rnd.agg.state[f"{name}.A"])
            assert torch.equal(mine[f"{name}.B"], rnd.trained[k][f"{name}.B"])
        if global_b == "mean":
            Bs = [rnd.upload(k, f"{name}.B") for k in range(3)]
            close(rnd.agg.state[f"{name}.B"], weighted(rnd.p, Bs).float())
    uploaded = {f"{n}.A" for n in rnd.modules} | ({f"{n}.B" for n in rnd.modules} if global_b == "mean" else set())
    for k in range(3):
        assert set(rnd.updates[k].tensors) == uploaded
        rnd.assert_metrics(k, R, sum(R * (m + n) for m, n in rnd.modules.values()))  # trains A and B
        assert "B" not in "".join(fed.algorithm.payload(rnd.agg.state, k).tensors)  # B̄ never goes down
    evaluated = fed.algorithm.eval_factors(rnd.agg.state)
    assert (evaluated == {}) if global_b == "none" else (evaluated == rnd.agg.state)
    rnd.assert_base_unchanged()
    first_b = {k: dict(s) for k, s in enumerate(rnd.client_states)}
    rnd = next_round(rnd, 2)  # round 2 starts from each client's own B, not from zero or B̄
    for k in range(3):
        assert any(not torch.equal(rnd.client_states[k][key], v) for key, v in first_b[k].items())
    fresh = fed.algorithm.own_b({})  # a client that never trained starts from B = 0
    assert set(fresh) == {f"{n}.B" for n in rnd.modules} and all(float(v.abs().max()) == 0 for v in fresh.values())


@pytest.mark.parametrize("refactor_every", [1, 2])
def test_fedsvd_averages_b_over_the_shared_a_then_refactors_by_svd(build, monkeypatch, refactor_every):
    fed = build("fedsvd", refactor_every=refactor_every)
    rnd = Round(fed, monkeypatch)
    for name, (m, n) in rnd.modules.items():
        A = rnd.state[f"{name}.A"]
        Bs = [rnd.upload(k, f"{name}.B") for k in range(3)]
        assert all(torch.equal(rnd.trained[k][f"{name}.A"], A) for k in range(3))  # A frozen
        B_bar = weighted(rnd.p, Bs)
        product = B_bar @ A.double()
        new_B, new_A = rnd.agg.state[f"{name}.B"].double(), rnd.agg.state[f"{name}.A"].double()
        torch.testing.assert_close(new_B @ new_A, product, rtol=1e-4, atol=1e-6)  # the product is unchanged
        assert far((sum(Bs) / 3).float() @ A, product.float())
        if refactor_every == 2:  # round 1 is not a re-factorisation round: A as it was, B̄
            assert torch.equal(rnd.agg.state[f"{name}.A"], A)
            continue
        torch.testing.assert_close(new_A @ new_A.t(), torch.eye(R, dtype=torch.float64), rtol=0, atol=1e-5)
        U, S, Vh = torch.linalg.svd(product, full_matrices=False)
        torch.testing.assert_close(new_B.norm(dim=0), S[:R], rtol=1e-4, atol=1e-6)  # B = U Σ: columns σ_j
        torch.testing.assert_close(new_A.t() @ new_A, Vh[:R].t() @ Vh[:R], rtol=1e-3, atol=1e-5)  # A = Vᵀ[:r]
    for k in range(3):
        assert set(rnd.updates[k].tensors) == {f"{n}.B" for n in rnd.modules}
        rnd.assert_metrics(k, R, sum(R * m for m, _ in rnd.modules.values()))
    assert set(fed.algorithm.payload(rnd.agg.state, 0).tensors) == {f"{n}.{f}" for n in rnd.modules for f in "AB"}
    rnd.assert_base_unchanged()


def test_fedsvd_orthogonal_init_gives_orthonormal_rows_from_round_one(build):
    fed = build("fedsvd", init_a="orthogonal")
    state = fed.algorithm.init_state()
    for name, (_, n) in fed.adapters.shapes().items():
        A = state[f"{name}.A"].double()
        torch.testing.assert_close(A @ A.t(), torch.eye(R, dtype=torch.float64), rtol=0, atol=1e-5)
        assert A.shape == (R, n)


def test_rolora_alternates_b_then_a_each_aggregation_exact(build, monkeypatch):
    fed = build("rolora")
    rnd = Round(fed, monkeypatch)
    for name, (m, n) in rnd.modules.items():  # round 1: B only
        A = rnd.state[f"{name}.A"]
        Bs = [rnd.upload(k, f"{name}.B") for k in range(3)]
        assert all(torch.equal(rnd.trained[k][f"{name}.A"], A) for k in range(3))
        close(rnd.agg.state[f"{name}.B"], weighted(rnd.p, Bs).float())
        assert torch.equal(rnd.agg.state[f"{name}.A"], A)
        torch.testing.assert_close((rnd.agg.state[f"{name}.B"] @ A).double(),
                                   weighted(rnd.p, [b.double() @ A.double() for b in Bs]), rtol=1e-4, atol=1e-6)
    for k in range(3):
        assert set(rnd.updates[k].tensors) == {f"{n}.B" for n in rnd.modules}
        rnd.assert_metrics(k, R, sum(R * m for m, _ in rnd.modules.values()))
    rnd = next_round(rnd, 2)  # round 2: A only, over the B of round 1
    for name, (m, n) in rnd.modules.items():
        B = rnd.state[f"{name}.B"]
        As = [rnd.upload(k, f"{name}.A") for k in range(3)]
        assert all(torch.equal(rnd.trained[k][f"{name}.B"], B) for k in range(3))
        close(rnd.agg.state[f"{name}.A"], weighted(rnd.p, As).float())
        assert far(rnd.agg.state[f"{name}.A"], sum(As) / 3)
        assert torch.equal(rnd.agg.state[f"{name}.B"], B)
        torch.testing.assert_close((B @ rnd.agg.state[f"{name}.A"]).double(),
                                   weighted(rnd.p, [B.double() @ a.double() for a in As]), rtol=1e-4, atol=1e-6)
    for k in range(3):
        assert set(rnd.updates[k].tensors) == {f"{n}.A" for n in rnd.modules}
        assert rnd.updates[k].metrics["trained_params"] == sum(R * n for _, n in rnd.modules.values())
    assert int(rnd.agg.state["round"]) == 3
    rnd.assert_base_unchanged()


def test_rolora_first_a_trains_a_in_odd_rounds(build):
    algo = build("rolora", first="A").algorithm
    assert [algo.factor(t) for t in (1, 2, 3, 4)] == ["A", "B", "A", "B"]
