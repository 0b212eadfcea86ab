"""The federated task a run works on: client shards, test subset, server public set."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import numpy as np
from transformers import PreTrainedTokenizerBase

from fedlora.data.ag_news import load_ag_news
from fedlora.data.alpaca import as_prompt_response, load_alpaca, public_subset
from fedlora.data.encode import (
    Encoded,
    encode_classification,
    encode_instruction,
    label_token_ids,
)
from fedlora.data.partition import partition_indices

if TYPE_CHECKING:
    from fedlora.config import RunConfig


@dataclass
class FederatedTask:
    clients: list[list[Encoded]]
    test: list[Encoded]
    label_ids: list[int]
    public: list[Encoded] = field(default_factory=list)

    def partition_table(self) -> list[list[int]]:
        """Examples per client per class."""
        n = len(self.label_ids)
        return [np.bincount([e.target for e in c], minlength=n).tolist() for c in self.clients]


def build_task(cfg: RunConfig, tokenizer: PreTrainedTokenizerBase) -> FederatedTask:
    """Same seed ⇒ same shards, same test subset, same public set, whatever the method."""
    d = cfg.data
    label_ids = label_token_ids(tokenizer, d.label_words)
    train = load_ag_news("train", d.data_dir, d.hub_name)
    test = load_ag_news("test", d.data_dir, d.hub_name)
    n_classes = len(set(list(train["label"])))
    if n_classes != len(d.label_words):
        raise ValueError(f"data.label_words: {len(d.label_words)} words for {n_classes} classes")
    # The local train file is grouped by class: shuffle (seeded) before capping or splitting.
    train = train.shuffle(seed=cfg.seed)
    if d.train_examples is not None:
        train = train.select(range(min(d.train_examples, len(train))))
    test = test.shuffle(seed=cfg.seed).select(range(min(d.test_examples, len(test))))

    labels = list(train["label"])
    parts = partition_indices(labels, cfg.federation.num_clients, d.partition, d.labels_per_client, cfg.seed)
    encoded = encode_classification(list(train["text"]), labels, tokenizer, d.prompt, d.max_length)
    clients = [[encoded[i] for i in idx] for idx in parts]
    test_enc = encode_classification(
        list(test["text"]), list(test["label"]), tokenizer, d.prompt, d.max_length
    )

    public: list[Encoded] = []
    if cfg.algorithm.uses_public_data:
        records = public_subset(load_alpaca(d.data_dir), cfg.public_data.fraction, cfg.seed)
        pairs = [as_prompt_response(r) for r in records]
        public = encode_instruction(pairs, tokenizer, cfg.public_data.max_length)
    return FederatedTask(clients=clients, test=test_enc, label_ids=label_ids, public=public)
