"""End-to-end exactness, one method at a time: one round on the tiny model, from real client
training (LocalClient on the synthetic task of conftest) through upload and aggregation to the merged base weights
(AFLoRA, FLoRA) or the new global adapter (the others). Each expected value is the method's
formula (docs: ALGORITHMS.md) computed here from the uploaded tensors, with plain torch: no
helper of the method (weights, padding, stacking, SVD) is called."""

from __future__ import annotations

import math

import pytest
import torch
from conftest import tiny_tree

from fedlora.config import build_config
from fedlora.runtime.context import LocalClient, PublicServer
from fedlora.runtime.inprocess import Federation

RANKS = [8, 4, 2]


@pytest.fixture
def build(synthetic_task, data_dir):
    return lambda method, **algo: federation(synthetic_task, method, **algo)


def federation(task: dict, method: str, **algo) -> Federation:
    tree = tiny_tree(
        data={**task, "partition": "size_skew", "train_examples": 120, "test_examples": 8},  # |D_k| all differ
        federation={"num_clients": 3, "client_max_ranks": RANKS, "rounds": 1, "local_steps": 2,
                    "batch_size": 4, "lr": 0.05},
        algorithm={"name": method, **algo},
    )
    fed = Federation.build(build_config(tree))
    sizes = [len(c) for c in fed.task.clients]
    assert len(set(sizes)) == len(sizes), sizes  # so data weights differ from uniform ones
    return fed


class Round:
    """One round as the runtime plays it, with what each party saw recorded on the way."""

    def __init__(self, fed: Federation, monkeypatch) -> None:
        self.fed, algo = fed, fed.algorithm
        self.trained: dict[int, dict[str, torch.Tensor]] = {}  # factors at the end of local training
        self.reg: dict[int, tuple[float, float] | None] = {}  # (regulariser, eq. 10 by hand)
        self.a_ft: dict[str, torch.Tensor] = {}  # the server's A after its public steps
        self.losses: dict[int, list[float]] = {}
        self.reg_passed: dict[int, bool] = {}
        client_train, server_train = LocalClient.train, PublicServer.train_public

        def spy_client(ctx, groups, regulariser=None):
            losses = client_train(ctx, groups, regulariser)
            self.losses[ctx.client_id] = losses
            self.trained[ctx.client_id] = ctx.adapters.state()
            self.reg_passed[ctx.client_id] = regulariser is not None
            if fed.cfg.algorithm.name == "aflora":
                self.reg[ctx.client_id] = None if regulariser is None else (float(regulariser().detach()), self._eq10(ctx))
            return losses

        def spy_server(server, groups, steps, batch_size):
            losses = server_train(server, groups, steps, batch_size)
            self.a_ft = {n: l.A.detach().clone() for n, l in server.adapters.layers.items()}
            return losses

        monkeypatch.setattr(LocalClient, "train", spy_client)
        monkeypatch.setattr(PublicServer, "train_public", spy_server)
        self.state = algo.init_state()
        self.payloads, self.updates, self.client_states = [], [], []
        for k in range(len(RANKS)):
            payload = algo.payload(self.state, k)
            update, client_state = algo.client_train(fed.client(k, 1), payload, {})
            fed.adapters.clear()
            assert update.num_examples == len(fed.task.clients[k])
            self.payloads.append(payload)
            self.updates.append(update)
            self.client_states.append(client_state)
        self.before = self.weights()
        self.agg = algo.aggregate(self.state, self.updates, fed.server(1))
        fed.adapters.clear()
        if self.agg.merge:
            fed.adapters.merge(self.agg.merge)
        self.after = self.weights()

    def _eq10(self, ctx) -> float:
        gamma = self.fed.cfg.algorithm.gamma
        total = 0.0
        for layer in ctx.adapters.layers.values():
            B, h = layer.B.detach(), layer.mask
            total += sum(gamma * (float(B[:, j].norm()) ** 2 - 1) ** 2 for j in range(B.shape[1]) if h[j] == 1)
        return total

    def weights(self) -> dict[str, torch.Tensor]:
        return {n: l.base.weight.detach().clone() for n, l in self.fed.adapters.layers.items()}

    @property
    def modules(self) -> dict[str, tuple[int, int]]:
        return self.fed.adapters.shapes()

    @property
    def p(self) -> list[float]:
        """|D_k| / Σ|D|."""
        n = [u.num_examples for u in self.updates]
        return [x / sum(n) for x in n]

    def upload(self, k: int, key: str) -> torch.Tensor:
        return self.updates[k].tensors[key]

    def uploaded_factors(self, name: str) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
        """Every client's uploaded A and B of one module."""
        return [self.upload(k, f"{name}.A") for k in range(3)], [self.upload(k, f"{name}.B") for k in range(3)]

    def assert_metrics(self, k: int, rank: float, trained: int) -> None:
        """What the client reports: mean loss, rank, parameters trained and uploaded."""
        u = self.updates[k]
        assert u.metrics["train_loss"] == pytest.approx(sum(self.losses[k]) / len(self.losses[k]))
        assert u.metrics["rank"] == pytest.approx(rank)
        assert u.metrics["trained_params"] == trained
        # AFLoRA's 0/1 mask is not counted as parameters
        assert u.metrics["uploaded_params"] == sum(t.numel() for k, t in u.tensors.items() if not k.endswith(".mask"))

    def assert_base_unchanged(self) -> None:
        assert self.agg.merge is None
        assert all(torch.equal(self.before[n], self.after[n]) for n in self.before)

    def assert_base_moved_by(self, name: str, delta: torch.Tensor) -> None:
        torch.testing.assert_close(self.after[name] - self.before[name], delta, rtol=1e-4, atol=1e-6)
        assert float(delta.abs().max()) > 1e-4  # the update is not negligible


