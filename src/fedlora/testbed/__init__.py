"""An emulated heterogeneous federation on one machine (`fedlora flower testbed`).

A SuperLink and N SuperNodes, each SuperNode in its own network namespace whose link to the
SuperLink's hub is shaped to its device's up/down rates, and in its own cgroup limited to its
share of the CPU. The processes are the real Flower ones; only the hardware is emulated, so a
run's wall-clock time can be set beside what the simulated clock predicts for the same devices.

Every namespace, link, rule, cgroup and process is created with the testbed's own prefix and
removed by that name or pid on exit: normal end, exception, Ctrl-C or SIGTERM. A manifest
(testbed.json in the work folder) lists them while they exist, so `cleanup(workdir)` can remove
what a SIGKILLed testbed left behind.
"""

from __future__ import annotations

import json
import os
import re
import secrets
import signal
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

from pydantic import Field, field_validator

from fedlora.devices import PRESETS, DeviceClass
from fedlora.flower.launch import LocalFederation
from fedlora.schema import Strict
from fedlora.testbed.cgroup import CpuQuotas
from fedlora.testbed.network import Network, TestbedError, in_netns, ip, namespaces

MANIFEST = "testbed.json"


class TestbedNode(Strict):
    __test__ = False  # (for pytest: not a test class)

    device: str = "reference"
    """Device class (a preset or one of the profile's `classes`): its link rates shape the node's
    link unless uplink_mbps/downlink_mbps are given."""
    cpu: float = Field(gt=0)
    """CPU share of the node's processes, in cores (a cgroup quota; 0.25 = a quarter of a core)."""
    uplink_mbps: float | None = Field(None, gt=0)
    downlink_mbps: float | None = Field(None, gt=0)
    data_file: str | None = None
    """This node's own data file (CSV/JSONL); without it the node serves its partition of the
    run config's dataset."""


class TestbedProfile(Strict):
    """A testbed profile file: the nodes, optional device classes, the hub's subnet."""

    __test__ = False

    nodes: list[TestbedNode] = Field(min_length=1, max_length=64)
    classes: dict[str, DeviceClass] = Field(default_factory=dict)
    subnet: str = "10.213.0.0/24"

    @field_validator("nodes")
    @classmethod
    def _cpu_fits(cls, nodes: list[TestbedNode]) -> list[TestbedNode]:
        cores = os.cpu_count() or 1
        for i, node in enumerate(nodes):
            if node.cpu > cores:
                raise ValueError(f"node {i}: cpu {node.cpu} is more than this machine's {cores} cores")
        return nodes

    def link(self, node: TestbedNode) -> tuple[float, float]:
        known = {**PRESETS, **self.classes}
        if node.device not in known:
            raise ValueError(f"unknown device class {node.device!r} (known: {sorted(known)})")
        c = known[node.device]
        return node.uplink_mbps or c.uplink_mbps, node.downlink_mbps or c.downlink_mbps


def load_profile(path: str | Path) -> TestbedProfile:
    """A testbed profile file, or a one-line ConfigError naming the file and the field."""
    from pydantic import ValidationError

    from fedlora.config import read_tree
    from fedlora.errors import ConfigError

    tree = read_tree(path)
    try:
        profile = TestbedProfile.model_validate(tree)
        for node in profile.nodes:
            profile.link(node)
    except ValidationError as err:
        first = err.errors()[0]
        where = ".".join(str(p) for p in first["loc"])
        raise ConfigError(f"testbed profile {path}: {where}: {first['msg'].removeprefix('Value error, ')}") from None
    except ValueError as err:
        raise ConfigError(f"testbed profile {path}: {err}") from None
    return profile


def available() -> str | None:
    """None if this process can build a testbed here, else the reason (for a clear skip/error)."""
    if os.geteuid() != 0:
        return "needs root (network namespaces and cgroups)"
    for tool in ("ip", "tc"):
        if subprocess.run(["which", tool], capture_output=True).returncode != 0:
            return f"`{tool}` (iproute2) is not installed"
    probe = f"fltprobe{secrets.token_hex(2)}"
    if ip("netns", "add", probe, check=False).returncode != 0:
        return "cannot create network namespaces here"
    ip("netns", "del", probe, check=False)
    try:
        CpuQuotas(probe)
    except TestbedError as exc:
        return str(exc)
    return None


