"""The simulated clock: FLOPs from the model's shapes, round time over lanes and stages, devices."""

import numpy as np
import pytest
from conftest import tiny_tree
from torch.utils.flop_counter import FlopCounterMode

from fedlora.clock import ModelShape, example_flops, lm_train_flops, loaded_modules, round_time, train_flops
from fedlora.config import ConfigError, build_config
from fedlora.data.encode import sample_batches
from fedlora.devices import (
    MBIT,
    DeviceProfile,
    DevicesConfig,
    mix_counts,
    resolve_profiles,
)
from fedlora.runtime.inprocess import Federation
from fedlora.train import classification_loss

# tiny-llama: 2 layers, hidden 32, 4 heads × 8, kv 2 heads × 8, MLP 64; q (32×32), k, v (16×32),
# o (32×32), gate, up (64×32), down (32×64).
SUM_MN = 32 * 32 + 16 * 32 + 16 * 32 + 32 * 32 + 64 * 32 + 64 * 32 + 32 * 64  # 9216
W = 32  # heads × head_dim


def hand_count(T: int, r: int, trained_layers: list[int], n_examples: int, rows: int = 4) -> float:
    """Forward + backward of one batch, written out (LoRA on q_proj (32×32), v_proj (16×32))."""
    lowest = min(trained_layers)
    lora_mn = [(32, 32), (16, 32)]
    per = 0.0
    for layer in range(2):
        per += 2 * T * SUM_MN + 4 * T * T * W  # base linears + attention, forward
        per += sum(2 * T * r * (m + n) for m, n in lora_mn)  # LoRA forward (A then B)
        if layer >= lowest:
            per += 2 * T * SUM_MN + 8 * T * T * W  # input gradients + attention backward
            per += sum(2 * T * r * (m + n) for m, n in lora_mn)  # gradient through B then A
            if layer in trained_layers:
                per += sum(2 * T * r * (m + n) for m, n in lora_mn)  # dB and dA
    per += 2 * 32 * rows * 2  # label rows at one position, forward and backward
    return n_examples * per


@pytest.fixture(scope="module")
def fedit_tiny():
    if not (__import__("conftest").DATA_DIR).exists():
        pytest.skip("shared data not found")
    return Federation.build(build_config(tiny_tree(algorithm={"name": "fedit"})))


@pytest.mark.parametrize("trained", [[0, 1], [1]])
def test_flops_match_hand_count_and_torch_counter(fedit_tiny, trained, monkeypatch):
    """The clock counts the full pass: the shared-prefix saving (train.hidden_states) is off
    here so that torch's counter sees the same pass (docs/concepts/time-to-accuracy.md: the clock over-counts by it)."""
    monkeypatch.setattr("fedlora.train.MIN_SHARED_PREFIX", 10**9)
    fed = fedit_tiny
    state = fed.algorithm.init_state()  # rank 2
    fed.adapters.load(state)
    for name, layer in fed.adapters.layers.items():
        if int(name.split(".")[2]) in trained:
            layer.set_factors(state[f"{name}.A"], state[f"{name}.B"], trainable={"A", "B"})
    batches = sample_batches(fed.task.clients[0], 4, 2, 0, fed.pad_id)
    widths = [b["input_ids"].shape[1] for b in batches]
    ours = train_flops(fed.model, fed.adapters, batches, 4)
    assert ours == sum(hand_count(T, 2, trained, 4) for T in widths)

    # Independent check: torch's counter on the real step with eager attention (its matmuls
    # are visible to the counter). The only difference is our documented over-count of the
    # lowest trained layer: q/k/v input gradients, the LoRA input path and the key gradient
    # (k_proj carries no LoRA there, so nothing needs dK).
    fed.model.set_attn_implementation("eager")
    try:
        with FlopCounterMode(display=False) as counter:
            for b in batches:
                classification_loss(fed.model, b, fed.task.label_ids, "classes").backward()
    finally:
        fed.model.set_attn_implementation("sdpa")
        fed.adapters.clear()
    over = sum(4 * (2 * T * (32 * 32 + 16 * 32 + 16 * 32) + 2 * T * 2 * (32 + 32) + 2 * T * T * W)
               for T in widths)
    assert ours == counter.get_total_flops() + over


def test_shape_read_from_model(fedit_tiny):
    shape = ModelShape.of(fedit_tiny.model)
    assert shape.num_layers == 2 and shape.attn_width == W and shape.vocab == fedit_tiny.model.config.vocab_size
    assert all(sum(m * n for m, n in layer) == SUM_MN for layer in shape.layers)


