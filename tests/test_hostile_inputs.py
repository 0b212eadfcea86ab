"""Issue 28, "untrusted inputs, round two": one test per numbered finding, each through the CLI.
Every hostile input gives exit code 2 and ONE line naming the file or field, never a
traceback, a write outside the run directory, or exit 0 with a different model. Findings that
allocated gigabytes run in a subprocess under an address-space limit (the old code died
there with a MemoryError traceback)."""

from __future__ import annotations

import hashlib
import json
import os
import resource
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml
from conftest import tiny_tree
from safetensors import safe_open
from safetensors.torch import load_file, save, save_file

import fedlora
from fedlora.cli import main

SRC = Path(fedlora.__file__).resolve().parents[1]  # the code under test, also in the subprocess
MEMORY_LIMIT = 4 << 30  # torch and the tiny model fit in it; the old code's allocations did not


def write_csv(path: Path, rows: int = 48) -> Path:
    path.write_text("text,label\n" + "".join(f"the article {i},{('negative', 'positive')[i % 2]}\n"
                                           for i in range(rows)))
    return path


def tree_for(tmp: Path, **sections) -> dict:
    data = {"dataset": "custom", "train_file": str(write_csv(tmp / "train.csv")), "partition": "iid",
            "train_examples": None, "test_examples": 12, "max_length": 32}
    tree = tiny_tree(data=data, algorithm={"name": "fedit"},
                     federation={"num_clients": 2, "client_max_ranks": [4, 2], "rounds": 2, "local_steps": 1,
                                 "batch_size": 4})
    for key, value in sections.items():
        tree[key] = {**tree.get(key, {}), **value} if isinstance(value, dict) else value
    return tree


def write_config(tmp: Path, tree: dict | str, name: str = "cfg.yaml") -> Path:
    path = tmp / name
    path.write_text(tree if isinstance(tree, str) else yaml.safe_dump(tree))
    return path


def refused(capsys, argv: list[str], *needles: str) -> str:
    """`fedlora ARGV` (in this process) exits 2 with one line containing every needle."""
    assert main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert err and "\n" not in err and "Traceback" not in err, err
    for needle in needles:
        assert needle in err, err
    return err


