"""`fedlora export`: a finished run as a PEFT adapter or as a merged transformers model.

What a run learned, per target module, is ΔW = s · Σ_t B_t A_t: the updates merged into
the base round by round (AFLoRA, FLoRA; kept in `merges/`) plus the final global adapter
(FedIT, FFA-LoRA, FlexLoRA, HETLoRA; `final_state.safetensors`, with AFLoRA-style
diagonals folded into B). Stacking those factors gives the exact update at rank Σ_t r_t;
`--rank R` compresses it by SVD to the best rank-R approximation (relative error
printed). A stack wider than min(m, n) is always re-factored by an SVD at min(m, n),
which is exact up to float rounding.

The PEFT adapter folds s into B and sets each module's alpha to its rank (PEFT scaling
alpha / r = 1), with per-module ranks in `rank_pattern`; `PeftModel.from_pretrained(base,
folder)` then computes W x + B A x, our model's output. Its `base_model_name_or_path` must
name exactly the weights the run trained on, or the logits differ: a hub name or folder is
itself; a GGUF base (SmolLM2) or a tiny random model is written beside the adapter, in
`base/`, de-quantised, as a plain transformers folder (`--base local`). `--base hub` names
the hub original instead (for SmolLM2, the unquantised weights the GGUF was made from).
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from peft import LoraConfig
from torch import Tensor, nn

from fedlora.adapters import Adapters
from fedlora.algorithms import build_algorithm
from fedlora.algorithms.base import FederationSetup, Tensors
from fedlora.config import ConfigError, RunConfig
from fedlora.models import hub_reference, load_base_model
from fedlora.files import atomic_write, refuse_links, tensors_to_bytes
from fedlora.lowrank import stack_factors, svd_factors
from fedlora.runtime.checkpoint import CHECKPOINT, check_state
from fedlora.runtime.outputs import client_sizes
from fedlora.runtime.rebuild import read_run
from fedlora.runtime.rundir import saved_config

Factors = dict[str, tuple[Tensor, Tensor]]  # module → (B, A), ΔW = s · B A


@dataclass
class RunModel:
    """A run's base model (as loaded before round 1) and everything it learned."""

    cfg: RunConfig
    model: nn.Module
    tokenizer: Any
    adapters: Adapters
    update: Factors

    @property
    def scaling(self) -> float:
        return self.cfg.scaling

    def merged_model(self) -> nn.Module:
        """The plain transformers model with ΔW folded into the base (our LoRA layers removed)."""
        self.adapters.merge(self.update)
        self.adapters.unwrap()
        return self.model

    def save(self, folder: Path) -> None:
        """The model as it stands (LoRA layers removed) and its tokenizer, as a transformers folder."""
        self.adapters.unwrap()
        self.model.save_pretrained(str(folder), safe_serialization=True)
        self.tokenizer.save_pretrained(str(folder))


def fold_diagonal(factors: Tensors, name: str) -> tuple[Tensor, Tensor] | None:
    """(B diag(λ ⊙ h), A) of one module in a factor dict, or None when it has no adapter."""
    A = factors.get(f"{name}.A")
    if A is None:
        return None
    B = factors[f"{name}.B"].to(torch.float32)
    diag = torch.ones(A.shape[0])
    for key in ("lam", "mask"):
        if f"{name}.{key}" in factors:
            diag = diag * factors[f"{name}.{key}"]
    return B * diag, A.to(torch.float32)


def stack_updates(parts: list[Factors], shapes: dict[str, tuple[int, int]]) -> Factors:
    """Σ_t B_t A_t per module as one pair of factors: B = [B_1 … B_T], A = [A_1; …; A_T]."""
    out: Factors = {}
    for name, (m, n) in shapes.items():
        pairs = [p[name] for p in parts if name in p]
        if not pairs:
            continue
        B, A = stack_factors([b for b, _ in pairs], [a for _, a in pairs])
        if A.shape[0] > min(m, n):
            B, A, _ = compress(B, A, min(m, n))
        out[name] = (B, A)
    return out


def compress(B: Tensor, A: Tensor, rank: int) -> tuple[Tensor, Tensor, float]:
    """Best rank-`rank` factors of B A (Eckart–Young) and the relative Frobenius error."""
    B_r, A_r, S = svd_factors(B.to(torch.float64) @ A.to(torch.float64), rank)
    total = float(S.norm())
    error = float(S[min(rank, S.numel()):].norm()) / total if total > 0 else 0.0
    return B_r.to(torch.float32), A_r.to(torch.float32), error


def _client_sizes(run_dir: Path, num_clients: int, expected_sha256: str | None) -> list[int]:
    sizes = client_sizes(run_dir, expected_sha256)
    return [max(1, n) for n in sizes] if sizes else [1] * num_clients