def scaling(fed: Federation) -> float:
    return fed.cfg.lora.alpha / max(RANKS)


def close(a: torch.Tensor, b: torch.Tensor) -> None:
    torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


def far(a: torch.Tensor, b: torch.Tensor) -> bool:
    """A wrong formula (e.g. uniform weights) would be detected: a and b differ clearly."""
    return float((a - b).abs().max()) > 1e-4 * max(1.0, float(b.abs().max()))


def test_fedit_round_is_data_weighted_fedavg_of_a_and_b(build, monkeypatch):
    fed = build("fedit")
    rnd = Round(fed, monkeypatch)
    r = min(RANKS)
    for name in rnd.modules:
        for f in "AB":
            key = f"{name}.{f}"
            ups = [rnd.upload(k, key) for k in range(3)]
            assert all(u.shape[0 if f == "A" else 1] == r for u in ups)  # the weakest client's rank
            assert all(torch.equal(ups[k], rnd.trained[k][key]) for k in range(3))  # uploads what it trained
            expected = sum(pk * u for pk, u in zip(rnd.p, ups))
            close(rnd.agg.state[key], expected)  # eq. 2: p_k = |D_k| / Σ|D|
            assert far(sum(ups) / 3, expected), "uniform and data weights agree: the test cannot tell them apart"
    assert not torch.equal(rnd.upload(0, f"{name}.B"), rnd.payloads[0].tensors[f"{name}.B"])  # B trained
    for k in range(3):
        rnd.assert_metrics(k, r, sum(r * (m + n) for m, n in rnd.modules.values()))
    rnd.assert_base_unchanged()
    assert fed.algorithm.eval_factors(rnd.agg.state) is rnd.agg.state


def kaiming_by_hand(shapes: dict[str, tuple[int, int]], rank: int, seed: int) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return {f"{name}.A": (torch.rand(rank, n, generator=g) * 2 - 1) / math.sqrt(n) for name, (_, n) in shapes.items()}


def test_ffa_round_averages_b_over_the_frozen_seeded_a(build, monkeypatch):
    fed = build("ffa")
    rnd = Round(fed, monkeypatch)
    r = min(RANKS)
    frozen = kaiming_by_hand(rnd.modules, r, fed.cfg.seed)
    for k in range(3):
        assert set(rnd.updates[k].tensors) == {f"{n}.B" for n in rnd.modules}  # B only goes up
        for key, A in frozen.items():
            close(rnd.trained[k][key], A)  # A trained by nobody, the seed's own
    evaluated = fed.algorithm.eval_factors(rnd.agg.state)
    for name in rnd.modules:
        key = f"{name}.B"
        ups = [rnd.upload(k, key) for k in range(3)]
        expected = sum(pk * u for pk, u in zip(rnd.p, ups))
        close(rnd.agg.state[key], expected)
        assert far(sum(ups) / 3, expected)
        close(evaluated[f"{name}.A"], frozen[f"{name}.A"])
        close(evaluated[key], expected)
    for k in range(3):
        rnd.assert_metrics(k, r, sum(r * m for m, _ in rnd.modules.values()))
    rnd.assert_base_unchanged()


