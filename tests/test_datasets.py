"""Every dataset's loader against its README, splits, partitions, instruction encoding,
MMLU prompts and scoring, held-out LM loss, bring-your-own data."""

import collections
import json
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from conftest import tiny_tree
from helpers import evaluate_lm, evaluate_mmlu, per_subject_subset

from fedlora.config import ConfigError, build_config, load_config
from fedlora.data.alpaca import alpaca_dataset, load_alpaca, public_indices
from fedlora.data.dolly import DOLLY_CATEGORIES, load_dolly
from fedlora.data.encode import collate, encode_instruction, length_sorted_batches
from fedlora.data.financial_phrasebank import FPB_CLASSES, load_financial_phrasebank
from fedlora.data.instruct import encode_instruction_data, format_prompt
from fedlora.data.mmlu import (
    LETTERS,
    encode_mmlu,
    load_mmlu,
    mmlu_subjects,
)
from fedlora.data.partition import partition_indices
from fedlora.data.sources import load_source
from fedlora.data.splits import seeded_split
from fedlora.data.task import build_task
from fedlora.evaluate import predict_classes
from fedlora.models import load_base_model, tiny_tokenizer
from fedlora.train import lm_loss

# --- loaders against each folder's README ------------------------------------------------


@pytest.mark.parametrize("agreement,counts", [
    ("50", (4846, 604, 2879, 1363)), ("66", (4217, 514, 2535, 1168)),
    ("75", (3453, 420, 2146, 887)), ("all", (2264, 303, 1391, 570)),
])
def test_financial_phrasebank_counts_and_labels_match_readme(data_dir, agreement, counts):
    ds = load_financial_phrasebank(agreement, data_dir)
    c = collections.Counter(list(ds["label"]))
    assert (len(ds), c[0], c[1], c[2]) == counts  # negative, neutral, positive
    assert FPB_CLASSES == ["negative", "neutral", "positive"]  # the hub's 0, 1, 2
    assert not any(t.endswith(("@positive", "@negative", "@neutral")) for t in ds["text"])


def test_dolly_counts_and_categories_match_readme(data_dir):
    ds = load_dolly(data_dir)
    assert len(ds) == 15011
    readme = {"open_qa": 3742, "general_qa": 2191, "classification": 2136, "closed_qa": 1773,
              "brainstorming": 1766, "information_extraction": 1506, "summarization": 1188,
              "creative_writing": 709}
    assert collections.Counter(list(ds["category"])) == readme
    assert all(DOLLY_CATEGORIES[lab] == cat for lab, cat in zip(ds["label"], ds["category"]))
    assert sum(1 for x in ds["input"] if x) > 0  # Dolly's context becomes the input


def test_alpaca_counts_and_public_draw_disjoint_from_clients(data_dir):
    records = load_alpaca(data_dir)
    assert len(records) == 5000 and sum(1 for r in records if r["input"]) == 1943
    ds = alpaca_dataset(records)
    assert ds.column_names == ["instruction", "input", "response", "label"]
    cfg = build_config(tiny_tree(data={"dataset": "alpaca", "max_length": 32, "train_examples": None,
                                       "test_examples": 5000}))
    task = build_task(cfg, tiny_tokenizer())
    public = {tuple(e.input_ids) for e in task.public}
    clients = {tuple(e.input_ids) for c in task.clients for e in c} | {tuple(e.input_ids) for e in task.test}
    assert len(task.public) == 100
    held = cfg.public_data.heldout_examples  # the server's held-out public rows are left out too
    assert sum(len(c) for c in task.clients) + len(task.test) == 4900 - held  # the 100 public rows left out
    idx = set(public_indices(5000, 0.02, 0))
    kept = [r for i, r in enumerate(records) if i not in idx]
    assert len(kept) == 4900 and len(public & clients) <= 5  # identical prompts only by coincidence