def load_run(run_dir: Path) -> RunModel:
    """Rebuild the run's base model and stack every update it learned (merges, then final)."""
    run_dir = Path(run_dir)
    cfg = saved_config(run_dir)
    saved = read_run(run_dir, cfg, final=True)  # the checkpoint, config.yaml, every merge, the final state
    state = saved.final_state
    sizes = _client_sizes(run_dir, cfg.federation.num_clients, saved.checkpoint.partition_sha256)
    model, tokenizer = load_base_model(cfg.model.name, seed=cfg.seed)
    adapters = Adapters.inject(model, cfg.model.target_modules, cfg.scaling)
    shapes = adapters.shapes()
    check_state(state, shapes, run_dir / CHECKPOINT)
    setup = FederationSetup(shapes, list(cfg.federation.client_max_ranks), sizes, cfg.scaling, cfg.seed)
    final = build_algorithm(cfg.algorithm, setup).eval_factors(state)
    final_pairs = {name: pair for name in shapes if (pair := fold_diagonal(final, name)) is not None}
    parts = [*saved.merges, final_pairs]  # stacked, not replayed: an adapter of rank Σ_t r_t
    return RunModel(cfg, model, tokenizer, adapters, stack_updates(parts, shapes))


def compress_update(update: Factors, rank: int) -> tuple[Factors, float]:
    """Every module at rank ≤ R; the error is ‖ΔW − ΔW_R‖_F / ‖ΔW‖_F over all modules."""
    out: Factors = {}
    num = den = 0.0
    for name, (B, A) in update.items():
        Bc, Ac, rel = compress(B, A, rank)
        norm = float(torch.linalg.norm(B.double() @ A.double()))
        num += (rel * norm) ** 2
        den += norm**2
        out[name] = (Bc, Ac)
    return out, (num / den) ** 0.5 if den > 0 else 0.0


def peft_base(run: RunModel, out: Path, choice: str = "auto") -> tuple[str, bool, bool]:
    """(the PEFT config's base_model_name_or_path, whether the export writes that base to
    OUT/base, whether it holds exactly the weights the run trained on). `auto`: the run's base
    by name when the name resolves to exactly its weights, else `local`."""
    reference, exact = hub_reference(run.cfg.model.name)
    if choice == "hub":
        if reference is None:
            raise ConfigError(f"export error: --base hub: no hub name is known for model "
                              f"{run.cfg.model.name}; use --base local")
        return reference, False, exact
    if choice == "auto" and exact:
        return reference, False, True
    return str((out / "base").resolve()), True, True


def write_peft(folder: Path, run: RunModel, update: Factors, base: str | None = None) -> None:
    """adapter_config.json and adapter_model.safetensors; `base` is base_model_name_or_path
    (default: the run's model name)."""
    folder.mkdir(parents=True, exist_ok=True)
    ranks = {name: int(A.shape[0]) for name, (_, A) in update.items()}
    default = max(ranks.values())
    config = LoraConfig(
        r=default,
        lora_alpha=default,
        target_modules=sorted(update),
        rank_pattern={k: r for k, r in ranks.items() if r != default},
        alpha_pattern={k: r for k, r in ranks.items() if r != default},
        lora_dropout=0.0,
        bias="none",
        task_type="CAUSAL_LM",
        fan_in_fan_out=any(layer.transposed for layer in run.adapters.layers.values()),
        base_model_name_or_path=base or run.cfg.model.name,
    )
    config.save_pretrained(str(folder))
    tensors = {}
    for name, (B, A) in update.items():
        tensors[f"base_model.model.{name}.lora_A.weight"] = A.contiguous()
        tensors[f"base_model.model.{name}.lora_B.weight"] = (run.scaling * B).contiguous()
    atomic_write(folder / "adapter_model.safetensors", tensors_to_bytes(tensors))


def export_run(run_dir: Path, fmt: str, out: Path, rank: int | None = None, base: str = "auto") -> dict[str, Any]:
    """Write the run as `peft` (adapter, plus its base in OUT/base when needed: see `peft_base`)
    or `merged` (a plain transformers folder). Returns what was written."""
    if Path(os.path.abspath(out)).is_relative_to(os.path.abspath(run_dir)):  # the default, RUN/export-*
        refuse_links(out, run_dir)  # PEFT and transformers write by path: no planted link in the way
    if os.path.lexists(out) and not os.path.isdir(out):  # a file, FIFO or socket where the folder goes
        raise ConfigError(f"export error: {out} exists and is not a folder; choose another --out")
    run = load_run(run_dir)
    if not run.update:
        raise ConfigError(f"export error: {run_dir} learned no update (no merges and no final adapter)")
    update, error = (compress_update(run.update, rank) if rank else (run.update, 0.0))
    info: dict[str, Any] = {"format": fmt, "out": str(out), "modules": len(update),
                            "ranks": sorted({int(A.shape[0]) for _, A in update.values()}),
                            "relative_error": error}
    if fmt == "peft":
        name, write_base, exact = peft_base(run, out, base)
        write_peft(out, run, update, name)
        if write_base:
            run.save(out / "base")  # nothing merged: the base exactly as the run trained on it
        info.update(base=name, base_written=write_base, base_exact=exact)
    else:
        run.adapters.merge(update)
        run.save(out)
    return info
