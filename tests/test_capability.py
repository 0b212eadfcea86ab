"""The capability rule behind `client_max_ranks: auto`: one rule for simulated profiles and for
what nodes measure; a slower or memory-poor client gets the smaller rank."""

import pytest
from conftest import tiny_tree

from fedlora.config import ConfigError, build_config
from fedlora.devices import PRESETS, capability_rank, capability_ranks


def test_rule_on_the_presets_gives_their_declared_ranks():
    """r = 2^round(log2(64 · f / f_max)): high 64, mid 16 (a quarter as fast), low 4 (3.2 rounds
    to 4 in log space), reference 32 (half as fast)."""
    flops = [PRESETS[k].flops for k in ("high", "mid", "low", "reference")]
    assert capability_ranks(flops) == [64, 16, 4, 32]
    assert [PRESETS[k].max_rank for k in ("high", "mid", "low")] == [64, 16, 4]


@pytest.mark.parametrize(("share", "rank"), [(1.0, 64), (0.72, 64), (0.70, 32), (0.6, 32), (0.3, 16), (0.01, 1), (0.001, 1)])
def test_rule_rounds_in_log_space_within_bounds(share, rank):
    assert capability_rank(share * 1e9, 1e9) == rank


def test_memory_caps_the_rank():
    """A fast client whose free memory holds the adapter state of only 10 units of rank (a
    quarter of its memory) gets 8, the largest power of two that fits."""
    per_rank = 1e6
    assert capability_rank(1e9, 1e9, free_bytes=4 * 10 * per_rank, bytes_per_rank=per_rank) == 8
    assert capability_rank(1e9, 1e9, free_bytes=4 * 1e3 * per_rank, bytes_per_rank=per_rank) == 64
    with pytest.raises(ValueError, match="cannot hold a rank-1 adapter"):
        capability_rank(1e9, 1e9, free_bytes=per_rank, bytes_per_rank=per_rank)


def test_throughput_outside_range_is_refused():
    with pytest.raises(ValueError, match="must be in"):
        capability_rank(2e9, 1e9)
    with pytest.raises(ValueError, match="must be in"):
        capability_rank(0, 1e9)


def test_auto_ranks_in_config_follow_the_devices():
    tree = tiny_tree(federation={"num_clients": 3, "client_max_ranks": "auto"},
                     devices={"assign": ["low", "high", "mid"]})
    cfg = build_config(tree)
    assert cfg.federation.client_max_ranks == [4, 64, 16]
    again = build_config({**tree, "federation": {**tree["federation"], "client_max_ranks": [4, 64, 16]}})
    assert again.federation.client_max_ranks == [4, 64, 16]


def test_auto_and_devices_ranks_together_are_one_line():
    tree = tiny_tree(federation={"num_clients": 2, "client_max_ranks": "auto"},
                     devices={"assign": ["low", "high"], "max_ranks": "devices"})
    with pytest.raises(ConfigError, match="both set the ranks") as err:
        build_config(tree)
    assert "\n" not in str(err.value)
