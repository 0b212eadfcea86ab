"""The small protocol every method implements, and the objects that travel between roles.

A method is plain Python over tensors: it never sees a transport. `Message` (server →
client) and `Update` (client → server) are named tensors plus scalars, which map one to
one onto Flower's ArrayRecord / ConfigRecord / MetricRecord. The runtimes (in-process,
Flower) supply the contexts: a `ClientContext` that can run local steps on the client's
data, and a `ServerContext` that can run steps on the server's public data.
"""

from __future__ import annotations

import time
from abc import ABC, abstractmethod
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import ClassVar, Protocol, TypeVar

import torch
from torch import Tensor

from fedlora.adapters import Adapters
from fedlora.devices import DeviceProfile
from fedlora.diagnostics import Term, aggregation_tilt
from fedlora.schema import Strict

Tensors = dict[str, Tensor]
DIAGNOSTIC_SECONDS = "diagnostic_seconds"
"""Aggregate.metrics key: seconds the server spent measuring, not aggregating (the tilt, the
held-out loss). The runtime subtracts them from the server time the simulated clock charges
and does not record them: a diagnostic must not make a method look slower."""
Scalar = int | float | str | bool
ParamGroups = list[tuple[list[Tensor], float] | tuple[list[Tensor], float, str]]
"""(parameters, lr) trained with Adam, or (parameters, lr, "adam" | "sgd")."""

T = TypeVar("T")


def timed(measure: Callable[[], T]) -> tuple[T, float]:
    """(measure(), the seconds it took): what a diagnostic costs, for DIAGNOSTIC_SECONDS."""
    start = time.perf_counter()
    return measure(), time.perf_counter() - start


REAL_FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)
"""The dtypes a client may upload: an int, bool or complex tensor is refused before any
arithmetic touches it (a complex NaN is not caught by a real finiteness check)."""


class InvalidUpdate(ValueError):
    """A client update the server refuses (wrong dtype or shapes, NaN/Inf, bad mask, outlier norm)."""


@dataclass
class Message:
    """Server → client: what the client needs for this round."""

    tensors: Tensors
    config: dict[str, Scalar] = field(default_factory=dict)


@dataclass
class Update:
    """Client → server. `metrics` carry train_loss, rank, trained_params, uploaded_params."""

    client_id: int
    tensors: Tensors
    num_examples: int
    metrics: dict[str, float] = field(default_factory=dict)


@dataclass
class Aggregate:
    """The server's new state, the update to fold into the base model (if any), and the round's
    server metrics: numbers, or mappings client id → number (`client_weight`, `delta_share`)."""

    state: Tensors
    merge: dict[str, tuple[Tensor, Tensor]] | None = None
    metrics: dict[str, float | dict[str, float]] = field(default_factory=dict)


@dataclass(frozen=True)
class FederationSetup:
    """What a method knows of the federation: module shapes, client ranks and data sizes."""

    module_shapes: Mapping[str, tuple[int, int]]  # module → (m, n) = (out, in)
    client_max_ranks: list[int]
    num_examples: list[int]
    scaling: float
    seed: int
    # Used by methods that plan for the devices (HierFedLoRA); filled by the runtimes.
    module_layers: Mapping[str, int] = field(default_factory=dict)  # module → decoder layer index
    num_layers: int = 0  # decoder layers of the model
    label_counts: list[list[int]] = field(default_factory=list)  # examples per client per class
    devices: list[DeviceProfile] = field(default_factory=list)  # one per client
    train_flops: Callable[[int, int], float] | None = None
    """FLOPs of one client's local training with LoRA of rank r trained in the last d layers:
    train_flops(d, r) (a planning estimate from the simulated clock)."""


class ClientContext(Protocol):
    adapters: Adapters
    client_id: int
    num_examples: int
    lr: float

    def train(
        self, param_groups: ParamGroups, regulariser: Callable[[], Tensor] | None = None
    ) -> list[float]:
        """Run the configured local steps on this client's data; losses per step."""
        ...

    def loss(self) -> float:
        """Mean loss of the current adapters on this round's batches (the ones `train` used), no step."""
        ...


class ServerContext(Protocol):
    adapters: Adapters

    def train_public(self, param_groups: ParamGroups, steps: int, batch_size: int) -> list[float]:
        """Run `steps` LM steps on the server's public data; losses per step."""
        ...

    def heldout_loss(self) -> float | None:
        """LM loss of the current adapters on held-out public examples (None: none held out)."""
        ...


