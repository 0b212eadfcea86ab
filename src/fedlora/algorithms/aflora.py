"""AFLoRA (Zhou, Pang, Wang 2025): diagonal Λ, per-client rank pruning, decoupled A/B, padding.

Local update of client k (eq. 6):   ΔW_k = s · B_k Λ_k A_k,  Λ_k = diag(λ_k ⊙ h_k)

Client, round t (decoupled fine-tuning, client side):
    A_k = A_global[:r_k^1]                                       frozen
    min  CE + γ Σ_{j: h_j=1} (‖b_j‖² − 1)²   over B_k (active columns) and λ_k   (eq. 10)
    upload B'_k = B_k[:, h=1] · diag(λ_k[h=1])   and  H_k
    h_j ← h_j · 1[λ_j² ≥ β σ],  σ = std{λ_j² : h_j = 1}          (eq. 8), r_k^{t+1} = Σ h (eq. 9)

Server, round t (zero-padding rank-aware aggregation, server-side A fine-tuning):
    B'_k → m × r_max^1 by H_k (zeros where h=0, then zero columns on the right)
    p_k ∝ log(1 + r_k^t) · |D_k|                                  (eq. 12, normalised)
    B_global = Σ p_k B'_k                                         (eq. 13)
    ⇒ B_global A_global = Σ p_k B_k Λ_k A_k  exactly
    A_FT = A_global after `server_steps` of CE on public data, B_global frozen
    A' = α A_global + (1 − α) A_FT                                (eq. 11)
    W ← W + s B_global A';  next round A_global = A', clients restart B at zero.

Options for an informative λ (issue 15; defaults = the behaviour above): `lambda_init`,
`lambda_lr`, `lambda_optimizer: sgd`, `b_init: unit`. Each round logs λ's diagnostics per
client (fedlora.diagnostics) and, on the server, ‖A_FT − A‖/‖A‖, the held-out public loss, and
each client's weight p_k and share of ΔW = Σ_k s p_k pad(B'_k) A' (`Algorithm.tilt`).

Decisions where the paper is silent (docs/concepts/methods/aflora.md, "our decisions"): Λ and H are per
target module (each LoRA adapter prunes its own dimensions, and eq. 12 uses that module's
rank); the default pruning threshold is mean − βσ (option `pruning_rule`); σ is the
population standard deviation; the upload uses the mask the client trained
with (`upload_mask: trained`), pruning takes effect next round; λ persists across rounds.
"""

from __future__ import annotations

import math
from typing import Literal

import numpy as np
import torch
from pydantic import Field, model_validator
from torch import Tensor

from fedlora.algorithms.base import (
    DIAGNOSTIC_SECONDS,
    Aggregate,
    Algorithm,
    ClientContext,
    FederationSetup,
    InvalidUpdate,
    Message,
    MethodOptions,
    ServerContext,
    Tensors,
    Update,
    timed,
    weighted_sum,
)
from fedlora.algorithms.registry import register_method
from fedlora.diagnostics import lambda_diagnostics, mean_over_modules, pruning_loss_increase