@dataclass
class Testbed(LocalFederation):
    """LocalFederation whose SuperLink lives in the hub namespace and whose node i lives in its
    own namespace and cgroup. Use as a context manager; `address` is the SuperLink's hub address."""

    __test__ = False

    profile: TestbedProfile = field(default_factory=lambda: TestbedProfile(nodes=[TestbedNode(cpu=1)]))
    prefix: str = field(default_factory=lambda: f"flt{secrets.token_hex(3)}")
    network: Network | None = None
    quotas: CpuQuotas | None = None

    def __post_init__(self) -> None:
        self.nodes = len(self.profile.nodes)
        self.network = Network(self.prefix, self.profile.subnet)
        self.quotas = CpuQuotas(self.prefix)
        self.host = self.network.hub_address
        super().__post_init__()

    def declared_devices(self, i: int) -> str:
        """Node i declares the link rates its veth is shaped to (true by construction: `devices:
        measured` then needs no link measurement); its throughput and memory it measures."""
        up, down = self.profile.link(self.profile.nodes[i])
        return f" uplink-mbps={float(up)} downlink-mbps={float(down)}"

    def flwr_prefix(self) -> list[str]:
        """Commands that talk to the SuperLink (`flwr run`) run in the hub namespace."""
        return ["ip", "netns", "exec", self.network.hub]

    def _write_manifest(self) -> None:
        manifest = {"prefix": self.prefix, "namespaces": list(self.network.created),
                    "cgroup": str(self.quotas.parent), "pids": {n: p.pid for n, p in self.procs.items()}}
        tmp = self.workdir / (MANIFEST + ".tmp")
        tmp.write_text(json.dumps(manifest, indent=1))
        os.replace(tmp, self.workdir / MANIFEST)

    def _spawn(self, name: str, cmd: list[str]) -> subprocess.Popen:
        """The SuperLink in the hub namespace; SuperNode i in its namespace and cgroup."""
        if name == "superlink":  # in a cgroup too (no quota), so a cleanup after SIGKILL finds it
            ns, join = self.network.hub, self.quotas.joiner("hub")
        else:
            i = int(name.rsplit("-", 1)[1])
            ns, join = self.network.nodes[i].namespace, self.quotas.joiner(i)
        with open(self.workdir / "logs" / f"{name}.log", "ab") as log:
            proc = subprocess.Popen(["ip", "netns", "exec", ns, *cmd], stdout=log, stderr=subprocess.STDOUT,
                                    env=self._env(name), start_new_session=True,
                                    cwd=self.workdir, preexec_fn=join)
        self.procs[name] = proc
        self._write_manifest()
        return proc

    def _wait_until_listening(self, timeout: float = 60.0) -> None:
        """Probed from inside the hub: the host's namespace has no route to it, by design."""
        probe = (f"import socket,sys; s=socket.socket(); s.settimeout(1); "
                 f"sys.exit(s.connect_ex(({self.host!r}, {self.port})))")
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.procs["superlink"].poll() is not None:
                raise TestbedError(f"the SuperLink exited (code {self.procs['superlink'].returncode}); "
                                   f"see {self.workdir / 'logs/superlink.log'}")
            if in_netns(self.network.hub, sys.executable, "-c", probe, check=False).returncode == 0:
                return
            time.sleep(0.3)
        raise TestbedError(f"the SuperLink did not listen on {self.address} within {timeout:g}s")

    def start(self) -> Testbed:
        self._write_manifest()
        self.network.create_hub()
        self.quotas.add("hub", None)
        for i, node in enumerate(self.profile.nodes):
            up, down = self.profile.link(node)
            self.network.add_node(up, down)
            self.quotas.add(i, node.cpu)
            self._write_manifest()
        return super().start()

    def __enter__(self) -> Testbed:
        """SIGTERM leaves through `__exit__` too (its default would end the process with the
        namespaces still there); Ctrl-C does already, as KeyboardInterrupt."""
        import threading

        if threading.current_thread() is threading.main_thread():
            self._old_sigterm = signal.signal(signal.SIGTERM, _exit_on_sigterm)
        return super().__enter__()

    def __exit__(self, *exc) -> None:
        try:
            super().__exit__(*exc)
        finally:
            if getattr(self, "_old_sigterm", None) is not None:
                signal.signal(signal.SIGTERM, self._old_sigterm)

    def stop(self) -> None:
        """Processes by pid (their process groups), then cgroups, then namespaces; the manifest
        goes last, and stays (listing what is left) if anything could not be removed."""
        super().stop()
        _kill_members(self.quotas)  # what the processes spawned in sessions of their own (SuperExec)
        left = self.quotas.remove() + self.network.remove()
        if left:
            self._write_manifest()
            raise TestbedError(f"testbed {self.prefix}: could not remove {', '.join(left)}")
        (self.workdir / MANIFEST).unlink(missing_ok=True)


def _kill_members(quotas: CpuQuotas) -> None:
    """SIGKILL every process still in the testbed's cgroups (by the pids the cgroups list: only
    the testbed's own), then give the kernel a moment to empty the groups."""
    killed = False
    for node in list(quotas.groups):
        for pid in quotas.pids(node):
            try:
                os.kill(pid, signal.SIGKILL)
                killed = True
            except ProcessLookupError:
                pass
    if killed:
        time.sleep(0.5)


def _exit_on_sigterm(signum, frame) -> None:
    raise SystemExit(128 + signum)


def cleanup(workdir: Path) -> list[str]:
    """Remove what a testbed killed without its own cleanup left behind, from its manifest:
    its processes (by pid, only if still in its cgroup), cgroups and namespaces."""
    path = Path(workdir) / MANIFEST
    if not path.is_file():
        return []
    manifest = json.loads(path.read_text())
    prefix = manifest["prefix"]
    if not str(prefix).startswith("flt"):
        raise TestbedError(f"{path}: not a testbed manifest")
    quotas = CpuQuotas(prefix)
    groups = [g for g in quotas.parent.iterdir() if g.is_dir() and re.fullmatch(r"n\d+|hub", g.name)] \
        if quotas.parent.exists() else []  # (cgroup v1 also keeps files such as notify_on_release there)
    for group in groups:
        quotas.groups[group.name if group.name == "hub" else int(group.name[1:])] = group
    _kill_members(quotas)
    left = quotas.remove()
    network = Network(prefix)
    network.created = [ns for ns in manifest["namespaces"] if ns in namespaces() and ns.startswith(prefix)]
    left += network.remove()
    if not left:
        path.unlink()
    return left
