"""Device profiles: how fast each simulated client computes and communicates, and what rank it fits.

Both seed papers are about resource heterogeneity, so a run can describe its devices and
the simulated clock (`fedlora.clock`) turns FLOPs and bytes into seconds on them. Devices
come from named classes (built-in presets or the user's own), assigned per client or drawn
with the run's seed from a mix; an optional log-normal spread makes devices of one class
differ. AFLoRA's per-client max ranks can be derived from the profiles.

A deployment can take each client's device from what its Flower node measured or declared
instead (`devices: measured`, docs/concepts/measured-devices.md): the server records the
figures here (`MeasuredDevices`) and from then on they are profiles like any other, so the
clock, HierFedLoRA's grouping and `client_max_ranks: auto` use one rule for both.
"""

from __future__ import annotations

import math
from collections.abc import Iterable
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
    # the aggregation server: one data-centre accelerator at a modest sustained share of its peak
    "server": DeviceClass(flops=1.0e13, uplink_mbps=1000, downlink_mbps=1000, max_rank=64),
}


MAX_THROUGHPUT = 1e17
"""FLOP/s no single device sustains in training (a hundred of today's largest accelerators):
a larger reported throughput is refused as untrue."""
MAX_MEMORY = 2.0**50
"""Bytes of free memory no device has (1 PiB)."""
MAX_LINK_MBPS = 1e6
"""Mbit/s no device's link carries (1 Tbit/s)."""
SOURCES = ("measured", "declared", "assumed")
"""How a figure was obtained: measured on the node, declared in its node config, or (link
rates a node did not report) assumed: the `reference` preset's."""


class MeasuredDevice(Strict):
    """One client's device as its node reported it (a Flower run's server writes these)."""

    throughput: float = Field(gt=0, le=MAX_THROUGHPUT)
    """Training throughput in FLOP/s: the simulated clock's FLOP count of a timed warm-up of real
    LoRA steps at the run's batch shape, over its seconds (or the node's declared figure)."""
    free_memory: float | None = Field(None, gt=0, le=MAX_MEMORY)
    """Free memory in bytes (MemAvailable, or the room left under the node's cgroup limit when that
    is smaller); None: not reported (no memory cap on the rank)."""
    uplink_mbps: float = Field(gt=0, le=MAX_LINK_MBPS)
    """Upload rate in Mbit/s."""
    downlink_mbps: float = Field(gt=0, le=MAX_LINK_MBPS)
    """Download rate in Mbit/s."""
    sources: dict[Literal["throughput", "free_memory", "uplink_mbps", "downlink_mbps"],
                  Literal["measured", "declared", "assumed"]] = Field(default_factory=dict)
    """How each figure was obtained (`measured`, `declared`, `assumed`)."""


class MeasuredDevices(Strict):
    """`devices.measured`: every client's reported device, in client order, and the adapter's
    memory per unit of rank that the memory cap of `client_max_ranks: auto` needs."""

    clients: list[MeasuredDevice] = Field(min_length=1)
    """Client k's figures at position k."""
    bytes_per_rank: float | None = Field(None, gt=0)
    """Bytes one unit of LoRA rank costs a training client on this model (`adapter_bytes_per_rank`:
    the factors, their gradients and Adam's two moments, in float32); None: no memory cap."""


class DevicesConfig(Strict):
    """The `devices:` section. Without it every client is the `reference` preset."""

    source: Literal["profiles", "measured"] = "profiles"
    """`profiles`: each client's device from the classes below (simulation); `measured`: from
    what its Flower node measured or declared in its `query` reply (deployment; `devices: measured`
    is short for this). A measured run records the figures in `measured`; the in-process runtime
    refuses `measured` without them (it has no nodes to ask)."""
    measured: MeasuredDevices | None = None
    """Set by the Flower server from the nodes' reports (recorded in the run's config.yaml, so a
    resume, `fedlora run --replay` and `compare` use the figures the run used); not written by hand."""

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
    max_ranks: Literal["config", "devices", "auto"] = "config"
    """`devices`: federation.client_max_ranks is taken from each client's device class (leave
    that key unset); `auto` (what `federation.client_max_ranks: auto` sets): from each client's
    throughput and free memory by the capability rule (`capability_rank`); `config`: from
    federation.client_max_ranks."""
    server: str = "server"
    """Device class of the server (a preset or one of `classes`): its `flops` throughput turns the
    server's training FLOPs (AFLoRA's A fine-tuning) into simulated seconds."""
    server_time: Literal["flops", "measured", "none"] = "flops"
    """Server share of a round's simulated time: `flops`, its training FLOPs on the `server`
    device (independent of the machine's load); `measured`, the aggregation's wall seconds on
    this machine (`server_seconds`, diagnostics excluded; what runs before issue 31 used, they
    vary with load); `none`, free."""

    @model_validator(mode="after")
    def _names_known(self) -> DevicesConfig:
        if self.assign is not None and self.mix is not None:
            raise ValueError("give either assign or mix, not both")
        known = {**PRESETS, **self.classes}
        for name in [*(self.assign or []), *(self.mix or {}), self.server]:
            if name not in known:
                raise ValueError(f"unknown device class {name!r} (known: {sorted(known)})")
        if self.mix is not None and (not self.mix or any(v < 0 for v in self.mix.values())
                                     or sum(self.mix.values()) <= 0):
            raise ValueError("mix: shares must be >= 0 with a positive sum")
        if self.source == "measured":
            given = [k for k in ("assign", "mix") if getattr(self, k) is not None] + (["spread"] if self.spread else [])
            if given:
                raise ValueError(f"{given[0]}: describes device profiles; devices: measured takes each client's "
                                 "device from its node's report")
            if self.max_ranks == "devices":
                raise ValueError("max_ranks: devices reads the profiles' declared ranks; measured devices declare "
                                 "none (use federation.client_max_ranks: auto)")
        elif self.measured is not None:
            raise ValueError("measured: node figures need source: measured")
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
ADAPTER_STATE_COPIES = 4  # a trained factor's value, gradient and Adam's two moments
FLOAT_BYTES = 4


