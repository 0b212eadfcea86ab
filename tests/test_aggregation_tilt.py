"""The tilt of an aggregation (issue 15, item 3): each client's weight p_k and share of ΔW."""

from __future__ import annotations

import json
import math

import pytest
import torch
from conftest import tiny_tree

from fedlora.algorithms.aflora import AFLoRA, AFLoRAOptions, client_upload, init_global_A
from fedlora.algorithms.base import DIAGNOSTIC_SECONDS, FederationSetup, Update
from fedlora.algorithms.fedit import FedIT, FedITOptions
from fedlora.config import build_config
from fedlora.aggregation.robust import RobustCombine
from fedlora.diagnostics import aggregation_tilt, delta_shares, product_norm
from fedlora.report import write_report
from fedlora.runtime.inprocess import Simulation


def _unit(m: int, j: int) -> torch.Tensor:
    e = torch.zeros(m, 1)
    e[j] = 1.0
    return e


def test_shares_of_orthogonal_updates_by_hand():
    """Module 1: client 0's term 3·e1e1ᵀ (norm 3), client 1's 4·e2e2ᵀ (norm 4), p = (¼, ¾):
    weighted norms 0.75 and 3. Module 2: client 0's term has norm 2, client 1's is zero,
    p = (½, ½): 1 and 0. Shares: 1.75 / 4.75 and 3 / 4.75. Wrong code this catches: dropping
    p_k (3/7), squared norms, the norm of the sum in the denominator, per-module shares
    averaged (0.6, 0.4) instead of norms summed over modules."""
    e1, e2 = _unit(4, 0), _unit(4, 1)
    module1 = [(0.25, 3 * e1, e1.T), (0.75, 4 * e2, e2.T)]
    module2 = [(0.5, 2 * e1, e2.T), (0.5, torch.zeros(4, 1), e1.T)]
    assert delta_shares([module1, module2]) == pytest.approx([7 / 19, 12 / 19])
    assert delta_shares([module1]) == pytest.approx([0.2, 0.8])
    tilt = aggregation_tilt([3, 7], [module1, module2])  # keyed by client id, as `ranks`
    assert tilt["client_weight"] == pytest.approx({"3": 0.375, "7": 0.625})  # mean of p_k over modules
    assert tilt["delta_share"] == pytest.approx({"3": 7 / 19, "7": 12 / 19})
    zero = [[(0.5, torch.zeros(4, 1), e1.T), (0.5, torch.zeros(4, 1), e2.T)]]
    assert delta_shares(zero) is None and "delta_share" not in aggregation_tilt([0, 1], zero)


def test_product_norm_and_shares_sum_to_one():
    g = torch.Generator().manual_seed(0)
    terms = [[(float(torch.rand(1, generator=g)), torch.randn(9, r, generator=g), torch.randn(r, 7, generator=g))
              for r in (1, 3, 5)] for _ in range(2)]
    for module in terms:
        for _, B, A in module:  # the Gram-matrix formula is the norm of the product
            assert product_norm(B, A) == pytest.approx(float(torch.linalg.matrix_norm(B.double() @ A.double())), rel=1e-9)
    shares = delta_shares(terms)
    assert sum(shares) == pytest.approx(1.0) and all(x > 0 for x in shares)


def _aflora_updates(ranks=(8, 4, 4, 2), sizes=(30, 10, 50, 20), m=12, n=10, seed=0):
    """Hand-made AFLoRA uploads with pruned columns (per-module ranks below the max)."""
    g = torch.Generator().manual_seed(seed)
    A = init_global_A(max(ranks), n, 1.0, g)
    updates, products = [], []
    for k, (r, d) in enumerate(zip(ranks, sizes)):
        B, lam = torch.randn(m, r, generator=g), torch.rand(r, generator=g) + 0.5
        mask = torch.ones(r)
        mask[1::3] = 0.0  # drop every third column from the second on
        updates.append(Update(k, {"w.B": client_upload(B, lam, mask), "w.mask": mask}, d))
        products.append(B @ torch.diag(lam * mask) @ A[:r])  # B_k Λ_k A_k, client k's ΔW_k / s
    setup = FederationSetup({"w": (m, n)}, list(ranks), list(sizes), scaling=0.5, seed=seed)
    return setup, {"w.A": A}, updates, products


