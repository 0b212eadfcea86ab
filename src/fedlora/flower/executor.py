"""Warm nodes: a SuperNode's ClientApps run in forks of one long-lived, already-loaded process.

Flower 1.41's own executor (`flower-superexec`, started by a SuperNode in its default
`subprocess` isolation) starts a new `flwr-clientapp` process for every message: each imports
torch, transformers and fedlora and loads the model again (about 27 s of a 28 s round trip on
the tiny benchmark, more for SmolLM2, ten at once on a ten-node machine). This executor takes
its place beside a SuperNode started with `--isolation process`:

    flower-supernode --isolation process --port 9094 ...  &
    fedlora flower node-executor --runtime-api-address 127.0.0.1:9094 --insecure --parent-pid $!

It imports everything once, keeps the base model in memory (`--model`, or the model the first
message loaded: fedlora.models.keep_warm), and polls the SuperNode's Runtime API like Flower's
SuperExec (`AcquireTask`, Flower's AutoExecPlugin building the task's ExecutionSpec). Each
task runs in a fork: the child calls Flower's own `run_clientapp`, so pulling the message,
heartbeats, the reply and error replies are Flower's, and it finds the imports done and the
model loaded (shared copy-on-write; only children change it, so the parent's copy stays the
fresh base that fedlora.flower.node brings up to date from the node's snapshot).

Fork and OpenMP: a process that ran a multi-threaded torch operation cannot fork safely (the
child inherits a thread pool whose threads it does not have). The parent therefore works with
one torch thread (no parallel region is ever entered) and each child sets the thread count a
fresh process would have had, before its first operation.

Faults are Flower's: a child that raises replies with Flower's error; one that is killed stops
its heartbeats and the SuperNode answers for it ("ClientApp stopped responding"), which the
server handles like any failed client; either way the executor reaps it and takes the next
task. The executor ends with its SuperNode (`--parent-pid`), on SIGTERM/SIGINT (its children
are stopped first), and each child ends with the executor.
"""

from __future__ import annotations

import json
import logging
import os
import signal
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path

log = logging.getLogger("fedlora")

POLL_SECONDS = 1.0
"""How often an idle executor asks its SuperNode for a task, as Flower's SuperExec does: each
ask costs ~20 ms of CPU (measured at 0.2 s: 4.4% of a core per node, 0.44 cores for ten local
nodes), and the SuperNode itself asks the SuperLink only every 3 s."""
STOP_GRACE = 10.0


def process_alive(pid: int, started: str | None = None) -> bool:
    """Whether `pid` runs (a zombie does not; with `started`, its /proc start time must match,
    so a reused pid is not mistaken for the process that died)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        pass
    stat = _stat(pid)
    if stat is None:  # no /proc (not Linux): kill(0) is all there is
        return True
    return stat[0] != "Z" and (started is None or stat[1] == started)


def _stat(pid: int) -> tuple[str, str] | None:
    """(state, start time) from /proc/PID/stat, None without it."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except (OSError, IndexError):
        return None
    return fields[0], fields[19]


def watch_parent(pid: int, what: str) -> None:
    """SIGTERM this process (a graceful stop) once `pid` has ended: a node executor ends with its
    SuperNode, a task with its executor. (Flower's own monitor counts a zombie as alive, and a
    process whose starter has not reaped it yet is one.) Both callers handle SIGTERM (Flower's
    handlers in the executor, SIG_DFL in a task); SIGTERM, unlike SIGINT, is never inherited
    ignored (a background start by a non-interactive shell ignores SIGINT), so the stop does not
    depend on how the process was started."""
    stat = _stat(pid)
    started = stat[1] if stat else None

    def watch() -> None:
        while process_alive(pid, started):
            time.sleep(0.2)
        log.info("%s (pid %d) ended: stopping pid %d", what, pid, os.getpid())
        os.kill(os.getpid(), signal.SIGTERM)

    threading.Thread(target=watch, name="supernode-watch", daemon=True).start()


