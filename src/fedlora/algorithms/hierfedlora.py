"""HierFedLoRA (Liu et al., arXiv 2503.21213; abstract only): near-IID groups, per-group
intra-group aggregation frequency τ_g and fine-tuning depth d_g, layer-wise global aggregation.

Every choice below is ours (the paper's text is not available); docs/concepts/methods/hierfedlora.md lists them
with their alternatives.

1. Grouping: devices, largest first (ties in a seeded order), each join the group (with room
   under the size cap) whose label distribution after adding them is closest to the global
   one (KL(group ‖ global) or L1); the first G devices seed the G groups. Then pairwise swaps
   between groups while they lower the summed distance (`refine`). Once at the start;
   `regroup_every` N re-runs it with a new seeded tie order. Option `speed_weight` w > 0
   adds w · ln(slowest / fastest full-depth cycle of the group's devices) to each group's
   distance, so groups also gather devices of like speed and a fast group can take τ > 1
   (w = 0, the default, groups by labels alone, as the abstract describes).
2. A global round is `max τ_g` stages: in stage s the members of groups with τ_g > s train
   from their group's model, then each group averages its members (FedAvg, data-weighted):
   `aggregate_stage`. Groups are lanes: they run in parallel on the simulated clock.
3. Depth d_g: a member loads every global factor (the forward pass needs them) but trains A
   and B only in the last d_g decoder layers; nothing below requires a gradient, so autograd
   stops there. It uploads only the trained modules.
4. (τ_g, d_g) `plan: auto`: each group's cycle time at depth d is its slowest member's
   local-training FLOPs / FLOP/s + upload / uplink + download / downlink. Round budget
   T* = time_budget × the slowest group's full-depth single-cycle time; each group takes
   the (τ, d) with τ·cycle(d) ≤ T* that maximises τ·d (ties: deeper), else (1, min_depth).
   `plan: fixed` takes τ and d from the config.
5. Global aggregation, per module: the data-weighted average (group weight = its
   participants' examples) of A and of B over the groups whose depth covers the module's
   layer; modules no group trained keep their value. Like FedIT, the global LoRA persists
   across rounds (no merge into the base) and A, B are averaged separately.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import Literal

import numpy as np
import torch
from pydantic import Field

from fedlora.algorithms.base import (
    Aggregate,
    Algorithm,
    ClientContext,
    FederationSetup,
    Message,
    MethodOptions,
    ServerContext,
    Tensors,
    Update,
    common_rank,
    data_weights,
    lora_init,
    weighted_sum,
)
from fedlora.algorithms.registry import register_method

log = logging.getLogger("fedlora")
FLOAT_BYTES = 4


class HierFedLoRAOptions(MethodOptions):
    name: Literal["hierfedlora"] = "hierfedlora"
    rank: int | None = Field(None, ge=1)
    """Homogeneous rank; None: the smallest client max rank."""
    groups: int = Field(4, ge=1)
    """G, the number of near-IID groups."""
    group_size_cap: int | None = Field(None, ge=1)
    """Max devices per group; None: ceil(K / groups)."""
    distance: Literal["kl", "l1"] = "kl"
    """Distance of a group's label distribution to the global one: `kl`
    (KL(group ‖ global)) or `l1`."""
    refine: bool = True
    """Improve the greedy grouping by swapping devices between groups while the summed distance
    falls (the greedy pass alone was sometimes worse than a random grouping:
    docs/concepts/methods/hierfedlora.md)."""
    speed_weight: float = Field(0.0, ge=0)
    """w: a group's distance also counts w · ln(slowest ÷ fastest full-depth cycle time of its
    devices), so groups gather devices of like speed; 0 groups by labels alone. Needs device
    profiles."""
    regroup_every: int | None = Field(None, ge=1)
    """Re-run the grouping every N rounds (new seeded tie order); None: once at the start."""
    plan: Literal["auto", "fixed"] = "auto"
    """`auto`: each group's (τ_g, d_g) from the devices; `fixed`: from `tau` and `depth`."""
    tau: int | list[int] = Field(1)
    """plan fixed: intra-group cycles per global round, one for all groups or one per group."""
    depth: int | list[int] | None = None
    """plan fixed: trained layers from the output, one or one per group; None: all layers."""
    tau_max: int = Field(3, ge=1)
    """plan auto: the largest τ considered."""
    min_depth: int = Field(1, ge=1)
    """plan auto: the smallest depth considered."""
    time_budget: float = Field(0.5, gt=0)
    """plan auto: T* as a fraction of the slowest group's one full-depth cycle."""


def distribution(counts: np.ndarray) -> np.ndarray:
    total = counts.sum()
    return counts / total if total > 0 else np.zeros_like(counts, dtype=float)