@pytest.mark.parametrize("weighting", ["normalized", "data", "paper-literal"])
def test_aflora_logs_weights_and_shares(weighting):
    """The weights are eq. 12's (∝ log(1 + r_k)|D_k| with r_k the uploaded rank) or FedAvg's
    (∝ |D_k|); the shares are the norms of p_k B_k Λ_k A_k computed here from the client's own
    factors (not from the padding code), so a wrong pad, weight or A is caught."""
    setup, state, updates, products = _aflora_updates()
    aflora = AFLoRA(AFLoRAOptions(weighting=weighting, dlf=False), setup)
    agg = aflora.aggregate(state, updates, server=None)
    sizes = [u.num_examples for u in updates]
    ranks = [int(u.tensors["w.mask"].sum()) for u in updates]  # pruned from 8, 4, 4, 2
    assert ranks == [5, 3, 3, 1]
    if weighting == "data":
        want = [d / sum(sizes) for d in sizes]
    elif weighting == "normalized":
        raw = [math.log1p(r) * d for r, d in zip(ranks, sizes)]
        want = [x / sum(raw) for x in raw]
    else:
        logs = [math.log1p(r) for r in ranks]
        want = [lr / sum(logs) * d / sum(sizes) for lr, d in zip(logs, sizes)]
    assert list(agg.metrics["client_weight"].values()) == pytest.approx(want)
    assert list(agg.metrics["client_weight"]) == ["0", "1", "2", "3"]
    norms = [p * float(torch.linalg.matrix_norm(prod)) for p, prod in zip(want, products)]
    assert list(agg.metrics["delta_share"].values()) == pytest.approx([x / sum(norms) for x in norms], rel=1e-5)
    assert sum(agg.metrics["delta_share"].values()) == pytest.approx(1.0)


def test_weighting_moves_the_share_towards_high_rank_clients():
    """Same data sizes, uploaded ranks 5 vs 1: rank-aware weights give the high-rank client more
    weight (log 6 / (log 6 + log 2)) than data weights (1/2), and so a larger share of ΔW."""
    setup, state, updates, _ = _aflora_updates(ranks=(8, 2), sizes=(10, 10))
    tilt = {w: AFLoRA(AFLoRAOptions(weighting=w, dlf=False), setup).aggregate(state, updates, None).metrics
            for w in ("normalized", "data")}
    assert tilt["data"]["client_weight"] == pytest.approx({"0": 0.5, "1": 0.5})
    assert tilt["normalized"]["client_weight"]["0"] == pytest.approx(math.log(6) / (math.log(6) + math.log(2)))
    assert tilt["normalized"]["delta_share"]["0"] > tilt["data"]["delta_share"]["0"]


def test_fedit_share_is_each_b_times_the_averaged_a():
    """FedIT's global B A = Σ_k p_k B_k Ā: client k's term is its B_k times the averaged A
    (not its own A_k); no tilt under a trimmed mean (no sum of client terms)."""
    g = torch.Generator().manual_seed(1)
    m, n, r, sizes = 6, 5, 2, [10, 30, 60]
    setup = FederationSetup({"w": (m, n)}, [r] * 3, sizes, scaling=1.0, seed=0)
    updates = [Update(k, {"w.A": torch.randn(r, n, generator=g), "w.B": torch.randn(m, r, generator=g)}, d)
               for k, d in enumerate(sizes)]
    agg = FedIT(FedITOptions(), setup).aggregate({"w.A": torch.zeros(r, n), "w.B": torch.zeros(m, r)}, updates, None)
    p = [0.1, 0.3, 0.6]
    assert list(agg.metrics["client_weight"].values()) == pytest.approx(p)
    A_bar = sum(pk * u.tensors["w.A"] for pk, u in zip(p, updates))
    norms = [pk * float(torch.linalg.matrix_norm(u.tensors["w.B"] @ A_bar)) for pk, u in zip(p, updates)]
    assert list(agg.metrics["delta_share"].values()) == pytest.approx([x / sum(norms) for x in norms], rel=1e-5)
    trimmed = RobustCombine(FedIT(FedITOptions(), setup), "trimmed_mean", trim=0.34)
    assert set(trimmed.aggregate(agg.state, updates, None).metrics) == {DIAGNOSTIC_SECONDS}


def _norm(B: torch.Tensor, A: torch.Tensor) -> float:
    return float(torch.linalg.matrix_norm(B.double() @ A.double()))


@pytest.mark.parametrize("method", ["ffa", "flora", "flexlora", "hetlora"])
def test_other_methods_shares_follow_their_terms(method):
    """Each method's client term (docs/concepts/methods/aflora.md, "Aggregation tilt"), computed here from the uploads:
    FFA-LoRA p_k B_k A (the frozen A), FLoRA and FlexLoRA p_k B_k A_k, HETLoRA w_k B_k Ā[:r_k]
    (sparsity weights, the averaged A)."""
    from fedlora.algorithms import ffa, flexlora, flora, hetlora

    g = torch.Generator().manual_seed(2)
    m, n, sizes = 6, 5, [10, 30, 60]
    ranks = [2, 2, 2] if method == "ffa" else [4, 2, 1]
    setup = FederationSetup({"w": (m, n)}, ranks, sizes, scaling=1.0, seed=0)
    algo = {"ffa": lambda: ffa.FFALoRA(ffa.FFALoRAOptions(), setup),
            "flora": lambda: flora.FLoRA(flora.FLoRAOptions(), setup),
            "flexlora": lambda: flexlora.FlexLoRA(flexlora.FlexLoRAOptions(), setup),
            "hetlora": lambda: hetlora.HETLoRA(hetlora.HETLoRAOptions(), setup)}[method]()
    updates = [Update(k, {"w.A": torch.randn(r, n, generator=g), "w.B": torch.randn(m, r, generator=g)}, d)
               for k, (r, d) in enumerate(zip(ranks, sizes))]
    if method == "ffa":
        updates = [Update(u.client_id, {"w.B": u.tensors["w.B"]}, u.num_examples) for u in updates]
    agg = algo.aggregate(algo.init_state(), updates, None)
    p = [0.1, 0.3, 0.6]
    if method == "ffa":
        norms = [pk * _norm(u.tensors["w.B"], algo.A["w.A"]) for pk, u in zip(p, updates)]
    elif method == "hetlora":
        p = hetlora.sparsity_weights([_norm(u.tensors["w.B"], u.tensors["w.A"]) for u in updates])
        A_bar = agg.state["w.A"]
        norms = [pk * _norm(u.tensors["w.B"], A_bar[: u.tensors["w.B"].shape[1]]) for pk, u in zip(p, updates)]
    else:
        norms = [pk * _norm(u.tensors["w.B"], u.tensors["w.A"]) for pk, u in zip(p, updates)]
    assert list(agg.metrics["client_weight"].values()) == pytest.approx(p, rel=1e-5)
    assert list(agg.metrics["delta_share"].values()) == pytest.approx([x / sum(norms) for x in norms], rel=1e-5)


