"""The federated task a run works on: client shards, test set, server public set, MMLU."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import numpy as np
from datasets import Dataset
from transformers import PreTrainedTokenizerBase

from fedlora.data.alpaca import ALPACA_FILE, as_prompt_response, heldout_indices, load_alpaca, public_indices
from fedlora.data.checks import check_examples, warn_small_clients
from fedlora.data.encode import (
    Encoded,
    encode_classification,
    encode_instruction,
    label_token_ids,
)
from fedlora.data.instruct import encode_instruction_data
from fedlora.data.mmlu import MMLUSet, encode_mmlu, load_mmlu, per_subject_rows
from fedlora.data.partition import partition_indices
from fedlora.data.personal import personal_holdout
from fedlora.data.reading import reading
from fedlora.data.sources import load_source
from fedlora.errors import ConfigError

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
    test_ids: list[int] = field(default_factory=list)
    """Per test example, its row in the dataset's test split: the key that pairs two runs'
    per-item records."""
    personal: list[list[Encoded]] = field(default_factory=list)
    """Per client, its held-out examples (`evaluation.personalized`; empty otherwise)."""
    personal_ids: list[list[int]] = field(default_factory=list)
    """Per client, each held-out example's row in the seeded training pool (the pairing key)."""

    def partition_table(self) -> list[list[int]]:
        """Examples per client per class (or category)."""
        n = max(len(self.names), len(self.label_ids))
        labels = self.client_labels or [[e.target for e in c] for c in self.clients]
        return [np.bincount(np.asarray(c, dtype=int), minlength=n).tolist() for c in labels]


def build_mmlu(ev: EvaluationConfig, data_dir, tokenizer: PreTrainedTokenizerBase, seed: int) -> MMLUSet:
    field, what = ("evaluation.mmlu_hub_name", ev.mmlu_hub_name) if ev.mmlu_hub_name else ("evaluation.mmlu", data_dir / "mmlu")
    with reading(field, what):
        test = load_mmlu("test", data_dir, ev.mmlu_subjects, ev.mmlu_hub_name)
        dev = load_mmlu("dev", data_dir, ev.mmlu_subjects, ev.mmlu_hub_name) if ev.mmlu_shots else None
    rows = per_subject_rows(list(test["subject"]), ev.mmlu_per_subject, seed)
    mmlu = encode_mmlu(test.select(rows), dev, ev.mmlu_shots, tokenizer, ev.mmlu_max_length)
    mmlu.ids = rows
    return mmlu


def draw_test_rows(size: int, examples: int, seed: int) -> list[int]:
    """The seeded test subset: rows of the test split, in order. The same draw as
    `Dataset.shuffle(seed=seed)` followed by the first `examples` rows (which permutes with
    numpy's default_rng(seed)), made explicit so every item keeps its row number."""
    return np.random.default_rng(seed).permutation(size)[:examples].tolist()


@dataclass
class DataPool:
    """A run's data before tokenisation: everything `check_data` can judge without a model."""

    train: Dataset
    test: Dataset
    names: list[str]
    parts: list[list[int]]
    """Indices into `train` of each client's shard."""
    public_pairs: list[tuple[str, str]] = field(default_factory=list)
    """The server's public (prompt, response) pairs (AFLoRA's A fine-tuning)."""
    heldout_pairs: list[tuple[str, str]] = field(default_factory=list)
    """Public pairs never trained on (the server's held-out loss)."""
    test_ids: list[int] = field(default_factory=list)
    """Each test item's row in the test split (validation: its position in the pool)."""
    personal_parts: list[list[int]] = field(default_factory=list)
    """Indices into `train` of each client's held-out part (`evaluation.personalized`)."""


def check_data(cfg: RunConfig) -> DataPool:
    """Load, check and partition the run's data (no tokenizer, no model): a bad file or a
    partition that cannot work stops here with one line. Same seed ⇒ same pool and shards."""
    d = cfg.data
    pairs: list[tuple[str, str]] = []
    heldout: list[tuple[str, str]] = []
    exclude: list[int] = []
    if cfg.algorithm.uses_public_data:
        hub = cfg.public_data.hub_name
        with reading("public_data.hub_name" if hub else "public_data.dataset", hub or d.data_dir / ALPACA_FILE):
            records = load_alpaca(d.data_dir, hub)
            every = [as_prompt_response(r) for r in records]  # every record has its fields
        idx = public_indices(len(records), cfg.public_data.fraction, cfg.seed)
        held = heldout_indices(len(records), idx, cfg.public_data.heldout_examples, cfg.seed)
        pairs, heldout = [every[i] for i in idx], [every[i] for i in held]
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
        rows = draw_test_rows(len(src.test), d.test_examples, cfg.seed)
        test = src.test.select(rows)
    else:  # validation items, numbered by their position in the seeded training pool
        rows = list(range(d.validation_examples))
        test = validation

    labels = list(train["label"])
    check_examples(d, labels, list(test["label"]), src.names)
    parts = partition_indices(
        labels, cfg.federation.num_clients, d.partition, d.labels_per_client, cfg.seed,
        alpha=d.dirichlet_alpha, epsilon=d.epsilon, min_partition_size=d.min_partition_size,
        size_distribution=d.size_distribution,
    )
    personal: list[list[int]] = []
    if cfg.evaluation.personalized:  # before any training: a client never trains on its held-out part
        parts, personal = personal_holdout(parts, cfg.evaluation.personal_fraction, cfg.seed)
    warn_small_clients([len(p) for p in parts], cfg.federation.batch_size)
    return DataPool(train, test, list(src.names), parts, pairs, heldout, rows, personal)


def build_task(cfg: RunConfig, tokenizer: PreTrainedTokenizerBase) -> FederatedTask:
    """Same seed ⇒ same shards, same test subset, same public set, whatever the method."""
    d = cfg.data
    pool = check_data(cfg)
    train, test, parts = pool.train, pool.test, pool.parts
    public = encode_instruction(pool.public_pairs, tokenizer, cfg.public_data.max_length)
    heldout = encode_instruction(pool.heldout_pairs, tokenizer, cfg.public_data.max_length)
    labels = list(train["label"])
    if d.task == "classification":
        label_ids = label_token_ids(tokenizer, d.label_words or pool.names)
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
        names=pool.names,
        client_labels=[[labels[i] for i in idx] for idx in parts],
        mmlu=mmlu,
        test_ids=pool.test_ids,
        personal=[[encoded[i] for i in idx] for idx in pool.personal_parts],
        personal_ids=pool.personal_parts,
    )
