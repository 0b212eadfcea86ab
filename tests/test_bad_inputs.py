"""A corpus of bad configs and data files: each gives exit code 2 and ONE line on stderr that
names the field or file, never a traceback, and (where it can be) before the model loads.

The cases run in-process through the CLI's `main()` (torch is imported once); a few run as
real subprocesses to see exactly what a user's terminal shows.
"""

from __future__ import annotations

import gzip
import json
import logging
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import pytest
import yaml
from conftest import tiny_tree

from fedlora import cli
from fedlora.config import build_config
from fedlora.data.partition import partition_indices
from fedlora.data.task import build_task
from fedlora.models import tiny_tokenizer
from fedlora.runtime import inprocess

# --- inputs the cases start from ------------------------------------------------------------


def good_csv(path: Path, rows: int = 60, labels: tuple[str, ...] = ("negative", "positive")) -> Path:
    path.write_text("text,label\n" + "".join(f"the article {i},{labels[i % len(labels)]}\n" for i in range(rows)))
    return path


def custom_tree(tmp: Path, **data) -> dict:
    """A tiny custom-CSV classification run: no AG News or Alpaca to load, so a case that
    gets as far as the data takes a fraction of a second."""
    base = {"dataset": "custom", "train_file": str(good_csv(tmp / "good.csv")), "partition": "iid",
            "train_examples": None, "test_examples": 20, "max_length": 32}
    return tiny_tree(data={**base, **data}, algorithm={"name": "fedit"})


def with_(tree: dict, dotted: str, value) -> dict:
    node = tree
    *path, last = dotted.split(".")
    for key in path:
        node = node.setdefault(key, {})
    node[last] = value
    return tree


def write_yaml(tmp: Path, tree: dict | str) -> Path:
    path = tmp / "bad.yaml"
    path.write_text(tree if isinstance(tree, str) else yaml.safe_dump(tree))
    return path


Case = Callable[[Path], tuple[list[str], str | list[str]]]
"""tmp dir -> (CLI args after `run`, the text(s) the error line must hold)."""
CASES: dict[str, tuple[Case, bool]] = {}  # id -> (case, fails before the model loads)


def case(name: str, before_model: bool = True):
    def register(fn: Case) -> Case:
        CASES[name] = (fn, before_model)
        return fn
    return register


def field_case(name: str, dotted: str, value, expect: str | None = None, before_model: bool = True) -> None:
    """A config whose field `dotted` is set to `value`; the line must name `expect` (default: the field)."""
    def fn(tmp: Path) -> tuple[list[str], str]:
        return [str(write_yaml(tmp, with_(custom_tree(tmp), dotted, value)))], expect or dotted
    CASES[name] = (fn, before_model)


def file_case(name: str, content: bytes | str, suffix: str = ".csv", field: str = "data.train_file",
              expect: str | None = None, **data) -> None:
    """A data file with `content` given as `field`; the line must name the file (and `expect`)."""
    def fn(tmp: Path) -> tuple[list[str], list[str]]:
        path = tmp / f"data{suffix}"
        if isinstance(content, bytes):
            path.write_bytes(content)
        else:
            path.write_text(content)
        tree = custom_tree(tmp, **{field.split(".")[1]: str(path)}, **data)
        return [str(write_yaml(tmp, tree))], [str(path), *([expect] if expect else [])]
    CASES[name] = (fn, True)


# --- the config file and --set ------------------------------------------------------------------