class MethodOptions(Strict):
    """Base of every method's options (the `algorithm:` section of a config)."""

    @property
    def uses_public_data(self) -> bool:
        return False


class Algorithm(ABC):
    """One federated LoRA method: server init/payload/aggregate and the client's round."""

    name: ClassVar[str]
    Options: ClassVar[type[MethodOptions]] = MethodOptions
    """The class of this method's `algorithm:` options; its `name` field defaults to `name`."""
    trains: ClassVar[str] = "AB"
    """What a client trains or uploads, whichever is more, per round: "AB", "A", "B", "B+lam"
    (B and the diagonal λ) or "A/B" (A and B in alternate rounds): the static cost figure."""
    cost_note: ClassVar[str] = ""
    """Said after the method's row of `fedlora costs` (why its figure is only a bound)."""
    adapts_ranks: ClassVar[bool] = False
    """True when a client's rank changes from round to round: `compare` draws its ranks per client."""
    compared_by_default: ClassVar[bool] = True
    """False keeps the method out of `compare`'s and `tune`'s default --methods (it needs settings
    of its own to be meaningful)."""
    homogeneous: ClassVar[bool] = False
    """True when every client trains at the weakest client's rank."""
    unbounded_keys: ClassVar[tuple[str, ...]] = ()
    """Suffixes of uploaded tensors that are not part of the update's norm (AFLoRA's 0/1
    masks): the server's norm bound screens and clips the rest."""

    def __init__(self, options: MethodOptions, setup: FederationSetup) -> None:
        self.options = options
        self.setup = setup

    @abstractmethod
    def init_state(self) -> Tensors:
        """The server's global tensors before round 1."""

    @abstractmethod
    def payload(self, state: Tensors, client_id: int) -> Message:
        """What client `client_id` receives this round."""

    @abstractmethod
    def client_train(
        self, ctx: ClientContext, payload: Message, client_state: Tensors
    ) -> tuple[Update, Tensors]:
        """Train locally; returns the upload and the client's new private state."""

    @abstractmethod
    def expected_shapes(self, state: Tensors, update: Update) -> dict[str, tuple[int, ...]]:
        """Shapes the server accepts for this update's tensors (all keys required)."""

    @abstractmethod
    def aggregate(self, state: Tensors, updates: list[Update], server: ServerContext) -> Aggregate:
        """Combine the accepted updates into the new global state."""

    def eval_factors(self, state: Tensors) -> Tensors:
        """Adapter factors the global model is evaluated with (empty: all merged in the base)."""
        return {}

    def personal_factors(self, state: Tensors, client_state: Tensors) -> Tensors:
        """Adapter factors client k would use on its own data, from the global state and its private
        state (personalised evaluation). Default: the global model's."""
        return self.eval_factors(state)

    # Multi-stage rounds (HierFedLoRA's intra-group cycles). A round is a list of stages; in
    # each stage some clients train (payload → client_train, as always); between stages the
    # server calls aggregate_stage; after the last stage it calls aggregate as usual. Clients
    # are keyed by lane (a group); lanes run in parallel, stages within a lane one after another
    # (the simulated clock sums a lane's stages). A one-stage, one-lane round is the default,
    # so single-stage methods need nothing, and a Flower server drives stages the same way
    # (one message round per stage).
    def stages(self, state: Tensors, selected: list[int]) -> list[dict[int, list[int]]]:
        """Per stage, lane → clients that train in it. Default: one stage, every selected client."""
        return [{0: list(selected)}]

    def aggregate_stage(self, state: Tensors, updates: list[Update], stage: int) -> Tensors:
        """The state after an intermediate stage (every stage but the last)."""
        raise NotImplementedError(f"{self.name} has single-stage rounds")

    def tilt(self, updates: list[Update], terms: Sequence[Sequence[Term]]) -> dict[str, dict[str, float]]:
        """The round's `client_weight` and `delta_share` per client (`aggregation_tilt`; `terms[m][k]
        = (p_k, B_k, A_k)`, module m's update being s Σ_k p_k B_k A_k). Its seconds go under
        DIAGNOSTIC_SECONDS (always present), which the runtime keeps out of the measured server time."""
        tilt, seconds = timed(lambda: aggregation_tilt([u.client_id for u in updates], terms))
        return {**tilt, DIAGNOSTIC_SECONDS: seconds}

    def validate(self, state: Tensors, update: Update) -> None:
        """Raise InvalidUpdate when the update cannot be aggregated: real floating-point
        tensors only, the method's names and shapes, finite values, at least one example."""
        for key, t in update.tensors.items():
            if not isinstance(t, Tensor) or t.dtype not in REAL_FLOAT_DTYPES:
                kind = t.dtype if isinstance(t, Tensor) else type(t).__name__
                raise InvalidUpdate(f"{key}: dtype {kind}, expected a real floating-point tensor")
        expected = self.expected_shapes(state, update)
        missing = sorted(set(expected) - set(update.tensors))
        extra = sorted(set(update.tensors) - set(expected))
        if missing or extra:
            raise InvalidUpdate(f"tensor names differ: missing {missing[:3]}, unexpected {extra[:3]}")
        for key, shape in expected.items():
            t = update.tensors[key]
            if tuple(t.shape) != tuple(shape):
                raise InvalidUpdate(f"{key}: shape {tuple(t.shape)}, expected {tuple(shape)}")
        bad = first_non_finite(update.tensors)
        if bad is not None:
            raise InvalidUpdate(f"{bad}: contains NaN or Inf")
        if update.num_examples < 1:
            raise InvalidUpdate(f"num_examples must be >= 1, got {update.num_examples}")