class ForkExecutor:
    """Flower's Executor protocol (flwr.supercore.superexec.executor.types.Executor) by fork:
    `launch` forks this process and the child runs `target` (Flower's run_clientapp) for the
    task, then exits. At most `max_tasks` children at once; more tasks wait in the SuperNode.
    Children tell the parent, through a pipe, which model they had to load from its source: the
    parent keeps that one warm for the next task (`keep_warm(name, seed)`)."""

    def __init__(self, threads: int, max_tasks: int = 2, target: Callable | None = None) -> None:
        self.threads = threads
        self.max_tasks = max_tasks
        self.target = target
        """What a child runs for a task (Flower's run_clientapp; a test's stand-in)."""
        self.owner = os.getpid()
        self.children: dict[int, int] = {}  # pid -> task id
        self._wanted, self._tell = os.pipe()
        os.set_blocking(self._wanted, False)
        self._pending = b""

    # -- Flower's Executor protocol -----------------------------------------------------------
    def get_eligible_capacity(self, supported_task_types, *, insecure: bool = False,
                              root_certificates_path: str | None = None):
        """ClientApp tasks while fewer than max_tasks children run, else none."""
        from flwr.supercore.constant import TaskType

        if len(self.children) >= self.max_tasks:
            return set(), set()
        return set(supported_task_types) & {TaskType.CLIENT_APP}, set()

    def wait_for_capacity(self, task_type=None, *, fab_hash=None, insecure: bool = False,
                          root_certificates_path: str | None = None) -> None:
        while len(self.children) >= self.max_tasks:
            self.reconcile()
            time.sleep(0.05)

    def launch(self, spec):
        from flwr.supercore.constant import TaskType
        from flwr.supercore.superexec.executor import LaunchResult

        if spec.task_type != TaskType.CLIENT_APP:
            return LaunchResult.failed(f"a fedlora node executor runs ClientApps, not {spec.task_type}")
        if len(self.children) >= self.max_tasks:
            return LaunchResult.capacity_rejected(f"{len(self.children)} ClientApps running")
        sys.stdout.flush()
        sys.stderr.flush()
        try:
            pid = os.fork()
        except OSError as err:
            return LaunchResult.failed(f"fork: {err}")
        if pid == 0:
            self._child(spec)  # never returns
        self.children[pid] = spec.task_id
        log.info("node executor: task %d in child %d", spec.task_id, pid)
        return LaunchResult.accepted()

    def reconcile(self) -> None:
        """Reap finished children (no zombies) and keep warm the model a child had to load."""
        for pid, task in list(self.children.items()):
            try:
                done, status = os.waitpid(pid, os.WNOHANG)
            except ChildProcessError:
                done, status = pid, 0
            if done == 0:
                continue
            del self.children[pid]
            if os.WIFSIGNALED(status):
                log.warning("node executor: task %d: child %d killed by signal %d (the SuperNode replies "
                            "'ClientApp stopped responding' once its heartbeats stop)", task, pid,
                            os.WTERMSIG(status))
            elif os.waitstatus_to_exitcode(status) != 0:
                log.warning("node executor: task %d: child %d exited with code %d", task, pid,
                            os.waitstatus_to_exitcode(status))
        self._keep_wanted_warm()

    def close(self) -> None:
        """Stop the children (SIGTERM, then SIGKILL after STOP_GRACE seconds) and reap them."""
        if os.getpid() != self.owner:  # a child inherited this object: not its to close
            return
        for sig, grace in ((signal.SIGTERM, STOP_GRACE), (signal.SIGKILL, 5.0)):
            for pid in self.children:
                try:
                    os.kill(pid, sig)
                except ProcessLookupError:
                    pass
            deadline = time.monotonic() + grace
            while self.children and time.monotonic() < deadline:
                self.reconcile()
                time.sleep(0.05)
            if not self.children:
                return

    # -- the child ------------------------------------------------------------------------------
    def _child(self, spec) -> None:
        """Run the task with Flower's ClientApp runtime, then leave without the parent's exit
        handlers (os._exit): they belong to the parent (its Runtime API client, this executor)."""
        code = 1
        try:
            from flwr.supercore.exit.exit_handler import registered_exit_handlers
            from flwr.supercore.tls import validate_and_resolve_root_certificates

            from fedlora import models

            registered_exit_handlers.clear()
            for sig in (signal.SIGINT, signal.SIGTERM):
                signal.signal(sig, signal.SIG_DFL)
            os.close(self._wanted)
            models.cold_load_hook = self._tell_parent
            _set_threads(self.threads)
            watch_parent(self.owner, "the node executor")
            target = self.target or _run_clientapp()
            target(
                runtime_api_address=spec.runtime_api_address, token=spec.token, insecure=spec.insecure,
                certificates=validate_and_resolve_root_certificates(spec.root_certificates_path, spec.insecure),
                parent_pid=None, runtime_dependency_install=False,
            )
            code = 0
        except SystemExit as exc:  # run_clientapp ends with flwr_exit
            code = exc.code if isinstance(exc.code, int) else int(exc.code is not None)
        except BaseException:  # noqa: BLE001 (a child must never return into the parent's loop)
            log.exception("node executor: task %d failed outside the ClientApp", spec.task_id)
        finally:
            for stream in (sys.stdout, sys.stderr):
                try:
                    stream.flush()
                except (OSError, ValueError):
                    pass
            os._exit(code)

    def _tell_parent(self, name: str, seed: int, vocab_size: int | None) -> None:
        from fedlora.models import model_key

        log.info("base model %s: loading it from its source (not warm yet in this node executor)", name)
        line = json.dumps({"name": name, "seed": seed, "key": model_key(name, seed, vocab_size)}).encode() + b"\n"
        if len(line) < 4096:  # one atomic pipe write
            try:
                os.write(self._tell, line)
            except OSError:
                pass

    def _keep_wanted_warm(self) -> None:
        from fedlora.models import keep_warm, warm_keys

        try:
            self._pending += os.read(self._wanted, 65536)
        except BlockingIOError:
            pass
        if b"\n" not in self._pending:
            return
        *lines, self._pending = self._pending.split(b"\n")
        try:
            wanted = json.loads(lines[-1])  # the latest: one model is kept
            name, seed, key = str(wanted["name"]), int(wanted["seed"]), tuple(wanted["key"])
        except (ValueError, KeyError, TypeError):
            return
        if key in warm_keys():  # (a child that loaded it a second time: it took the warm one first)
            return
        try:
            key = keep_warm(name, seed)
        except Exception as err:  # noqa: BLE001 (the node goes on cold: each task loads its model)
            log.warning("node executor: cannot keep %s warm: %s", name, err)
            return
        log.info("node executor: keeping base model %s warm (key %s) for the next tasks", name, key)