def adapter_bytes_per_rank(module_shapes: Iterable[tuple[int, int]]) -> float:
    """Bytes one unit of rank costs a training client: A (r × n) and B (m × r) on every target
    module, each with its gradient and Adam's two moments, in float32."""
    return float(ADAPTER_STATE_COPIES * FLOAT_BYTES * sum(m + n for m, n in module_shapes))


def memory_rank_cap(free_bytes: float, bytes_per_rank: float, cap: int = AUTO_RANK_CAP) -> int:
    """The largest power of two (at most `cap`) whose adapter state fits in a quarter of
    `free_bytes` (the rest for the model, activations and the data); ValueError if not even rank 1."""
    fits = free_bytes / 4 / bytes_per_rank
    if fits < 1:
        raise ValueError(f"free memory {free_bytes / 2**20:.0f} MiB cannot hold a rank-1 adapter")
    return min(cap, 2 ** math.floor(math.log2(fits)))


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
        rank = min(rank, memory_rank_cap(free_bytes, bytes_per_rank, cap))
    return rank


def capability_ranks(throughputs: list[float], cap: int = AUTO_RANK_CAP, free_bytes: list[float | None] | None = None,
                     bytes_per_rank: float | None = None) -> list[int]:
    """Every client's rank by `capability_rank`, relative to the fastest of them (and capped by
    its free memory where both that and the adapter's bytes per rank are known)."""
    fastest = max(throughputs)
    free = free_bytes or [None] * len(throughputs)
    out = []
    for k, (t, f) in enumerate(zip(throughputs, free)):
        try:
            out.append(capability_rank(t, fastest, cap, f, bytes_per_rank))
        except ValueError as err:
            raise ValueError(f"client {k}: {err}") from None
    return out


def auto_ranks(cfg: DevicesConfig, profiles: list[DeviceProfile]) -> list[int]:
    """`client_max_ranks: auto`: the capability rule on the clients' devices, profiles or
    measured alike (the measured ones add their free memory)."""
    measured = cfg.measured
    free = [c.free_memory for c in measured.clients] if measured else None
    return capability_ranks([p.flops for p in profiles], free_bytes=free,
                            bytes_per_rank=measured.bytes_per_rank if measured else None)


def mix_counts(mix: dict[str, float], n: int) -> dict[str, int]:
    """Largest-remainder rounding of shares to exactly n devices (names in the given order)."""
    total = sum(mix.values())
    raw = {k: n * v / total for k, v in mix.items()}
    counts = {k: int(v) for k, v in raw.items()}
    rest = sorted(raw, key=lambda k: counts[k] - raw[k])  # largest remainder first
    for k in rest[: n - sum(counts.values())]:
        counts[k] += 1
    return counts


def measured_profiles(measured: MeasuredDevices | None, num_clients: int) -> list[DeviceProfile]:
    """The nodes' reported devices as profiles (their max_rank: the memory cap, else the largest)."""
    if measured is None:
        raise ValueError("devices: measured: no client figures yet; they come from the Flower nodes' reports "
                         "(fedlora flower run); in-process, describe the devices as profiles (devices.assign or mix), "
                         "which go through the same rule")
    if len(measured.clients) != num_clients:
        raise ValueError(f"devices.measured: {len(measured.clients)} clients for {num_clients}")
    out = []
    for c in measured.clients:
        rank = AUTO_RANK_CAP
        if c.free_memory is not None and measured.bytes_per_rank:
            # (a client below rank 1 is refused by `auto_ranks` when the ranks are derived from this)
            rank = max(1, min(AUTO_RANK_CAP, int(c.free_memory / 4 / measured.bytes_per_rank)))
            rank = 2 ** math.floor(math.log2(rank))
        out.append(DeviceProfile("measured", c.throughput, c.uplink_mbps * MBIT, c.downlink_mbps * MBIT, rank))
    return out


def resolve_profiles(cfg: DevicesConfig | None, num_clients: int, seed: int) -> list[DeviceProfile]:
    """Each client's device profile; same config and seed give the same devices."""
    cfg = cfg or DevicesConfig()
    if cfg.source == "measured":
        return measured_profiles(cfg.measured, num_clients)
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


def server_profile(cfg: DevicesConfig | None) -> DeviceProfile:
    """The server's device (no spread: there is one server)."""
    cfg = cfg or DevicesConfig()
    c = {**PRESETS, **cfg.classes}[cfg.server]
    return DeviceProfile(cfg.server, c.flops, c.uplink_mbps * MBIT, c.downlink_mbps * MBIT, c.max_rank)
