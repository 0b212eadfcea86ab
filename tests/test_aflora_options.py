"""AFLoRA's options for an informative λ (issue 15, item 2): typed, tested, default unchanged."""

from __future__ import annotations

import json

import pytest
import torch
from conftest import tiny_tree
from safetensors.torch import load_file

from fedlora.algorithms.aflora import unit_columns
from fedlora.config import ConfigError, build_config
from fedlora.runtime.inprocess import Simulation
from fedlora.train import optimizers

# The paper-literal path as the code computed it before these options existed (commit 22f64d5,
# tiny-llama, tiny_tree with beta 0.5, two rounds): the defaults must reproduce it exactly.
BEFORE = {
    "train_loss": [1.3740895837545395, 1.394010916352272],
    "server_loss": [4.756601095199585, 4.727068662643433],
    "next_ranks": [{"0": 7.0, "1": 3.25, "2": 3.0, "3": 1.25}, {"0": 5.75, "1": 2.0, "2": 2.0, "3": 1.25}],
    "abs_sum": {
        "model.layers.0.self_attn.q_proj.A": 36.28557444631588,
        "model.layers.0.self_attn.q_proj.B": 1.7123537212937663,
        "model.layers.0.self_attn.v_proj.A": 36.58371659880504,
        "model.layers.0.self_attn.v_proj.B": 0.7927526390703861,
    },
}


def _run(tmp_path, rounds: int = 2, **algo) -> list[dict]:
    tree = tiny_tree(federation={"rounds": rounds}, algorithm={"name": "aflora", "server_steps": 2, "beta": 0.5, **algo})
    Simulation(build_config(tree), tmp_path, progress=False).run()
    return [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]


def test_defaults_reproduce_the_code_before_the_options(data_dir, tmp_path):
    records = _run(tmp_path / "default")
    assert [r["train_loss"] for r in records] == pytest.approx(BEFORE["train_loss"], rel=1e-6)
    assert [r["server_loss"] for r in records] == pytest.approx(BEFORE["server_loss"], rel=1e-6)
    assert [r["next_ranks"] for r in records] == BEFORE["next_ranks"]
    state = load_file(str(tmp_path / "default" / "final_state.safetensors"))
    for key, want in BEFORE["abs_sum"].items():
        assert float(state[key].double().abs().sum()) == pytest.approx(want, rel=1e-6)

    moved = [c["lambda_moved"] for c in records[0]["clients"]]
    faster = [c["lambda_moved"] for c in _run(tmp_path / "fast", rounds=1, lambda_lr=0.1)[0]["clients"]]
    assert all(f > 5 * m for f, m in zip(faster, moved))  # Adam: λ moves ≈ lambda_lr per step


def test_unit_b_start_with_lambda_from_zero(data_dir, tmp_path):
    """b_init unit + λ from 0: ‖b_j‖ = 1 at the start, so λ² tracks the contribution."""
    records = _run(tmp_path, rounds=1, b_init="unit", lambda_init=0.0, lambda_persist=False,
                   lambda_optimizer="sgd", lambda_lr=1.0)
    clients = records[0]["clients"]
    assert all(c["lambda_moved"] > 0 and c["lambda_sq_std"] > 0 for c in clients)
    assert all(c["lambda_spearman"] > 0.9 for c in clients if "lambda_spearman" in c)
    B = unit_columns(7, 3, torch.Generator().manual_seed(0))
    assert B.norm(dim=0).tolist() == pytest.approx([1.0] * 3)


def test_sgd_group_steps_by_the_gradient_and_adam_by_about_lr():
    p, q = torch.nn.Parameter(torch.zeros(2)), torch.nn.Parameter(torch.zeros(2))
    opts = optimizers([([p], 0.1), ([q], 0.1, "sgd")])
    (torch.tensor([1.0, 100.0]) * (p + q)).sum().backward()
    for opt in opts:
        opt.step()
    assert q.detach().tolist() == pytest.approx([-0.1, -10.0])  # lr × gradient
    assert p.detach().tolist() == pytest.approx([-0.1, -0.1], rel=1e-4)  # Adam: ≈ lr each
    with pytest.raises(ValueError, match="nothing to train"):
        optimizers([([], 0.1)])


@pytest.mark.parametrize(
    "algo, message",
    [
        ({"b_init": "unit"}, "config error: algorithm: b_init: unit needs lambda_init: 0 and lambda_persist: false"),
        ({"b_init": "ones"}, "config error: algorithm.b_init: Input should be 'zeros' or 'unit'"),
        ({"lambda_optimizer": "rmsprop"}, "config error: algorithm.lambda_optimizer: Input should be 'adam' or 'sgd'"),
        ({"lambda_init": -1}, "config error: algorithm.lambda_init: Input should be greater than or equal to 0"),
        ({"pruning_check": -2}, "config error: algorithm.pruning_check: Input should be greater than or equal to 0"),
    ],
)
def test_bad_options_give_one_line(algo, message):
    with pytest.raises(ConfigError) as err:
        build_config(tiny_tree(algorithm={"name": "aflora", **algo}))
    assert str(err.value) == message or str(err.value).startswith(message)
    assert "\n" not in str(err.value)