def test_flora_round_merges_the_data_weighted_sum_of_products(build, monkeypatch):
    fed = build("flora")
    rnd = Round(fed, monkeypatch)
    s = scaling(fed)
    for name, (m, n) in rnd.modules.items():
        As, Bs = rnd.uploaded_factors(name)
        assert [a.shape for a in As] == [(r, n) for r in RANKS] and [b.shape for b in Bs] == [(m, r) for r in RANKS]
        assert not torch.equal(As[1][:2], As[2][:2])  # every client draws its own A
        ideal = sum(pk * B @ A for pk, A, B in zip(rnd.p, As, Bs))
        rnd.assert_base_moved_by(name, s * ideal)  # W ← W + s Σ p_k B_k A_k
        B, A = rnd.agg.state[f"{name}.merge.B"], rnd.agg.state[f"{name}.merge.A"]
        assert B.shape == (m, sum(RANKS)) and A.shape == (sum(RANKS), n)  # the stack is broadcast
        close(B @ A, ideal)
        assert far(sum(b @ a for a, b in zip(As, Bs)) / 3, ideal)
    for k, r in enumerate(RANKS):
        rnd.assert_metrics(k, r, sum(r * (m + n) for m, n in rnd.modules.values()))
    nxt = fed.algorithm.payload(rnd.agg.state, 0)  # round 2 carries round 1's stack
    assert nxt.config == {"round": 2}
    assert all(torch.equal(nxt.tensors[k], v) for k, v in rnd.agg.state.items() if k != "round")
    assert fed.algorithm.eval_factors(rnd.agg.state) == {}


def test_flexlora_round_keeps_the_weighted_sum_and_hands_out_svd_truncations(build, monkeypatch):
    fed = build("flexlora")
    rnd = Round(fed, monkeypatch)
    errors = []
    for name in rnd.modules:
        As, Bs = rnd.uploaded_factors(name)
        ideal = sum(pk * B.double() @ A.double() for pk, A, B in zip(rnd.p, As, Bs))
        global_BA = rnd.agg.state[f"{name}.B"] @ rnd.agg.state[f"{name}.A"]
        torch.testing.assert_close(global_BA.double(), ideal, rtol=1e-4, atol=1e-6)  # Σ r_k ≤ min(m, n): exact
        U, S, Vh = torch.linalg.svd(ideal, full_matrices=False)
        for k, r in enumerate(RANKS):
            mine = fed.algorithm.payload(rnd.agg.state, k).tensors
            best = (U[:, :r] * S[:r]) @ Vh[:r]  # Eckart–Young: the best rank-r approximation
            torch.testing.assert_close((mine[f"{name}.B"] @ mine[f"{name}.A"]).double(), best, rtol=1e-4, atol=1e-6)
            assert mine[f"{name}.A"].shape[0] == r
            if r < len(S) and float(S[r]) > 1e-6:
                assert float((ideal - best).norm()) > 0  # the truncation really drops something
        m, n = rnd.modules[name]
        keep = min(m, n, max(max(RANKS), sum(RANKS)))  # the exact rank of Σ p B A, at least r_max
        assert rnd.agg.state[f"{name}.B"].shape == (m, keep) and rnd.agg.state[f"{name}.A"].shape == (keep, n)
        assert rnd.agg.state[f"{name}.B"].dtype == rnd.agg.state[f"{name}.A"].dtype == torch.float32
        S32 = torch.linalg.svdvals(ideal)
        errors.append(float(S32[min(RANKS):].norm() / S32.norm()))  # the smallest client's truncation
    assert rnd.agg.metrics["truncation_error_min_rank"] == pytest.approx(sum(errors) / len(errors), rel=1e-3)
    for k, r in enumerate(RANKS):
        rnd.assert_metrics(k, r, sum(r * (m + n) for m, n in rnd.modules.values()))
    rnd.assert_base_unchanged()


