"""Per-item records of every evaluation (classification, instruction loss, MMLU) and the
per-class, confusion and worst-client fields (on a hand-made partition and predictions)."""

from __future__ import annotations

import numpy as np
import pytest
from conftest import tiny_tree
from helpers import evaluate_lm, evaluate_mmlu

from fedlora.class_metrics import classification_breakdown, client_accuracy
from fedlora.config import build_config
from fedlora.data.encode import encode_instruction
from fedlora.data.mmlu import load_mmlu
from fedlora.data.sources import load_source
from fedlora.data.task import build_mmlu, draw_test_rows
from fedlora.evaluate import lm_items, mmlu_items
from fedlora.models import load_base_model, tiny_tokenizer
from fedlora.runtime.inprocess import Simulation
from fedlora.runtime.outputs import read_eval_items, read_metrics

# class 0: 3 of 4 right (one called 1); class 1: 2 of 2; class 2: 1 of 4 (called 0, 0, 1)
LABELS = np.array([0, 0, 0, 0, 1, 1, 2, 2, 2, 2])
PREDS = np.array([0, 0, 0, 1, 1, 1, 2, 0, 0, 1])


def test_breakdown_on_a_hand_made_partition():
    partition = [[10, 10, 0], [0, 5, 15], [4, 0, 4]]
    out = classification_breakdown(LABELS, PREDS, ["w", "s", "b"], partition)
    assert out["confusion"] == [[3, 1, 0], [0, 2, 0], [2, 1, 1]]
    assert out["class_accuracy"] == {"w": 0.75, "s": 1.0, "b": 0.25}
    # client 0: (10·0.75 + 10·1)/20; client 1: (5·1 + 15·0.25)/20; client 2: (4·0.75 + 4·0.25)/8
    assert out["client_accuracy"] == pytest.approx([0.875, 0.4375, 0.5])
    assert out["worst_client_accuracy"] == pytest.approx(0.4375) and out["worst_client"] == 1


def test_classes_missing_from_the_test_set():
    """Class 3 has no test item: no accuracy; a client's mix is renormalised over the others,
    and a client holding only class 3 has no re-weighted accuracy."""
    out = classification_breakdown(LABELS, PREDS, ["w", "s", "b", "t"], [[2, 0, 0, 6], [0, 0, 0, 8], [0, 4, 4, 0]])
    assert out["class_accuracy"]["t"] is None
    assert out["client_accuracy"] == [0.75, None, pytest.approx(0.625)]
    assert out["worst_client"] == 2
    assert np.isnan(client_accuracy(np.array([np.nan, 0.5]), [[3, 0]])[0])


def test_test_ids_are_the_rows_of_the_seeded_test_subset(data_dir):
    """test_rows draws exactly the subset `shuffle(seed)` drew before, with its row numbers."""
    cfg = build_config(tiny_tree())
    src = load_source(cfg.data)
    shuffled = src.test.shuffle(seed=3).select(range(20))
    rows = draw_test_rows(len(src.test), 20, 3)
    assert list(src.test.select(rows)["text"]) == list(shuffled["text"])
    assert sorted(draw_test_rows(10, 50, 0)) == list(range(10))


def test_every_evaluation_saves_per_item_records(data_dir, tmp_path):
    Simulation(build_config(tiny_tree()), tmp_path, progress=False).run()
    history = read_metrics(tmp_path)
    for rec in history:
        items = read_eval_items(tmp_path, rec["round"])
        n = len(items["id"])
        assert n == 48 and len(set(items["id"].tolist())) == n
        assert items["correct"].mean() == pytest.approx(rec["accuracy"])
        assert np.array_equal(items["correct"], items["prediction"] == items["label"])
        assert np.array_equal(items["prediction"], items["logprob"].argmax(1))
        assert np.exp(items["logprob"]).sum(1) == pytest.approx(np.ones(n), rel=1e-5)
        ce = -items["logprob"][np.arange(n), items["label"]].astype(np.float64).mean()
        assert ce == pytest.approx(rec["test_loss"], rel=1e-6)
        confusion = np.array(rec["confusion"])
        assert confusion.sum() == n and np.trace(confusion) == items["correct"].sum()
        assert rec["worst_client_accuracy"] == min(a for a in rec["client_accuracy"] if a is not None)
        assert rec["client_accuracy"][rec["worst_client"]] == rec["worst_client_accuracy"]
        assert set(rec["class_accuracy"]) == {"World", "Sports", "Business", "Sci/Tech"}
    first, last = (read_eval_items(tmp_path, r["round"]) for r in (history[0], history[-1]))
    assert np.array_equal(first["id"], last["id"])  # the same test items every round


def test_instruction_items_are_each_examples_own_loss():
    """Per-item LM loss in a padded batch equals the example scored alone; their token-weighted
    mean is the held-out loss."""
    tok = tiny_tokenizer()
    model, _ = load_base_model("tiny-llama", seed=0)
    pairs = [("Instruction : say", "World Sports"), ("Instruction : a b c d e f g", "Business"),
             ("Instruction : x", "Sci Tech and more words here")]
    enc = encode_instruction(pairs, tok, 32)
    items = lm_items(model, enc, tok.pad_token_id, batch_size=3)
    for i, e in enumerate(enc):
        alone = lm_items(model, [e], tok.pad_token_id, batch_size=1)
        assert items["loss"][i] == pytest.approx(alone["loss"][0], rel=1e-5)
        assert items["tokens"][i] == len(e.input_ids) - e.prompt_length
    assert evaluate_lm(model, enc, tok.pad_token_id, 2)["loss"] == pytest.approx(
        float((items["loss"] * items["tokens"]).sum() / items["tokens"].sum()), rel=1e-6)


def test_mmlu_items_carry_their_rows(data_dir):
    ev = build_config(tiny_tree(evaluation={"mmlu": True, "mmlu_subjects": ["anatomy", "virology"],
                                            "mmlu_per_subject": 4})).evaluation
    tok = tiny_tokenizer()
    mmlu = build_mmlu(ev, data_dir, tok, seed=0)
    full = load_mmlu("test", data_dir, ["anatomy", "virology"])
    assert [e.target for e in mmlu.examples] == [full[i]["answer"] for i in mmlu.ids]
    assert mmlu.subjects == [full[i]["subject"] for i in mmlu.ids]
    model, _ = load_base_model("tiny-llama", seed=0)
    items, _ = mmlu_items(model, mmlu, tok.pad_token_id, 4)
    assert items["mmlu_id"].tolist() == mmlu.ids
    assert np.array_equal(items["mmlu_correct"], items["mmlu_prediction"] == items["mmlu_label"])
    assert evaluate_mmlu(model, mmlu, tok.pad_token_id, 4)["mmlu_micro_accuracy"] == items["mmlu_correct"].mean()