def test_mmlu_counts_and_answers_match_readme(data_dir):
    subjects = mmlu_subjects(data_dir)
    assert len(subjects) == 57
    test, dev = load_mmlu("test", data_dir), load_mmlu("dev", data_dir)
    assert len(test) == 14042 and len(dev) == 285
    assert collections.Counter(LETTERS[a] for a in test["answer"]) == {"A": 3222, "B": 3462, "C": 3582, "D": 3776}
    assert collections.Counter(LETTERS[a] for a in dev["answer"]) == {"A": 67, "B": 69, "C": 71, "D": 78}
    per = collections.Counter(list(test["subject"]))
    assert per["professional_medicine"] == 272 and per["machine_learning"] == 112
    assert all(n == 5 for n in collections.Counter(list(dev["subject"])).values())


def test_ag_news_label_map_matches_readme(data_dir):
    from fedlora.data.ag_news import AG_NEWS_CLASSES, load_ag_news

    ds = load_ag_news("test", data_dir)
    assert AG_NEWS_CLASSES == ["World", "Sports", "Business", "Sci/Tech"]  # README index 1..4
    assert "Olympic" in " ".join(t for t, lab in zip(ds["text"][:400], ds["label"][:400]) if lab == 1)


# --- splits and partitions ---------------------------------------------------------------


def test_seeded_split_keeps_duplicates_together_and_covers_all():
    keys = [f"s{i % 90}" for i in range(100)]  # 10 duplicated keys
    train, test = seeded_split(keys, 0.2, seed=3)
    assert sorted(train + test) == list(range(100))
    assert not {keys[i] for i in train} & {keys[i] for i in test}
    assert (train, test) == seeded_split(keys, 0.2, seed=3) and test != seeded_split(keys, 0.2, seed=4)[1]


SCHEMES = ["iid", "label_skew", "dirichlet", "category_skew", "size_skew"]


@pytest.mark.parametrize("scheme", SCHEMES)
def test_every_partition_is_seeded_and_covers_each_example_once(scheme):
    rng = np.random.default_rng(0)
    labels = rng.integers(0, 8, size=3000).tolist()
    parts = partition_indices(labels, 10, scheme, 2, seed=1)
    assert parts == partition_indices(labels, 10, scheme, 2, seed=1)
    assert sorted(i for p in parts for i in p) == list(range(3000))
    if scheme in ("dirichlet", "category_skew"):
        assert parts != partition_indices(labels, 10, scheme, 2, seed=2)
    if scheme == "label_skew":
        assert all(len({labels[i] for i in p}) == 2 for p in parts)
    if scheme == "size_skew":
        sizes = [len(p) for p in parts]
        assert sizes == sorted(sizes) and sizes[-1] > 5 * sizes[0]


@pytest.mark.parametrize("k", [1, 3])
def test_label_skew_gives_exactly_k_labels(k):
    labels = [i % 4 for i in range(800)]
    parts = partition_indices(labels, 8, "label_skew", k, seed=0)
    assert all(len({labels[i] for i in p}) == k for p in parts)


def test_category_skew_is_more_heterogeneous_at_smaller_epsilon(data_dir):
    labels = list(load_dolly(data_dir)["label"])
    glob = np.bincount(labels, minlength=8) / len(labels)

    def distance(eps):  # mean total-variation distance of a client's mix from the global one
        d = []
        for seed in range(1):
            for p in partition_indices(labels, 10, "category_skew", 2, seed, epsilon=eps):
                mix = np.bincount([labels[i] for i in p], minlength=8) / len(p)
                d.append(0.5 * np.abs(mix - glob).sum())
        return float(np.mean(d))

    d = [distance(e) for e in (0.2, 0.5, 5.0)]
    assert d[0] > d[1] > d[2]
    parts = partition_indices(labels, 10, "category_skew", 2, 0, epsilon=0.5)
    assert min(len(p) for p in parts) >= 40  # FedIT's minimum client size


# --- instruction encoding: chat template, response-only loss, truncation ------------------


def _chat_tokenizer():
    tok = tiny_tokenizer()
    tok.chat_template = (
        "{% for m in messages %}Instruction {{ m['content'] }} {% endfor %}"
        "{% if add_generation_prompt %}Response : {% endif %}"
    )
    return tok


