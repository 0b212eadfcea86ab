"""The federated task a run works on: client shards, test set, server public set, MMLU."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import numpy as np
from transformers import PreTrainedTokenizerBase

from fedlora.data.alpaca import as_prompt_response, heldout_indices, load_alpaca, public_indices
from fedlora.data.encode import (
    Encoded,
    encode_classification,
    encode_instruction,
    label_token_ids,
)
from fedlora.data.instruct import encode_instruction_data
from fedlora.data.mmlu import MMLUSet, encode_mmlu, load_mmlu, per_subject_subset
from fedlora.data.partition import partition_indices
from fedlora.data.sources import load_source

from fedlora.config import ConfigError

if TYPE_CHECKING:
    from fedlora.config import EvaluationConfig, RunConfig


@dataclass
class FederatedTask:
    clients: list[list[Encoded]]
    test: list[Encoded]
    label_ids: list[int]
    public: list[Encoded] = field(default_factory=list)
    public_heldout: list[Encoded] = field(default_factory=list)
    """Public examples the server never trains on (measures its A fine-tuning)."""
    kind: str = "classification"
    """`classification` (label-token loss, accuracy) or `instruction` (response-token loss)."""
    names: list[str] = field(default_factory=list)
    """Class names, or category names of instruction data (columns of partition_table)."""
    client_labels: list[list[int]] = field(default_factory=list)
    """Per client, the class / category index of each of its examples (same order)."""
    mmlu: MMLUSet | None = None

    def partition_table(self) -> list[list[int]]:
        """Examples per client per class (or category)."""
        n = max(len(self.names), len(self.label_ids))
        labels = self.client_labels or [[e.target for e in c] for c in self.clients]
        return [np.bincount(np.asarray(c, dtype=int), minlength=n).tolist() for c in labels]


def build_mmlu(ev: EvaluationConfig, data_dir, tokenizer: PreTrainedTokenizerBase, seed: int) -> MMLUSet:
    test = load_mmlu("test", data_dir, ev.mmlu_subjects, ev.mmlu_hub_name)
    test = per_subject_subset(test, ev.mmlu_per_subject, seed)
    dev = load_mmlu("dev", data_dir, ev.mmlu_subjects, ev.mmlu_hub_name) if ev.mmlu_shots else None
    return encode_mmlu(test, dev, ev.mmlu_shots, tokenizer, ev.mmlu_max_length)


def build_task(cfg: RunConfig, tokenizer: PreTrainedTokenizerBase) -> FederatedTask:
    """Same seed ⇒ same shards, same test subset, same public set, whatever the method."""
    d = cfg.data
    public: list[Encoded] = []
    heldout: list[Encoded] = []
    exclude: list[int] = []
    if cfg.algorithm.uses_public_data:
        records = load_alpaca(d.data_dir, cfg.public_data.hub_name)
        idx = public_indices(len(records), cfg.public_data.fraction, cfg.seed)
        held = heldout_indices(len(records), idx, cfg.public_data.heldout_examples, cfg.seed)
        encode = lambda ids: encode_instruction(
            [as_prompt_response(records[i]) for i in ids], tokenizer, cfg.public_data.max_length
        )
        public, heldout = encode(idx), encode(held)
        if d.dataset == "alpaca" and d.hub_name == cfg.public_data.hub_name:
            exclude = sorted(idx + held)  # the public draw is disjoint from the clients' data

    src = load_source(d, exclude)
    # Local files are grouped (by class, category or client): shuffle (seeded) before capping
    # or splitting.
    train = src.train.shuffle(seed=cfg.seed)
    if d.validation_examples is not None:
        # Tuning (`fedlora tune`): carve a validation set off the training pool before capping
        # or partitioning, so no client trains on it, and evaluate on it: the test split is
        # never touched.
        if d.validation_examples >= len(train):
            raise ConfigError(
                f"config error: data.validation_examples: {d.validation_examples} leaves no training data "
                f"(the pool has {len(train)} examples)"
            )
        validation = train.select(range(d.validation_examples))
        train = train.select(range(d.validation_examples, len(train)))
    if d.train_examples is not None:
        train = train.select(range(min(d.train_examples, len(train))))
    if d.validation_examples is None:
        test = src.test.shuffle(seed=cfg.seed).select(range(min(d.test_examples, len(src.test))))
    else:
        test = validation

    labels = list(train["label"])
    parts = partition_indices(
        labels, cfg.federation.num_clients, d.partition, d.labels_per_client, cfg.seed,
        alpha=d.dirichlet_alpha, epsilon=d.epsilon, min_partition_size=d.min_partition_size,
        size_distribution=d.size_distribution,
    )
    if d.task == "classification":
        words = d.label_words or src.names
        if len(words) != len(src.names):
            raise ValueError(f"data.label_words: {len(words)} words for {len(src.names)} classes")
        label_ids = label_token_ids(tokenizer, words)
        encoded = encode_classification(list(train["text"]), labels, tokenizer, d.prompt, d.max_length)
        test_enc = encode_classification(
            list(test["text"]), list(test["label"]), tokenizer, d.prompt, d.max_length
        )
    else:
        label_ids = []
        encoded = encode_instruction_data(train, d, tokenizer)
        test_enc = encode_instruction_data(test, d, tokenizer)
    mmlu = build_mmlu(cfg.evaluation, d.data_dir, tokenizer, cfg.seed) if cfg.evaluation.mmlu else None
    return FederatedTask(
        clients=[[encoded[i] for i in idx] for idx in parts],
        test=test_enc,
        label_ids=label_ids,
        public=public,
        public_heldout=heldout,
        kind=d.task,
        names=list(src.names),
        client_labels=[[labels[i] for i in idx] for idx in parts],
        mmlu=mmlu,
    )