def _run_clientapp() -> Callable:
    from flwr.supernode.runtime.run_clientapp import run_clientapp

    return run_clientapp


def _set_threads(threads: int) -> None:
    import torch

    torch.set_num_threads(threads)


def one_thread() -> int:
    """Leave this process one torch thread, so that it stays safe to fork (it never enters an
    OpenMP parallel region). Returns the thread count a fresh process gets (OMP_NUM_THREADS, else
    the cores): what each child sets back."""
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")  # no Rust thread pool across forks
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    return threads


def prepare(model: str | None, seed: int) -> int:
    """Import what a ClientApp needs, with one torch thread (fork-safe), and load `model`
    warm. Returns the thread count a fresh process would have used (each child sets it)."""
    threads = one_thread()
    from fedlora.errors import ConfigError, one_line
    from fedlora.models import keep_warm

    if model:  # first: a name that is no model stops here, before the other imports
        try:
            keep_warm(model, seed)
        except ConfigError as err:
            raise ConfigError(f"config error: --model: {one_line(err).removeprefix('config error: ')}") from None
    # the ClientApp's imports (also those its handlers make lazily), and Flower's for a task
    import flwr.cli.install  # noqa: F401
    import flwr.clientapp.utils  # noqa: F401
    import flwr.supernode.runtime.run_clientapp  # noqa: F401
    import transformers  # noqa: F401

    import fedlora.algorithms  # noqa: F401
    import fedlora.data.custom  # noqa: F401
    import fedlora.data.task  # noqa: F401
    import fedlora.flower.capability  # noqa: F401  (a query that measures the node)
    import fedlora.flower.client_app  # noqa: F401
    import fedlora.flower.node  # noqa: F401
    import fedlora.runtime.inprocess  # noqa: F401
    import fedlora.runtime.rebuild  # noqa: F401

    return threads