def test_no_trainable_factor_means_no_backward(fedit_tiny):
    fed = fedit_tiny
    fed.adapters.load(fed.algorithm.init_state())  # loaded, frozen
    batches = sample_batches(fed.task.clients[0], 4, 1, 0, fed.pad_id)
    T = batches[0]["input_ids"].shape[1]
    forward = 4 * (2 * (2 * T * SUM_MN + 4 * T * T * W + 2 * T * 2 * (64 + 48)) + 2 * 32 * 4)
    assert train_flops(fed.model, fed.adapters, batches, 4) == forward
    fed.adapters.clear()


def _profile(flops, up, down):
    return DeviceProfile("x", flops, up, down, 8)


def test_round_time_slowest_lane_sums_its_stages():
    profiles = [_profile(1e9, 1e6, 1e6), _profile(1e9, 1e6, 1e6), _profile(2e9, 1e6, 1e6)]
    clients = [
        {"id": 0, "flops": 2e9, "uplink_bytes": 1e6, "downlink_bytes": 0, "lane": 0, "stage": 0},  # 3 s
        {"id": 1, "flops": 1e9, "uplink_bytes": 0, "downlink_bytes": 0, "lane": 0, "stage": 0},  # 1 s
        {"id": 1, "flops": 1e9, "uplink_bytes": 0, "downlink_bytes": 2e6, "lane": 0, "stage": 1},  # 3 s
        {"id": 2, "flops": 8e9, "uplink_bytes": 0, "downlink_bytes": 0, "lane": 1, "stage": 0},  # 4 s
    ]
    total, per = round_time(clients, profiles, server_seconds=0.5)
    assert per == [3.0, 1.0, 3.0, 4.0]
    assert total == pytest.approx(6.5)  # lane 0: 3 + 3 > lane 1: 4; plus the server
    flat = [{k: v for k, v in c.items() if k not in ("lane", "stage")} for c in clients]
    assert round_time(flat, profiles, 0.0)[0] == 4.0  # one stage, one lane: the slowest client


def test_device_mix_is_seeded_and_exact():
    cfg = DevicesConfig(mix={"high": 0.25, "mid": 0.35, "low": 0.4}, spread=0.2)
    a, b = resolve_profiles(cfg, 20, 0), resolve_profiles(cfg, 20, 0)
    assert a == b and a != resolve_profiles(cfg, 20, 1)
    names = [p.device_class for p in a]
    assert {n: names.count(n) for n in set(names)} == {"high": 5, "mid": 7, "low": 8}
    assert mix_counts({"a": 1, "b": 1, "c": 1}, 10) == {"a": 4, "b": 3, "c": 3}
    plain = resolve_profiles(DevicesConfig(assign=["low", "high"]), 2, 0)
    assert plain[0].uplink == 5 * MBIT and plain[1].flops == 2e12


def test_ranks_from_devices_and_config_errors():
    tree = tiny_tree(devices={"classes": {"big": {"flops": 1e12, "uplink_mbps": 10, "downlink_mbps": 10,
                                                  "max_rank": 8}},
                              "assign": ["big", "low", "mid", "big"], "max_ranks": "devices"})
    del tree["federation"]["client_max_ranks"]
    cfg = build_config(tree)
    assert cfg.federation.client_max_ranks == [8, 4, 16, 8]
    assert [p.max_rank for p in cfg.device_profiles()] == [8, 4, 16, 8]
    with pytest.raises(ConfigError, match=r"^config error: federation.client_max_ranks: \[8, 4, 4, 2\] differs "
                       r"from the devices' ranks \[4, 4, 4, 4\]; leave it unset"):
        build_config(tiny_tree(devices={"max_ranks": "devices", "assign": ["low"] * 4}))
    tree["federation"]["client_max_ranks"] = [8, 4, 16, 8]  # as a run's config.yaml records them: resumable
    assert build_config(tree) == cfg
    with pytest.raises(ConfigError, match="^config error: devices.assign: 3 entries for 4 clients"):
        build_config(tiny_tree(devices={"assign": ["low"] * 3}))
    with pytest.raises(ConfigError, match="unknown device class 'tpu'"):
        build_config(tiny_tree(devices={"mix": {"tpu": 1.0}}))


def test_every_method_reports_simulated_time(data_dir, tmp_path):
    from fedlora.runtime.inprocess import Simulation
    from fedlora.runtime.outputs import read_metrics

    tree = tiny_tree(algorithm={"name": "fedit"}, devices={"assign": ["high", "mid", "low", "low"]},
                     federation={"rounds": 2, "local_steps": 1})
    Simulation(build_config(tree), tmp_path, progress=False).run()
    hist = read_metrics(tmp_path)
    for r in hist:
        slowest = max(c["sim_seconds"] for c in r["clients"])
        assert r["server_flops"] == 0 and r["server_sim_seconds"] == 0  # FedIT's server trains nothing
        assert r["sim_seconds"] == pytest.approx(slowest)  # the measured server seconds are not on the clock
        assert all(c["flops"] > 0 for c in r["clients"])
        assert max(r["clients"], key=lambda c: c["sim_seconds"])["id"] in (2, 3)  # a low device
    assert hist[1]["sim_time"] == pytest.approx(hist[0]["sim_seconds"] + hist[1]["sim_seconds"])
    assert np.isfinite(hist[-1]["wall_seconds"])