def test_chat_template_used_when_present_and_optional():
    d = build_config(tiny_tree(data={"dataset": "dolly"})).data
    tok = _chat_tokenizer()
    assert format_prompt("a b", "c", d, tok) == "Instruction a b\n\nc Response : "
    d.chat_template = False
    assert format_prompt("a b", "c", d, tok).startswith("### Instruction:\na b\n\n### Input:\nc")
    assert format_prompt("a b", "", d, tiny_tokenizer()) == "### Instruction:\na b\n\n### Response:\n"


def test_response_only_loss_equals_full_logit_loss_on_response_tokens():
    tok = _chat_tokenizer()
    model, _ = load_base_model("tiny-llama", seed=0)
    d = build_config(tiny_tree(data={"dataset": "dolly", "max_length": 40})).data
    ds = alpaca_dataset([
        {"instruction": "Classify the news", "input": "", "output": "World and Sports"},
        {"instruction": "a b c d e f", "input": "the article", "output": "positive ; negative"},
    ])
    enc = encode_instruction_data(ds, d, tok)
    batch = collate(enc, tok.pad_token_id)
    for e, row in zip(enc, batch["labels"]):
        assert (row[: e.prompt_length] == -100).all() and (row[len(e.input_ids):] == -100).all()
        assert row[e.prompt_length : len(e.input_ids)].tolist() == e.input_ids[e.prompt_length:]
    with torch.no_grad():
        logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
        nll = []
        for i, e in enumerate(enc):
            for t in range(e.prompt_length, len(e.input_ids)):
                nll.append(-F.log_softmax(logits[i, t - 1], -1)[e.input_ids[t]])
        expected = torch.stack(nll).mean()
        torch.testing.assert_close(lm_loss(model, batch), expected, rtol=1e-5, atol=1e-5)
        # changing prompt tokens' labels cannot matter: they are masked
        assert evaluate_lm(model, enc, tok.pad_token_id, 2)["loss"] == pytest.approx(float(expected), rel=1e-5)


def test_truncation_keeps_the_response():
    tok = tiny_tokenizer()
    prompt = "Instruction : " + " ".join(["a"] * 100) + " Response :"
    enc = encode_instruction([(prompt, "World Sports")], tok, 32)[0]
    response = tok.encode("World Sports", add_special_tokens=False) + [tok.eos_token_id]
    assert len(enc.input_ids) == 32 and enc.input_ids[-len(response):] == response
    assert enc.input_ids[enc.prompt_length:] == response
    assert enc.input_ids[: enc.prompt_length][-2:] == tok.encode("Response :", add_special_tokens=False)


# --- MMLU ---------------------------------------------------------------------------------


def test_mmlu_prompts_subset_and_truncation(data_dir):
    tok = tiny_tokenizer()
    subjects = ["anatomy", "virology"]
    test = load_mmlu("test", data_dir, subjects)
    sub = per_subject_subset(test, 7, seed=0)
    assert collections.Counter(list(sub["subject"])) == {"anatomy": 7, "virology": 7}
    assert list(sub["question"]) == list(per_subject_subset(test, 7, seed=0)["question"])
    assert list(sub["question"]) != list(per_subject_subset(test, 7, seed=1)["question"])
    dev = load_mmlu("dev", data_dir, subjects)
    zero = encode_mmlu(sub, None, 0, tok, 4096)
    five = encode_mmlu(sub, dev, 5, tok, 4096)
    answer = tok.encode("Answer:", add_special_tokens=False)
    for z, f in zip(zero.examples, five.examples):
        assert z.input_ids[-len(answer):] == answer and f.input_ids[-len(z.input_ids) + 0:][-len(answer):] == answer
        assert len(f.input_ids) > len(z.input_ids)
    assert [e.target for e in zero.examples] == list(sub["answer"])
    assert zero.label_ids == [tok.convert_tokens_to_ids(L) for L in LETTERS]
    short = encode_mmlu(sub, dev, 5, tok, 64)
    assert all(len(e.input_ids) <= 64 for e in short.examples)
    assert all(e.input_ids[-len(answer):] == answer for e in short.examples)


