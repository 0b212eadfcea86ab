"""Run directories are not trusted: no pickle is ever loaded, every merge file and the config are
verified on resume, damaged files give one line, one process per run directory, a full disk
says so. (Tiny model; the failing resumes stop before the model loads.)"""

from __future__ import annotations

import errno
import os
import pickle
import shutil
import signal
import struct
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
import torch
import yaml
from conftest import tiny_tree
from safetensors.torch import load_file

from fedlora.cli import main
from fedlora.config import build_config, dump_config
from fedlora.flower.records import checked_run_key
from fedlora.runtime.checkpoint import CHECKPOINT, Checkpoint, merge_path
from fedlora.files import DiskFullError, RunFileError, atomic_write, read_json
from fedlora.runtime.inprocess import Simulation
from fedlora.runtime.outputs import read_metrics
from fedlora.runtime.rundir import run_lock, verify_run

TREE = tiny_tree(federation={"rounds": 2, "eval_every": 1})


@pytest.fixture(scope="module")
def finished(tmp_path_factory) -> Path:
    """A finished 2-round AFLoRA run (AFLoRA merges an update into the base every round)."""
    if not Path(TREE["data"]["data_dir"]).exists():
        pytest.skip("shared data not found")
    run_dir = tmp_path_factory.mktemp("finished") / "run"
    Simulation(build_config(TREE), run_dir, progress=False).run()
    return run_dir


@pytest.fixture
def run_copy(finished, tmp_path) -> Path:
    shutil.copytree(finished, tmp_path / "run")
    return tmp_path / "run"


def _refused(capsys, argv: list[str], *needles: str) -> str:
    """`fedlora ARGV` exits 2 with one line on stderr that contains every needle."""
    assert main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert "\n" not in err and "Traceback" not in err, err
    for needle in needles:
        assert needle in err, err
    return err


# -- 1. no pickle ----------------------------------------------------------------------------