def label_distance(p: np.ndarray, q: np.ndarray, kind: str) -> float:
    """KL(p ‖ q) (0·log 0 = 0; q > 0 wherever the data has a class) or L1."""
    if kind == "l1":
        return float(np.abs(p - q).sum())
    nz = p > 0
    return float((p[nz] * np.log(p[nz] / q[nz])).sum())


def speed_spread(seconds: np.ndarray, members: list[int]) -> float:
    """ln(slowest / fastest) device time among `members` (0 for one device or none)."""
    if len(members) < 2:
        return 0.0
    t = seconds[members]
    return float(np.log(t.max() / t.min()))


def near_iid_groups(counts: list[list[int]], num_groups: int, cap: int | None, kind: str,
                    seed: int | list[int], refine: bool = True, seconds: list[float] | None = None,
                    speed_weight: float = 0.0) -> list[list[int]]:
    """Greedy near-IID grouping (module doc, 1); returns the members of each non-empty group.
    With `seconds` (each device's cycle time) and `speed_weight` > 0 a group's distance adds
    speed_weight · speed_spread."""
    table = np.asarray(counts, dtype=float)
    k = len(table)
    g_count = min(num_groups, k)
    cap = cap or -(-k // g_count)
    if cap * g_count < k:
        raise ValueError(f"algorithm.group_size_cap: {g_count} groups of at most {cap} cannot hold {k} clients")
    target = distribution(table.sum(0))
    times = np.asarray(seconds if seconds is not None else np.ones(k), dtype=float)

    def cost(sums: np.ndarray, group: list[int]) -> float:
        spread = speed_weight * speed_spread(times, group) if speed_weight else 0.0
        return label_distance(distribution(sums), target, kind) + spread

    tie = np.random.default_rng(seed).permutation(k)
    order = sorted(range(k), key=lambda i: (-table[i].sum(), tie[i]))
    members: list[list[int]] = [[] for _ in range(g_count)]
    sums = np.zeros((g_count, table.shape[1]))
    for i in order:
        empty = [g for g in range(g_count) if not members[g]]
        if empty:
            best = empty[0]
        else:
            room = [g for g in range(g_count) if len(members[g]) < cap]
            best = min(room, key=lambda g: (cost(sums[g] + table[i], [*members[g], i]), len(members[g]), g))
        members[best].append(i)
        sums[best] += table[i]
    if refine:
        members = swap_refine(table, members, cost)
    return [sorted(m) for m in members if m]


def swap_refine(table: np.ndarray, members: list[list[int]], cost: Callable[[np.ndarray, list[int]], float],
                max_passes: int = 20) -> list[list[int]]:
    """Local search after the greedy pass: swap two devices of different groups whenever that
    lowers the summed group cost (`cost(label sums, members)`); stop when no swap helps."""
    members = [list(m) for m in members]
    sums = [table[m].sum(0) for m in members]
    for _ in range(max_passes):
        improved = False
        for a in range(len(members)):
            for b in range(a + 1, len(members)):
                for i in list(members[a]):
                    for j in list(members[b]):
                        sa, sb = sums[a] - table[i] + table[j], sums[b] - table[j] + table[i]
                        ma = [j if x == i else x for x in members[a]]
                        mb = [i if x == j else x for x in members[b]]
                        if cost(sa, ma) + cost(sb, mb) < cost(sums[a], members[a]) + cost(sums[b], members[b]) - 1e-12:
                            members[a].remove(i), members[b].remove(j)
                            members[a].append(j), members[b].append(i)
                            sums[a], sums[b] = sa, sb
                            improved = True
                            break
        if not improved:
            break
    return members


@register_method
class HierFedLoRA(Algorithm):
    name = "hierfedlora"
    Options = HierFedLoRAOptions
    homogeneous = True  # A and B at one rank; the static cost row is its full-depth upper bound
    cost_note = " (full depth: an upper bound)"
    compared_by_default = False  # its grouping and depths are planned for the config's devices

    def __init__(self, options: HierFedLoRAOptions, setup: FederationSetup) -> None:
        super().__init__(options, setup)
        self._plans: dict[tuple[int, ...], list[tuple[int, int]]] = {}
        self.rank = common_rank(options.rank, setup.client_max_ranks)
        n = min(options.groups, len(setup.num_examples))
        for field, value in (("tau", options.tau), ("depth", options.depth)):
            if isinstance(value, list) and len(value) != n:
                raise ValueError(f"algorithm.{field}: need one value per group ({n} groups), got {len(value)}")

    @property
    def num_layers(self) -> int:
        return self.setup.num_layers or 1 + max((i for i in self.setup.module_layers.values() if i is not None),
                                                default=0)

    def check_setup(self) -> None:
        """What grouping and planning need from the runtime (eval_factors needs none of it, so
        `fedlora export` can build the method from shapes alone)."""
        o, setup = self.options, self.setup
        missing = [m for m in setup.module_shapes if setup.module_layers.get(m) is None]
        if missing:
            raise ValueError(f"model.target_modules: {missing[0]} is not inside a decoder layer (depth needs one)")
        if o.min_depth > self.num_layers:
            raise ValueError(f"algorithm.min_depth: {o.min_depth} exceeds the {self.num_layers} layers")
        if o.plan == "auto" and (not setup.devices or setup.train_flops is None):
            raise ValueError("algorithm.plan: auto needs device profiles and a FLOP model from the runtime")
        if o.speed_weight and (not setup.devices or setup.train_flops is None):
            raise ValueError("algorithm.speed_weight: needs device profiles and a FLOP model from the runtime")
        if not setup.label_counts:
            raise ValueError("algorithm: hierfedlora needs each client's label counts for grouping")

    # ---- grouping and plan -------------------------------------------------------------
    def grouping(self, epoch: int) -> list[list[int]]:
        o = self.options
        seconds = None
        if o.speed_weight:
            seconds = [self.cycle_seconds([k], self.num_layers) for k in range(len(self.setup.num_examples))]
        return near_iid_groups(self.setup.label_counts, o.groups, o.group_size_cap, o.distance,
                               [self.setup.seed, epoch], o.refine, seconds, o.speed_weight)

    def group_of(self, state: Tensors, client_id: int) -> int:
        return int(state["groups"][client_id])

    def members(self, state: Tensors) -> list[list[int]]:
        gid = state["groups"].tolist()
        return [[k for k, g in enumerate(gid) if g == j] for j in range(max(gid) + 1)]

    def trained_modules(self, depth: int) -> list[str]:
        first = self.num_layers - depth
        return [m for m in self.setup.module_shapes if self.setup.module_layers[m] >= first]

    def bytes_up(self, depth: int) -> float:
        return FLOAT_BYTES * self.rank * sum(sum(self.setup.module_shapes[m]) for m in self.trained_modules(depth))

    def cycle_seconds(self, members: list[int], depth: int) -> float:
        """One intra-group cycle at depth d: the group's slowest member (train + up + down)."""
        flops = self.setup.train_flops(depth, self.rank)
        down = self.bytes_up(self.num_layers)
        return max(self.setup.devices[k].seconds(flops, self.bytes_up(depth), down) for k in members)

    def plan(self, state: Tensors) -> list[tuple[int, int]]:
        """(τ_g, d_g) per group (computed once per grouping)."""
        groups = tuple(state["groups"].tolist())
        if groups not in self._plans:
            self._plans[groups] = self._plan(groups)
        return self._plans[groups]

    def _plan(self, groups: tuple[int, ...]) -> list[tuple[int, int]]:
        o, L = self.options, self.num_layers
        n = max(groups) + 1
        if o.plan == "fixed":
            taus = o.tau if isinstance(o.tau, list) else [o.tau] * n
            depths = o.depth if isinstance(o.depth, list) else [o.depth or L] * n
            if len(taus) != n or len(depths) != n:
                raise ValueError(f"algorithm.tau/depth: need one value per group ({n} groups)")
            if any(not 1 <= d <= L for d in depths) or any(t < 1 for t in taus):
                raise ValueError(f"algorithm.tau/depth: τ >= 1 and 1 <= d <= {L} required")
            return list(zip(taus, depths))
        members = [[k for k, g in enumerate(groups) if g == j] for j in range(n)]
        budget = o.time_budget * max(self.cycle_seconds(m, L) for m in members)
        out = []
        for m in members:
            cycle = {d: self.cycle_seconds(m, d) for d in range(o.min_depth, L + 1)}
            fits = [(t * d, d, t) for d in cycle for t in range(1, o.tau_max + 1) if t * cycle[d] <= budget]
            _, d, t = max(fits) if fits else (0, o.min_depth, 1)
            out.append((t, d))
        return out

    def plan_table(self, state: Tensors) -> list[dict]:
        """Groups with members, (τ, d), slowest device class and planned seconds (for reports)."""
        rows = []
        for g, (m, (tau, depth)) in enumerate(zip(self.members(state), self.plan(state))):
            row = {"group": g, "members": m, "tau": tau, "depth": depth}
            if self.setup.devices and self.setup.train_flops is not None:
                row["planned_seconds"] = round(float(tau * self.cycle_seconds(m, depth)), 4)
                row["device_classes"] = sorted({self.setup.devices[k].device_class for k in m})
            rows.append(row)
        return rows

    # ---- protocol ----------------------------------------------------------------------
    def init_state(self) -> Tensors:
        self.check_setup()
        state = lora_init(self.setup.module_shapes, self.rank, self.setup.seed)
        groups = torch.zeros(len(self.setup.num_examples), dtype=torch.long)
        for j, members in enumerate(self.grouping(0)):
            groups[members] = j
        state["groups"] = groups
        state["round"] = torch.zeros((), dtype=torch.long)
        for row in self.plan_table(state):
            log.info("hierfedlora group %s", row)
        return state

    def stages(self, state: Tensors, selected: list[int]) -> list[dict[int, list[int]]]:
        plan = self.plan(state)
        by_group: dict[int, list[int]] = {}
        for k in selected:
            by_group.setdefault(self.group_of(state, k), []).append(k)
        return [{g: ks for g, ks in sorted(by_group.items()) if plan[g][0] > s}
                for s in range(max(plan[g][0] for g in by_group))] if by_group else [{}]

    def payload(self, state: Tensors, client_id: int) -> Message:
        g = self.group_of(state, client_id)
        tau, depth = self.plan(state)[g]
        tensors = {key: state.get(f"g{g}/{key}", state[key]) for key in self.factor_keys()}
        return Message(tensors=tensors, config={"group": g, "tau": tau, "depth": depth})

    def factor_keys(self) -> list[str]:
        return [f"{name}.{f}" for name in self.setup.module_shapes for f in ("A", "B")]

    def client_train(self, ctx: ClientContext, payload: Message, client_state: Tensors
                     ) -> tuple[Update, Tensors]:
        ctx.adapters.load(payload.tensors)  # every factor, frozen: the forward pass needs them
        trained = self.trained_modules(int(payload.config["depth"]))
        for name in trained:
            ctx.adapters.layers[name].set_factors(payload.tensors[f"{name}.A"], payload.tensors[f"{name}.B"],
                                                  trainable={"A", "B"})
        losses = ctx.train([(ctx.adapters.trainable_parameters(), ctx.lr)])
        current = ctx.adapters.state()
        tensors = {f"{n}.{f}": current[f"{n}.{f}"] for n in trained for f in ("A", "B")}
        params = sum(t.numel() for t in tensors.values())
        metrics = {"train_loss": sum(losses) / len(losses), "rank": float(self.rank),
                   "trained_params": params, "uploaded_params": params,
                   "group": float(payload.config["group"]), "depth": float(payload.config["depth"])}
        return Update(ctx.client_id, tensors, ctx.num_examples, metrics), client_state

    def expected_shapes(self, state: Tensors, update: Update) -> dict[str, tuple[int, ...]]:
        _, depth = self.plan(state)[self.group_of(state, update.client_id)]
        return {f"{n}.{f}": tuple(state[f"{n}.{f}"].shape) for n in self.trained_modules(depth) for f in ("A", "B")}

    def aggregate_stage(self, state: Tensors, updates: list[Update], stage: int) -> Tensors:
        """Intra-group FedAvg: each group's trained modules become its members' weighted mean."""
        new = dict(state)
        by_group: dict[int, list[Update]] = {}
        for u in updates:
            by_group.setdefault(self.group_of(state, u.client_id), []).append(u)
        for g, us in by_group.items():
            p = data_weights(us)
            for key in us[0].tensors:
                new[f"g{g}/{key}"] = weighted_sum([u.tensors[key] for u in us], p)
            new[f"g{g}/num_examples"] = torch.tensor(float(sum(u.num_examples for u in us)))
        return new

    def aggregate(self, state: Tensors, updates: list[Update], server: ServerContext) -> Aggregate:
        """Layer-wise global aggregation over the groups that trained each module, then regroup."""
        state = self.aggregate_stage(state, updates, -1) if updates else state
        plan = self.plan(state)
        weights = {g: float(state[f"g{g}/num_examples"]) for g in range(len(plan)) if f"g{g}/num_examples" in state}
        new: Tensors = {}
        for name in self.setup.module_shapes:
            layer = self.setup.module_layers[name]
            covering = [g for g in weights if layer >= self.num_layers - plan[g][1]]
            for f in ("A", "B"):
                key = f"{name}.{f}"
                if covering:
                    total = sum(weights[g] for g in covering)
                    new[key] = weighted_sum([state[f"g{g}/{key}"] for g in covering],
                                            [weights[g] / total for g in covering])
                else:
                    new[key] = state[key]
        t = int(state["round"]) + 1
        new["round"] = torch.tensor(t)
        new["groups"] = state["groups"]
        every = self.options.regroup_every
        if every and t % every == 0:
            groups = torch.zeros_like(state["groups"])
            for j, members in enumerate(self.grouping(t // every)):
                groups[members] = j
            new["groups"] = groups
        depths = [plan[g][1] for g in weights]
        return Aggregate(state=new, metrics={"groups_aggregated": float(len(weights)),
                                             "mean_depth": float(np.mean(depths)) if depths else 0.0})

    def eval_factors(self, state: Tensors) -> Tensors:
        return {key: state[key] for key in self.factor_keys()}
