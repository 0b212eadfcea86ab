"""AG News and Alpaca loaders, partitions, encoding."""

import collections

import pytest
from conftest import tiny_tree
from helpers import public_subset

from fedlora.config import build_config
from fedlora.data.ag_news import load_ag_news
from fedlora.data.alpaca import load_alpaca
from fedlora.data.encode import (
    collate,
    encode_classification,
    encode_instruction,
    label_token_ids,
)
from fedlora.data.partition import partition_indices
from fedlora.data.task import build_task
from fedlora.models import tiny_tokenizer


def test_ag_news_counts_match_readme(data_dir):
    test, train = load_ag_news("test", data_dir), load_ag_news("train", data_dir)
    assert len(test) == 7600 and len(train) == 20000
    assert collections.Counter(list(test["label"])) == {0: 1900, 1: 1900, 2: 1900, 3: 1900}
    assert "#39;" not in "".join(list(test["text"])[:500])


@pytest.mark.parametrize("scheme", ["iid", "label_skew"])
def test_partitions_are_seeded_disjoint_and_skewed(scheme):
    labels = [i % 4 for i in range(2000)]
    parts = partition_indices(labels, 10, scheme, 2, seed=0)
    assert parts == partition_indices(labels, 10, scheme, 2, seed=0)
    flat = [i for p in parts for i in p]
    assert len(flat) == len(set(flat))
    if scheme == "label_skew":
        assert all(len({labels[i] for i in p}) == 2 for p in parts)
        assert len(flat) == 2000
    else:
        assert sorted(flat) == list(range(2000))


def test_task_shards_same_for_every_method(data_dir):
    tok = tiny_tokenizer()
    a = build_task(build_config(tiny_tree()), tok)
    b = build_task(build_config(tiny_tree(algorithm={"name": "fedit"})), tok)
    assert a.clients == b.clients and a.test == b.test
    assert a.public and not b.public
    assert all(sum(1 for n in row if n) == 2 for row in a.partition_table())


def test_classification_prompt_truncates_text_and_keeps_the_ending():
    tok = tiny_tokenizer()
    enc = encode_classification(["a b c d e f g h i j k l m n o p"], [1], tok, "Article: {text}\nTopic:", 10)
    ids = enc[0].input_ids
    assert len(ids) == 10 and ids[-2:] == tok.encode("Topic:", add_special_tokens=False)
    assert label_token_ids(tok, ["World", "Sports"]) == tok.convert_tokens_to_ids(["World", "Sports"])
    with pytest.raises(ValueError, match="share a first token"):
        label_token_ids(tok, ["World", "World"])


def test_instruction_loss_only_on_response(data_dir):
    tok = tiny_tokenizer()
    enc = encode_instruction([("Instruction : a b", "World Sports")], tok, 64)[0]
    batch = collate([enc], tok.pad_token_id)
    labels = batch["labels"][0]
    assert (labels[: enc.prompt_length] == -100).all()
    assert labels[enc.prompt_length :].tolist() == enc.input_ids[enc.prompt_length :]
    records = load_alpaca(data_dir)
    assert len(records) == 5000 and len(public_subset(records, 0.02, 0)) == 100
