"""Will the run's shapes fit in memory? Checked once the model's dimensions are known and
before the first batch is built, so `batch_size: 10000000` stops with one line naming the
field instead of a MemoryError (or the OOM killer) minutes later.

The estimate is deliberately an upper bound of the big terms, not a prediction: it refuses
only what cannot fit in the memory this process may use (physical memory, an address-space
rlimit, a cgroup limit: the smallest), never a run that merely would be slow.
Activations follow Korthikanti et al. (2022), 34·h + 5·a·s bytes per token and layer in
16-bit, doubled for float32; logits cost 2 × 4 bytes per token and vocabulary entry; the
batches a client draws for its local steps are built up front, 24 bytes per token.
"""

from __future__ import annotations

import os
import resource
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from fedlora.errors import ConfigError
from fedlora.units import format_bytes

CGROUP_LIMIT = Path("/sys/fs/cgroup/memory.max")
BATCH_BYTES_PER_TOKEN = 24  # input ids, attention mask, labels: int64 each


@dataclass(frozen=True)
class ModelDims:
    hidden: int
    layers: int
    heads: int
    vocab: int

    @classmethod
    def vocabulary_only(cls, vocab: int) -> ModelDims:
        """What the tokenizer tells before the model loads: a lower bound of the estimate."""
        return cls(0, 0, 0, vocab)

    @classmethod
    def of(cls, config: Any) -> ModelDims:
        """The dimensions of a transformers config (Llama and GPT-2 names alike)."""
        def first(*names: str, default: int = 1) -> int:
            return int(next((getattr(config, n) for n in names if getattr(config, n, None)), default))

        return cls(first("hidden_size", "n_embd"), first("num_hidden_layers", "n_layer"),
                   first("num_attention_heads", "n_head"), first("vocab_size"))


def available_bytes() -> int:
    """Memory this process may use: physical memory, or less under an rlimit or a cgroup."""
    limits = [os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")]
    soft, _ = resource.getrlimit(resource.RLIMIT_AS)
    if soft != resource.RLIM_INFINITY:
        limits.append(soft)
    try:
        text = CGROUP_LIMIT.read_text().strip()
        if text.isdigit():
            limits.append(int(text))
    except OSError:
        pass
    return min(limits)


def forward_bytes(dims: ModelDims, sequences: int, length: int, backward: bool,
                  last_only: bool = False) -> int:
    """Peak bytes of one forward (and backward) pass over `sequences` × `length` tokens.
    `last_only`: the pass projects only each sequence's last hidden state (classification and
    MMLU scoring, fedlora.evaluate), so the vocabulary-wide logits are one row per sequence."""
    tokens = sequences * length
    per_layer = 2 * (34 * dims.hidden + 5 * dims.heads * length)  # float32: twice the 16-bit bytes
    kept = dims.layers if backward else 2  # without a backward pass a layer's activations are freed
    logits = 8 * dims.vocab * (sequences if last_only else tokens)
    return tokens * (kept * per_layer + BATCH_BYTES_PER_TOKEN) + logits


def check_memory(cfg: Any, dims: ModelDims, available: int | None = None) -> None:
    """One line naming the field whose shape cannot fit, before anything is allocated for it."""
    available = available_bytes() if available is None else available
    f, d = cfg.federation, cfg.data
    needs = [
        (f"federation.batch_size: {f.batch_size} × data.max_length {d.max_length} tokens per training step",
         forward_bytes(dims, f.batch_size, d.max_length, backward=True)),
        (f"federation.local_steps: {f.local_steps} batches of {f.batch_size} × {d.max_length} tokens drawn per "
         "client round", f.local_steps * f.batch_size * d.max_length * BATCH_BYTES_PER_TOKEN),
        (f"federation.eval_batch_size: {f.eval_batch_size} × data.max_length {d.max_length} tokens per "
         "evaluation batch", forward_bytes(dims, f.eval_batch_size, d.max_length, backward=False,
                                           last_only=d.task == "classification")),
    ]
    # MMLU's `evaluation.mmlu_max_length` is a truncation cap, not a batch shape: its batches are
    # as long as their longest question, far below the cap, so it is not estimated here
    for what, need in needs:
        if need > available:
            raise ConfigError(f"config error: {what} need about {format_bytes(need)}, more than the "
                              f"{format_bytes(available)} of memory this process may use")