case("config_missing")(lambda t: ([str(t / "nope.yaml")], "nope.yaml: file not found"))
case("config_is_a_folder")(lambda t: ([str(t)], "is a folder"))
case("yaml_unclosed_bracket")(lambda t: ([str(write_yaml(t, "federation: {rounds: [1, 2\n"))], "invalid YAML"))
case("yaml_bad_indent")(lambda t: ([str(write_yaml(t, "data:\n  dataset: custom\n bad: 1\n"))], "invalid YAML at line"))
case("yaml_tab")(lambda t: ([str(write_yaml(t, "data:\n\tdataset: custom\n"))], "invalid YAML"))
case("yaml_top_level_list")(lambda t: ([str(write_yaml(t, "- a\n- b\n"))], "top level must be a mapping"))
case("yaml_empty")(lambda t: ([str(write_yaml(t, ""))], "algorithm"))
case("yaml_deep_nesting")(lambda t: ([str(write_yaml(t, "a: " + "[" * 5000 + "]" * 5000 + "\n"))], "nested too deeply"))
case("yaml_too_large")(lambda t: ([str(write_yaml(t, "# padding\n" * 100_001))], "more than a config may have"))
case("yaml_huge_int")(lambda t: ([str(write_yaml(t, "seed: " + "9" * 4400 + "\n"))], "invalid YAML: Exceeds"))
case("yaml_python_tag")(lambda t: ([str(write_yaml(t, "seed: !!python/object/apply:os.system [ls]\n"))],
                                   "invalid YAML"))
case("devices_ranks_seed_list")(lambda t: ([str(write_yaml(t, {**tiny_tree(), "seed": [1],
                                                                "devices": {"max_ranks": "devices"}}))], "seed"))


@case("yaml_self_alias")
def _(tmp):
    text = yaml.safe_dump(tiny_tree()) + "extra: &loop [1, *loop]\n"  # a list that contains itself
    return [str(write_yaml(tmp, text))], "extra"


@case("config_latin1")
def _(tmp):
    path = tmp / "latin.yaml"
    path.write_bytes("seed: 0 # café\n".encode("latin-1"))
    return [str(path)], "latin.yaml: not UTF-8"


def set_case(name: str, pair: str, expect: str) -> None:
    case(name)(lambda t: ([str(write_yaml(t, custom_tree(t))), "--set", pair], expect))


set_case("set_without_equals", "federation.rounds", "--set federation.rounds: expected key=value")
set_case("set_bad_yaml_value", "federation.rounds=[1", "--set federation.rounds=[1")
set_case("set_bad_yaml_quote", "data.prompt='x", "--set data.prompt='x")
set_case("set_empty_key", "=3", "--set : empty key")
set_case("set_empty_key_part", "federation..rounds=3", "--set federation..rounds: empty key")
set_case("set_into_a_value", "model.name.x=1", "model.name.x: name is not a section")
set_case("set_wrong_type", "federation.rounds=abc", "federation.rounds")
set_case("set_unknown_key", "federation.nmu_clients=3", "federation.nmu_clients: unknown key")

# --- fields -------------------------------------------------------------------------------------

field_case("unknown_top_level_key", "federaton", {"rounds": 2})
field_case("seed_not_int", "seed", "abc")
field_case("algorithm_unknown", "algorithm.name", "fedavg", "algorithm")
field_case("fedit_rank_too_large", "algorithm.rank", 16, "algorithm.rank: 16 exceeds the smallest client max rank 2")
field_case("num_clients_zero", "federation.num_clients", 0)
field_case("client_ranks_wrong_length", "federation.client_max_ranks", [8, 4], "client_max_ranks has 2 entries")
field_case("client_rank_zero", "federation.client_max_ranks", [8, 4, 0, 2])
field_case("fraction_zero", "federation.fraction", 0)
field_case("rounds_zero", "federation.rounds", 0)
field_case("batch_size_zero", "federation.batch_size", 0)
field_case("lr_negative", "federation.lr", -0.1)
field_case("lora_alpha_zero", "lora.alpha", 0)
field_case("compute_dtype_float16", "model.compute_dtype", "float16")
field_case("target_modules_empty", "model.target_modules", [])
field_case("max_length_below_8", "data.max_length", 4)
field_case("max_length_no_room_for_text", "data.max_length", 8, "data.max_length: 8 tokens leave no room")
field_case("label_words_duplicate", "data.label_words", ["negative", "negative"], "data.label_words: 'negative' appears")
field_case("label_words_empty_word", "data.label_words", ["negative", " "], "data.label_words: a label word is empty")
field_case("label_words_one", "data.label_words", ["negative"])
field_case("label_words_same_first_token", "data.label_words", ["foo", "bar"], "share a first token")
field_case("label_words_count_vs_classes", "data.label_words", ["negative", "neutral", "positive"],
           "data.label_words: 3 words for 2 classes")