class AFLoRAOptions(MethodOptions):
    name: Literal["aflora"] = "aflora"
    beta: float = Field(2.0, ge=0)
    """β of the pruning rule (eq. 8)."""
    pruning_rule: Literal["paper-literal", "zscore"] = "zscore"
    """`zscore` (default): keep λ² ≥ mean − βσ, the statistical β-σ outlier rule the paper
    cites (a dimension can lie at most σ√(n−1) below the mean, so with β = 2 modules of rank
    ≤ 5 never prune); `paper-literal`: keep λ² ≥ βσ as eq. 8 is printed (with λ near its
    init 1 and σ ≪ 1 it prunes nothing unless β ≈ 1/σ: see docs/concepts/methods/aflora.md)."""
    gamma: float = Field(0.01, ge=0)
    """γ of the column-norm regulariser (eq. 10)."""
    min_rank: int = Field(1, ge=1)
    """Ranks never fall below this."""
    alpha: float = Field(0.5, ge=0, le=1)
    """α of the A fusion (eq. 11): A' = α A + (1 − α) A_FT."""
    row_norm: float = Field(1.0, gt=0)
    """C: every row of the initial A_global has ℓ2 norm C."""
    server_steps: int = Field(5, ge=0)
    """Server A fine-tuning steps per round on the public set."""
    server_lr: float = Field(1e-3, gt=0)
    """Adam learning rate of the server's A fine-tuning."""
    server_batch_size: int = Field(4, ge=1)
    """Public examples per server step."""
    weighting: Literal["normalized", "paper-literal", "data"] = "normalized"
    """`normalized`: p ∝ log(1+r)|D|, Σp = 1 (rank-aware, the paper's); `paper-literal`: eq. 12
    as printed (two separately normalised factors multiplied; Σp < 1); `data`: p ∝ |D|, Σp = 1
    (FedAvg's weights: no tilt towards high-rank clients)."""
    ddr: bool = True
    """Diagonal-based dynamic rank assignment; false = the paper's "w/o DDR" ablation."""
    dlf: bool = True
    """Server-side A fine-tuning; false = the paper's "w/o DLF" ablation (A stays fixed)."""
    lambda_lr: float | None = Field(None, gt=0)
    """Learning rate of λ (None: federation.lr)."""
    lambda_init: float = Field(1.0, ge=0)
    """λ's start (paper: 1): the first round's, and every round's when λ does not persist."""
    lambda_optimizer: Literal["adam", "sgd"] = "adam"
    """`adam` (default): λ in the clients' Adam, which moves every λ_j by about its lr per step
    whatever its gradient; `sgd`: plain SGD on λ, a step proportional to the gradient, so
    λ_j² accumulates what dimension j is worth to the loss."""
    lambda_persist: bool = True
    """Keep λ across rounds as client state (false: reset to lambda_init every round)."""
    b_init: Literal["zeros", "unit"] = "zeros"
    """B's start every round: `zeros` (paper); `unit`: seeded random columns of norm 1, so
    eq. 10's premise ‖b_j‖ = 1 holds from the start and λ (which must then start at 0 every
    round: lambda_init 0, lambda_persist false) carries each dimension's magnitude."""
    upload_mask: Literal["trained", "pruned"] = "trained"
    """Upload the columns trained this round, or only those that survive this round's pruning."""
    pruning_check: int = Field(0, ge=0)
    """Measure, per client and round, the loss increase of switching off the columns DDR prunes
    against as many random active columns (this many random draws, on the client's own
    batches; 0: off; costs 1 + 1 + draws forward passes over the round's batches; see
    "AFLoRA's diagnostics")."""

    @property
    def uses_public_data(self) -> bool:
        return self.dlf and self.server_steps > 0

    @model_validator(mode="after")
    def _unit_b_starts_at_zero(self) -> AFLoRAOptions:
        if self.b_init == "unit" and (self.lambda_init != 0 or self.lambda_persist):
            raise ValueError(
                "b_init: unit needs lambda_init: 0 and lambda_persist: false (a round must start "
                "from the global model: B Λ = 0)"
            )
        return self


# --- the paper's equations, one function each -------------------------------------------


def init_global_A(r_max: int, n: int, row_norm: float, generator: torch.Generator) -> Tensor:
    """Random rows, each renormalised to ‖a_j‖₂ = C."""
    A = torch.randn(r_max, n, generator=generator)
    return A * (row_norm / A.norm(dim=1, keepdim=True))


def column_norm_penalty(B: Tensor, mask: Tensor, gamma: float) -> Tensor:
    """γ Σ_{j active} (‖b_j‖₂² − 1)²  (eq. 10's regulariser)."""
    sq = (B * B).sum(0)
    return gamma * (((sq - 1.0) ** 2) * mask).sum()


def prune_mask(lam: Tensor, mask: Tensor, beta: float, min_rank: int, rule: str = "zscore") -> Tensor:
    """Eq. 8: h_j ← h_j · 1[λ_j² ≥ β σ] (`paper-literal`) or 1[λ_j² ≥ mean − β σ] (`zscore`), with σ the
    population std of λ² over the active dims; never below min_rank."""
    active = mask > 0
    energy = lam.detach() ** 2
    values = energy[active]
    if values.numel() <= min_rank:
        return mask.clone()
    sigma = values.std(unbiased=False)
    threshold = beta * sigma if rule == "paper-literal" else values.mean() - beta * sigma
    keep = active & (energy >= threshold)
    if int(keep.sum()) < min_rank:  # keep the most informative active dims instead
        ranked = torch.where(active, energy, torch.full_like(energy, -math.inf))
        keep = torch.zeros_like(active)
        keep[ranked.topk(min_rank).indices] = True
    return keep.to(mask.dtype)


