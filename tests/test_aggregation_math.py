"""The equations: exact padded aggregation, FedIT interference, eq. 8, eq. 10, eq. 12."""

import math

import pytest
import torch

from fedlora.algorithms.aflora import (
    AFLoRA,
    AFLoRAOptions,
    client_upload,
    column_norm_penalty,
    fuse,
    init_global_A,
    prune_mask,
    rank_weights,
    zero_pad,
)
from fedlora.aggregation.robust import RobustCombine, trimmed_mean
from fedlora.algorithms.base import FederationSetup, Update, lora_init, weighted_sum
from fedlora.algorithms.fedit import FedIT, FedITOptions


def _clients(seed=0, m=24, n=20, ranks=(8, 4, 4, 2)):
    g = torch.Generator().manual_seed(seed)
    r_max = max(ranks)
    A_global = init_global_A(r_max, n, 1.0, g)
    clients = []
    for r in ranks:
        B = torch.randn(m, r, generator=g)
        lam = torch.rand(r, generator=g) + 0.5
        mask = (torch.rand(r, generator=g) > 0.3).float()
        mask[0] = 1.0
        clients.append((B, lam, mask, int(torch.randint(10, 100, (1,), generator=g))))
    return A_global, clients, r_max


@pytest.mark.parametrize("mode", ["normalized", "paper-literal", "data"])
def test_padded_aggregation_equals_sum_of_client_products(mode):
    A_global, clients, r_max = _clients()
    ranks = [int(mask.sum()) for _, _, mask, _ in clients]
    p = rank_weights(ranks, [d for *_, d in clients], mode)
    padded = [zero_pad(client_upload(B, lam, mask), mask, r_max) for B, lam, mask, _ in clients]
    aggregated = weighted_sum(padded, p) @ A_global
    ideal = sum(
        pk * (B @ torch.diag(lam * mask) @ A_global[: B.shape[1]])
        for pk, (B, lam, mask, _) in zip(p, clients)
    )
    torch.testing.assert_close(aggregated, ideal, rtol=1e-5, atol=1e-5)


def test_fedit_separate_averaging_interferes():
    """FedIT's own aggregation averages A and B separately: the global product is
    (Σ p B)(Σ p A), not the clients' Σ p B A (eq. 2's interference)."""
    g = torch.Generator().manual_seed(0)
    m, n, r, K = 24, 20, 4, 5
    setup = FederationSetup({"w": (m, n)}, [r] * K, [10 * (k + 1) for k in range(K)], scaling=1.0, seed=0)
    fedit = FedIT(FedITOptions(), setup)
    updates = [Update(k, {"w.A": torch.randn(r, n, generator=g), "w.B": torch.randn(m, r, generator=g)}, 10 * (k + 1))
               for k in range(K)]
    state = fedit.aggregate(fedit.init_state(), updates, server=None).state
    p = [u.num_examples / sum(v.num_examples for v in updates) for u in updates]
    A = [u.tensors["w.A"] for u in updates]
    B = [u.tensors["w.B"] for u in updates]
    separate = sum(pk * b for pk, b in zip(p, B)) @ sum(pk * a for pk, a in zip(p, A))
    torch.testing.assert_close(state["w.B"] @ state["w.A"], separate)
    ideal = sum(pk * b @ a for pk, a, b in zip(p, A, B))
    rel = float((state["w.B"] @ state["w.A"] - ideal).norm() / ideal.norm())
    assert rel > 0.5, rel  # measured interference on random factors (≈0.9 here)


def test_zero_pad_places_columns_by_mask():
    B_up = torch.tensor([[1.0, 2.0], [3.0, 4.0]])
    out = zero_pad(B_up, torch.tensor([0.0, 1.0, 0.0, 1.0]), 6)
    assert out.tolist() == [[0, 1, 0, 2, 0, 0], [0, 3, 0, 4, 0, 0]]


