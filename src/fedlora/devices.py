"""Device profiles: how fast each simulated client computes and communicates, and what rank it fits.

Both seed papers are about resource heterogeneity, so a run can describe its devices and
the simulated clock (`fedlora.clock`) turns FLOPs and bytes into seconds on them. Devices
come from named classes (built-in presets or the user's own), assigned per client or drawn
with the run's seed from a mix; an optional log-normal spread makes devices of one class
differ. AFLoRA's per-client max ranks can be derived from the profiles.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal

import numpy as np
from pydantic import Field, model_validator

from fedlora.schema import Strict

MBIT = 1e6 / 8  # bytes per second in one Mbit/s


class DeviceClass(Strict):
    """One kind of device. Throughput is what training sustains, not the chip's peak."""

    flops: float = Field(gt=0)
    """Sustained training throughput in FLOP/s."""
    uplink_mbps: float = Field(gt=0)
    """Upload bandwidth in Mbit/s."""
    downlink_mbps: float = Field(gt=0)
    """Download bandwidth in Mbit/s."""
    max_rank: int = Field(ge=1)
    """The largest LoRA rank the device's memory allows."""


# Presets (ours; orders of magnitude of edge boards and phones, not measurements).
PRESETS: dict[str, DeviceClass] = {
    "high": DeviceClass(flops=2.0e12, uplink_mbps=50, downlink_mbps=100, max_rank=64),
    "mid": DeviceClass(flops=5.0e11, uplink_mbps=20, downlink_mbps=50, max_rank=16),
    "low": DeviceClass(flops=1.0e11, uplink_mbps=5, downlink_mbps=20, max_rank=4),
    "reference": DeviceClass(flops=1.0e12, uplink_mbps=100, downlink_mbps=100, max_rank=64),
}


class DevicesConfig(Strict):
    """The `devices:` section. Without it every client is the `reference` preset."""

    classes: dict[str, DeviceClass] = Field(default_factory=dict)
    """Named device classes `{name: {flops, uplink_mbps, downlink_mbps, max_rank}}`; they add
    to (or replace) the presets high, mid, low, reference."""
    assign: list[str] | None = None
    """One class name per client (client k gets assign[k])."""
    mix: dict[str, float] | None = None
    """Class name → share of clients; counts are rounded (largest remainder), then assigned
    by a seeded shuffle."""
    spread: float = Field(0.0, ge=0)
    """σ of a seeded log-normal factor on each device's throughput and bandwidths (0: none)."""
    max_ranks: Literal["config", "devices"] = "config"
    """`devices`: federation.client_max_ranks is taken from each client's device class (leave
    that key unset); `config`: from federation.client_max_ranks."""
    server_time: Literal["measured", "none"] = "measured"
    """Server share of a round's simulated time: the measured aggregation seconds
    (`server_seconds`, diagnostics excluded), or none."""

    @model_validator(mode="after")
    def _names_known(self) -> DevicesConfig:
        if self.assign is not None and self.mix is not None:
            raise ValueError("give either assign or mix, not both")
        known = {**PRESETS, **self.classes}
        for name in [*(self.assign or []), *(self.mix or {})]:
            if name not in known:
                raise ValueError(f"unknown device class {name!r} (known: {sorted(known)})")
        if self.mix is not None and (not self.mix or any(v < 0 for v in self.mix.values())
                                     or sum(self.mix.values()) <= 0):
            raise ValueError("mix: shares must be >= 0 with a positive sum")
        return self


@dataclass(frozen=True)
class DeviceProfile:
    """One client's device, in SI units (FLOP/s, bytes/s)."""

    device_class: str
    flops: float
    uplink: float
    downlink: float
    max_rank: int

    def seconds(self, flops: float, bytes_up: float, bytes_down: float) -> float:
        return flops / self.flops + bytes_up / self.uplink + bytes_down / self.downlink


AUTO_RANK_CAP = 64  # the paper's largest client rank


def capability_rank(throughput: float, fastest: float, cap: int = AUTO_RANK_CAP,
                    free_bytes: float | None = None, bytes_per_rank: float | None = None) -> int:
    """AFLoRA's "rank based on client resources" as one written rule, the same in simulation
    (device profiles) and deployment (what nodes measured):

        r = 2 ** round(log2(cap * throughput / fastest)), within [1, cap],

    so a client half as fast as the fastest gets half its rank (on the presets: high 64, mid 16,
    low 4). When the client's free memory is known and the model's adapter cost per rank too,
    r is also at most the largest power of two whose adapter, gradient and Adam state
    (`bytes_per_rank` per unit of rank) fit in a quarter of that memory."""
    if throughput <= 0 or fastest <= 0 or throughput > fastest:
        raise ValueError(f"throughput {throughput:g} must be in (0, fastest={fastest:g}]")
    rank = 2 ** round(math.log2(cap * throughput / fastest))
    rank = int(min(cap, max(1, rank)))
    if free_bytes is not None and bytes_per_rank:
        fits = free_bytes / 4 / bytes_per_rank
        if fits < 1:
            raise ValueError(f"free memory {free_bytes / 2**20:.0f} MiB cannot hold a rank-1 adapter")
        rank = min(rank, 2 ** int(math.floor(math.log2(fits))))
    return rank


def capability_ranks(throughputs: list[float], cap: int = AUTO_RANK_CAP) -> list[int]:
    """Every client's rank by `capability_rank`, relative to the fastest of them."""
    fastest = max(throughputs)
    return [capability_rank(t, fastest, cap) for t in throughputs]


def mix_counts(mix: dict[str, float], n: int) -> dict[str, int]:
    """Largest-remainder rounding of shares to exactly n devices (names in the given order)."""
    total = sum(mix.values())
    raw = {k: n * v / total for k, v in mix.items()}
    counts = {k: int(v) for k, v in raw.items()}
    rest = sorted(raw, key=lambda k: counts[k] - raw[k])  # largest remainder first
    for k in rest[: n - sum(counts.values())]:
        counts[k] += 1
    return counts


def resolve_profiles(cfg: DevicesConfig | None, num_clients: int, seed: int) -> list[DeviceProfile]:
    """Each client's device profile; same config and seed give the same devices."""
    cfg = cfg or DevicesConfig()
    known = {**PRESETS, **cfg.classes}
    rng = np.random.default_rng([seed, 0xDE71CE])
    if cfg.assign is not None:
        if len(cfg.assign) != num_clients:
            raise ValueError(f"devices.assign: {len(cfg.assign)} entries for {num_clients} clients")
        names = list(cfg.assign)
    elif cfg.mix is not None:
        names = [k for k, c in mix_counts(cfg.mix, num_clients).items() for _ in range(c)]
        names = [names[i] for i in rng.permutation(num_clients)]
    else:
        names = ["reference"] * num_clients
    out = []
    for name in names:
        c = known[name]
        f = np.exp(rng.normal(0.0, cfg.spread, size=3)) if cfg.spread else np.ones(3)
        out.append(DeviceProfile(name, c.flops * f[0], c.uplink_mbps * MBIT * f[1],
                                 c.downlink_mbps * MBIT * f[2], c.max_rank))
    return out
