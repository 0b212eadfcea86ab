"""CPU quotas for the testbed's nodes: one cgroup per node, its processes limited to a share of
one core (cgroup v1 `cpu.cfs_quota_us`, or v2 `cpu.max`). Created under a parent named with the
testbed's prefix and removed by that name."""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path

from fedlora.testbed.network import TestbedError

PERIOD_US = 100_000
V1_CPU = Path("/sys/fs/cgroup/cpu")
V2_ROOT = Path("/sys/fs/cgroup")


def cpu_hierarchy() -> tuple[Path, int]:
    """(root folder, version) of the cgroup hierarchy that has the cpu controller."""
    if (V1_CPU / "cpu.cfs_quota_us").exists():
        return V1_CPU, 1
    controllers = V2_ROOT / "cgroup.controllers"
    if controllers.exists() and "cpu" in controllers.read_text().split():
        return V2_ROOT, 2
    raise TestbedError("no cgroup hierarchy with the cpu controller (/sys/fs/cgroup/cpu or cgroup v2 'cpu')")


@dataclass
class CpuQuotas:
    """`{root}/{prefix}/n{i}` limited to `cores` CPUs each. `join_command(i)` gives the preexec
    hook that moves a starting process into node i's group before it execs."""

    prefix: str
    groups: dict[int, Path] = field(default_factory=dict)

    def __post_init__(self) -> None:
        self.root, self.version = cpu_hierarchy()
        self.parent = self.root / self.prefix

    def add(self, node: int | str, cores: float | None) -> Path:
        """Group `n{node}` (or `hub`: the SuperLink, cores None: no quota) under the parent."""
        if cores is not None and cores <= 0:
            raise TestbedError(f"node {node}: cpu share must be > 0, got {cores}")
        try:
            if not self.parent.exists():
                self.parent.mkdir()
                if self.version == 2:  # children may use the cpu controller
                    (self.parent / "cgroup.subtree_control").write_text("+cpu")
            group = self.parent / (node if isinstance(node, str) else f"n{node}")
            group.mkdir()
            if cores is not None:
                quota = int(cores * PERIOD_US)
                if self.version == 1:
                    (group / "cpu.cfs_period_us").write_text(str(PERIOD_US))
                    (group / "cpu.cfs_quota_us").write_text(str(quota))
                else:
                    (group / "cpu.max").write_text(f"{quota} {PERIOD_US}")
        except OSError as exc:
            raise TestbedError(f"cgroup {self.parent}: {exc}") from None
        self.groups[node] = group
        return group

    def quota_cores(self, node: int) -> float:
        group = self.groups[node]
        if self.version == 1:
            return int((group / "cpu.cfs_quota_us").read_text()) / int((group / "cpu.cfs_period_us").read_text())
        quota, period = (group / "cpu.max").read_text().split()
        return int(quota) / int(period)

    def joiner(self, node: int | str):
        """A preexec_fn: the child writes its own pid into node's cgroup before exec, so it and
        everything it spawns (the SuperNode's ClientApp) run under the quota from the start."""
        procs = str(self.groups[node] / "cgroup.procs")

        def join() -> None:
            with open(procs, "w") as f:
                f.write(str(os.getpid()))
        return join

    def pids(self, node: int) -> list[int]:
        text = (self.groups[node] / "cgroup.procs").read_text()
        return [int(p) for p in text.split()]

    def remove(self) -> list[str]:
        """rmdir every group and the parent (their processes must have been stopped); returns
        what could not be removed."""
        left = []
        for group in [*self.groups.values(), self.parent]:
            try:
                if group.exists():
                    group.rmdir()
            except OSError as exc:
                left.append(f"{group}: {exc.strerror}")
        self.groups = {}
        return left