def first_non_finite(tensors: Mapping[str, Tensor]) -> str | None:
    """Name of the first floating (or complex) tensor holding NaN or Inf, or None. A float64
    value beyond float32's range counts too: the server aggregates in float32."""
    for key, t in tensors.items():
        if t.is_floating_point():
            t = t.to(torch.float32)
        elif not t.is_complex():
            continue
        if not bool(torch.isfinite(t).all()):
            return key
    return None


def data_weights(updates: list[Update]) -> list[float]:
    """p_k = |D_k| / Σ |D| over the participating clients."""
    total = sum(u.num_examples for u in updates)
    return [u.num_examples / total for u in updates]


def weighted_sum(tensors: list[Tensor], weights: list[float]) -> Tensor:
    out = torch.zeros_like(tensors[0], dtype=torch.float32)
    for t, w in zip(tensors, weights):
        out.add_(t.to(torch.float32), alpha=w)
    return out


def common_rank(requested: int | None, client_max_ranks: list[int]) -> int:
    """The one rank of a homogeneous method: the weakest client's max rank bounds everyone."""
    weakest = min(client_max_ranks)
    if requested is not None and requested > weakest:
        raise ValueError(f"algorithm.rank: {requested} exceeds the smallest client max rank {weakest}")
    return requested or weakest


def kaiming_rows(r: int, n: int, generator: torch.Generator) -> Tensor:
    """PEFT's default A init: uniform(±1/√n), i.e. kaiming_uniform with a=√5."""
    bound = 1.0 / n**0.5
    return (torch.rand(r, n, generator=generator) * 2 - 1) * bound


def lora_init(module_shapes: Mapping[str, tuple[int, int]], rank: int, seed: int) -> Tensors:
    """Plain LoRA's start for every module: A with PEFT's init (seeded), B = 0."""
    g = torch.Generator().manual_seed(seed)
    state: Tensors = {}
    for name, (m, n) in module_shapes.items():
        state[f"{name}.A"] = kaiming_rows(rank, n, g)
        state[f"{name}.B"] = torch.zeros(m, rank)
    return state


def factor_shapes(module_shapes: Mapping[str, tuple[int, int]], rank: int) -> dict[str, tuple[int, ...]]:
    """Shapes of A (r × n) and B (m × r) for every module."""
    shapes: dict[str, tuple[int, ...]] = {}
    for name, (m, n) in module_shapes.items():
        shapes[f"{name}.A"] = (rank, n)
        shapes[f"{name}.B"] = (m, rank)
    return shapes


def train_loaded(ctx: ClientContext, rank: float, upload: tuple[str, ...] = (".A", ".B")) -> Update:
    """Train the trainable factors loaded in ctx.adapters; upload the factors named by `upload`.
    What a plain-LoRA client does (FedIT, FFA-LoRA, FLoRA, FlexLoRA)."""
    losses = ctx.train([(ctx.adapters.trainable_parameters(), ctx.lr)])
    tensors = {k: v for k, v in ctx.adapters.state().items() if k.endswith(upload)}
    params = sum(t.numel() for t in tensors.values())
    metrics = {
        "train_loss": sum(losses) / len(losses),
        "rank": float(rank),
        "trained_params": params,
        "uploaded_params": params,
    }
    return Update(ctx.client_id, tensors, ctx.num_examples, metrics)