def client_upload(B: Tensor, lam: Tensor, mask: Tensor) -> Tensor:
    """B'_k = B_k[:, h=1] · diag(λ_k[h=1])  (m × r_k^t)."""
    active = mask > 0
    return B[:, active] * lam[active]


def zero_pad(B_up: Tensor, mask: Tensor, r_max: int) -> Tensor:
    """Expand B'_k to m × r_k^1 by the mask (zeros where h=0), then pad columns to r_max."""
    out = torch.zeros(B_up.shape[0], r_max, dtype=torch.float32)
    out[:, : mask.numel()][:, mask > 0] = B_up.to(torch.float32)
    return out


def rank_weights(ranks: list[int], sizes: list[int], mode: str = "normalized") -> list[float]:
    """Eq. 12: p_k ∝ log(1 + r_k) · |D_k|  (`data`: p_k ∝ |D_k|, ranks ignored)."""
    if mode == "data":
        return [d / sum(sizes) for d in sizes]
    logs = [math.log1p(r) for r in ranks]
    if mode == "paper-literal":
        return [(lr / sum(logs)) * (d / sum(sizes)) for lr, d in zip(logs, sizes)]
    raw = [lr * d for lr, d in zip(logs, sizes)]
    return [w / sum(raw) for w in raw]


def fuse(A: Tensor, A_ft: Tensor, alpha: float) -> Tensor:
    """Eq. 11: A' = α A + (1 − α) A_FT."""
    return alpha * A + (1.0 - alpha) * A_ft


def finetune_a(server: ServerContext, factors: Tensors, lr: float, steps: int,
               batch_size: int) -> tuple[Tensors, list[float]]:
    """The server's DLF step: (A_FT of every module, the step losses) after `steps` steps of
    causal-LM loss on the public data at `lr`, from `factors` (B and A), B frozen."""
    server.adapters.load(factors, trainable={"A"})
    try:
        params = [layer.A for layer in server.adapters.layers.values()]
        losses = server.train_public([(params, lr)], steps, batch_size)
        return {k: v for k, v in server.adapters.state().items() if k.endswith(".A")}, losses
    finally:
        server.adapters.clear()


def heldout_loss_with(server: ServerContext, factors: Tensors) -> float | None:
    """The server's held-out public loss with `factors` loaded (None: nothing held out)."""
    server.adapters.load(factors)
    try:
        return server.heldout_loss()
    finally:
        server.adapters.clear()


def a_change(A: Tensors, A_ft: Tensors) -> float:
    """‖A_FT − A‖_F / ‖A‖_F over all modules (`server_a_change`): how far the server moved A."""
    moved = sum(float((A_ft[k] - A[k]).pow(2).sum()) for k in A)
    return math.sqrt(moved / sum(float(A[k].pow(2).sum()) for k in A))


def unit_columns(m: int, r: int, generator: torch.Generator) -> Tensor:
    """Random m × r matrix whose columns have ℓ2 norm 1 (option b_init: unit)."""
    B = torch.randn(m, r, generator=generator)
    return B / B.norm(dim=0, keepdim=True)


# --- the method -------------------------------------------------------------------------


