"""A node executor's forks, without Flower's network (run as a script by test_warm_nodes: it
forks, so it runs in a process of its own, never inside pytest).

The task target stands in for Flower's run_clientapp: it loads the model as the ClientApp does
and records what it got. Writes OUT/summary.json and OUT/<token>.json per task."""

from __future__ import annotations

import json
import os
import signal
import sys
import time
from pathlib import Path

import torch
from flwr.supercore.constant import TaskType
from flwr.supercore.superexec.executor import ExecutionSpec, LaunchResultStatus

from fedlora import models
from fedlora.flower.executor import ForkExecutor, one_thread

OUT = Path(sys.argv[1])
NAME = "tiny-llama"
WARM_PTR: list[int] = []  # the parent's warm embedding's address, set before a launch


def task(runtime_api_address, token, insecure, certificates, parent_pid, runtime_dependency_install):
    """What a ClientApp does with the model, and what it saw."""
    had_warm = bool(models.warm_keys())
    tokenizer = models.load_tokenizer(NAME)
    model = models.load_model(NAME, 0, len(tokenizer))
    again = models.load_model(NAME, 0, len(tokenizer))  # taken once: read from its source
    record = {
        "pid": os.getpid(), "ppid": os.getppid(), "threads": torch.get_num_threads(), "had_warm": had_warm,
        "shared_with_parent": model.model.embed_tokens.weight.data_ptr() in WARM_PTR,
        "equals_fresh": all(torch.equal(a, b) for a, b in zip(model.state_dict().values(),
                                                            again.state_dict().values())),
    }
    with torch.no_grad():  # as a ClientApp's merges and training would: only in this child
        for p in model.parameters():
            p.add_(1.0)
    (OUT / f"{token}.json").write_text(json.dumps(record))
    if token == "raises":
        raise RuntimeError("a ClientApp that fails")
    if token == "killed":
        os.kill(os.getpid(), signal.SIGKILL)
    if token.startswith("hangs"):
        time.sleep(600)


def spec(token: str, n: int) -> ExecutionSpec:
    return ExecutionSpec(task_type=TaskType.CLIENT_APP, runtime_api_address="127.0.0.1:9", token=token,
                         insecure=True, root_certificates_path=None, runtime_dependency_install=False,
                         parent_pid=os.getpid(), suppress_output=False, task_id=n)


def finish(ex: ForkExecutor, timeout: float = 60.0) -> None:
    deadline = time.monotonic() + timeout
    while ex.children and time.monotonic() < deadline:
        ex.reconcile()
        time.sleep(0.02)
    assert not ex.children, f"children still running: {ex.children}"


def warm_ptr() -> list[int]:
    return [m.model.embed_tokens.weight.data_ptr() for k, m in models._WARM.items() if k[0] == "model"]


def main() -> None:
    threads = one_thread()  # nothing warm yet: the first task's model becomes warm
    summary: dict = {"threads": threads, "parent_threads": torch.get_num_threads()}
    ex = ForkExecutor(threads, max_tasks=2, target=task)
    results = {}
    for n, token in enumerate(["first", "second", "third", "raises", "killed"], start=1):
        WARM_PTR[:] = warm_ptr()
        assert ex.launch(spec(token, n)).status == LaunchResultStatus.ACCEPTED
        finish(ex)
        results[token] = json.loads((OUT / f"{token}.json").read_text())
    summary["tasks"] = results
    summary["warm_after"] = [list(k) for k in models.warm_keys()]

    for n, token in enumerate(["hangs-1", "hangs-2"], start=10):
        assert ex.launch(spec(token, n)).status == LaunchResultStatus.ACCEPTED
    summary["capacity_when_full"] = sorted(ex.get_eligible_capacity({TaskType.CLIENT_APP})[0])
    summary["third_launch"] = str(ex.launch(spec("hangs-3", 12)).status)
    while not all((OUT / f"hangs-{i}.json").exists() for i in (1, 2)):
        time.sleep(0.02)
    t = time.monotonic()
    ex.close()
    summary["close_seconds"] = time.monotonic() - t
    summary["children_after_close"] = dict(ex.children)
    try:
        os.waitpid(-1, os.WNOHANG)
        summary["unreaped"] = True
    except ChildProcessError:
        summary["unreaped"] = False
    (OUT / "summary.json").write_text(json.dumps(summary))


if __name__ == "__main__":
    main()