field_case("prompt_without_text", "data.prompt", "Label:", "data.prompt: must contain the placeholder")
field_case("dataset_unknown", "data.dataset", "imdb")
field_case("partition_unknown", "data.partition", "shards")
field_case("test_fraction_above_one", "data.test_fraction", 1.5)
field_case("custom_without_train_file", "data.train_file", None, "dataset custom needs train_file")
field_case("train_file_txt", "data.train_file", "notes.txt", "data.train_file: notes.txt: expected a .csv")
field_case("test_file_xlsx", "data.test_file", "test.xlsx", "data.test_file: test.xlsx: expected a .csv")
field_case("devices_assign_wrong_length", "devices.assign", ["high"], "devices.assign: 1 entries for 4 clients")
field_case("mmlu_shots_too_many", "evaluation.mmlu_shots", 9)
field_case("model_unknown_hub_name", "model.name", "nobody/no-such-model", "model.name: cannot load 'nobody/no-such-model'")
field_case("model_gguf_missing", "model.name", "/nonexistent/model.gguf", "model.name: file not found")
field_case("target_module_unknown", "model.target_modules", ["qq_proj"], "model.target_modules: 'qq_proj'",
           before_model=False)


@case("labels_per_client_exceeds_the_classes")
def _(tmp):
    tree = custom_tree(tmp, partition="label_skew", labels_per_client=3)
    return [str(write_yaml(tmp, tree))], "data.labels_per_client: 3 exceeds the 2 labels"


@case("hetlora_min_rank_too_large")
def _(tmp):
    tree = custom_tree(tmp)
    tree["algorithm"] = {"name": "hetlora", "min_rank": 4}
    return [str(write_yaml(tmp, tree))], "algorithm.min_rank: 4 exceeds the smallest client max rank 2"


@case("aflora_min_rank_too_large")
def _(tmp):
    tree = custom_tree(tmp)
    tree["algorithm"] = {"name": "aflora", "min_rank": 3, "dlf": False}
    return [str(write_yaml(tmp, tree))], "algorithm.min_rank: 3 exceeds"


@case("hierfedlora_min_depth_too_deep", before_model=False)
def _(tmp):
    tree = custom_tree(tmp)
    tree["algorithm"] = {"name": "hierfedlora", "groups": 2, "min_depth": 5}
    return [str(write_yaml(tmp, tree))], "algorithm.min_depth: 5 exceeds the 2 layers"


@case("train_file_with_builtin_dataset")
def _(tmp):
    tree = custom_tree(tmp)
    tree["data"]["dataset"] = "ag_news"
    return [str(write_yaml(tmp, tree))], "data.train_file: only for dataset custom"


@case("model_folder_without_model")
def _(tmp):
    (tmp / "empty_model").mkdir()
    tree = with_(custom_tree(tmp), "model.name", str(tmp / "empty_model"))
    return [str(write_yaml(tmp, tree))], "model.name: cannot load"


# --- data files ---------------------------------------------------------------------------------

case("train_file_missing")(lambda t: ([str(write_yaml(t, custom_tree(t, train_file=str(t / "gone.csv"))))],
                                      "data.train_file: file not found"))
case("test_file_missing")(lambda t: ([str(write_yaml(t, custom_tree(t, test_file=str(t / "gone.csv"))))],
                                     "data.test_file: file not found"))
case("data_dir_missing")(lambda t: ([str(write_yaml(t, tiny_tree(data={"data_dir": str(t / "nodata")})))],
                                    "data.data_dir: file not found"))


@case("train_file_is_a_folder")
def _(tmp):
    (tmp / "folder.csv").mkdir()
    return [str(write_yaml(tmp, custom_tree(tmp, train_file=str(tmp / "folder.csv"))))], "folder.csv: not a .csv"


@case("ag_news_file_corrupt")
def _(tmp):
    (tmp / "data" / "ag_news").mkdir(parents=True)
    for name in ("train_subset_20k.csv.gz", "test.csv.gz"):
        (tmp / "data" / "ag_news" / name).write_bytes(b"not gzip at all")
    tree = tiny_tree(data={"data_dir": str(tmp / "data")}, algorithm={"name": "fedit"})
    return [str(write_yaml(tmp, tree))], "data.data_dir"