def test_pruning_follows_eq8_on_hand_made_lambda():
    lam = torch.tensor([1.0, 0.1, 2.0, 0.5, 3.0, 0.0])
    mask = torch.tensor([1.0, 1.0, 1.0, 1.0, 1.0, 0.0])  # the last dim is already pruned
    e = lam[:5] ** 2  # 1, .01, 4, .25, 9
    sigma = float(e.std(unbiased=False))
    # paper-literal: keep λ² ≥ βσ
    assert sigma == pytest.approx(3.3880, abs=1e-3)  # sqrt(57.393 / 5)
    assert prune_mask(lam, mask, 1.0, 1, "paper-literal").tolist() == [0, 0, 1, 0, 1, 0]  # 3.39
    assert prune_mask(lam, mask, 0.2, 1, "paper-literal").tolist() == [1, 0, 1, 0, 1, 0]  # 0.68
    # zscore: keep λ² ≥ mean − βσ (mean 2.852)
    assert prune_mask(lam, mask, 0.5, 1, "zscore").tolist() == [0, 0, 1, 0, 1, 0]  # 1.158
    assert prune_mask(lam, mask, 0.6, 1, "zscore").tolist() == [1, 0, 1, 0, 1, 0]  # 0.819
    assert prune_mask(lam, mask, 1.0, 1, "zscore").tolist() == [1, 1, 1, 1, 1, 0]  # -0.54
    # β = 0 never prunes (literal rule), ranks never grow back, min_rank holds
    assert prune_mask(lam, mask, 0.0, 1, "paper-literal").tolist() == mask.tolist()
    assert prune_mask(lam, mask, 10.0, 2, "paper-literal").tolist() == [0, 0, 1, 0, 1, 0]
    assert prune_mask(lam, mask, 10.0, 1, "paper-literal").tolist() == [0, 0, 0, 0, 1, 0]


def test_regulariser_gradient_is_eq10():
    g = torch.Generator().manual_seed(0)
    B = torch.randn(7, 5, generator=g, requires_grad=True)
    mask = torch.tensor([1.0, 0.0, 1.0, 1.0, 0.0])
    gamma = 0.3
    column_norm_penalty(B, mask, gamma).backward()
    sq = (B.detach() ** 2).sum(0)
    expected = 4 * gamma * (sq - 1) * B.detach() * mask
    torch.testing.assert_close(B.grad, expected)
    value = column_norm_penalty(B.detach(), mask, gamma)
    assert float(value) == pytest.approx(gamma * float((((sq - 1) ** 2) * mask).sum()), rel=1e-6)


def test_rank_weights_eq12():
    ranks, sizes = [64, 8, 4], [100, 300, 600]
    p = rank_weights(ranks, sizes)
    raw = [math.log1p(r) * d for r, d in zip(ranks, sizes)]
    assert p == pytest.approx([x / sum(raw) for x in raw]) and sum(p) == pytest.approx(1)
    lit = rank_weights(ranks, sizes, "paper-literal")
    logs = [math.log1p(r) for r in ranks]
    assert lit == pytest.approx([lr / sum(logs) * d / sum(sizes) for lr, d in zip(logs, sizes)])
    assert sum(lit) < 1
    assert rank_weights(ranks, sizes, "data") == pytest.approx([0.1, 0.3, 0.6])  # |D_k| / Σ|D|, ranks ignored


def test_aflora_data_weighting_aggregates_by_data_size_alone():
    """`weighting: data` end to end: B_global = Σ |D_k|/Σ|D| · pad(B'_k), by hand; the default
    (rank-aware) gives the rank-2 client more than its data share."""
    setup = FederationSetup(module_shapes={"m": (3, 2)}, client_max_ranks=[2, 1], num_examples=[30, 10],
                            scaling=1.0, seed=0)
    updates = [Update(0, {"m.B": torch.full((3, 2), 4.0), "m.mask": torch.ones(2)}, 30),
               Update(1, {"m.B": torch.full((3, 1), 8.0), "m.mask": torch.ones(1)}, 10)]

    def aggregate(weighting):
        algo = AFLoRA(AFLoRAOptions(weighting=weighting, dlf=False), setup)
        return algo.aggregate(algo.init_state(), updates, None).state["m.B"]

    # column 0: 0.75·4 + 0.25·8 = 5; column 1: 0.75·4 + 0.25·0 = 3
    assert aggregate("data").tolist() == [[5.0, 3.0]] * 3
    p0 = 30 * math.log(3) / (30 * math.log(3) + 10 * math.log(2))
    torch.testing.assert_close(aggregate("normalized")[:, 1], torch.full((3,), 4 * p0))
    assert p0 > 0.75