def test_one_round_run_logs_the_tilt_and_report_tabulates_it(data_dir, tmp_path):
    tree = tiny_tree(federation={"rounds": 1}, algorithm={"name": "aflora", "server_steps": 1, "weighting": "data"})
    Simulation(build_config(tree), tmp_path, progress=False).run()
    record = json.loads((tmp_path / "metrics.jsonl").read_text().splitlines()[0])
    ids = [str(c["id"]) for c in record["clients"]]
    sizes = [sum(row) for row in json.loads((tmp_path / "partition.json").read_text())["examples_per_client_per_label"]]
    assert sorted(record["client_weight"]) == sorted(ids) == sorted(record["delta_share"])
    assert [record["client_weight"][c] for c in ids] == pytest.approx([sizes[int(c)] / sum(sizes) for c in ids])
    assert sum(record["delta_share"].values()) == pytest.approx(1.0)
    assert all(x > 0 for x in record["delta_share"].values())
    text = write_report(tmp_path).read_text()
    assert "## Aggregation tilt" in text
    row = next(line for line in text.splitlines() if line.startswith("| 0 | 8 |"))  # client 0, max rank 8
    cells = row.strip("| ").split(" | ")
    assert cells[2] == str(sizes[0]) and cells[3] == "1"
    assert cells[4] == f"{record['client_weight']['0']:.4g}" and cells[5] == f"{record['delta_share']['0']:.4g}"


def test_diagnostic_seconds_stay_out_of_the_server_time(data_dir, tmp_path, monkeypatch):
    """Measuring the tilt is not aggregating: a slow diagnostic must not make a method's server
    (and so its simulated round) slower; its seconds are recorded apart."""
    import time

    import fedlora.algorithms.base as base

    slow_tilt = base.aggregation_tilt

    def tilt_taking_half_a_second(*args, **kwargs):
        time.sleep(0.5)
        return slow_tilt(*args, **kwargs)

    monkeypatch.setattr(base, "aggregation_tilt", tilt_taking_half_a_second)
    tree = tiny_tree(federation={"rounds": 1}, algorithm={"name": "fedit"})
    Simulation(build_config(tree), tmp_path, progress=False).run()
    record = json.loads((tmp_path / "metrics.jsonl").read_text().splitlines()[0])
    assert "delta_share" in record and base.DIAGNOSTIC_SECONDS not in record
    assert 0 <= record["server_seconds"] < 0.4 and 0.5 <= record["server_diagnostic_seconds"] < 1.0


@pytest.mark.parametrize("dlf", [True, False])
def test_aflora_held_out_loss_seconds_stay_out_of_the_server_time(data_dir, tmp_path, monkeypatch, dlf):
    """AFLoRA's three held-out loss passes and the tilt are measurements: a second each here,
    yet the server time stays below one second; without the server's steps nothing is subtracted that
    was not spent (the server time is never negative)."""
    import time

    from fedlora.runtime.context import PublicServer

    measured = PublicServer.heldout_loss

    def slow_heldout_loss(self):
        time.sleep(1.0)
        return measured(self)

    monkeypatch.setattr(PublicServer, "heldout_loss", slow_heldout_loss)
    from fedlora.algorithms import base

    tilt = base.aggregation_tilt

    def slow_tilt(*args):  # the tilt is a measurement too: its second must go as well
        time.sleep(1.0)
        return tilt(*args)

    monkeypatch.setattr(base, "aggregation_tilt", slow_tilt)
    tree = tiny_tree(federation={"rounds": 1}, algorithm={"name": "aflora", "server_steps": 1, "dlf": dlf})
    Simulation(build_config(tree), tmp_path, progress=False).run()
    record = json.loads((tmp_path / "metrics.jsonl").read_text().splitlines()[0])
    assert ("server_heldout_before" in record) == dlf and "diagnostic_seconds" not in record
    assert 0 <= record["server_seconds"] < 1.0
    # three held-out passes and the tilt, a second each, each counted once
    assert 3.0 * dlf + 1.0 <= record["server_diagnostic_seconds"] < 3.0 * dlf + 2.5
