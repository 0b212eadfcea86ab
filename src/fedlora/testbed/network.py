"""An emulated network for the testbed: one hub namespace with a bridge, one namespace per node,
joined by a veth pair, each direction shaped to the node's link rate with `tc tbf`.

Everything is created *inside* namespaces named with the testbed's prefix (the veth ends are
created directly in their namespaces), so the host's own interfaces and routes are never
touched and removing the namespaces by name removes every link and rule with them. Traffic
stays on the bridge in the hub: the SuperLink listens on the hub's address, nodes reach it
through their veth, nothing is routed out.
"""

from __future__ import annotations

import ipaddress
import logging
import subprocess
from dataclasses import dataclass, field

log = logging.getLogger("fedlora")


class TestbedError(RuntimeError):
    """A step of building or removing the testbed failed (one line: the command and its error)."""

    __test__ = False  # not a pytest test class, despite its name


def ip(*args: str, check: bool = True) -> subprocess.CompletedProcess:
    """`ip ARGS`, raising a one-line TestbedError naming the command when it fails."""
    return _run(["ip", *args], check)


def in_netns(ns: str, *cmd: str, check: bool = True) -> subprocess.CompletedProcess:
    return _run(["ip", "netns", "exec", ns, *cmd], check)


def _run(cmd: list[str], check: bool) -> subprocess.CompletedProcess:
    try:
        done = subprocess.run(cmd, capture_output=True, text=True, timeout=30)
    except (OSError, subprocess.TimeoutExpired) as exc:
        raise TestbedError(f"{' '.join(cmd)}: {exc}") from None
    if check and done.returncode != 0:
        raise TestbedError(f"{' '.join(cmd)}: {done.stderr.strip() or f'exit {done.returncode}'}")
    return done


def namespaces() -> set[str]:
    """The network namespaces that exist now (names only)."""
    out = ip("netns", "list", check=False).stdout
    return {line.split()[0] for line in out.splitlines() if line.strip()}


def shape(ns: str, dev: str, mbps: float) -> None:
    """Egress of `dev` in `ns` limited to `mbps` by a token bucket (tbf): the node's uplink on
    its own end, its downlink on the hub's end. Burst: 10 ms at the rate, at least one MTU."""
    rate_bit = int(mbps * 1e6)
    burst = max(1600, rate_bit // 8 // 100)
    in_netns(ns, "tc", "qdisc", "add", "dev", dev, "root", "tbf", "rate", f"{rate_bit}bit",
             "burst", str(burst), "latency", "1s")


@dataclass
class NodeLink:
    index: int
    namespace: str
    address: str
    uplink_mbps: float
    downlink_mbps: float


@dataclass
class Network:
    """A hub namespace `{prefix}-hub` with bridge `br0` at `.1` of a /24, and node namespaces
    `{prefix}-n{i}` at `.{i+2}`. `remove()` deletes every namespace this object created."""

    prefix: str
    subnet: str = "10.213.0.0/24"
    nodes: list[NodeLink] = field(default_factory=list)
    created: list[str] = field(default_factory=list)

    @property
    def hub(self) -> str:
        return f"{self.prefix}-hub"

    @property
    def hub_address(self) -> str:
        return str(ipaddress.ip_network(self.subnet)[1])

    def _add_namespace(self, name: str) -> None:
        if name in namespaces():
            raise TestbedError(f"network namespace {name} exists already (another testbed, or a stale one: "
                               f"`ip netns del {name}`)")
        ip("netns", "add", name)
        self.created.append(name)
        in_netns(name, "ip", "link", "set", "lo", "up")

    def create_hub(self) -> None:
        self._add_namespace(self.hub)
        prefix_len = ipaddress.ip_network(self.subnet).prefixlen
        in_netns(self.hub, "ip", "link", "add", "br0", "type", "bridge")
        in_netns(self.hub, "ip", "addr", "add", f"{self.hub_address}/{prefix_len}", "dev", "br0")
        in_netns(self.hub, "ip", "link", "set", "br0", "up")

    def add_node(self, uplink_mbps: float, downlink_mbps: float) -> NodeLink:
        i = len(self.nodes)
        net = ipaddress.ip_network(self.subnet)
        if i + 2 >= net.num_addresses - 1:
            raise TestbedError(f"{self.subnet} has no address left for node {i}")
        ns, hub_end = f"{self.prefix}-n{i}", f"v{i}"
        self._add_namespace(ns)
        # both ends are born in their namespaces: nothing appears in the host's namespace
        ip("link", "add", "name", "eth0", "netns", ns, "type", "veth", "peer", "name", hub_end, "netns", self.hub)
        address = str(net[i + 2])
        in_netns(ns, "ip", "addr", "add", f"{address}/{net.prefixlen}", "dev", "eth0")
        in_netns(ns, "ip", "link", "set", "eth0", "up")
        in_netns(self.hub, "ip", "link", "set", hub_end, "master", "br0")
        in_netns(self.hub, "ip", "link", "set", hub_end, "up")
        shape(ns, "eth0", uplink_mbps)
        shape(self.hub, hub_end, downlink_mbps)
        node = NodeLink(i, ns, address, uplink_mbps, downlink_mbps)
        self.nodes.append(node)
        return node

    def remove(self) -> list[str]:
        """Delete the namespaces this object created (their links and tc rules go with them);
        returns what could not be deleted (logged), so a caller can report it."""
        left = []
        for name in reversed(self.created):
            if ip("netns", "del", name, check=False).returncode != 0 and name in namespaces():
                log.warning("testbed: could not delete network namespace %s", name)
                left.append(name)
        self.created = left
        return left
