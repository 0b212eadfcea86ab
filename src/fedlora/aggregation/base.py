"""The stage protocol of the aggregation pipeline: a stage wraps a method the way Flower's
`DifferentialPrivacyServerSideFixedClipping(strategy)` wraps a strategy.

A run's algorithm is the method inside its stages, outermost first (`fedlora.aggregation.ORDER`):

    secure_sum  secure aggregation: the client uploads its masked summand, the server aggregates
                the unmasked sum alone (fedlora.aggregation.secagg; Flower runtime only)
    attack      client side: k simulated adversaries change their upload (harness, not a defence)
    screening   each update against its round: the norm bound (reject or clip)
    combine     a robust combination: median, trimmed mean, Krum, Multi-Krum
    privacy     (the slot of issue 27) clip and noise, client side or server side
    the method  its own client_train and aggregate, unchanged

A stage is a `Wrapper`: an `Algorithm` around an inner one (the next stage or the method) that
delegates everything it does not override. What a stage may override, and when it runs:

- `client_train(ctx, payload, client_state)`: on the client (either runtime: the Flower ClientApp
  builds the same pipeline), after or around the inner training: change the upload (an attack;
  client-side privacy clips and noises it), or the data it trains on (label flipping).
- `screen(updates) -> list[Verdict]`: on the server, once per stage of a round, after every update
  passed its own checks (dtype, shapes, finiteness: `Algorithm.validate`) and before anything is
  aggregated; one `Verdict` per update, in order: kept (maybe changed, with a note for the client's
  record) or rejected (with the reason). The runtime logs them and lists rejections in the round's
  record (`runtime.rounds.screen_norms`); a rejected client's new private state is not kept.
  Call `super().screen(kept)` so the inner stages screen what this one kept.
- `aggregate(state, updates, server)`: call `self.inner.aggregate` on what the stage makes of the
  updates (a subset, changed copies, one consensus update) and change its result if it must (noise).
  `aggregate_stage` likewise for a method's intermediate stages (HierFedLoRA's groups).

What a stage acts on depends on the method (a norm of uploaded factors; a median of zero-padded
factors or of each client's ΔW_k = B_k A_k; ...). Every stage declares it: `ACTS_ON` maps a method
name to a one-line description, `REFUSED` a method name to why the stage is undefined there, and
`DEFAULT` covers the methods in neither (None: refused until someone declares them).
`check(method)` raises one line naming the config field before any model loads (the config calls
it through `fedlora.aggregation.check_pipeline`), so an undefined combination never starts.

A new stage (the privacy stage): a `Wrapper` subclass with `FIELD`, `ACTS_ON`/`REFUSED`/`DEFAULT`
and the hooks it needs, and a factory `cfg -> functools.partial(YourStage, **options) | None` in
`fedlora.aggregation.SLOTS` under its slot name. Nothing in the methods or the runtimes changes.
"""

from __future__ import annotations

import inspect
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, ClassVar, TypeVar

from fedlora.algorithms.base import (
    Aggregate,
    Algorithm,
    ClientContext,
    Message,
    ServerContext,
    Tensors,
    Update,
)


class Undefined(ValueError):
    """A stage configured for a method it is not defined for: one line naming the config field."""


@dataclass(frozen=True)
class Verdict:
    """A screening's decision on one update: `update` None means rejected, and `note` says why;
    otherwise the update to aggregate (the same object or a changed copy, then `note` says how)."""

    update: Update | None
    note: str = ""


