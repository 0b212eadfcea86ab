"""HierFedLoRA end to end on SmolLM2-135M (slow): a run on simulated devices, and the measured
step-time saving of a shallow fine-tuning depth."""

import statistics
import time

import pytest
from conftest import tiny_tree

from fedlora.adapters import layer_index
from fedlora.clock import train_flops
from fedlora.config import build_config
from fedlora.data.encode import sample_batches
from fedlora.runtime.inprocess import Federation, Simulation
from fedlora.runtime.outputs import read_metrics
from fedlora.train import classification_loss, train_steps

pytestmark = pytest.mark.slow


def _tree(**algo):
    return tiny_tree(
        model={"name": "smollm2-135m", "compute_dtype": "auto"},
        data={"train_examples": 200, "test_examples": 32, "max_length": 48},
        federation={"num_clients": 4, "client_max_ranks": [4] * 4, "rounds": 2, "local_steps": 1,
                    "batch_size": 4, "lr": 0.003},
        devices={"assign": ["high", "low", "mid", "high"]},
        algorithm={"name": "hierfedlora", "groups": 2, **algo},
    )


def test_hierfedlora_runs_on_simulated_devices(data_dir, tmp_path):
    sim = Simulation(build_config(_tree(time_budget=0.7)), tmp_path, progress=False)
    summary = sim.run()
    assert 0 <= summary["final_accuracy"] <= 1
    plan = sim.fed.algorithm.plan_table(sim.fed.algorithm.init_state())
    assert all(row["planned_seconds"] > 0 and 1 <= row["depth"] <= 30 for row in plan)
    for r in read_metrics(tmp_path):
        assert r["sim_seconds"] > 0 and r["mean_depth"] < 30  # the budget forces shallower training
        assert all(c["flops"] > 0 for c in r["clients"])


def test_shallow_depth_is_measurably_faster(data_dir):
    fed = Federation.build(build_config(_tree(plan="fixed", depth=30)))
    state = fed.algorithm.init_state()
    batches = sample_batches(fed.task.clients[0], 8, 1, 0, fed.pad_id)

    def step(depth):
        fed.adapters.load({k: v for k, v in state.items() if k.endswith((".A", ".B"))})
        for name, layer in fed.adapters.layers.items():
            if layer_index(name) >= 30 - depth:
                layer.set_factors(state[f"{name}.A"], state[f"{name}.B"], trainable={"A", "B"})
        flops = train_flops(fed.model, fed.adapters, batches, 4)
        t = time.perf_counter()
        train_steps([(fed.adapters.trainable_parameters(), 1e-3)], batches,
                    lambda b: classification_loss(fed.model, b, fed.task.label_ids, "classes"), None,
                    fed.cfg.model.compute_dtype)
        return time.perf_counter() - t, flops

    step(30), step(2)  # warm-up
    times = {30: [], 2: []}
    for _ in range(5):
        for d, ts in times.items():
            ts.append(step(d)[0])
    ratio = statistics.median(times[2]) / statistics.median(times[30])
    flop_ratio = step(2)[1] / step(30)[1]
    fed.adapters.clear()
    assert flop_ratio < 0.6
    assert ratio < 0.85, (ratio, flop_ratio)  # measured ≈ the FLOP ratio; margin for a shared CPU