def test_hetlora_round_pads_and_weights_a_and_b_by_update_norm(build, monkeypatch):
    fed = build("hetlora")
    rnd = Round(fed, monkeypatch)
    r_max = max(RANKS)
    for name, (m, n) in rnd.modules.items():
        As, Bs = rnd.uploaded_factors(name)
        for k, r in enumerate(RANKS):
            assert torch.equal(As[k], rnd.trained[k][f"{name}.A"][:r]) and torch.equal(Bs[k], rnd.trained[k][f"{name}.B"])
        norms = [float(torch.linalg.matrix_norm(B @ A)) for A, B in zip(As, Bs)]
        w = [x / sum(norms) for x in norms]
        assert max(w) - min(w) > 0.01  # norm weights differ from uniform ones
        A_pad = [torch.cat([A, torch.zeros(r_max - A.shape[0], n)]) for A in As]
        B_pad = [torch.cat([B, torch.zeros(m, r_max - B.shape[1])], dim=1) for B in Bs]
        expected_A = sum(wk * a for wk, a in zip(w, A_pad))
        expected_B = sum(wk * b for wk, b in zip(w, B_pad))
        close(rnd.agg.state[f"{name}.A"], expected_A)
        close(rnd.agg.state[f"{name}.B"], expected_B)
        assert far(sum(B_pad) / 3, expected_B) and far(sum(pk * b for pk, b in zip(rnd.p, B_pad)), expected_B)
        for k, r in enumerate(RANKS):  # next round, client k gets the truncation at its rank
            mine = fed.algorithm.payload(rnd.agg.state, k).tensors
            close(mine[f"{name}.A"], expected_A[:r])
            close(mine[f"{name}.B"], expected_B[:, :r])
    assert rnd.agg.state["ranks"].tolist() == RANKS  # round 1: no previous tail norm, no pruning
    for k, r in enumerate(RANKS):
        rnd.assert_metrics(k, r, sum(r * (m + n) for m, n in rnd.modules.values()))
        start = math.floor(0.99 * r)  # the tail ⌊γ r⌋ … r−1, γ = 0.99
        norm = sum(float(rnd.trained[k][f"{name}.A"][start:].norm() * rnd.trained[k][f"{name}.B"][:, start:].norm())
                   for name in rnd.modules)
        assert rnd.updates[k].metrics["tail_norm"] == pytest.approx(norm, rel=1e-5)
        assert float(rnd.client_states[k]["tail_norm"]) == pytest.approx(norm, rel=1e-5)
        assert rnd.reg_passed[k], "HETLoRA trained without its tail-norm penalty"
    rnd.assert_base_unchanged()