class Wrapper(Algorithm):
    """A pipeline stage around `inner`: everything is delegated unless the stage overrides it."""

    FIELD: ClassVar[str] = ""
    """The config field that chose the stage (its errors name it), e.g. `aggregation.combine`."""
    ACTS_ON: ClassVar[Mapping[str, str]] = {}
    """Method name → what the stage reads and changes for that method."""
    REFUSED: ClassVar[Mapping[str, str]] = {}
    """Method name → why the stage is undefined for it."""
    DEFAULT: ClassVar[str | None] = None
    """What the stage acts on for a method in neither table; None: such a method is refused."""

    def __init__(self, inner: Algorithm) -> None:
        type(self).check(inner.name)
        super().__init__(inner.options, inner.setup)
        self.inner = inner
        self.name = inner.name
        for trait, value in vars(Algorithm).items():  # what the method declares of itself (trains, ...)
            if not trait.startswith("_") and not inspect.isfunction(value) and not isinstance(value, property):
                setattr(self, trait, getattr(inner, trait))

    def label(self) -> str:
        """The stage as the config names it (errors, logs), e.g. `krum`."""
        return type(self).__name__

    @classmethod
    def acts_on(cls, method: str) -> str | None:
        """What the stage acts on for `method`, None if undefined there."""
        if method in cls.REFUSED:
            return None
        return cls.ACTS_ON.get(method, cls.DEFAULT)

    @classmethod
    def check(cls, method: str) -> None:
        """Raise Undefined (one line naming FIELD) when the stage is not defined for `method`."""
        if method in cls.REFUSED:
            raise Undefined(f"{cls.FIELD}: {cls.__name__} is undefined for {method}: {cls.REFUSED[method]}")
        if cls.acts_on(method) is None:
            raise Undefined(f"{cls.FIELD}: {cls.__name__} does not declare what it acts on for {method} "
                            f"(add {method} to its ACTS_ON or REFUSED in fedlora.aggregation)")

    @property
    def method(self) -> Algorithm:
        """The method at the centre of the pipeline."""
        inner = self.inner
        return inner.method if isinstance(inner, Wrapper) else inner

    def __getattr__(self, attr: str) -> Any:
        """A method's own attributes (rank, plan_table, ...) reach through the stages."""
        if attr == "inner":  # not set yet (during __init__): no recursion
            raise AttributeError(attr)
        return getattr(self.inner, attr)

    # -- the protocol, delegated --------------------------------------------------------------
    def init_state(self) -> Tensors:
        return self.inner.init_state()

    def payload(self, state: Tensors, client_id: int) -> Message:
        return self.inner.payload(state, client_id)

    def client_train(self, ctx: ClientContext, payload: Message, client_state: Tensors
                     ) -> tuple[Update, Tensors]:
        return self.inner.client_train(ctx, payload, client_state)

    def expected_shapes(self, state: Tensors, update: Update) -> dict[str, tuple[int, ...]]:
        return self.inner.expected_shapes(state, update)

    def validate(self, state: Tensors, update: Update) -> None:
        return self.inner.validate(state, update)

    def screen(self, updates: list[Update]) -> list[Verdict]:
        return screen(self.inner, updates)

    def pass_inward(self, verdicts: list[Verdict]) -> list[Verdict]:
        """This stage's verdicts with the inner stages' screening of what it kept (notes joined):
        what a stage's `screen` returns."""
        inner = iter(screen(self.inner, [v.update for v in verdicts if v.update is not None]))
        out = []
        for v in verdicts:
            if v.update is None:
                out.append(v)
                continue
            after = next(inner)
            out.append(Verdict(after.update, "; ".join(n for n in (v.note, after.note) if n)))
        return out

    def aggregate(self, state: Tensors, updates: list[Update], server: ServerContext) -> Aggregate:
        return self.inner.aggregate(state, updates, server)

    def stages(self, state: Tensors, selected: list[int]) -> list[dict[int, list[int]]]:
        return self.inner.stages(state, selected)

    def aggregate_stage(self, state: Tensors, updates: list[Update], stage: int) -> Tensors:
        return self.inner.aggregate_stage(state, updates, stage)

    def eval_factors(self, state: Tensors) -> Tensors:
        return self.inner.eval_factors(state)

    def personal_factors(self, state: Tensors, client_state: Tensors) -> Tensors:
        return self.inner.personal_factors(state, client_state)


def screen(algorithm: Algorithm, updates: list[Update]) -> list[Verdict]:
    """The pipeline's screening of one round's (stage's) updates; a bare method keeps them all."""
    if isinstance(algorithm, Wrapper):
        return algorithm.screen(updates)
    return [Verdict(u) for u in updates]


W = TypeVar("W", bound="Wrapper")


def find_stage(algorithm: Algorithm, kind: type[W]) -> W | None:
    """The pipeline's outermost stage of type `kind`, if it has one."""
    while isinstance(algorithm, Wrapper):
        if isinstance(algorithm, kind):
            return algorithm
        algorithm = algorithm.inner
    return None


def stage_names(algorithm: Algorithm) -> list[str]:
    """The pipeline's stages, outermost first, as the config names them (for logs and reports)."""
    names = []
    while isinstance(algorithm, Wrapper):
        names.append(algorithm.label())
        algorithm = algorithm.inner
    return names