def serve(runtime_api_address: str, insecure: bool, root_certificates: str | None = None,
          parent_pid: int | None = None, model: str | None = None, seed: int = 0, max_tasks: int = 2,
          poll_seconds: float = POLL_SECONDS) -> None:
    """Run a node executor until SIGTERM/SIGINT or until `parent_pid` (its SuperNode) ends."""
    threads = prepare(model, seed)

    from flwr.proto.runtime_pb2 import AcquireTaskRequest  # pylint: disable=E0611
    from flwr.supercore.exit import register_signal_handlers
    from flwr.supercore.interceptors import RuntimeVersionHttpInterceptor
    from flwr.supercore.retry import make_simple_http_retry_invoker
    from flwr.supercore.runtime import RuntimeHttpClient
    from flwr.supercore.superexec.executor import LaunchResultStatus
    from flwr.supercore.superexec.plugin import AutoExecPlugin
    from flwr.supercore.telemetry import EventType
    from flwr.supercore.tls import validate_and_resolve_root_certificates

    from fedlora.models import warm_keys

    executor = ForkExecutor(threads, max_tasks)
    client = RuntimeHttpClient.from_server_address(
        server_address=runtime_api_address, insecure=insecure,
        root_certificates=validate_and_resolve_root_certificates(root_certificates, insecure),
        interceptors=[RuntimeVersionHttpInterceptor(component_name="SuperExec")],
        retry_invoker=make_simple_http_retry_invoker(),
    )
    register_signal_handlers(event_type=EventType.RUN_SUPEREXEC_LEAVE, exit_message="fedlora node executor stopped.",
                             exit_handlers=[client.close, executor.close])
    if parent_pid is not None:
        watch_parent(parent_pid, "the SuperNode")
    plugin = AutoExecPlugin(runtime_api_address=runtime_api_address, insecure=insecure,
                            root_certificates_path=root_certificates, runtime_dependency_install=False,
                            executor=executor)
    log.info("node executor ready (pid %d, Runtime API %s, %d torch threads per task, warm: %s)",
             os.getpid(), runtime_api_address, threads, warm_keys() or "none yet")
    while True:
        executor.reconcile()
        types, _ = executor.get_eligible_capacity(set(plugin.supported_task_types))
        if types:
            try:
                reply = client.AcquireTask(AcquireTaskRequest(supported_task_types=sorted(types)))
            except Exception as err:  # noqa: BLE001 (connection errors are retried inside; a refusal is not)
                log.warning("node executor: AcquireTask failed (%s); asking again", err)
                time.sleep(1.0)
                continue
            if reply.HasField("task") and reply.token:
                result = plugin.launch_task(token=reply.token, task=reply.task)
                if result.status != LaunchResultStatus.ACCEPTED:
                    log.warning("node executor: task %d not launched (%s: %s); the SuperNode's task expiry "
                                "applies", reply.task.task_id, result.status, result.message)
                continue  # another task may be waiting
        time.sleep(poll_seconds)