def refused_limited(argv: list[str], *needles: str, cwd: Path | None = None) -> str:
    """The same in a fresh process whose address space is capped at MEMORY_LIMIT."""
    def cap() -> None:
        resource.setrlimit(resource.RLIMIT_AS, (MEMORY_LIMIT, MEMORY_LIMIT))

    env = {**os.environ, "PYTHONPATH": str(SRC), "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
    proc = subprocess.run([sys.executable, "-m", "fedlora.cli", *argv], capture_output=True, text=True,
                          preexec_fn=cap, env=env, cwd=cwd, timeout=600)
    err = "\n".join(line for line in proc.stderr.strip().splitlines() if " WARNING " not in line)
    assert proc.returncode == 2 and "\n" not in err and "Traceback" not in err, (proc.returncode, proc.stderr[-2000:])
    for needle in needles:
        assert needle in err, err
    return err


@pytest.fixture(scope="module")
def finished(tmp_path_factory) -> Path:
    """A finished 2-round FedIT run on the tiny Llama (its final_state holds the adapter)."""
    tmp = tmp_path_factory.mktemp("finished")
    assert main(["run", "--quiet", str(write_config(tmp, tree_for(tmp))), "--out", str(tmp / "run")]) == 0
    return tmp / "run"


@pytest.fixture
def run_copy(finished, tmp_path) -> Path:
    shutil.copytree(finished, tmp_path / "run")
    return tmp_path / "run"


def forge(run: Path, record=None, tensors=None) -> None:
    """Rewrite run/checkpoint.safetensors with its record and tensors edited, every checksum
    in the record recomputed: what a forger who knows the format writes."""
    def tensors_sha256(tensors: dict) -> str:  # the format's own: SHA-256 of the tensors saved without metadata
        return hashlib.sha256(save({k: v.contiguous() for k, v in tensors.items()})).hexdigest()

    path = run / "checkpoint.safetensors"
    with safe_open(str(path), "pt") as fh:
        rec = json.loads(fh.metadata()["fedlora"])
    flat = load_file(str(path))
    if tensors is not None:
        tensors(flat)
    if record is not None:
        record(rec)
    rec["tensors_sha256"] = tensors_sha256(flat)
    rec["state_sha256"] = tensors_sha256({k[len("state/"):]: v for k, v in flat.items() if k.startswith("state/")})
    rec["config_sha256"] = hashlib.sha256(rec["config"].encode()).hexdigest()
    save_file(flat, str(path), {"fedlora": json.dumps(rec)})


# -- 1. no write outside the run directory ---------------------------------------------------


@pytest.mark.parametrize("resume", [False, True])
def test_a_run_lock_that_is_a_link_is_refused_and_its_target_untouched(run_copy, tmp_path, capsys, resume):
    victim = tmp_path / "victim.txt"
    victim.write_text("precious\n")
    out = run_copy if resume else tmp_path / "new"
    out.mkdir(exist_ok=True)
    (out / "run.lock").unlink(missing_ok=True)
    (out / "run.lock").symlink_to(victim)
    argv = ["run", "--quiet", "--resume", str(out)] if resume else \
        ["run", "--quiet", str(write_config(tmp_path, tree_for(tmp_path))), "--out", str(out)]
    refused(capsys, argv, "run.lock", "symbolic link")
    assert victim.read_text() == "precious\n"


@pytest.mark.parametrize("label", ["../../escaped", "/ABS"])
def test_compare_refuses_a_method_label_that_is_a_path(tmp_path, capsys, label):
    label = label.replace("/ABS", str(tmp_path / "abs"))
    tree = {**tree_for(tmp_path), "methods": {label: {"name": "fedit"}}}
    cfg = write_config(tmp_path, tree)
    out = tmp_path / "a" / "b" / "out"
    refused(capsys, ["compare", str(cfg), "--methods", label, "--out", str(out)], "cannot name a folder")
    refused(capsys, ["compare", str(cfg), "--methods", "fedit", "--out", str(out)], "methods", "cannot name a folder")
    assert not (tmp_path / "a").exists() and not (tmp_path / "abs").exists() and not (tmp_path / "escaped").exists()


def test_a_resume_refuses_an_eval_folder_that_is_a_link(run_copy, tmp_path, capsys):
    outside = tmp_path / "outside"
    outside.mkdir()
    shutil.rmtree(run_copy / "eval")
    (run_copy / "eval").symlink_to(outside)
    refused(capsys, ["run", "--quiet", "--resume", str(run_copy), "--set", "federation.rounds=3"], "eval",
            "symbolic link")
    assert list(outside.iterdir()) == []


# -- 2. bounded by bytes read, depth and a memory estimate ------------------------------------


def test_a_config_that_links_to_dev_zero_fails_fast(tmp_path):
    (tmp_path / "cfg.yaml").symlink_to("/dev/zero")
    refused_limited(["run", str(tmp_path / "cfg.yaml"), "--out", str(tmp_path / "run")], "cfg.yaml", "bytes")


def test_a_sparse_checkpoint_is_refused_without_being_read(run_copy):
    with open(run_copy / "checkpoint.safetensors", "r+b") as fh:
        fh.truncate(3 << 30)  # its header says less: the rest is never read
    refused_limited(["run", "--quiet", "--resume", str(run_copy)], "checkpoint.safetensors")


def test_a_header_of_nested_empty_lists_is_refused_before_it_is_parsed(run_copy):
    body = b"[" + b"[]," * 33_000_000 + b"[]]"  # 99 MB: ~4 GB once json.loads builds its lists
    path = run_copy / "checkpoint.safetensors"
    path.write_bytes(len(body).to_bytes(8, "little") + body)
    refused_limited(["run", "--quiet", "--resume", str(run_copy)], "checkpoint.safetensors", "arrays and objects")


def test_a_csv_line_with_a_million_columns_is_refused_naming_the_file(tmp_path):
    wide = tmp_path / "wide.csv"
    wide.write_text(",".join(f"c{i}" for i in range(10**6)) + "\n" + ",".join("1" * 10**6) + "\n")
    cfg = write_config(tmp_path, tree_for(tmp_path, data={"train_file": str(wide)}))
    refused_limited(["run", "--quiet", str(cfg), "--out", str(tmp_path / "run")], "data.train_file", "columns")


def test_a_batch_size_that_cannot_fit_is_refused_naming_the_field(tmp_path):
    cfg = write_config(tmp_path, tree_for(tmp_path, federation={"batch_size": 10_000_000}))
    refused_limited(["run", "--quiet", str(cfg), "--out", str(tmp_path / "run")], "federation.batch_size")
    assert not (tmp_path / "run").exists()


# -- 3. checksums on every file resume, eval --run and export read; the record validated ------


def test_flipped_bytes_in_checkpoint_tensors_stop_the_resume(run_copy, capsys):
    path = run_copy / "checkpoint.safetensors"
    data = bytearray(path.read_bytes())
    for i in range(1, 17):  # 16 bytes in the tensor data, at the end of the file
        data[-4 * i] ^= 0x40
    path.write_bytes(bytes(data))
    refused(capsys, ["run", "--quiet", "--resume", str(run_copy), "--set", "federation.rounds=3"],
            "checkpoint.safetensors", "altered")


@pytest.mark.parametrize("damage", ["bit_flip", "scaled"])
def test_an_altered_final_state_stops_eval_and_export(run_copy, tmp_path, capsys, damage):
    path = run_copy / "final_state.safetensors"
    if damage == "bit_flip":
        data = bytearray(path.read_bytes())
        data[-3] ^= 0x01
        path.write_bytes(bytes(data))
    else:
        save_file({k: 2 * v for k, v in load_file(str(path)).items()}, str(path))
    refused(capsys, ["eval", str(run_copy / "config.yaml"), "--run", str(run_copy)], "final_state.safetensors")
    refused(capsys, ["export", str(run_copy), "--format", "peft", "--out", str(tmp_path / "peft")],
            "final_state.safetensors")


def _nan_state(flat: dict) -> None:
    key = next(k for k in flat if k.startswith("state/"))
    flat[key] = torch.full_like(flat[key], float("nan"))


def _wrong_shape(flat: dict) -> None:
    key = next(k for k in flat if k.startswith("state/") and k.endswith(".A"))
    flat[key] = torch.zeros(flat[key].shape[0] + 1, flat[key].shape[1] + 3)


@pytest.mark.parametrize("record, tensors, needle", [
    (lambda r: r.update(round=1_000_000), None, "round"),
    (lambda r: r.update(threads=1_000_000), None, "threads"),
    (lambda r: r.update(sampler_state={"bit_generator": "PCG64", "state": "x"}), None, "sampler_state"),
    (lambda r: r.update(history="not a list"), None, "history"),
    (lambda r: r.update(history=[1, 2]), None, "history"),
    (lambda r: r.update(round=[[[[[[[[]]]]]]]]), None, "round"),
    (None, _nan_state, "NaN"),
    (None, _wrong_shape, "shape"),
], ids=["round", "threads", "sampler_state", "history_text", "history_items", "nested", "nan_state", "wrong_shape"])
def test_a_forged_checkpoint_record_or_state_gives_one_line(run_copy, capsys, record, tensors, needle):
    forge(run_copy, record, tensors)
    refused(capsys, ["run", "--quiet", "--resume", str(run_copy), "--set", "federation.rounds=3"],
            "checkpoint.safetensors", needle)


def test_deeply_nested_json_in_a_checkpoint_record_gives_one_line(run_copy, capsys):
    path = run_copy / "checkpoint.safetensors"
    flat = load_file(str(path))
    save_file(flat, str(path), {"fedlora": "[" * 100_000 + "]" * 100_000})
    refused(capsys, ["run", "--quiet", "--resume", str(run_copy)], "checkpoint.safetensors")


# -- 4 and 5. configs and data files ---------------------------------------------------------


@pytest.mark.parametrize("section, key, raw", [
    (None, "seed", "18446744073709551616"),
    (None, "seed", "-1"),
    ("federation", "lr", ".inf"),
    ("federation", "lr", ".nan"),
    ("lora", "alpha", ".inf"),
], ids=["seed_2_64", "seed_negative", "lr_inf", "lr_nan", "alpha_inf"])
def test_out_of_range_and_non_finite_values_give_one_line(tmp_path, capsys, section, key, raw):
    tree = tree_for(tmp_path)
    (tree.setdefault(section, {}) if section else tree)[key] = "PLACEHOLDER"
    cfg = write_config(tmp_path, yaml.safe_dump(tree).replace("PLACEHOLDER", raw))
    refused(capsys, ["run", "--quiet", str(cfg), "--out", str(tmp_path / "run")], f"{section}.{key}" if section else key)
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize("twice", ["seed: 3\n", "federation:\n  lr: 0.5\n"], ids=["top", "nested"])
def test_a_key_given_twice_is_an_error(tmp_path, capsys, twice):
    cfg = write_config(tmp_path, yaml.safe_dump(tree_for(tmp_path)) + twice)
    refused(capsys, ["run", "--quiet", str(cfg), "--out", str(tmp_path / "run")], "duplicate key")


def test_an_empty_jsonl_training_file_gives_one_line(tmp_path, capsys):
    empty = tmp_path / "train.jsonl"
    empty.write_text("")
    cfg = write_config(tmp_path, tree_for(tmp_path, data={"train_file": str(empty)}))
    refused(capsys, ["run", "--quiet", str(cfg), "--out", str(tmp_path / "run")], "data.train_file", "no data rows")


# -- 6. the model identity of a tiny model includes its seed ----------------------------------


def test_eval_of_a_run_with_another_seed_is_refused(run_copy, tmp_path, capsys):
    tree = yaml.safe_load((run_copy / "config.yaml").read_text())
    tree["seed"] = 7
    cfg = write_config(tmp_path, tree, "other_seed.yaml")
    refused(capsys, ["eval", str(cfg), "--run", str(run_copy)], "seed")
    assert main(["eval", str(run_copy / "config.yaml"), "--run", str(run_copy)]) == 0  # its own config still works