@case("ag_news_rows_wrong_shape")
def _(tmp):
    (tmp / "data" / "ag_news").mkdir(parents=True)
    for name in ("train_subset_20k.csv.gz", "test.csv.gz"):
        with gzip.open(tmp / "data" / "ag_news" / name, "wt") as fh:
            fh.write("1,only a title\n")
    tree = tiny_tree(data={"data_dir": str(tmp / "data")}, algorithm={"name": "fedit"})
    return [str(write_yaml(tmp, tree))], "ag_news"


file_case("csv_header_only", "text,label\n", expect="no data rows")
file_case("csv_empty_file", "", expect="no data rows")
file_case("csv_latin1", ("text,label\n" + "".join(f"café {i},{'ab'[i % 2]}\n" for i in range(40))).encode("latin-1"),
          expect="not UTF-8")
file_case("csv_no_text_column", "body,label\n" + "x,a\ny,b\n" * 20, expect="data.columns.text")
file_case("csv_no_label_column", "text,sentiment\n" + "x,a\ny,b\n" * 20, expect="data.columns.label")
file_case("csv_empty_label_cell", "text,label\n" + "x,negative\ny,\n" * 20, expect="data row 2 has no value in column 'label'")
file_case("csv_single_class", "text,label\n" + "".join(f"t {i},negative\n" for i in range(40)),
          expect="the training data has one class ('negative')")
file_case("csv_gz_not_gzip", "text,label\nx,a\n", suffix=".csv.gz")
file_case("json_invalid", "[{\"text\": \"x\", \"label\": ", suffix=".json")
file_case("jsonl_broken_line", '{"text": "x", "label": "a"}\n{"text": \n', suffix=".jsonl")
file_case("json_empty_list", "[]", suffix=".json")
file_case("test_label_unseen_in_training", "text,label\n" + "x,negative\ny,neutral\n" * 5, field="data.test_file",
          expect="test label 'neutral' never occurs in the training data")
file_case("test_file_missing_column", "body,label\nx,negative\n", field="data.test_file", expect="data.columns.text")


@case("instruction_jsonl_no_response")
def _(tmp):
    path = tmp / "chat.jsonl"
    path.write_text("".join(json.dumps({"instruction": f"q {i}", "answer": "a"}) + "\n" for i in range(20)))
    tree = custom_tree(tmp, task="instruction", train_file=str(path))
    return [str(write_yaml(tmp, tree))], "data.columns.response"


@case("too_few_examples_for_the_clients")
def _(tmp):
    tree = custom_tree(tmp, train_file=str(good_csv(tmp / "tiny.csv", rows=4)))
    return [str(write_yaml(tmp, tree))], "data.partition: iid leaves"


@case("label_too_rare_for_label_skew")
def _(tmp):
    path = tmp / "rare.csv"
    path.write_text("text,label\n" + "".join(f"t {i},negative\n" for i in range(40)) + "t 40,positive\nt 41,positive\n")
    tree = custom_tree(tmp, train_file=str(path), test_file=str(good_csv(tmp / "test.csv")),
                       partition="label_skew", labels_per_client=1)
    tree["federation"] = {**tree["federation"], "num_clients": 8, "client_max_ranks": [4] * 8}
    return [str(write_yaml(tmp, tree))], "data.partition: label_skew gives some label to more clients"


# --- the tests ------------------------------------------------------------------------------


def test_the_corpus_is_large_enough():
    assert len(CASES) >= 50


@pytest.mark.parametrize("name", sorted(CASES))
def test_bad_input_gives_one_line_and_exit_2(name, tmp_path, capsys, caplog, monkeypatch):
    fn, before_model = CASES[name]
    if before_model:
        monkeypatch.setattr(inprocess, "load_model", lambda *a, **k: pytest.fail("model loaded before the check"))
    args, expect = fn(tmp_path)
    out = tmp_path / "run"
    with caplog.at_level(logging.WARNING):
        code = cli.main(["run", *args, "--out", str(out), "--quiet"])
    err = capsys.readouterr().err
    lines = err.strip().splitlines()
    assert code == 2, err
    assert len(lines) == 1, err
    assert lines[0].startswith(("config error: ", "data error: ")), lines[0]
    assert all(e in lines[0] for e in ([expect] if isinstance(expect, str) else expect)), lines[0]
    assert "Traceback" not in err
    assert not [r for r in caplog.records if r.levelno >= logging.WARNING], caplog.text
    assert not out.exists(), sorted(p.name for p in out.iterdir())  # nothing written, not even the lock