class _Plant:
    """Unpickling this runs `touch MARKER`."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return os.system, (f"touch {self.marker}",)


def test_planted_pickle_checkpoint_is_refused_and_never_unpickled(run_copy, tmp_path, capsys):
    marker = tmp_path / "pwned"
    (run_copy / CHECKPOINT).unlink()
    (run_copy / "checkpoint.pt").write_bytes(pickle.dumps({"round": 1, "x": _Plant(marker)}))
    pickle.loads((run_copy / "checkpoint.pt").read_bytes())  # the plant works ...
    assert marker.exists()
    marker.unlink()
    _refused(capsys, ["run", "--resume", str(run_copy)], "checkpoint.pt", "pickle")
    _refused(capsys, ["export", str(run_copy)], "checkpoint.pt")
    cfg = tmp_path / "cfg.yaml"
    cfg.write_text(yaml.safe_dump(TREE))
    _refused(capsys, ["eval", str(cfg), "--run", str(run_copy)], "checkpoint.pt")
    _refused(capsys, ["run", str(cfg), "--out", str(run_copy)], "holds a run already")
    assert not marker.exists()  # ... and nothing of ours ever unpickled it


def test_no_pickle_loader_in_the_package():
    src = Path(__file__).resolve().parents[1] / "src" / "fedlora"
    text = "\n".join(p.read_text() for p in src.rglob("*.py"))
    for loader in ("torch.load(", "pickle.load", "allow_pickle=True", "weights_only=False"):
        assert loader not in text, loader


# -- 2. integrity ----------------------------------------------------------------------------


def _flip_a_bit(path: Path) -> None:
    data = bytearray(path.read_bytes())
    data[-3] ^= 0x01  # in the last tensor's data: still a well-formed safetensors file
    path.write_bytes(bytes(data))


TAMPER = {
    "deleted": lambda d: merge_path(d, 1).unlink(),
    "bit-flipped": lambda d: _flip_a_bit(merge_path(d, 1)),
    "swapped": lambda d: merge_path(d, 1).write_bytes(merge_path(d, 2).read_bytes()),
    "truncated": lambda d: merge_path(d, 1).write_bytes(merge_path(d, 1).read_bytes()[:100]),
}


@pytest.mark.parametrize("kind", TAMPER)
def test_altered_merge_file_stops_the_resume_naming_it(run_copy, capsys, kind):
    assert merge_path(run_copy, 1).exists() and merge_path(run_copy, 2).exists()
    TAMPER[kind](run_copy)
    before = (run_copy / "metrics.jsonl").read_bytes()
    _refused(capsys, ["run", "--resume", str(run_copy)], "round_0001.safetensors",
             "missing" if kind == "deleted" else "SHA-256")
    assert (run_copy / "metrics.jsonl").read_bytes() == before


def test_altered_merge_stops_export_and_flower_resume(run_copy, capsys):
    _flip_a_bit(merge_path(run_copy, 2))
    _refused(capsys, ["export", str(run_copy)], "round_0002.safetensors")
    _refused(capsys, ["flower", "run", "--resume", str(run_copy), "--local", "1"], "round_0002.safetensors")
    assert not (run_copy / "flower").exists()  # refused before any SuperLink started


def test_compare_rerun_verifies_an_unfinished_run(run_copy, tmp_path, capsys):
    out = tmp_path / "cmp"
    shutil.copytree(run_copy, out / "seed_0" / "aflora")
    (out / "seed_0" / "aflora" / "summary.json").unlink()  # "interrupted": compare would resume it
    merge_path(out / "seed_0" / "aflora", 1).unlink()
    cfg = tmp_path / "cfg.yaml"
    cfg.write_text(yaml.safe_dump(TREE))
    _refused(capsys, ["compare", str(cfg), "--methods", "aflora", "--out", str(out)], "round_0001.safetensors")


@pytest.mark.parametrize("edit, field", [
    ({"federation": {"lr": 0.02}}, "federation.lr"),
    ({"seed": 1}, "seed"),
    ({"algorithm": {"name": "fedit"}}, "algorithm.name"),
])
def test_edited_config_yaml_stops_the_resume_naming_the_field(run_copy, capsys, edit, field):
    tree = yaml.safe_load((run_copy / "config.yaml").read_text())
    for section, value in edit.items():
        if isinstance(value, dict) and section != "algorithm":
            tree[section].update(value)
        else:
            tree[section] = value
    (run_copy / "config.yaml").write_text(yaml.safe_dump(tree, sort_keys=False))
    _refused(capsys, ["run", "--resume", str(run_copy)], "config.yaml", "edited", field)


@pytest.mark.parametrize("sets, fields", [
    (["federation.lr=0.02"], "federation.lr"),
    (["federation.rounds=1"], "federation.rounds"),
    (["federation.rounds=4", "seed=3"], "federation.rounds, seed"),
])
def test_resume_refuses_any_change_but_more_rounds(run_copy, capsys, sets, fields):
    argv = ["run", "--resume", str(run_copy)]
    for s in sets:
        argv += ["--set", s]
    _refused(capsys, argv, f"differs from the run's in {fields}")


def test_more_rounds_extend_a_finished_run_like_an_uninterrupted_one(run_copy, tmp_path, capsys):
    assert main(["run", "--quiet", "--resume", str(run_copy), "--set", "federation.rounds=3"]) == 0
    assert yaml.safe_load((run_copy / "config.yaml").read_text())["federation"]["rounds"] == 3
    assert Checkpoint.load(run_copy).round == 3
    longer = build_config({**TREE, "federation": {**TREE["federation"], "rounds": 3}})
    Simulation(longer, tmp_path / "three", progress=False).run()
    a = load_file(str(run_copy / "final_state.safetensors"))
    b = load_file(str(tmp_path / "three" / "final_state.safetensors"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert [r["accuracy"] for r in read_metrics(run_copy)] == [r["accuracy"] for r in read_metrics(tmp_path / "three")]
    capsys.readouterr()
    assert main(["run", "--quiet", "--resume", str(run_copy)]) == 0  # the extended config is the run's now


def test_extension_interrupted_before_its_checkpoint_resumes(run_copy, capsys):
    """config.yaml already names the new rounds, the checkpoint not yet: the same command goes on."""
    longer = build_config(TREE, {"federation.rounds": 3})
    (run_copy / "config.yaml").write_text(dump_config(longer))
    ckpt, merges = verify_run(run_copy, longer)
    assert ckpt.round == 2 and len(merges) == 2
    _refused(capsys, ["run", "--resume", str(run_copy)], "config.yaml", "federation.rounds")


def test_flower_server_app_verifies_on_resume(run_copy, tmp_path, monkeypatch):
    from test_flower import _loopback_run

    shutil.copytree(run_copy, tmp_path / "flower")
    merge_path(tmp_path / "flower", 2).unlink()
    run, grid = _loopback_run(TREE, tmp_path, monkeypatch)
    grid.push_messages = None  # no client may be contacted
    with pytest.raises(RunFileError, match="round_0002.safetensors: missing"):
        run.run(resume=True)


def test_garbled_checkpoint_header_is_refused_without_allocating(run_copy, capsys):
    path = run_copy / CHECKPOINT
    data = bytearray(path.read_bytes())
    data[:8] = struct.pack("<Q", 40 * 2**30)  # "a 40 GB header"
    path.write_bytes(bytes(data))
    _refused(capsys, ["run", "--resume", str(run_copy)], CHECKPOINT, "header length")


@pytest.mark.parametrize("keep", [0, 5, 1000])
def test_truncated_checkpoint_gives_one_line(run_copy, capsys, keep):
    path = run_copy / CHECKPOINT
    path.write_bytes(path.read_bytes()[:keep])
    _refused(capsys, ["run", "--resume", str(run_copy)], CHECKPOINT)


def test_damaged_checkpoint_record_gives_one_line(run_copy, capsys):
    ckpt = Checkpoint.load(run_copy)
    ckpt.merges[7] = "0" * 64  # a merge for a round the checkpoint has not reached
    ckpt.save(run_copy)
    _refused(capsys, ["run", "--resume", str(run_copy)], CHECKPOINT, "inconsistent")


def test_truncated_metrics_and_oversized_json_give_one_line(run_copy, capsys, tmp_path):
    (run_copy / "metrics.jsonl").write_text('{"round": 1, "accu')
    _refused(capsys, ["report", str(run_copy)], "metrics.jsonl", "not valid JSON")
    big = tmp_path / "big.json"
    big.write_text("[" + "0," * 1000 + "0]")
    with pytest.raises(RunFileError, match="2003 bytes, more than the 100 a run file may have"):
        read_json(big, max_bytes=100)


HOSTILE_VALUES = ["0.5", True, [], {}, {"x": "y"}, -1, 2.5, float("nan"), None]


def _damage(records: list, rng) -> tuple[int, str]:
    """Replace one field (top-level or a client's) of one record with a hostile value."""
    n = int(rng.integers(len(records)))
    rec = records[n]
    if rng.random() < 0.3 and rec.get("clients"):
        rec = rec["clients"][int(rng.integers(len(rec["clients"])))]
    key = sorted(rec)[int(rng.integers(len(rec)))]
    rec[key] = HOSTILE_VALUES[int(rng.integers(len(HOSTILE_VALUES)))]
    return n + 1, key


def test_damaged_metrics_fields_give_one_line_naming_line_and_field(run_copy, tmp_path, capsys):
    """40 seeded damages of one field each, read by `report` on the run and on a comparison
    holding it: exit 0 (a harmless value) or 2 with one line, never a traceback."""
    import json

    import numpy as np

    clean = [json.loads(line) for line in (run_copy / "metrics.jsonl").read_text().splitlines()]
    comparison = tmp_path / "cmp"
    shutil.copytree(run_copy, comparison / "seed_0" / "aflora", ignore=shutil.ignore_patterns("*.safetensors"))
    rng = np.random.default_rng(0)
    refused = 0
    for case in range(40):
        records = json.loads(json.dumps(clean))
        line, key = _damage(records, rng)
        target = run_copy if case % 2 else comparison / "seed_0" / "aflora"
        (target / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
        code = main(["report", str(run_copy if case % 2 else comparison)])
        err = capsys.readouterr().err.strip()
        assert code in (0, 2) and "\n" not in err and "Traceback" not in err, (key, err)
        if code == 2:
            refused += 1
            assert f"metrics.jsonl line {line}:" in err, (key, err)
    assert refused >= 25  # most damages are refused, each naming its line
    records = json.loads(json.dumps(clean))
    records[1]["accuracy"] = "0.9"
    (run_copy / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    _refused(capsys, ["report", str(run_copy)], "metrics.jsonl line 2: accuracy: not a number")
    records[1]["accuracy"], records[1]["round"] = 0.9, 1
    (run_copy / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    _refused(capsys, ["report", str(run_copy)], "line 2: round: 1 does not follow the previous line's 1")


def test_every_record_the_check_accepts_is_one_the_tables_can_read(run_copy):
    """Every field of both records (and of their first client) × every hostile value: either
    `record_error` names it, or the readers that index records (compare's row, statistics'
    tilt, time to accuracy, report's tables) compute without an exception."""
    import json

    from fedlora.compare import method_row, tilt_tables
    from fedlora.report import class_table, tilt_table
    from fedlora.runtime.outputs import record_error
    from fedlora.tta import tta_rows

    clean = [json.loads(line) for line in (run_copy / "metrics.jsonl").read_text().splitlines()]
    assert [record_error(r, n) for n, r in enumerate(clean)] == [None, None]
    places = [(n, None, key) for n, r in enumerate(clean) for key in r]
    places += [(n, 0, key) for n, r in enumerate(clean) for key in r["clients"][0]]
    accepted = 0
    for n, client, key in places:
        for value in HOSTILE_VALUES:
            records = json.loads(json.dumps(clean))
            (records[n] if client is None else records[n]["clients"][client])[key] = value
            if any(record_error(r, prev) for r, prev in zip(records, [-1, records[0]["round"]])):
                continue
            accepted += 1
            method_row("m", [records])
            tilt_tables({"m": [records]})
            tta_rows({"m": {0: records}}, 0.5, reference="m")
            class_table(records)
            tilt_table(records, [4, 4], [10, 10])
    assert accepted > 50  # the loop ran on harmless values too (None for an optional number, ...)
    clipped = json.loads(json.dumps(clean[0]))
    clipped["clients"][0]["clipped"] = "norm 9.1 above the bound 3; scaled by 0.33"  # runtime.rounds' note
    assert record_error(clipped, -1) is None
    clipped["clients"][0]["seconds"] = "9 s"  # text only where the runtime writes text
    assert record_error(clipped, -1) == "clients[0].seconds: not a number"


def test_summary_that_is_not_an_object_gives_one_line(run_copy, tmp_path, capsys):
    (run_copy / "summary.json").write_text("[1, 2]")
    _refused(capsys, ["report", str(run_copy)], "summary.json: not a JSON object")
    comparison = tmp_path / "cmp"
    shutil.copytree(run_copy, comparison / "seed_0" / "aflora", ignore=shutil.ignore_patterns("*.safetensors"))
    _refused(capsys, ["report", str(comparison)], "summary.json: not a JSON object")


# -- 6. lock, run key, full disk ---------------------------------------------------------------


def test_second_run_into_a_locked_directory_stops_with_one_line(tmp_path, capsys, data_dir):
    cfg = tmp_path / "cfg.yaml"
    cfg.write_text(yaml.safe_dump(TREE))
    out = tmp_path / "run"
    with run_lock(out):  # another process is running there (flock: any other open file conflicts)
        _refused(capsys, ["run", str(cfg), "--out", str(out)], "another fedlora process", "run.lock")
    assert not (out / "config.yaml").exists()


def test_a_killed_holder_leaves_no_stale_lock(tmp_path):
    out = tmp_path / "run"
    code = ("import sys, time; from pathlib import Path; from fedlora.runtime.rundir import run_lock\n"
            f"with run_lock(Path({str(out)!r})):\n    print('locked', flush=True); time.sleep(120)\n")
    proc = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True)
    try:
        assert proc.stdout.readline().strip() == "locked"
        with pytest.raises(RunFileError, match=rf"another fedlora process \(pid {proc.pid}\)"), run_lock(out, wait=0.6):
            pass
        threading.Timer(1.0, proc.send_signal, [signal.SIGKILL]).start()
        started = time.monotonic()
        with run_lock(out, wait=60):  # waits for the holder; the OS releases a dead holder's lock
            assert time.monotonic() - started >= 0.9
    finally:
        proc.kill()
        proc.wait(30)
        proc.stdout.close()


@pytest.mark.parametrize("key", ["../../escape", "/etc", "a" * 32 + "/..", "ABCDEF" * 6, "", None, 12])
def test_run_key_that_is_not_one_is_refused(key):
    with pytest.raises(ValueError, match="not a run key"):
        checked_run_key(key)


def test_client_refuses_a_server_run_key_that_leaves_its_state_dir(data_dir, tmp_path, monkeypatch):
    from test_flower import _loopback_run, _tree

    from fedlora.flower import server_app

    escaped = f"escaped-{tmp_path.name}"  # state-dir/../../escaped-… is tmp_path.parent/escaped-…
    monkeypatch.setattr(server_app, "checked_run_key", lambda key: f"../../{escaped}")  # a hostile server
    run, _ = _loopback_run(_tree("fedit"), tmp_path, monkeypatch)
    with pytest.raises(ValueError, match="not a run key"):
        run.run()
    assert not (tmp_path.parent / escaped).exists()


def test_tampered_flower_key_file_is_refused(data_dir, tmp_path, monkeypatch):
    from test_flower import _loopback_run, _tree

    run, _ = _loopback_run(_tree("fedit"), tmp_path, monkeypatch)
    (tmp_path / "flower").mkdir()
    (tmp_path / "flower" / "flower_run.json").write_text('{"run_key": "../../x"}')
    with pytest.raises(RunFileError, match="flower_run.json"):
        run.run()


def test_disk_full_while_checkpointing_says_so_and_keeps_no_partial_file(tmp_path, capsys, monkeypatch, data_dir):
    cfg = tmp_path / "cfg.yaml"
    cfg.write_text(yaml.safe_dump(TREE))
    real = Path.write_bytes

    def full_disk(self, data):
        if self.name == CHECKPOINT + ".tmp":
            real(self, data[: len(data) // 2])  # the disk filled up half-way
            raise OSError(errno.ENOSPC, "No space left on device")
        return real(self, data)

    monkeypatch.setattr(Path, "write_bytes", full_disk)
    out = tmp_path / "run"
    _refused(capsys, ["run", "--quiet", str(cfg), "--out", str(out)], "disk full", str(out / CHECKPOINT))
    assert not (out / CHECKPOINT).exists() and not (out / (CHECKPOINT + ".tmp")).exists()


def test_torch_stream_error_on_a_full_disk_is_a_disk_full_error(tmp_path):
    def failing_writer(path):
        Path(path).write_bytes(b"half")
        raise RuntimeError("[enforce fail at inline_container.cc:603] . unexpected pos; basic_ios::clear: iostream error")

    (tmp_path / "f").write_bytes(b"old")
    with pytest.raises(DiskFullError, match="disk full: could not write .*f "):
        atomic_write(tmp_path / "f", failing_writer)
    assert (tmp_path / "f").read_bytes() == b"old" and not (tmp_path / "f.tmp").exists()
    with pytest.raises(RuntimeError, match="something else"):  # other errors are not disguised
        atomic_write(tmp_path / "g", lambda p: (_ for _ in ()).throw(RuntimeError("something else")))