def test_mmlu_scoring_matches_full_logits_and_macro_average(data_dir):
    tok = tiny_tokenizer()
    model, _ = load_base_model("tiny-llama", seed=0)
    test = per_subject_subset(load_mmlu("test", data_dir, ["anatomy", "astronomy", "virology"]), 6, 0)
    mmlu = encode_mmlu(test, None, 0, tok, 256)
    preds, _ = predict_classes(model, mmlu.examples, mmlu.label_ids, tok.pad_token_id, 5)
    oracle = np.zeros(len(preds), dtype=int)
    with torch.no_grad():
        for idx, batch in length_sorted_batches(mmlu.examples, 5, tok.pad_token_id):
            logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
            oracle[idx] = logits[torch.arange(len(idx)), batch["last"]][:, mmlu.label_ids].argmax(-1).numpy()
    assert (preds == oracle).all()
    res = evaluate_mmlu(model, mmlu, tok.pad_token_id, 5)
    correct = preds == np.array(list(test["answer"]))
    subj = np.array(mmlu.subjects)
    per = {s: correct[subj == s].mean() for s in ("anatomy", "astronomy", "virology")}
    assert res["mmlu_subjects"] == pytest.approx(per)
    assert res["mmlu_accuracy"] == pytest.approx(np.mean(list(per.values())))
    assert res["mmlu_micro_accuracy"] == pytest.approx(correct.mean()) and res["mmlu_questions"] == 18


# --- bring your own data, config --------------------------------------------------------


def test_custom_csv_classification_and_jsonl_instruction(tmp_path, data_dir):
    csv = tmp_path / "reviews.csv"
    rows = [(f"good {i}", "pos") if i % 2 else (f"bad {i}", "neg") for i in range(120)]
    csv.write_text("body,sentiment\n" + "".join(f"{t},{s}\n" for t, s in rows))
    cfg = build_config(tiny_tree(data={
        "dataset": "custom", "task": "classification", "train_file": str(csv), "partition": "iid",
        "columns": {"text": "body", "label": "sentiment"}, "label_words": ["negative", "positive"],
        "prompt": "Review: {text}\nSentiment:", "train_examples": None}))
    task = build_task(cfg, tiny_tokenizer())
    assert task.names == ["neg", "pos"] and len(task.test) == 24  # 20% of 120, seeded split
    assert sum(map(sum, task.partition_table())) == 96

    jl = tmp_path / "chat.jsonl"
    jl.write_text("".join(json.dumps({"q": f"a {i}", "a": "World", "kind": "x" if i % 3 else "y"}) + "\n"
                          for i in range(60)))
    cfg = build_config(tiny_tree(data={
        "dataset": "custom", "task": "instruction", "train_file": str(jl), "partition": "dirichlet",
        "min_partition_size": 1, "columns": {"instruction": "q", "response": "a", "category": "kind"}}))
    task = build_task(cfg, tiny_tokenizer())
    assert task.kind == "instruction" and task.names == ["x", "y"] and not task.label_ids
    assert sum(map(sum, task.partition_table())) == 48
    with pytest.raises(ConfigError, match="data: dataset custom needs train_file"):
        build_config(tiny_tree(data={"dataset": "custom", "task": "instruction"}))
    bad = build_config(tiny_tree(data={"dataset": "custom", "task": "instruction", "train_file": str(jl)}))
    with pytest.raises(ValueError, match="no column 'instruction'"):
        build_task(bad, tiny_tokenizer())


def test_dataset_defaults_fill_only_missing_keys():
    fpb = build_config(tiny_tree(data={"dataset": "financial_phrasebank"})).data
    assert fpb.label_words == ["negative", "neutral", "positive"] and "{text}" in fpb.prompt
    dolly = build_config(tiny_tree(data={"dataset": "dolly", "max_length": 96})).data
    assert dolly.task == "instruction" and dolly.max_length == 96
    ag = build_config(tiny_tree()).data
    assert ag.task == "classification" and ag.label_words[-1] == "Technology"
    with pytest.raises(ConfigError, match="data: dataset dolly is instruction data"):
        build_config(tiny_tree(data={"dataset": "dolly", "task": "classification"}))