def test_a_users_terminal_shows_one_line(tmp_path):
    """The real process (one only: a fresh torch import is slow on a busy machine): the CSV
    reader's progress bars and log lines must not add to the error line."""
    args, expect = CASES["csv_latin1"][0](tmp_path)
    proc = subprocess.run([sys.executable, "-m", "fedlora.cli", "run", *args, "--out", str(tmp_path / "run"),
                           "--quiet"], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 2, proc.stderr
    assert len(proc.stderr.strip().splitlines()) == 1, proc.stderr
    assert all(e in proc.stderr for e in ([expect] if isinstance(expect, str) else expect)), proc.stderr
    assert "Traceback" not in proc.stderr


# --- loud warnings and defaults -----------------------------------------------------------------


def test_batch_larger_than_a_clients_data_is_a_loud_warning(tmp_path, caplog):
    cfg = build_config(custom_tree(tmp_path, train_file=str(good_csv(tmp_path / "small.csv", rows=20))),
                       {"federation.batch_size": 8})
    with caplog.at_level(logging.WARNING, logger="fedlora"):
        task = build_task(cfg, tiny_tokenizer())
    sizes = [len(c) for c in task.clients]
    assert min(sizes) < 8  # 16 training examples over 4 clients
    [record] = [r for r in caplog.records if r.levelno == logging.WARNING]
    assert "federation.batch_size: 8" in record.getMessage() and "repeat examples" in record.getMessage()
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="fedlora"):
        build_task(build_config(cfg.model_dump(mode="json"), {"federation.batch_size": 2}), tiny_tokenizer())
    assert not caplog.records


def test_custom_data_uses_its_own_class_names_and_a_neutral_prompt(tmp_path):
    """A six-class CSV needs no `label_words: null`: custom data does not inherit AG News's words."""
    classes = ("World", "Sports", "Business", "Technology", "Science", "Tech")
    cfg = build_config(custom_tree(tmp_path, train_file=str(good_csv(tmp_path / "six.csv", 120, classes))))
    assert cfg.data.label_words is None and "news" not in cfg.data.prompt
    task = build_task(cfg, tiny_tokenizer())
    tok = tiny_tokenizer()
    assert task.names == sorted(classes)
    assert task.label_ids == [tok.encode(" " + n, add_special_tokens=False)[0] for n in sorted(classes)]
    # the defaults of other datasets are unchanged
    assert build_config(tiny_tree()).data.label_words == ["World", "Sports", "Business", "Technology"]


def test_label_skew_first_label_is_the_clients_index_the_rest_seeded():
    """What docs/concepts/data.md says: client i holds label i mod L and k-1 others drawn by the seed."""
    labels = [j for j in range(4) for _ in range(50)]
    def held(seed: int) -> list[list[int]]:
        return [sorted({labels[i] for i in p}) for p in partition_indices(labels, 6, "label_skew", 2, seed)]

    draws = [held(seed) for seed in range(4)]
    assert all(len(h) == 2 and k % 4 in h for d in draws for k, h in enumerate(d))
    assert held(0) == draws[0]  # seeded
    assert len({str(d) for d in draws}) > 1  # the other label is drawn, not i+1


def test_flower_run_checks_the_data_before_starting_flower(tmp_path, capsys, monkeypatch):
    """`fedlora flower run` judges the data in the CLI, not later inside the Flower apps."""
    import fedlora.flower.launch as launch

    monkeypatch.setattr(launch, "LocalFederation", lambda *a, **k: pytest.fail("Flower was started"))
    args, expect = CASES["csv_single_class"][0](tmp_path)
    code = cli.main(["flower", "run", *args, "--local", "2", "--out", str(tmp_path / "run")])
    err = capsys.readouterr().err.strip()
    assert code == 2 and len(err.splitlines()) == 1 and all(e in err for e in expect), err
