"""Property-based fuzzing of everything fedlora reads from outside (issue 28).

Hypothesis generates three kinds of hostile input, each run as `fedlora ...` in a forked child
of one warm worker (tests/fuzz_worker.py) under an address-space and a CPU-time limit:

- configs: a small valid config with fields set to hostile values (huge, negative, non-finite,
  wrong types, deep or long nestings) or its YAML text damaged (truncated, a bit flipped, a key
  given twice, thousands of brackets);
- data files: a small CSV or JSON Lines training file truncated, bit-flipped, emptied, made
  very wide or deeply nested;
- run directories: a finished run with one file truncated, bit-flipped, replaced by a link to
  a file or folder outside the run, by a FIFO, a sparse giant, nested JSON, or removed; then
  `run --resume`, `eval --run`, `export` or `report` on it.

Every case must end in exit 2 with exactly one line on stderr, or exit 0 with the right result
(a resume or eval of a run whose damage does not matter gives the undamaged run's numbers);
never a traceback, a signal, or a file written outside the run directory. Failures found are
kept in tests/fuzz_corpus/ and replayed as explicit cases. `make test` runs a few examples per
kind (derandomized); `pytest -m slow` a longer profile.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import yaml
from conftest import tiny_tree
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

HERE = Path(__file__).resolve().parent
CORPUS = HERE / "fuzz_corpus"
MEMORY = 2 << 30  # on top of the warm worker's mappings
SECONDS = 120  # CPU seconds per case

FAST = settings(max_examples=4, deadline=None, derandomize=True, database=None,
                suppress_health_check=list(HealthCheck))
# CI runs the long profile derandomized (the same 150 cases every time: a red CI is a regression);
# FEDLORA_FUZZ_EXPLORE=1 (with --hypothesis-seed=N) explores new inputs (docs/concepts/threat-model.md).
LONG = settings(max_examples=150, deadline=None, database=None, suppress_health_check=list(HealthCheck),
                derandomize=os.environ.get("FEDLORA_FUZZ_EXPLORE") != "1")


# --- the worker ------------------------------------------------------------------------------


class Worker:
    def __init__(self, cache: Path) -> None:
        env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(HERE.parent / "src"), os.environ.get("PYTHONPATH", "")]),
               "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "HF_DATASETS_CACHE": str(cache),
               "TOKENIZERS_PARALLELISM": "false"}
        self.proc = subprocess.Popen([sys.executable, str(HERE / "fuzz_worker.py")], stdin=subprocess.PIPE,
                                     stdout=subprocess.PIPE, text=True, env=env)

    def run(self, argv: list[str], cwd: Path) -> dict[str, Any]:
        assert self.proc.stdin and self.proc.stdout
        self.proc.stdin.write(json.dumps({"argv": argv, "cwd": str(cwd), "memory": MEMORY, "seconds": SECONDS}) + "\n")
        self.proc.stdin.flush()
        return json.loads(self.proc.stdout.readline())

    def close(self) -> None:
        if self.proc.stdin:
            self.proc.stdin.close()
        self.proc.wait(timeout=60)


@pytest.fixture(scope="module")
def worker(tmp_path_factory):
    w = Worker(tmp_path_factory.mktemp("hf_cache"))
    yield w
    w.close()


# --- a case's folder: inputs, the run directory, and things that must stay as they are ------


def tree_hash(folder: Path) -> dict[str, str]:
    """Every entry under `folder` (links as links) → a digest of what it is."""
    out = {}
    for path in sorted(folder.rglob("*")):
        rel = str(path.relative_to(folder))
        if path.is_symlink():
            out[rel] = "link:" + os.readlink(path)
        elif path.is_file():
            out[rel] = hashlib.sha256(path.read_bytes()).hexdigest() if path.stat().st_size < 1 << 24 else "big"
        else:
            out[rel] = "dir" if path.is_dir() else "other"
    return out


class Case:
    """cwd/: inputs the case made, RUN/ (the only place a command may write), and outside/
    (a file and a folder that links planted in RUN point at)."""

    def __init__(self, folder: Path) -> None:
        self.cwd = folder
        self.run = folder / "run"
        self.outside = folder / "outside"
        self.outside.mkdir(parents=True)
        (self.outside / "victim.txt").write_text("must stay\n")
        (self.outside / "dir").mkdir()

    def snapshot(self) -> dict[str, str]:
        return {k: v for k, v in tree_hash(self.cwd).items()
                if not (k == "run" or k.startswith("run/")) and k not in ("stdout.txt", "stderr.txt")}


def check_outcome(reply: dict[str, Any], before: dict[str, str], case: Case) -> str | None:
    """None when the case ended well, else what went wrong (for the assertion message)."""
    err = "\n".join(line for line in reply["stderr"].strip().splitlines() if " WARNING " not in line)
    if reply["rc"] not in (0, 2):
        return f"exit {reply['rc']}: {reply['stderr'][-3000:]}"
    if "Traceback" in reply["stderr"]:
        return f"traceback: {reply['stderr'][-3000:]}"
    if reply["rc"] == 2 and (not err or "\n" in err):
        return f"not one line: {err!r}"
    after = case.snapshot()
    if after != before:
        changed = sorted(k for k in after.keys() | before.keys() if after.get(k) != before.get(k))
        return f"wrote outside the run directory: {changed[:5]}"
    return None


# --- configs ---------------------------------------------------------------------------------


def write_csv(path: Path, rows: int = 24) -> Path:
    path.write_text("text,label\n" + "".join(f"the article {i},{('negative', 'positive')[i % 2]}\n"
                                           for i in range(rows)))
    return path


def base_tree(data_file: Path) -> dict:
    return tiny_tree(
        data={"dataset": "custom", "train_file": str(data_file), "partition": "iid", "train_examples": None,
              "test_examples": 6, "max_length": 24},
        federation={"num_clients": 2, "client_max_ranks": [2, 2], "rounds": 1, "local_steps": 1, "batch_size": 2,
                    "eval_batch_size": 8},
        algorithm={"name": "fedit"})


FIELDS = ["seed", "threads", "model.name", "model.target_modules", "lora.alpha", "lora.scaling", "data.max_length",
          "data.test_fraction", "data.split_seed", "data.label_words", "data.prompt", "data.partition",
          "data.train_file", "data.columns.text", "federation.num_clients", "federation.client_max_ranks",
          "federation.rounds", "federation.fraction", "federation.local_steps", "federation.batch_size",
          "federation.lr", "federation.eval_batch_size", "algorithm.name", "algorithm.rank", "aggregation.norm_bound",
          "devices.spread", "devices.mix", "evaluation.mmlu_shots", "methods", "unknown_key"]

hostile_scalars = st.one_of(
    st.sampled_from([0, -1, 1, 2, 2**31, 2**63, 2**64, 10**7, 10**30, -(2**63)]),
    st.floats(allow_nan=True, allow_infinity=True),
    st.text(max_size=20),
    st.sampled_from(["../../x", "/etc/passwd", "", "nan", ".inf", None, True]),
)
hostile_values = st.recursive(hostile_scalars, lambda inner: st.one_of(
    st.lists(inner, max_size=4), st.dictionaries(st.text(max_size=5), inner, max_size=3)), max_leaves=8)


def set_dotted(tree: dict, dotted: str, value: Any) -> None:
    *path, last = dotted.split(".")
    node = tree
    for key in path:
        node = node.setdefault(key, {}) if isinstance(node.get(key, {}), dict) else {}
    node[last] = value


def text_damage(text: str, kind: str, at: int) -> str:
    at = at % max(1, len(text))
    if kind == "truncate":
        return text[:at]
    if kind == "flip":
        raw = bytearray(text.encode())
        raw[at % len(raw)] ^= 1 << (at % 8)
        return raw.decode("latin-1")
    if kind == "duplicate":
        return text + text.splitlines()[at % len(text.splitlines())].lstrip() + "\n"
    if kind == "deep":
        return text + "extra: " + "[" * (at * 37 % 50_000 + 1) + "\n"
    return text + "bomb: &a [" + ", ".join(["x"] * 9) + "]\n" + "".join(
        f"b{i}: &b{i} [" + ", ".join([f"*{'a' if i == 0 else f'b{i - 1}'}"] * 9) + "]\n" for i in range(9))


config_cases = st.one_of(
    st.fixed_dictionaries({"kind": st.just("config_value"), "field": st.sampled_from(FIELDS), "value": hostile_values}),
    st.fixed_dictionaries({"kind": st.just("config_text"),
                           "damage": st.sampled_from(["truncate", "flip", "duplicate", "deep", "aliases"]),
                           "at": st.integers(0, 10**6)}),
)


def run_config_case(worker: Worker, folder: Path, spec: dict) -> str | None:
    case = Case(folder)
    tree = base_tree(write_csv(folder / "train.csv"))
    if spec["kind"] == "config_value":
        set_dotted(tree, spec["field"], spec["value"])
        text = yaml.safe_dump(tree, allow_unicode=True)
    else:
        text = text_damage(yaml.safe_dump(tree), spec["damage"], spec["at"])
    (folder / "cfg.yaml").write_bytes(text.encode("utf-8", errors="surrogateescape"))
    before = case.snapshot()
    # damaged text that is still a valid config must not fall back to the default (real) model,
    # whose legitimate run would outlast the CPU limit: --set applies after parsing and checking
    pin = ["--set", "model.name=tiny-llama"] if spec["kind"] == "config_text" else []
    reply = worker.run(["run", "--quiet", "cfg.yaml", "--out", "run", *pin], folder)
    problem = check_outcome(reply, before, case)
    if problem is None and reply["rc"] == 0:
        if not (case.run / "summary.json").exists():
            problem = "exit 0 without a finished run"
        elif spec["kind"] == "config_value" and spec["field"] != "methods" and not all_finite(spec["value"]):
            problem = "a non-finite value was accepted"  # (`run` ignores a compare config's methods:)
        elif spec.get("damage") == "duplicate":
            problem = "a key given twice was accepted"
    return problem


def all_finite(value: Any) -> bool:
    if isinstance(value, float):
        return math.isfinite(value)
    if isinstance(value, dict):
        return all(all_finite(v) for v in value.values())
    if isinstance(value, list):
        return all(all_finite(v) for v in value)
    return True


# --- data files ------------------------------------------------------------------------------


def data_text(kind: str, fmt: str, at: int) -> bytes:
    rows = [{"text": f"the article {i}", "label": ("negative", "positive")[i % 2]} for i in range(24)]
    good = ("text,label\n" + "".join(f"{r['text']},{r['label']}\n" for r in rows) if fmt == "csv"
            else "".join(json.dumps(r) + "\n" for r in rows)).encode()
    at = at % len(good)
    if kind == "truncate":
        return good[:at]
    if kind == "flip":
        raw = bytearray(good)
        raw[at] ^= 1 << (at % 8)
        return bytes(raw)
    if kind == "empty":
        return b"" if at % 2 else b"\n\n"
    if kind == "wide":
        n = 1000 + at * 97 % 200_000
        return (",".join(f"c{i}" for i in range(n)) + "\n" + ",".join("1" * n) + "\n").encode()
    if kind == "deep":
        return good + (b'{"text": ' + b"[" * (at % 5000 + 70) + b"]" * (at % 5000 + 70) + b', "label": "x"}\n')
    return good + b"\xff\xfe" + good[:at]  # not UTF-8 in the middle


data_cases = st.fixed_dictionaries({
    "kind": st.just("data"), "damage": st.sampled_from(["truncate", "flip", "empty", "wide", "deep", "binary"]),
    "format": st.sampled_from(["csv", "jsonl"]), "at": st.integers(0, 10**6)})


def run_data_case(worker: Worker, folder: Path, spec: dict) -> str | None:
    case = Case(folder)
    data = folder / f"train.{spec['format']}"
    data.write_bytes(data_text(spec["damage"], spec["format"], spec["at"]))
    (folder / "cfg.yaml").write_text(yaml.safe_dump(base_tree(data)))
    before = case.snapshot()
    reply = worker.run(["run", "--quiet", "cfg.yaml", "--out", "run"], folder)
    return check_outcome(reply, before, case)


# --- run directories -------------------------------------------------------------------------

RUN_FILES = ["checkpoint.safetensors", "final_state.safetensors", "config.yaml", "partition.json", "metrics.jsonl",
             "summary.json", "eval/round_0002.npz", "merges/round_0001.safetensors", "run.lock", "eval", "merges",
             "report.md", "figures", "partition.png", "export", "export/adapter_config.json"]
COMMANDS = {
    "resume": ["run", "--quiet", "--resume", "run"],
    "eval": ["eval", "pristine.yaml", "--run", "run"],
    "export": ["export", "run", "--format", "peft", "--out", "run/export"],
    "report": ["report", "run"],
}

rundir_cases = st.fixed_dictionaries({
    "kind": st.just("rundir"), "file": st.sampled_from(RUN_FILES),
    "damage": st.sampled_from(["truncate", "flip", "link_file", "link_dir", "fifo", "sparse", "nested", "remove"]),
    "at": st.integers(0, 10**9), "command": st.sampled_from(sorted(COMMANDS))})


def damage_run_file(case: Case, rel: str, damage: str, at: int) -> None:
    path = case.run / rel
    path.parent.mkdir(parents=True, exist_ok=True)  # a file in a folder the finished run lacks (export/)
    if damage in ("truncate", "flip") and path.is_file():
        raw = bytearray(path.read_bytes())
        if raw and damage == "flip":
            raw[at % len(raw)] ^= 1 << (at % 8)
        path.write_bytes(bytes(raw if damage == "flip" else raw[: at % max(1, len(raw))]))
        return
    if damage == "sparse" and path.is_file():
        with open(path, "r+b") as fh:
            fh.truncate(path.stat().st_size + (3 << 30))
        return
    if damage == "nested" and path.is_file():
        path.write_bytes(b"[" * 100_000 + b"]" * 100_000 if path.suffix != ".safetensors" else
                         (200_000).to_bytes(8, "little") + b"[" * 100_000 + b"]" * 100_000)
        return
    if path.is_dir() and not path.is_symlink():
        shutil.copytree(path, case.outside / "dir" / path.name)
        shutil.rmtree(path)
    elif path.exists() or path.is_symlink():
        if path.is_file():
            shutil.copy(path, case.outside / path.name)
        path.unlink()
    if damage == "link_file":
        path.symlink_to(case.outside / (path.name if (case.outside / path.name).exists() else "victim.txt"))
    elif damage == "link_dir":
        path.symlink_to(case.outside / "dir" / path.name if (case.outside / "dir" / path.name).exists()
                        else case.outside / "dir")
    elif damage == "fifo":
        os.mkfifo(path)


def run_rundir_case(worker: Worker, folder: Path, spec: dict, finished: dict) -> str | None:
    case = Case(folder)
    shutil.copytree(finished["run"], case.run, symlinks=True)
    shutil.copy(finished["run"] / "config.yaml", folder / "pristine.yaml")
    damage_run_file(case, spec["file"], spec["damage"], spec["at"])
    before = case.snapshot()
    reply = worker.run(COMMANDS[spec["command"]], folder)
    problem = check_outcome(reply, before, case)
    if problem is None and reply["rc"] == 0:
        problem = same_result(spec["command"], case, reply, finished)
    return problem


def same_result(command: str, case: Case, reply: dict, finished: dict) -> str | None:
    """Exit 0 on a damaged run is right only if the result is the undamaged run's."""
    if command == "resume":
        got = (case.run / "final_state.safetensors").read_bytes()
        return None if got == finished["final_state"] else "resume exit 0 with a different final state"
    if command == "eval":
        return None if accuracy(reply["stdout"]) == finished["accuracy"] else "eval exit 0 with a different accuracy"
    if command == "export":
        got = (case.run / "export" / "adapter_model.safetensors").read_bytes()
        return None if got == finished["adapter"] else "export exit 0 with a different adapter"
    return None