def test_quickstart_partition_unchanged(data_dir):
    """The AG News label-skew shards of configs/quickstart.yaml (seed 0), as the core engine
    drew them (build_task's order: load, shuffle by seed, partition)."""
    cfg = load_config(Path(__file__).parents[1] / "configs" / "quickstart.yaml")
    src = load_source(cfg.data)
    labels = list(src.train.shuffle(seed=cfg.seed)["label"])
    parts = partition_indices(labels, 10, cfg.data.partition, cfg.data.labels_per_client, cfg.seed)
    table = [np.bincount([labels[i] for i in p], minlength=4).tolist() for p in parts]
    assert table == [[1667, 0, 0, 834], [0, 1000, 834, 0], [0, 1000, 834, 0], [0, 1000, 0, 834],
                     [1667, 0, 0, 833], [0, 1000, 833, 0], [0, 0, 833, 833], [0, 0, 833, 833],
                     [1666, 0, 833, 0], [0, 1000, 0, 833]]


# --- runs on instruction data -------------------------------------------------------------


def _dolly_tree(**evaluation):
    return tiny_tree(
        data={"dataset": "dolly", "train_examples": 160, "test_examples": 16, "max_length": 48,
              "min_partition_size": 5},
        federation={"num_clients": 2, "client_max_ranks": [4, 2], "rounds": 1, "local_steps": 2,
                    "batch_size": 4, "lr": 0.01},
        evaluation=evaluation, algorithm={"name": "fedit"},
    )


def test_dolly_run_trains_on_responses_and_is_judged_on_mmlu(data_dir, tmp_path, monkeypatch):
    from fedlora.runtime import context
    from fedlora.runtime.inprocess import Simulation
    from fedlora.runtime.outputs import read_metrics

    calls = []
    original = context.lm_loss
    monkeypatch.setattr(context, "lm_loss", lambda m, b: calls.append(1) or original(m, b))
    cfg = build_config(_dolly_tree(mmlu=True, mmlu_per_subject=2, mmlu_subjects=["anatomy", "virology"]))
    summary = Simulation(cfg, tmp_path, progress=False).run()
    rec = read_metrics(tmp_path)[-1]
    assert len(calls) == 4  # 2 clients × 2 local steps, all on the response-only LM loss
    assert rec["accuracy"] == rec["mmlu_accuracy"] and rec["mmlu_questions"] == 4
    assert set(rec["mmlu_subjects"]) == {"anatomy", "virology"}
    assert rec["perplexity"] == pytest.approx(np.exp(rec["test_loss"]))
    assert summary["final_accuracy"] == rec["accuracy"]
    part = json.loads((tmp_path / "partition.json").read_text())
    assert part["names"] == DOLLY_CATEGORIES and sum(map(sum, part["examples_per_client_per_label"])) == 160
    assert (tmp_path / "partition.png").read_bytes()[:4] == b"\x89PNG"


def test_loss_only_run_reports_no_accuracy(data_dir, tmp_path):
    from fedlora.runtime.inprocess import Simulation

    summary = Simulation(build_config(_dolly_tree()), tmp_path, progress=False).run()
    assert summary["final_accuracy"] is None and summary["rounds"] == 1


@pytest.mark.parametrize("path", sorted((Path(__file__).parents[1] / "configs").glob("*.yaml")), ids=lambda p: p.name)
def test_every_config_validates_and_finds_its_files(data_dir, path):
    import yaml

    if "algorithm" not in yaml.safe_load(path.read_text()):
        pytest.skip("a `fedlora compare` config with no algorithm of its own")
    cfg = load_config(path)
    cfg.check_files()
    if path.name.endswith("-quick.yaml"):
        full = load_config(path.with_name(path.name.replace("-quick", "")))
        assert (cfg.data.dataset, cfg.data.partition, cfg.algorithm.name) == (
            full.data.dataset, full.data.partition, full.algorithm.name)


