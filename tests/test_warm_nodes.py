"""Warm nodes (fedlora.flower.executor): a node executor runs each ClientApp task in a fork of a
process that keeps the imports and the base model; its children take the warm model (the
parent's own copy, untouched by what a child does), are reaped, and stop with it; it stops with
its SuperNode and on SIGTERM; bad arguments are one line and exit code 2.

The real Flower path (a run on warm nodes equals in-process bit for bit, a killed task is a
failed client) is in test_flower.py and test_flower_nodes.py (slow: real processes)."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from fedlora.cli import main
from fedlora.flower.launch import flower_env, free_port

ROOT = Path(__file__).resolve().parents[1]


def _env(**extra) -> dict[str, str]:
    return {**flower_env(), "PYTHONPATH": os.pathsep.join(sys.path), **extra}


def test_forked_tasks_take_the_warm_model_and_are_reaped(tmp_path):
    """The first task loads the model from its source and the executor keeps it warm; later
    tasks get the parent's copy (same memory, equal to a fresh load even after an earlier task
    changed its own), with the thread count a fresh process would have (the parent keeps one);
    a task that raises or is killed is reaped like one that succeeds; past max_tasks nothing is
    acquired; close() stops running tasks; no child is left unreaped."""
    proc = subprocess.run([sys.executable, str(ROOT / "tests/warm_scenario.py"), str(tmp_path)],
                          env=_env(OMP_NUM_THREADS="2"), capture_output=True, text=True, timeout=300, check=False)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    s = json.loads((tmp_path / "summary.json").read_text())
    tasks = s["tasks"]
    assert (s["threads"], s["parent_threads"]) == (2, 1)
    assert all(t["threads"] == 2 and t["ppid"] != t["pid"] for t in tasks.values())
    assert len({t["pid"] for t in tasks.values()}) == len(tasks)
    assert tasks["first"]["had_warm"] is False and tasks["first"]["shared_with_parent"] is False
    for name in ("second", "third", "raises", "killed"):
        assert tasks[name]["had_warm"] and tasks[name]["shared_with_parent"], name
    assert all(t["equals_fresh"] for t in tasks.values()), "a warm model differs from a fresh load"
    (kept,) = s["warm_after"]
    assert kept[:2] == ["tiny-llama", 0]
    assert s["capacity_when_full"] == [] and s["third_launch"] == "capacity_rejected"
    assert s["close_seconds"] < 5 and s["children_after_close"] == {} and s["unreaped"] is False
    assert "task 4 failed outside the ClientApp" in proc.stderr  # the one that raised, reported
    assert "killed by signal 9" in proc.stderr


@pytest.mark.parametrize("reaped", [True, False])
def test_a_watched_process_stops_when_its_parent_ends(reaped):
    """watch_parent (the executor on its SuperNode, a task on its executor): once the watched
    process ends, the watcher gets SIGTERM, also while the ended one is a zombie nobody reaped
    yet (a plain kill(pid, 0) would call it alive), and also with SIGINT ignored (what a
    background start by a non-interactive shell leaves; the stop must not depend on it)."""
    parent = subprocess.Popen(["sleep", "300"])
    code = (f"import signal, time; from fedlora.flower.executor import watch_parent; "
            f"signal.signal(signal.SIGINT, signal.SIG_IGN); "
            f"watch_parent({parent.pid}, 'the SuperNode'); print('watching', flush=True); time.sleep(120)")
    watcher = subprocess.Popen([sys.executable, "-c", code], env=_env(), stdout=subprocess.PIPE,
                               stderr=subprocess.PIPE, text=True)
    try:  # the import takes seconds on a loaded machine: kill the parent only once it is watched
        assert watcher.stdout.readline() == "watching\n", watcher.stderr.read()
        time.sleep(0.5)
        assert watcher.poll() is None, "the watcher stopped while its parent ran"
        parent.kill()
        if reaped:
            parent.wait()
        assert watcher.wait(10) == -signal.SIGTERM
    finally:
        for proc in (parent, watcher):
            if proc.poll() is None:
                proc.kill()
            proc.wait()


def test_node_executor_with_a_model_it_cannot_load_exit_2(tmp_path, capsys):
    """--model is loaded before the executor serves: a name that is no model is one line, exit 2."""
    import torch

    threads = torch.get_num_threads()
    try:  # (the executor's preparation leaves one torch thread: give this process its own back)
        assert main(["flower", "node-executor", "--runtime-api-address", "127.0.0.1:9", "--insecure",
                     "--model", str(tmp_path / "no-such-model")]) == 2
    finally:
        torch.set_num_threads(threads)
    err = capsys.readouterr().err
    assert "--model" in err and "cannot load" in err and len(err.strip().splitlines()) == 1, err


def _start_executor(log: Path, *args: str) -> subprocess.Popen:
    with open(log, "wb") as out:
        return subprocess.Popen([sys.executable, "-m", "fedlora.cli", "flower", "node-executor", *args],
                                env=_env(), stdout=out, stderr=subprocess.STDOUT, start_new_session=True)


def _wait_for(path: Path, text: str, proc: subprocess.Popen, timeout: float = 300.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if text in path.read_text():
            return
        assert proc.poll() is None, path.read_text()
        time.sleep(0.1)
    raise AssertionError(f"{text!r} not in {path} within {timeout}s")


@pytest.mark.slow
def test_executor_stops_with_its_supernode_and_on_sigterm(tmp_path):
    """`fedlora flower node-executor` itself: when its SuperNode (here a stand-in process) ends,
    it ends too, even while it cannot reach the Runtime API; on SIGTERM it ends."""
    supernode = subprocess.Popen(["sleep", "300"])
    address = f"127.0.0.1:{free_port()}"  # nothing listens: AcquireTask keeps retrying
    procs = []
    try:
        orphan = _start_executor(tmp_path / "a.log", "--runtime-api-address", address, "--insecure",
                                 "--parent-pid", str(supernode.pid))
        stopped = _start_executor(tmp_path / "b.log", "--runtime-api-address", address, "--insecure",
                                  "--parent-pid", str(os.getpid()))
        procs = [orphan, stopped]
        for log, proc in ((tmp_path / "a.log", orphan), (tmp_path / "b.log", stopped)):
            _wait_for(log, "node executor ready", proc)
        supernode.kill()
        supernode.wait()
        os.kill(stopped.pid, signal.SIGTERM)
        for proc in procs:
            proc.wait(30)
    finally:
        for proc in procs:
            if proc.poll() is None:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()
        if supernode.poll() is None:
            supernode.kill()
            supernode.wait()
    assert "the SuperNode (pid" in (tmp_path / "a.log").read_text()
    assert "node executor stopped" in (tmp_path / "b.log").read_text()


@pytest.mark.parametrize("args, message", [
    (["--runtime-api-address", "localhost", "--insecure"], "is not HOST:PORT"),
    (["--runtime-api-address", "127.0.0.1:70000", "--insecure"], "is not HOST:PORT"),
    (["--runtime-api-address", "127.0.0.1:9094"], "give --insecure"),
    (["--runtime-api-address", "127.0.0.1:9094", "--insecure", "--root-certificates", "ca.crt"], "give --insecure"),
    (["--runtime-api-address", "127.0.0.1:9094", "--root-certificates", "/no/ca.crt"], "file not found"),
    (["--runtime-api-address", "127.0.0.1:9094", "--insecure", "--max-tasks", "0"], "--max-tasks"),
    (["--runtime-api-address", "127.0.0.1:9094", "--insecure", "--seed", "-1"], "--seed"),
    (["--runtime-api-address", "127.0.0.1:9094", "--insecure", "--parent-pid", "DEAD"], "no running process"),
])
def test_node_executor_bad_arguments_exit_2(args, message, capsys):
    if "DEAD" in args:
        gone = subprocess.Popen(["true"])
        gone.wait()
        args = [str(gone.pid) if a == "DEAD" else a for a in args]
    assert main(["flower", "node-executor", *args]) == 2
    err = capsys.readouterr().err
    assert message in err and len(err.strip().splitlines()) == 1, err


def test_local_nodes_share_the_cores(tmp_path, monkeypatch):
    """Ten local nodes of torch's default threads on a small machine spin in OpenMP instead of
    training (a quickstart round ~8x the in-process one): each node's processes get cores // nodes
    threads, at least one, unless the caller chose OMP_NUM_THREADS; the SuperLink trains nothing."""
    from fedlora.flower.launch import LocalFederation

    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    monkeypatch.setattr(os, "cpu_count", lambda: 8)
    fed = LocalFederation(tmp_path, nodes=3)
    assert fed._env("executor-0")["OMP_NUM_THREADS"] == "2"
    assert fed._env("supernode-2")["OMP_NUM_THREADS"] == "2"
    assert LocalFederation(tmp_path, nodes=10)._env("executor-9")["OMP_NUM_THREADS"] == "1"
    assert "OMP_NUM_THREADS" not in fed._env("superlink")
    monkeypatch.setenv("OMP_NUM_THREADS", "4")
    assert fed._env("executor-0")["OMP_NUM_THREADS"] == "4"