@register_method
class AFLoRA(Algorithm):
    name = "aflora"
    Options = AFLoRAOptions
    trains = "B+lam"
    cost_note = " (before pruning: an upper bound)"
    adapts_ranks = True
    unbounded_keys = (".mask",)
    options: AFLoRAOptions

    def __init__(self, options: AFLoRAOptions, setup: FederationSetup) -> None:
        super().__init__(options, setup)
        self.r_max = max(setup.client_max_ranks)
        if options.min_rank > min(setup.client_max_ranks):
            raise ValueError(
                f"algorithm.min_rank: {options.min_rank} exceeds the smallest client max rank"
            )

    def init_state(self) -> Tensors:
        """A_global only; B_global exists from the first aggregation on."""
        g = torch.Generator().manual_seed(self.setup.seed)
        return {
            f"{name}.A": init_global_A(self.r_max, n, self.options.row_norm, g)
            for name, (_, n) in self.setup.module_shapes.items()
        }

    def payload(self, state: Tensors, client_id: int) -> Message:
        """A_global[:r_k^1], plus last round's base update (B_global and the rows of A' beyond
        r_k^1), which a client holding its own copy of the base folds in: W += s B_global A'.
        (The in-process runtime shares one base and merges it once, centrally.)"""
        r1 = self.setup.client_max_ranks[client_id]
        tensors: Tensors = {}
        for name in self.setup.module_shapes:
            A = state[f"{name}.A"]
            tensors[f"{name}.A"] = A[:r1]
            if f"{name}.B" in state:
                tensors[f"{name}.merge.B"] = state[f"{name}.B"]
                tensors[f"{name}.merge.A_tail"] = A[r1:]
        return Message(tensors=tensors, config={"max_rank": r1})

    def initial_client_state(self, client_id: int) -> Tensors:
        r1 = self.setup.client_max_ranks[client_id]
        out: Tensors = {}
        for name in self.setup.module_shapes:
            out[f"{name}.lam"] = torch.full((r1,), self.options.lambda_init)
            out[f"{name}.mask"] = torch.ones(r1)
        return out

    def _b_start(self, client_id: int) -> dict[str, Tensor] | None:
        """Option b_init: unit: each module's unit-norm B start, seeded by (seed, client)."""
        if self.options.b_init == "zeros":
            return None
        seed = int(np.random.SeedSequence([self.setup.seed, client_id]).generate_state(1)[0])
        g = torch.Generator().manual_seed(seed)
        r1 = self.setup.client_max_ranks[client_id]
        return {name: unit_columns(m, r1, g) for name, (m, _) in self.setup.module_shapes.items()}

    def client_train(
        self, ctx: ClientContext, payload: Message, client_state: Tensors
    ) -> tuple[Update, Tensors]:
        opts = self.options
        state = client_state or self.initial_client_state(ctx.client_id)
        b_start = self._b_start(ctx.client_id)
        factors: Tensors = {}
        for name, (m, _) in self.setup.module_shapes.items():
            A = payload.tensors[f"{name}.A"]
            factors[f"{name}.A"] = A
            factors[f"{name}.B"] = torch.zeros(m, A.shape[0]) if b_start is None else b_start[name]
            factors[f"{name}.lam"] = state[f"{name}.lam"]
            factors[f"{name}.mask"] = state[f"{name}.mask"]
        ctx.adapters.load(factors, trainable={"B", "lam"})
        layers = [ctx.adapters.layers[name] for name in self.setup.module_shapes]

        def regulariser() -> Tensor:
            return sum(column_norm_penalty(l.B, l.mask, opts.gamma) for l in layers)

        lam_group = ([l.lam for l in layers], opts.lambda_lr or ctx.lr)
        groups = [
            ([l.B for l in layers], ctx.lr),
            lam_group if opts.lambda_optimizer == "adam" else (*lam_group, "sgd"),
        ]
        losses = ctx.train(groups, regulariser if opts.gamma > 0 else None)

        upload: Tensors = {}
        new_state: Tensors = {}
        trained = uploaded = 0
        ranks, next_ranks, pruned, diagnostics = [], [], [], []
        trained_factors = ctx.adapters.state()  # on the CPU, whatever device trained them
        for name in self.setup.module_shapes:
            lam, mask, B, A = (trained_factors[f"{name}.{key}"] for key in ("lam", "mask", "B", "A"))
            new_mask = (
                prune_mask(lam, mask, opts.beta, opts.min_rank, opts.pruning_rule) if opts.ddr else mask
            )
            sent = mask if opts.upload_mask == "trained" else new_mask
            upload[f"{name}.B"] = client_upload(B, lam, sent)
            upload[f"{name}.mask"] = sent.clone()
            persist = opts.lambda_persist
            new_state[f"{name}.lam"] = lam.clone() if persist else torch.full_like(lam, opts.lambda_init)
            new_state[f"{name}.mask"] = new_mask
            r = int(mask.sum())
            ranks.append(r)
            next_ranks.append(int(new_mask.sum()))
            pruned.append(new_mask)
            diagnostics.append(
                lambda_diagnostics(state[f"{name}.lam"], lam, B, A, mask, self.setup.scaling)
            )
            trained += r * (B.shape[0] + 1)  # active columns of B and their λ
            uploaded += upload[f"{name}.B"].numel()
        metrics = {
            "train_loss": sum(losses) / len(losses),
            "rank": sum(ranks) / len(ranks),
            "next_rank": sum(next_ranks) / len(next_ranks),
            "trained_params": trained,
            "uploaded_params": uploaded,
            "pruned": float(sum(ranks) - sum(next_ranks)),  # columns over all modules
            **mean_over_modules(diagnostics),
        }
        if opts.pruning_check:
            g = torch.Generator().manual_seed(self.setup.seed + ctx.client_id)
            check = pruning_loss_increase(layers, pruned, ctx.loss, g, opts.pruning_check)
            if check is not None:
                metrics["prune_loss_ddr"], metrics["prune_loss_random"] = check
        ctx.adapters.clear()
        return Update(ctx.client_id, upload, ctx.num_examples, metrics), new_state

    def expected_shapes(self, state: Tensors, update: Update) -> dict[str, tuple[int, ...]]:
        r1 = self.setup.client_max_ranks[update.client_id]
        shapes: dict[str, tuple[int, ...]] = {}
        for name, (m, _) in self.setup.module_shapes.items():
            mask = update.tensors.get(f"{name}.mask")
            if mask is None or mask.shape != (r1,):
                raise InvalidUpdate(f"{name}.mask: expected shape ({r1},)")
            if not bool(((mask == 0) | (mask == 1)).all()):
                raise InvalidUpdate(f"{name}.mask: entries must be 0 or 1")
            rank = int(mask.sum())
            if rank < self.options.min_rank:
                raise InvalidUpdate(f"{name}.mask: rank {rank} below min_rank {self.options.min_rank}")
            shapes[f"{name}.mask"] = (r1,)
            shapes[f"{name}.B"] = (m, rank)
        return shapes

    def aggregate(self, state: Tensors, updates: list[Update], server: ServerContext) -> Aggregate:
        opts = self.options
        sizes = [u.num_examples for u in updates]
        new_state: Tensors = {}
        weighted: dict[str, tuple[list[float], list[Tensor]]] = {}
        for name in self.setup.module_shapes:
            masks = [u.tensors[f"{name}.mask"] for u in updates]
            padded = [zero_pad(u.tensors[f"{name}.B"], h, self.r_max) for u, h in zip(updates, masks)]
            p = rank_weights([int(h.sum()) for h in masks], sizes, opts.weighting)
            new_state[f"{name}.B"] = weighted_sum(padded, p)
            new_state[f"{name}.A"] = state[f"{name}.A"]
            weighted[name] = (p, padded)
        metrics: dict[str, float | dict[str, float]] = {}
        if opts.uses_public_data:
            A = {f"{name}.A": state[f"{name}.A"] for name in self.setup.module_shapes}
            # the held-out losses are measurements (no step, no randomness), timed as diagnostics
            before, measured = timed(lambda: heldout_loss_with(server, new_state))
            tuned, losses = finetune_a(server, new_state, opts.server_lr, opts.server_steps, opts.server_batch_size)
            after_ft, seconds = timed(lambda: heldout_loss_with(server, {**new_state, **tuned}))
            measured += seconds
            for key in A:
                new_state[key] = fuse(A[key], tuned[key], opts.alpha)
            metrics["server_loss"] = sum(losses) / len(losses)
            metrics["server_a_change"] = a_change(A, tuned)
            if before is not None:
                after, seconds = timed(lambda: heldout_loss_with(server, new_state))
                measured += seconds
                metrics.update(server_heldout_before=before, server_heldout_ft=after_ft, server_heldout_after=after)
            metrics[DIAGNOSTIC_SECONDS] = measured
        # the tilt: ΔW = s B_global A' = Σ_k s p_k pad(B'_k) A', client k's term of each module
        terms = [[(pk, Bk, new_state[f"{name}.A"]) for pk, Bk in zip(*weighted[name])] for name in weighted]
        tilt = self.tilt(updates, terms)
        tilt[DIAGNOSTIC_SECONDS] += metrics.get(DIAGNOSTIC_SECONDS, 0.0)  # `tilt` always has the key
        metrics.update(tilt)
        merge = {name: (new_state[f"{name}.B"], new_state[f"{name}.A"]) for name in self.setup.module_shapes}
        return Aggregate(state=new_state, merge=merge, metrics=metrics)
