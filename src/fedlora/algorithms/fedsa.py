"""FedSA-LoRA (Guo et al., ICLR 2025): clients train A and B, share only A; B stays private.

Round t (one rank r for every client: the weakest client's):
    client k loads the global Ā and its own B_k (zero before its first round), trains both,
    keeps B_k, uploads A_k
    Ā = Σ_k p_k A_k,  p_k = |D_k| / Σ|D|
Client k's model is W + s B_k Ā: a personal model per client, judged on the client's own data
(`evaluation.personalized`). There is no global B, so the global model is what `global_b` says:
    none   (default; the paper) only A is uploaded; the global model is the base with Ā and
           B = 0, i.e. the base itself: its global accuracy is the untuned model's, and
           nothing is exported (the run has no global adapter)
    mean   clients upload B_k too, and the server keeps B̄ = Σ_k p_k B_k for the global model
           only (evaluation, export: W + s B̄ Ā); B̄ is never sent back, clients keep their own
           B_k. Costs r·m more uplink numbers per module per client.
Heterogeneous ranks: every client trains at the weakest client's rank (Ā must be one shape).
"""

from __future__ import annotations

from typing import Literal

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
    train_loaded,
    weighted_sum,
)
from fedlora.algorithms.registry import register_method


class FedSALoRAOptions(MethodOptions):
    name: Literal["fedsa"] = "fedsa"
    rank: int | None = Field(None, ge=1)
    """Homogeneous rank; None: the smallest client max rank."""
    global_b: Literal["none", "mean"] = "none"
    """The global model's B: `none` (only A leaves a client, the paper's protocol; the global
    model is the base) or `mean` (clients also upload B for the server's data-weighted mean,
    used only to evaluate and export a global model, never sent back)."""


@register_method
class FedSALoRA(Algorithm):
    name = "fedsa"
    Options = FedSALoRAOptions
    homogeneous = True
    options: FedSALoRAOptions

    def __init__(self, options: FedSALoRAOptions, setup: FederationSetup) -> None:
        super().__init__(options, setup)
        self.rank = common_rank(options.rank, setup.client_max_ranks)
        self.upload = (".A", ".B") if options.global_b == "mean" else (".A",)

    def init_state(self) -> Tensors:
        """Ā (PEFT's init, seeded) and, for `global_b: mean`, B̄ = 0."""
        start = lora_init(self.setup.module_shapes, self.rank, self.setup.seed)
        return {k: v for k, v in start.items() if k.endswith(self.upload)}

    def payload(self, state: Tensors, client_id: int) -> Message:
        return Message(tensors={k: v for k, v in state.items() if k.endswith(".A")})

    def own_b(self, client_state: Tensors) -> Tensors:
        """The client's private B of every module (zero before its first round)."""
        return {f"{name}.B": client_state.get(f"{name}.B", torch.zeros(m, self.rank))
                for name, (m, _) in self.setup.module_shapes.items()}

    def client_train(
        self, ctx: ClientContext, payload: Message, client_state: Tensors
    ) -> tuple[Update, Tensors]:
        ctx.adapters.load({**payload.tensors, **self.own_b(client_state)}, trainable={"A", "B"})
        update = train_loaded(ctx, self.rank, upload=self.upload)
        update.metrics["trained_params"] = sum(t.numel() for t in ctx.adapters.trainable_parameters())
        kept = {k: v for k, v in ctx.adapters.state().items() if k.endswith(".B")}
        return update, kept

    def expected_shapes(self, state: Tensors, update: Update) -> dict[str, tuple[int, ...]]:
        return {k: tuple(v.shape) for k, v in state.items()}

    def aggregate(self, state: Tensors, updates: list[Update], server: ServerContext) -> Aggregate:
        p = data_weights(updates)
        new = {key: weighted_sum([u.tensors[key] for u in updates], p) for key in state}
        if self.options.global_b == "none":
            return Aggregate(state=new)
        terms = [[(pk, u.tensors[f"{name}.B"], new[f"{name}.A"]) for pk, u in zip(p, updates)]
                 for name in self.setup.module_shapes]  # B̄ Ā = Σ_k p_k B_k Ā
        return Aggregate(state=new, metrics=self.tilt(updates, terms))

    def eval_factors(self, state: Tensors) -> Tensors:
        """Ā with B̄ (`global_b: mean`); with `none` there is no global adapter: the base."""
        return dict(state) if self.options.global_b == "mean" else {}

    def personal_factors(self, state: Tensors, client_state: Tensors) -> Tensors:
        """Client k's own model: the global Ā with its private B_k."""
        return {**{k: v for k, v in state.items() if k.endswith(".A")}, **self.own_b(client_state)}