def test_global_A_rows_have_norm_C_and_fuse_is_eq11():
    A = init_global_A(8, 30, 2.5, torch.Generator().manual_seed(0))
    torch.testing.assert_close(A.norm(dim=1), torch.full((8,), 2.5))
    A_ft = torch.ones_like(A)
    torch.testing.assert_close(fuse(A, A_ft, 0.3), 0.3 * A + 0.7 * A_ft)


def test_trimmed_mean_drops_each_coordinates_extremes_and_reweights():
    values = [torch.tensor([1.0, 100.0]), torch.tensor([2.0, -50.0]), torch.tensor([1e6, 3.0]),
              torch.tensor([4.0, 4.0]), torch.tensor([-1e6, 5.0])]
    weights = [0.1, 0.2, 0.3, 0.2, 0.2]
    out = trimmed_mean(values, weights, 0.2)  # drops one value at each end, per coordinate
    # coordinate 0 keeps 1, 2, 4 (weights .1 .2 .2); coordinate 1 keeps 3, 4, 5 (.3 .2 .2)
    expected = torch.tensor([(0.1 + 0.4 + 0.8) / 0.5, (0.9 + 0.8 + 1.0) / 0.7])
    assert torch.allclose(out, expected)
    # per coordinate whatever the shape: the same numbers as 2 × 1 matrices
    out2 = trimmed_mean([v.view(2, 1) for v in values], weights, 0.2)
    assert out2.shape == (2, 1) and torch.allclose(out2.flatten(), expected)
    # trim 0.4 of 5: ⌊2⌋ = 2 dropped at each end, the median is left
    assert torch.allclose(trimmed_mean(values, weights, 0.4), torch.tensor([2.0, 4.0]))


def test_trimmed_mean_with_nothing_to_trim_is_the_weighted_mean_exactly():
    values = [torch.randn(3, 4, generator=torch.Generator().manual_seed(k)) for k in range(4)]
    weights = [0.1, 0.2, 0.3, 0.4]
    assert torch.equal(trimmed_mean(values, weights, 0.2), weighted_sum(values, weights))  # ⌊0.8⌋ = 0


def test_fedit_averages_with_the_trimmed_mean_when_configured():
    """aggregation.combine trimmed_mean wraps FedIT's aggregate: A and B are the coordinate-wise trimmed
    means of the clients' factors with the data weights (the 1e6 client is trimmed everywhere)."""
    sizes = [10, 20, 30, 20, 20]
    setup = FederationSetup({"w": (4, 3)}, [2] * 5, sizes, scaling=1.0, seed=0)
    algo = RobustCombine(FedIT(FedITOptions(), setup), "trimmed_mean", trim=0.2)
    g = torch.Generator().manual_seed(0)
    updates = [Update(k, {"w.A": torch.randn(2, 3, generator=g) * (1e6 if k == 4 else 1.0),
                          "w.B": torch.randn(4, 2, generator=g)}, n) for k, n in enumerate(sizes)]
    state = algo.aggregate(algo.init_state(), updates, server=None).state
    p = [n / sum(sizes) for n in sizes]
    for key in ("w.A", "w.B"):
        torch.testing.assert_close(state[key], trimmed_mean([u.tensors[key] for u in updates], p, 0.2))
    assert float(state["w.A"].abs().max()) < 10


def test_weighted_sum_accumulates_in_float32():
    g = torch.Generator().manual_seed(2)
    halves = [torch.randn(5, 7, generator=g).half() for _ in range(3)]
    out = weighted_sum(halves, [0.2, 0.3, 0.5])
    assert out.dtype == torch.float32
    torch.testing.assert_close(out, sum(w * h.float() for w, h in zip([0.2, 0.3, 0.5], halves)))


def test_lora_init_is_seeded_peft_a_and_zero_b():
    shapes = {"q": (6, 16), "v": (4, 9)}
    torch.manual_seed(0)
    first = lora_init(shapes, 3, seed=7)
    torch.manual_seed(1)  # the global generator plays no part
    again, other = lora_init(shapes, 3, seed=7), lora_init(shapes, 3, seed=8)
    for name, (m, n) in shapes.items():
        A = first[f"{name}.A"]
        assert A.shape == (3, n) and float(A.abs().max()) <= 1 / n**0.5  # uniform(±1/√n)
        assert torch.equal(A, again[f"{name}.A"]) and not torch.equal(A, other[f"{name}.A"])
        assert torch.equal(first[f"{name}.B"], torch.zeros(m, 3))