def accuracy(stdout: str) -> Any:
    start = stdout.find("{")
    end = stdout.find("}\n", start)
    return json.loads(stdout[start:end + 1]).get("accuracy") if start >= 0 and end >= 0 else None


@pytest.fixture(scope="module")
def finished(worker, tmp_path_factory) -> dict:
    """A finished 2-round AFLoRA run (merges, eval records) and its undamaged results."""
    folder = tmp_path_factory.mktemp("pristine")
    tree = base_tree(write_csv(folder / "train.csv", 40))
    tree["federation"]["rounds"] = 2
    tree["algorithm"] = {"name": "aflora", "server_steps": 1}
    (folder / "cfg.yaml").write_text(yaml.safe_dump(tree))
    assert worker.run(["run", "--quiet", "cfg.yaml", "--out", "run"], folder)["rc"] == 0
    shutil.copy(folder / "run" / "config.yaml", folder / "pristine.yaml")
    probe = folder / "probe"
    shutil.copytree(folder / "run", probe / "run")
    shutil.copy(folder / "pristine.yaml", probe / "pristine.yaml")
    ev = worker.run(COMMANDS["eval"], probe)
    assert worker.run(COMMANDS["export"], probe)["rc"] == 0
    return {"run": folder / "run", "final_state": (folder / "run" / "final_state.safetensors").read_bytes(),
            "accuracy": accuracy(ev["stdout"]),
            "adapter": (probe / "run" / "export" / "adapter_model.safetensors").read_bytes()}