def test_server_lm_flops_count_the_head_at_every_labelled_position(data_dir, monkeypatch):
    """The server's public steps (causal-LM loss on the response tokens) read the whole vocabulary
    at each labelled target position, not at one per example; against torch's counter on the real
    step the only difference left is the documented over-count of the lowest trained layer."""
    import torch

    monkeypatch.setattr("fedlora.train.MIN_SHARED_PREFIX", 10**9)
    from fedlora.train import lm_loss

    fed = Federation.build(build_config(tiny_tree()))  # AFLoRA: the method with a public set
    assert fed.task.public
    shapes = fed.adapters.shapes()
    state = fed.algorithm.init_state()  # A at r_max rows
    factors = {**state, **{k[:-2] + ".B": torch.zeros(shapes[k[:-2]][0], a.shape[0]) for k, a in state.items()}}
    fed.adapters.load(factors, trainable={"A"})  # AFLoRA's A fine-tuning: A trains, B frozen, every layer
    batches = sample_batches(fed.task.public, 4, 2, 0, fed.pad_id)
    shape = ModelShape.of(fed.model)
    lora = loaded_modules(fed.adapters)
    ours = lm_train_flops(fed.model, fed.adapters, batches)
    by_hand = 0.0
    for b in batches:
        n, T = b["input_ids"].shape
        positions = int((b["labels"][:, 1:] != -100).sum())
        assert n < positions  # several response tokens per example
        by_hand += n * example_flops(shape, T, lora, shape.vocab, head_positions=0)
        by_hand += positions * 2 * shape.hidden * shape.vocab * 2  # head rows, forward and input gradient
    assert ours == pytest.approx(by_hand, rel=1e-12)
    fed.model.set_attn_implementation("eager")
    try:
        with FlopCounterMode(display=False) as counter:
            for b in batches:
                lm_loss(fed.model, b).backward()
    finally:
        fed.model.set_attn_implementation("sdpa")
        fed.adapters.clear()
    assert counter.get_total_flops() <= ours <= 1.25 * counter.get_total_flops()


def _one_aflora_round(tmp_path, name, devices=None):
    from fedlora.runtime.inprocess import Simulation
    from fedlora.runtime.outputs import read_metrics

    tree = tiny_tree(federation={"rounds": 1, "local_steps": 1}, devices=devices or {})
    Simulation(build_config(tree), tmp_path / name, progress=False).run()
    return read_metrics(tmp_path / name)[0]


def test_a_slowed_server_changes_measured_seconds_not_simulated_time(data_dir, tmp_path, monkeypatch):
    """Issue 31: the machine's load must not reach the simulated clock. The server's public steps
    slowed by a second change `server_seconds` (the diagnostic) and nothing simulated; the
    server's share is its counted FLOPs over the declared server device."""
    import time

    from fedlora.runtime.context import PublicServer

    normal = _one_aflora_round(tmp_path, "normal")
    train_public = PublicServer.train_public

    def slowed(self, *args, **kwargs):
        time.sleep(1.0)
        return train_public(self, *args, **kwargs)

    monkeypatch.setattr(PublicServer, "train_public", slowed)
    slow = _one_aflora_round(tmp_path, "slow")
    assert slow["server_seconds"] >= normal["server_seconds"] + 0.9
    assert slow["server_flops"] == normal["server_flops"] > 0
    for key in ("sim_seconds", "sim_time", "server_sim_seconds"):
        assert slow[key] == normal[key], key
    assert normal["server_sim_seconds"] == normal["server_flops"] / 1e13  # the `server` preset
    slowest = max(c["sim_seconds"] for c in normal["clients"])
    assert normal["sim_seconds"] == pytest.approx(slowest + normal["server_sim_seconds"])

    fast = _one_aflora_round(tmp_path, "fast", {"classes": {"gpu": {"flops": 1e15, "uplink_mbps": 1,
                                                                    "downlink_mbps": 1, "max_rank": 8}},
                                                "server": "gpu"})
    assert fast["server_sim_seconds"] == pytest.approx(normal["server_sim_seconds"] / 100)
    measured = _one_aflora_round(tmp_path, "measured", {"server_time": "measured"})  # the old clock: load shows
    assert measured["server_sim_seconds"] == measured["server_seconds"] >= 1.0


def test_server_device_must_be_known():
    with pytest.raises(ConfigError, match="unknown device class 'tpu'"):
        build_config(tiny_tree(devices={"server": "tpu"}))
