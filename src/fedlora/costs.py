"""What a client pays: parameters trained and uploaded, bytes, and the paper's client-side cost %.

Client-side cost (AFLoRA paper, §VI-A): parameters a client fine-tunes or uploads, divided
by the base model's parameter count. Every upload here is (a function of) trained
parameters, so the count is max(trained, uploaded), averaged over clients and rounds.

`architecture_costs` computes the figure for an architecture from its config alone (model
built on the meta device: no weights are downloaded or allocated).
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass

import torch
from torch import Tensor

from fedlora.adapters import find_targets, module_shape

# Configs of the paper's models, so `fedlora costs` works offline for them.
ARCHITECTURES: dict[str, dict] = {
    "gpt2": {"model_type": "gpt2"},  # GPT-2 small, 124M (the config defaults)
    "tinyllama": {
        "model_type": "llama", "hidden_size": 2048, "intermediate_size": 5632,
        "num_hidden_layers": 22, "num_attention_heads": 32, "num_key_value_heads": 4,
        "vocab_size": 32000, "tie_word_embeddings": False,
    },
    "qwen2.5-3b": {
        "model_type": "qwen2", "hidden_size": 2048, "intermediate_size": 11008,
        "num_hidden_layers": 36, "num_attention_heads": 16, "num_key_value_heads": 2,
        "vocab_size": 151936, "tie_word_embeddings": True,
    },
}
DEFAULT_TARGETS = {"gpt2": ["c_attn", "c_proj", "c_fc"], "tinyllama": ["q_proj", "v_proj"],
                   "qwen2.5-3b": ["q_proj", "v_proj"]}


def tensor_bytes(tensors: Mapping[str, Tensor] | Iterable[Tensor]) -> int:
    values = tensors.values() if isinstance(tensors, Mapping) else tensors
    return sum(t.numel() * t.element_size() for t in values)


def cost_percent(trained_params: float, uploaded_params: float, total_params: int) -> float:
    return 100.0 * max(trained_params, uploaded_params) / total_params


@dataclass(frozen=True)
class ArchitectureShapes:
    name: str
    total_params: int
    modules: dict[str, tuple[int, int]]  # module → (m, n)


def architecture_shapes(arch: str, targets: list[str] | None = None) -> ArchitectureShapes:
    """Target shapes and parameter count of `arch` (a known name, hub name or folder)."""
    from transformers import AutoConfig, AutoModelForCausalLM

    if arch in ARCHITECTURES:
        spec = dict(ARCHITECTURES[arch])
        config = AutoConfig.for_model(spec.pop("model_type"), **spec)
    else:
        config = AutoConfig.from_pretrained(arch)
    targets = targets or DEFAULT_TARGETS.get(arch) or ["q_proj", "v_proj"]
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config)
    total = sum(p.numel() for p in model.parameters())
    shapes = {name: module_shape(mod) for name, mod in find_targets(model, targets, "--targets").items()}
    return ArchitectureShapes(arch, total, shapes)


def per_client_params(shapes: Mapping[str, tuple[int, int]], ranks: list[int], trains: str) -> list[float]:
    """Parameters each client trains/uploads when it trains `trains` at rank r_k.

    trains: "AB" (A and B), "A" (A only), "B" (B only), "B+lam" (B and the diagonal λ),
    "A/B" (A and B in alternate rounds: their mean per round).
    """
    per_rank = {
        "AB": sum(m + n for m, n in shapes.values()),
        "A": sum(n for _, n in shapes.values()),
        "B": sum(m for m, _ in shapes.values()),
        "B+lam": sum(m + 1 for m, _ in shapes.values()),
        "A/B": sum(m + n for m, n in shapes.values()) / 2,
    }[trains]
    return [per_rank * r for r in ranks]


def method_cost_rows(
    shapes: ArchitectureShapes, ranks: list[int], total_params: int | None = None
) -> list[tuple[str, str, float]]:
    """(method, what clients train, cost %) for each method, averaged over clients."""
    from fedlora.algorithms import ALGORITHMS

    total = total_params or shapes.total_params
    what = {"AB": "A and B", "A": "A only", "B": "B only", "B+lam": "B and λ", "A/B": "A or B (alternate rounds)"}
    out = []
    for method, algo in ALGORITHMS.items():
        rr = [min(ranks)] * len(ranks) if algo.homogeneous else ranks
        where = f"at the common rank {min(ranks)}" if algo.homogeneous else "at each client's max rank"
        where += algo.cost_note
        params = per_client_params(shapes.modules, rr, algo.trains)
        out.append((method, f"{what[algo.trains]} {where}", 100.0 * sum(params) / len(params) / total))
    return out
