"""AFLoRA's diagnostics (issue 15, item 1): rank correlation, pruned-vs-random, server measures."""

from __future__ import annotations

import json

import pytest
import torch
from conftest import tiny_tree
from torch import nn

from fedlora.adapters import LoRALayer
from fedlora.algorithms.aflora import prune_mask
from fedlora.config import build_config
from fedlora.data.alpaca import heldout_indices, public_indices
from fedlora.diagnostics import (
    column_contributions,
    lambda_diagnostics,
    mean_over_modules,
    pruning_loss_increase,
    spearman,
)
from fedlora.report import write_report
from fedlora.runtime.inprocess import Simulation


def test_spearman_known_orderings():
    x = torch.tensor([0.1, 0.5, 2.0, 3.0, 7.0])
    assert spearman(x, x**3 + 1) == pytest.approx(1.0)  # same order, different scale
    assert spearman(x, -x) == pytest.approx(-1.0)
    assert spearman(x, torch.tensor([1.0, 2.0, 3.0, 5.0, 4.0])) == pytest.approx(0.9)  # 1 − 6·2/(5·24)
    assert spearman(torch.tensor([1.0, 1.0, 2.0]), torch.tensor([1.0, 2.0, 3.0])) == pytest.approx(0.8660254)  # ties
    assert spearman(torch.ones(3), x[:3]) is None and spearman(x[:1], x[:1]) is None


def test_column_contribution_is_the_rank_one_norm():
    g = torch.Generator().manual_seed(0)
    A, B, lam = torch.randn(3, 5, generator=g), torch.randn(4, 3, generator=g), torch.tensor([0.5, -2.0, 1.0])
    want = [float(torch.linalg.matrix_norm(0.7 * lam[j] * torch.outer(B[:, j], A[j]))) for j in range(3)]
    assert column_contributions(B, lam, A, 0.7).tolist() == pytest.approx(want, rel=1e-5)


def test_lambda_diagnostics_over_active_dims():
    A, B = torch.eye(4), torch.eye(4)  # unit rows and columns: contribution = s|λ|
    start, lam = torch.ones(4), torch.tensor([2.0, 1.0, 3.0, 9.0])
    d = lambda_diagnostics(start, lam, B, A, torch.tensor([1.0, 1.0, 1.0, 0.0]), 0.5)
    assert d["lambda_spearman"] == pytest.approx(1.0)
    assert d["lambda_moved"] == pytest.approx(2.0)  # the masked dim (moved 8) does not count
    assert d["lambda_sq_std"] == pytest.approx(torch.tensor([4.0, 1.0, 9.0]).std(unbiased=False).item())
    B2 = B * torch.tensor([1.0, 100.0, 0.01, 1.0])  # ‖b_j‖ reverses the order of s|λ_j|‖b_j‖
    assert lambda_diagnostics(start, lam, B2, A, torch.ones(4), 0.5)["lambda_spearman"] < 0
    assert mean_over_modules([{"a": 1.0, "b": 2.0}, {"a": 3.0}]) == {"a": 2.0, "b": 2.0}


def _hand_made_layer() -> tuple[LoRALayer, torch.Tensor, torch.Tensor]:
    """A zero base with six unit dims, λ² large on three and tiny on three; the target is the
    full adapter's output, so every switched-off column raises the loss by its own energy."""
    base = nn.Linear(6, 6, bias=False)
    nn.init.zeros_(base.weight)
    layer = LoRALayer(base, scaling=1.0)
    lam = torch.tensor([3.0, 0.05, 2.5, 0.1, 2.0, 0.02])
    layer.set_factors(torch.eye(6), torch.eye(6), lam, torch.ones(6))
    x = torch.randn(32, 6, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        target = layer(x)
    return layer, x, target


def test_pruning_what_ddr_prunes_costs_less_than_random_pruning():
    layer, x, target = _hand_made_layer()

    @torch.no_grad()
    def loss() -> float:
        return float(((layer(x) - target) ** 2).mean())

    new_mask = prune_mask(layer.lam, layer.mask, beta=0.5, min_rank=1)
    assert new_mask.tolist() == [1, 0, 1, 0, 1, 0]  # the three tiny λ² go
    ddr, rand = pruning_loss_increase([layer], [new_mask], loss, torch.Generator().manual_seed(0), draws=8)
    assert 0 <= ddr < 0.01 < rand  # random draws of three switch off big columns too
    assert layer.mask.tolist() == [1.0] * 6 and loss() == 0.0  # the trained mask is restored
    assert pruning_loss_increase([layer], [torch.ones(6)], loss, torch.Generator()) is None  # nothing pruned


def test_run_logs_diagnostics_and_report_plots_them(data_dir, tmp_path):
    tree = tiny_tree(federation={"rounds": 2}, algorithm={"name": "aflora", "server_steps": 2, "beta": 0.5,
                                                         "pruning_check": 2},
                     public_data={"heldout_examples": 4})
    Simulation(build_config(tree), tmp_path, progress=False).run()
    records = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    clients = [c for r in records for c in r["clients"]]
    assert all({"lambda_sq_std", "lambda_moved", "pruned"} <= set(c) for c in clients)
    assert any("lambda_spearman" in c for c in clients)
    assert all(c["pruned"] == 4 * (c["rank"] - c["next_rank"]) for c in clients)  # 4 modules, mean ranks
    checked = [c for c in clients if c["pruned"] > 0]
    assert checked and all("prune_loss_ddr" in c and "prune_loss_random" in c for c in checked)
    for r in records:
        assert r["server_a_change"] > 0
        assert {"server_heldout_before", "server_heldout_ft", "server_heldout_after"} <= set(r)
    assert records[0]["server_heldout_before"] != records[0]["server_heldout_ft"]  # A moved
    text = write_report(tmp_path).read_text()
    for name in ("lambda_spearman", "lambda_sq_std", "pruned", "prune_loss_ddr", "server_heldout", "server_a_change"):
        assert f"figures/{name}.png" in text and (tmp_path / "figures" / f"{name}.png").stat().st_size > 1000
    row = next(line for line in text.splitlines() if line.startswith("| 1 |"))  # round 1's means over clients
    mean_pruned = sum(c["pruned"] for c in records[0]["clients"]) / len(records[0]["clients"])
    assert f"{mean_pruned:.4g}" in row.split(" | ")


def test_heldout_public_examples_are_outside_the_public_set():
    public = public_indices(1000, 0.02, 3)
    held = heldout_indices(1000, public, 16, 3)
    assert len(held) == 16 and not set(held) & set(public)
    assert held == heldout_indices(1000, public, 16, 3) and held != heldout_indices(1000, public, 16, 4)