def test_aflora_round_from_trained_b_and_lambda_to_the_merged_base(build, monkeypatch):
    opts = {"beta": 0.5, "gamma": 0.01, "alpha": 0.5, "server_steps": 2}  # β low enough to prune at rank 8
    fed = build("aflora", **opts)
    rnd = Round(fed, monkeypatch)
    s, r_max = scaling(fed), max(RANKS)
    pruned = 0
    for k, r in enumerate(RANKS):
        reg = rnd.reg[k]
        assert reg is not None, "the client trained without eq. 10's column-norm regulariser"
        assert reg[0] == pytest.approx(reg[1], rel=1e-5) and reg[1] > 0
        for name in rnd.modules:
            trained = rnd.trained[k]
            A_global = rnd.state[f"{name}.A"]
            assert torch.equal(trained[f"{name}.A"], A_global[:r])  # A frozen at A_global[:r_k^1]
            mask = rnd.upload(k, f"{name}.mask")
            assert torch.equal(mask, trained[f"{name}.mask"]), "uploaded mask is not the one trained with"
            assert mask.tolist() == [1.0] * r  # round 1 trains every dimension
            h = mask.bool()
            B_up = trained[f"{name}.B"][:, h] * trained[f"{name}.lam"][h]  # B'_k = B[:, h] diag(λ[h])
            close(rnd.upload(k, f"{name}.B"), B_up)
            pruned += int(rnd.client_states[k][f"{name}.mask"].sum()) < r
    assert pruned > 0, "nothing pruned: the test cannot tell the trained mask from the pruned one"
    alpha = opts["alpha"]
    for name, (m, n) in rnd.modules.items():
        masks = [rnd.upload(k, f"{name}.mask") for k in range(3)]
        ranks = [int(h.sum()) for h in masks]
        raw = [math.log(1 + rk) * u.num_examples for rk, u in zip(ranks, rnd.updates)]
        p = [x / sum(raw) for x in raw]  # eq. 12, normalised
        padded = []
        for k, h in enumerate(masks):
            out = torch.zeros(m, r_max)
            out[:, torch.nonzero(h).flatten()] = rnd.upload(k, f"{name}.B")  # columns by H_k, zeros beyond
            padded.append(out)
        B_global = sum(pk * b for pk, b in zip(p, padded))  # eq. 13
        close(rnd.agg.state[f"{name}.B"], B_global)
        assert far(sum(pk * b for pk, b in zip(rnd.p, padded)), B_global)  # rank matters in p
        A_global = rnd.state[f"{name}.A"]
        exact = sum(
            pk * rnd.trained[k][f"{name}.B"] @ torch.diag(rnd.trained[k][f"{name}.lam"] * masks[k]) @ A_global[:r]
            for k, (pk, r) in enumerate(zip(p, RANKS))
        )
        torch.testing.assert_close(rnd.agg.state[f"{name}.B"] @ A_global, exact, rtol=1e-4, atol=1e-6)
        A_ft = rnd.a_ft[name]
        assert far(A_ft, A_global)  # the server's public steps moved A
        A_new = alpha * A_global + (1 - alpha) * A_ft  # eq. 11
        close(rnd.agg.state[f"{name}.A"], A_new)
        rnd.assert_base_moved_by(name, s * B_global @ A_new)  # W ← W + s B_global A'
        for k, r in enumerate(RANKS):  # round 2: A'[:r], and the base update for a client's own copy
            nxt = fed.algorithm.payload(rnd.agg.state, k)
            assert nxt.config == {"max_rank": r}
            close(nxt.tensors[f"{name}.A"], A_new[:r])
            close(nxt.tensors[f"{name}.merge.B"], B_global)
            close(nxt.tensors[f"{name}.merge.A_tail"], A_new[r:])
    for k, r in enumerate(RANKS):
        rnd.assert_metrics(k, r, sum(r * (m + 1) for m, _ in rnd.modules.values()))  # active B columns and λ
        nexts = [int(rnd.client_states[k][f"{name}.mask"].sum()) for name in rnd.modules]
        assert rnd.updates[k].metrics["next_rank"] == pytest.approx(sum(nexts) / len(nexts))


def test_hierfedlora_round_averages_each_layer_over_the_groups_that_trained_it(build, monkeypatch):
    depth = [2, 1]  # tiny-llama has 2 layers: group 0 trains both, group 1 the top one only
    fed = build("hierfedlora", groups=2, plan="fixed", tau=1, depth=depth)
    rnd = Round(fed, monkeypatch)
    groups = rnd.state["groups"].tolist()
    assert sorted(set(groups)) == [0, 1]
    layers = 2
    for name in rnd.modules:
        layer = int(name.split(".")[2])
        covering = [k for k in range(3) if layer >= layers - depth[groups[k]]]
        for k in range(3):
            assert (f"{name}.A" in rnd.updates[k].tensors) == (k in covering)  # only trained modules go up
        for f in "AB":
            key = f"{name}.{f}"
            total = sum(rnd.updates[k].num_examples for k in covering)
            expected = sum(rnd.updates[k].num_examples / total * rnd.upload(k, key) for k in covering)
            close(rnd.agg.state[key], expected)  # per layer: data-weighted over the groups covering it
            if f == "B" and len(covering) > 1:
                assert far(sum(rnd.upload(k, key) for k in covering) / len(covering), expected)
    assert any(len([k for k in range(3) if l >= layers - depth[groups[k]]]) < 3 for l in range(layers))
    r = min(RANKS)
    for k in range(3):
        trained = [name for name in rnd.modules if int(name.split(".")[2]) >= layers - depth[groups[k]]]
        rnd.assert_metrics(k, r, sum(r * sum(rnd.modules[name]) for name in trained))
        assert rnd.updates[k].metrics["group"] == groups[k] and rnd.updates[k].metrics["depth"] == depth[groups[k]]
    rnd.assert_base_unchanged()