# --- the properties --------------------------------------------------------------------------


def run_spec(worker: Worker, folder: Path, spec: dict, finished: dict | None = None) -> str | None:
    if spec["kind"].startswith("config"):
        return run_config_case(worker, folder, spec)
    if spec["kind"] == "data":
        return run_data_case(worker, folder, spec)
    return run_rundir_case(worker, folder, spec, finished)


def fresh(tmp_path: Path) -> Path:
    """A new case folder per example (Hypothesis calls the test body many times)."""
    n = len(list(tmp_path.iterdir()))
    folder = tmp_path / f"case{n}"
    folder.mkdir()
    return folder


@FAST
@given(spec=config_cases)
def test_hostile_configs(worker, tmp_path_factory, spec):
    problem = run_spec(worker, fresh(tmp_path_factory.mktemp("cfg")), spec)
    assert problem is None, (spec, problem)


@FAST
@given(spec=data_cases)
def test_hostile_data_files(worker, tmp_path_factory, spec):
    problem = run_spec(worker, fresh(tmp_path_factory.mktemp("data")), spec)
    assert problem is None, (spec, problem)


@FAST
@given(spec=rundir_cases)
def test_hostile_run_directories(worker, finished, tmp_path_factory, spec):
    problem = run_spec(worker, fresh(tmp_path_factory.mktemp("rundir")), spec, finished)
    assert problem is None, (spec, problem)


CORPUS_CASES = sorted(CORPUS.glob("*.json"))


@pytest.mark.parametrize("path", CORPUS_CASES, ids=[p.stem for p in CORPUS_CASES])
def test_corpus_of_found_failures(worker, tmp_path, request, path):
    """Every failure the fuzzer found (on the code of its day), replayed as an explicit case."""
    spec = json.loads(path.read_text())["case"]
    finished = request.getfixturevalue("finished") if spec["kind"] == "rundir" else None
    problem = run_spec(worker, tmp_path, spec, finished)
    assert problem is None, (spec, problem)


@pytest.mark.slow
@LONG
@given(spec=st.one_of(config_cases, data_cases, rundir_cases))
def test_long_fuzzing_profile(worker, finished, tmp_path_factory, spec):
    problem = run_spec(worker, fresh(tmp_path_factory.mktemp("long")), spec, finished)
    assert problem is None, (spec, problem)