def test_eval_command_reproduces_a_runs_final_accuracy(data_dir, tmp_path):
    import yaml

    from fedlora.cli import main
    from fedlora.runtime.inprocess import Simulation
    from fedlora.runtime.outputs import read_metrics

    tree = tiny_tree(algorithm={"name": "fedit"}, federation={"rounds": 1})
    cfg = build_config(tree)
    Simulation(cfg, tmp_path / "run", progress=False).run()
    final = read_metrics(tmp_path / "run")[-1]
    assert main(["eval", str(tmp_path / "run" / "config.yaml"), "--run", str(tmp_path / "run"),
                 "--out", str(tmp_path / "eval.json")]) == 0
    got = json.loads((tmp_path / "eval.json").read_text())["results"]
    assert got["accuracy"] == final["accuracy"] and got["loss"] == pytest.approx(final["test_loss"])
    (tmp_path / "c.yaml").write_text(yaml.safe_dump({**tree, "evaluation": {
        "mmlu": True, "mmlu_per_subject": 1, "mmlu_subjects": ["anatomy", "virology"]}}))
    assert main(["eval", str(tmp_path / "c.yaml"), "--repeat", "2", "--out", str(tmp_path / "u.json")]) == 0
    untuned = json.loads((tmp_path / "u.json").read_text())
    assert untuned["results"]["mmlu_questions"] == 2 and len(untuned["mmlu_questions_per_second_all"]) == 2
    assert main(["eval", str(tmp_path / "c.yaml"), "--repeat", "0"]) == 2
    # another method's config cannot evaluate this run's factors: one line, not a traceback
    (tmp_path / "other.yaml").write_text(yaml.safe_dump({**tree, "algorithm": {"name": "aflora"}}))
    assert main(["eval", str(tmp_path / "other.yaml"), "--run", str(tmp_path / "run")]) == 2


# Hub rows in each hub dataset's own schema (column names as on the Hugging Face hub).
HUB_ROWS = {
    "ag_news": {"text": ["a", "b"], "label": [0, 3]},
    "financial_phrasebank": {"sentence": ["up", "down"], "label": [2, 0]},
    "databricks/databricks-dolly-15k": {"instruction": ["i"], "context": [""], "response": ["r"],
                                        "category": ["open_qa"]},
    "tatsu-lab/alpaca": {"instruction": ["i"], "input": [""], "output": ["o"], "text": ["t"]},
    "cais/mmlu": {"question": ["q", "q2"], "subject": ["anatomy", "virology"],
                  "choices": [["a", "b", "c", "d"]] * 2, "answer": [1, 2]},
}


def test_hub_loaders_ask_for_the_right_dataset_and_give_our_columns(data_dir, monkeypatch):
    """No network here: a stand-in `datasets.load_dataset` serves rows in each hub dataset's
    schema. Each loader must request the right name/config/split and return the same column
    layout as its local loader (the real hub download itself is untested offline)."""
    import datasets

    calls = []

    def fake_load_dataset(name, config=None, split=None, **_):
        calls.append((name, config, split))
        return datasets.Dataset.from_dict(HUB_ROWS[name])

    monkeypatch.setattr(datasets, "load_dataset", fake_load_dataset)
    from fedlora.data.ag_news import load_ag_news

    hub = load_ag_news("test", data_dir, "ag_news")
    assert hub.column_names == load_ag_news("test", data_dir).column_names and hub["label"] == [0, 3]
    fpb = load_financial_phrasebank("75", data_dir, "financial_phrasebank")
    assert fpb.column_names == load_financial_phrasebank("75", data_dir).column_names and fpb["text"] == ["up", "down"]
    dolly = load_dolly(data_dir, "databricks/databricks-dolly-15k")
    assert dolly.column_names == load_dolly(data_dir).column_names
    assert dolly["label"] == [DOLLY_CATEGORIES.index("open_qa")]
    assert set(load_alpaca(data_dir, "tatsu-lab/alpaca")[0]) >= set(load_alpaca(data_dir)[0])
    mmlu = load_mmlu("test", data_dir, ["virology"], "cais/mmlu")
    assert mmlu.column_names == load_mmlu("test", data_dir, ["virology"]).column_names and mmlu["answer"] == [2]
    assert calls == [("ag_news", None, "test"), ("financial_phrasebank", "sentences_75agree", "train"),
                     ("databricks/databricks-dolly-15k", None, "train"), ("tatsu-lab/alpaca", None, "train"),
                     ("cais/mmlu", "all", "test")]
