"""Prompt encoding and batching: classification (one label token) and instruction (response loss)."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from torch import Tensor
from transformers import PreTrainedTokenizerBase

from fedlora.errors import ConfigError


@dataclass(frozen=True)
class Encoded:
    """Token ids of one example; `target` is a class index or, for instruction data, -1."""

    input_ids: list[int]
    target: int = -1
    prompt_length: int = 0  # instruction data: tokens before the response (no loss there)


def label_token_ids(tokenizer: PreTrainedTokenizerBase, label_words: list[str]) -> list[int]:
    """First token of " word" for each label; they must be distinct to score by one position.
    (Without data.label_words the words are the class names.)"""
    tokens = [tokenizer.encode(" " + w, add_special_tokens=False) for w in label_words]
    empty = [w for w, t in zip(label_words, tokens) if not t]
    if empty:
        raise ConfigError(f"config error: data.label_words: {empty[0]!r} encodes to no token")
    ids = [t[0] for t in tokens]
    if len(set(ids)) != len(ids):
        raise ConfigError(
            f"config error: data.label_words: {label_words} share a first token {ids}; choose words "
            "whose first tokens differ"
        )
    return ids


def encode_classification(
    texts: list[str],
    targets: list[int],
    tokenizer: PreTrainedTokenizerBase,
    prompt: str,
    max_length: int,
) -> list[Encoded]:
    """Prompt with the text truncated so the whole prompt fits in `max_length` tokens.

    The label is not part of the input: the model's next-token logits at the last prompt
    position score the label words.
    """
    prefix, suffix = prompt.split("{text}", 1)
    pre = tokenizer.encode(prefix, add_special_tokens=False) if prefix else []
    suf = tokenizer.encode(suffix, add_special_tokens=False) if suffix else []
    budget = max_length - len(pre) - len(suf)
    if budget < 1:
        raise ConfigError(
            f"config error: data.max_length: {max_length} tokens leave no room for the text: the prompt "
            f"alone takes {len(pre) + len(suf)}"
        )
    bodies = tokenizer(texts, add_special_tokens=False)["input_ids"]
    return [Encoded(pre + body[:budget] + suf, int(t)) for body, t in zip(bodies, targets)]


def encode_instruction(
    pairs: list[tuple[str, str]], tokenizer: PreTrainedTokenizerBase, max_length: int
) -> list[Encoded]:
    """Prompt + response + EOS; the response keeps at least half the budget when truncating."""
    out = []
    eos = [tokenizer.eos_token_id] if tokenizer.eos_token_id is not None else []
    if not pairs:
        return out
    prompts = tokenizer([p for p, _ in pairs], add_special_tokens=False)["input_ids"]  # batched: fast
    responses = tokenizer([r for _, r in pairs], add_special_tokens=False)["input_ids"]
    for p, r in zip(prompts, responses):
        r = r + eos
        r = r[: max(max_length - len(p), max_length // 2)]
        p = p[max(0, len(p) - (max_length - len(r))) :]  # drop the prompt's start if needed
        out.append(Encoded(p + r, -1, len(p)))
    return out


def collate(examples: list[Encoded], pad_id: int) -> dict[str, Tensor]:
    """Right-padded batch; `last` is each row's last real position, `labels` for LM loss."""
    width = max(len(e.input_ids) for e in examples)
    ids = torch.full((len(examples), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(examples), width), dtype=torch.long)
    labels = torch.full((len(examples), width), -100, dtype=torch.long)
    for i, e in enumerate(examples):
        n = len(e.input_ids)
        ids[i, :n] = torch.tensor(e.input_ids)
        mask[i, :n] = 1
        labels[i, e.prompt_length : n] = ids[i, e.prompt_length : n]
    return {
        "input_ids": ids,
        "attention_mask": mask,
        "last": mask.sum(1) - 1,
        "target": torch.tensor([e.target for e in examples]),
        "labels": labels,
    }


def sample_batches(
    examples: list[Encoded], batch_size: int, steps: int, seed: int | np.random.SeedSequence, pad_id: int
) -> list[dict[str, Tensor]]:
    """`steps` batches drawn by walking seeded permutations (an epoch boundary reshuffles)."""
    rng = np.random.default_rng(seed)
    order: list[int] = []
    batches = []
    for _ in range(steps):
        while len(order) < batch_size:
            order += rng.permutation(len(examples)).tolist()
        take, order = order[:batch_size], order[batch_size:]
        batches.append(collate([examples[i] for i in take], pad_id))
    return batches


def length_sorted_batches(examples: list[Encoded], batch_size: int, pad_id: int):
    """Evaluation batches of similar length (little padding); yields (indices, batch)."""
    order = sorted(range(len(examples)), key=lambda i: len(examples[i].input_ids))
    for start in range(0, len(order), batch_size):
        idx = order[start : start + batch_size]
        yield idx, collate([examples[i] for i in idx], pad_id)
