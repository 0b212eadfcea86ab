"""Start Flower processes and submit runs: a local SuperLink + N SuperNodes on 127.0.0.1, the
Flower app folder, `flwr run` against any SuperLink, and TLS certificates for a deployment.

Every process started here is stopped by its pid (its own process group, so a ClientApp a
SuperNode spawned goes with it); nothing is stopped by name.
"""

from __future__ import annotations

import datetime
import ipaddress
import os
import signal
import socket
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import tomli_w

FLOWER_ENV = {
    "FLWR_TELEMETRY_ENABLED": "0",
    "FLWR_DISABLE_UPDATE_CHECK": "1",
    "RAY_USAGE_STATS_ENABLED": "0",
    "HF_HUB_OFFLINE": "1",
    "TOKENIZERS_PARALLELISM": "false",
}
CONNECTION = "fedlora"

# The Flower app is only this file: both components live in the installed fedlora package,
# so the FAB carries no code and SuperNodes run whatever fedlora version is installed there.
APP_PYPROJECT = """\
[build-system]
requires = ["setuptools>=68"]
build-backend = "setuptools.build_meta"

[project]
name = "fedlora-flower"
version = "1.0.0"
description = "fedlora on Flower: the ServerApp and ClientApp live in the fedlora package"
license = "Apache-2.0"
dependencies = ["fedlora", "flwr==1.41.0"]

[tool.flwr.app]
publisher = "fedlora"

[tool.flwr.app.components]
serverapp = "fedlora.flower.server_app:app"
clientapp = "fedlora.flower.client_app:app"

[tool.flwr.app.config]
config-yaml = ""
out = "runs/flower"
resume = false
min-clients = 1
round-timeout = 600.0
node-wait = 300.0
"""


def bin_path(name: str) -> str:
    """A Flower executable of this interpreter's environment."""
    return str(Path(sys.executable).parent / name)


def flower_env(flwr_home: Path | None = None) -> dict[str, str]:
    env = {**os.environ, **FLOWER_ENV}
    env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}"
    src = str(Path(__file__).resolve().parents[2])  # fedlora importable in every Flower process
    env["PYTHONPATH"] = os.pathsep.join(p for p in (src, env.get("PYTHONPATH")) if p)
    if flwr_home is not None:
        env["FLWR_HOME"] = str(flwr_home)
    return env


def write_app(folder: Path) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "pyproject.toml").write_text(APP_PYPROJECT)
    return folder


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _stop(proc: subprocess.Popen, grace: float = 10.0, terminated: bool = False) -> None:
    """SIGTERM the process group we created for `proc` (unless `terminated`: done already),
    SIGKILL it after `grace` seconds."""
    if proc.poll() is not None:
        return
    for sig, wait in ((signal.SIGTERM, grace), (signal.SIGKILL, 5.0)):
        try:
            if not (terminated and sig == signal.SIGTERM):  # a second SIGTERM cuts Flower's graceful exit short
                os.killpg(proc.pid, sig)
        except ProcessLookupError:
            return
        try:
            proc.wait(wait)
            return
        except subprocess.TimeoutExpired:
            continue


@dataclass
class LocalFederation:
    """A SuperLink and `nodes` SuperNodes on 127.0.0.1.

    Node i serves partition i of `partitions` (default `nodes`) and keeps its client state in
    workdir/clients; it is a SuperNode and, unless `warm` is False, its node executor. Logs go
    to workdir/logs/*.log. Plain HTTP unless `certs` (from
    `make_certificates`) is given; with `node_keys` (from `make_node_keys`) too, the SuperLink
    admits only SuperNodes whose public key was registered (done here before they start).
    """

    workdir: Path
    nodes: int
    partitions: int | None = None
    data_dir: str | None = None
    data_files: list[str] | None = None
    """Node i's own data file (node config data-file): a run with nodes.local_data."""
    port: int = 0
    host: str = "127.0.0.1"
    """Where the SuperLink listens (the testbed puts it on its hub's address)."""
    certs: dict[str, Path] | None = None
    node_keys: list[tuple[Path, Path]] | None = None
    warm: bool = True
    """Each SuperNode runs its ClientApps through a warm node executor (`executor-i`, started
    with it: fedlora.flower.executor); False: Flower's subprocess isolation, a new process per
    message (for comparison, or as a fallback)."""
    procs: dict[str, subprocess.Popen] = field(default_factory=dict)

    def __post_init__(self) -> None:
        self.workdir = Path(self.workdir).resolve()
        self.port = self.port or free_port()
        self.partitions = self.partitions or self.nodes
        (self.workdir / "logs").mkdir(parents=True, exist_ok=True)

    @property
    def address(self) -> str:
        return f"{self.host}:{self.port}"

    def _env(self, name: str) -> dict[str, str]:
        """Flower's environment; a node's processes also get their share of this machine's cores
        (OMP_NUM_THREADS, unless set): ten nodes of two torch threads each on 2 cores spin in
        OpenMP instead of training (measured: a quickstart round 8x slower than in-process)."""
        env = flower_env(self.workdir / "flwr-home")
        if name != "superlink" and "OMP_NUM_THREADS" not in os.environ:
            env["OMP_NUM_THREADS"] = str(max(1, (os.cpu_count() or 1) // self.nodes))
        return env

    def _spawn(self, name: str, cmd: list[str]) -> subprocess.Popen:
        with open(self.workdir / "logs" / f"{name}.log", "ab") as log:
            proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=self._env(name),
                                    start_new_session=True, cwd=self.workdir)
        self.procs[name] = proc
        return proc

    def _security(self) -> list[str]:
        if not self.certs:
            return ["--insecure"]
        return ["--ssl-certfile", str(self.certs["cert"]), "--ssl-keyfile", str(self.certs["key"]),
                "--ssl-ca-certfile", str(self.certs["ca"])]

    def start(self) -> LocalFederation:
        auth = ["--enable-supernode-auth"] if self.node_keys else []
        self._spawn("superlink", [
            bin_path("flower-superlink"), *self._security(), *auth, "--host", self.host,
            "--port", str(self.port), "--disable-runtime-dependency-installation",
        ])
        self._wait_until_listening()
        if self.node_keys:
            self.register_nodes()
        for i in range(self.nodes):
            self.start_node(i)
        return self

    def flwr_prefix(self) -> list[str]:
        """What `flwr run` is started under to reach the SuperLink (nothing on the host itself)."""
        return []

    def _wait_until_listening(self) -> None:
        _wait_for_port(self.port, self.procs["superlink"], self.workdir / "logs" / "superlink.log")

    def start_node(self, i: int) -> subprocess.Popen:
        node_config = (f'partition-id={i} num-partitions={self.partitions} '
                       f'state-dir="{self.workdir / "clients"}"')
        if self.data_dir:
            node_config += f' data-dir="{self.data_dir}"'
        if self.data_files:
            node_config += f' data-file="{self.data_files[i]}"'
        node_config += self.declared_devices(i)
        security = ["--root-certificates", str(self.certs["ca"])] if self.certs else ["--insecure"]
        if self.node_keys:
            security += ["--auth-supernode-private-key", str(self.node_keys[i][0])]
        runtime_port = free_port()
        isolation = ["--isolation", "process"] if self.warm else []
        node = self._spawn(f"supernode-{i}", [
            bin_path("flower-supernode"), *security, "--superlink", self.address,
            "--host", "127.0.0.1", "--port", str(runtime_port), "--node-config", node_config, *isolation,
        ])
        if self.warm:  # in the node's namespace and cgroup too (the testbed's _spawn by the name's index)
            self._spawn(f"executor-{i}", [
                sys.executable, "-m", "fedlora.cli", "flower", "node-executor", "--runtime-api-address",
                f"127.0.0.1:{runtime_port}", "--insecure", "--parent-pid", str(node.pid),
            ])
        return node

    def declared_devices(self, i: int) -> str:
        """Device figures node i declares in its node config (fedlora.flower.capability); none here."""
        return ""

    def register_nodes(self) -> None:
        """`flwr supernode register` every node's public key (node authentication)."""
        home = self.workdir / "flwr-cli"
        write_connection(home, self.address, str(self.certs["ca"]) if self.certs else None)
        for _, public in self.node_keys or []:
            subprocess.run([bin_path("flwr"), "supernode", "register", str(public), CONNECTION],
                           env=flower_env(home), check=True, capture_output=True, timeout=120)

    def stop(self) -> None:
        """Every node's processes at once (SIGTERM to each group, then a wait for each: a node's
        graceful exit takes seconds), the SuperLink after them."""
        nodes = [n for n in self.procs if n != "superlink"]
        for name in nodes:
            if self.procs[name].poll() is None:
                try:
                    os.killpg(self.procs[name].pid, signal.SIGTERM)
                except ProcessLookupError:
                    pass
        for name in [*nodes, "superlink"]:
            if name in self.procs:
                _stop(self.procs.pop(name), terminated=name != "superlink")

    def __enter__(self) -> LocalFederation:  # noqa: PYI034 (dataclass, not subclassed)
        try:
            return self.start()
        except BaseException:
            self.stop()
            raise

    def __exit__(self, *exc) -> None:
        self.stop()


def _wait_for_port(port: int, proc: subprocess.Popen, log: Path, timeout: float = 60.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"the SuperLink exited (code {proc.returncode}); see {log}")
        with socket.socket() as s:
            if s.connect_ex(("127.0.0.1", port)) == 0:
                return
        time.sleep(0.3)
    raise RuntimeError(f"the SuperLink did not listen on 127.0.0.1:{port} within {timeout:g}s; see {log}")


def write_connection(flwr_home: Path, address: str, root_certificates: str | None) -> None:
    """$FLWR_HOME/config.toml with one SuperLink connection named `fedlora`."""
    conn: dict[str, object] = {"address": address}
    if root_certificates:
        conn["root-certificates"] = str(Path(root_certificates).resolve())
    else:
        conn["insecure"] = True
    flwr_home.mkdir(parents=True, exist_ok=True)
    (flwr_home / "config.toml").write_text(tomli_w.dumps({"superlink": {"default": CONNECTION, CONNECTION: conn}}))


def flwr_run(
    workdir: Path, address: str, run_config: dict[str, object], root_certificates: str | None = None,
    quiet: bool = False, timeout: float | None = None, prefix: list[str] | None = None,
) -> subprocess.CompletedProcess:
    """`flwr run --stream` the fedlora app against the SuperLink at `address`: blocks until the
    run ends (without --stream, flwr returns as soon as the run is submitted). quiet: the
    streamed log goes to workdir/flwr_run.log instead of the terminal. prefix: run flwr under
    it (the testbed's `ip netns exec HUB`, where its SuperLink is reachable)."""
    workdir = Path(workdir).resolve()
    app = write_app(workdir / "app")
    flwr_home = workdir / "flwr-cli"
    write_connection(flwr_home, address, root_certificates)
    rc_file = workdir / "run_config.toml"
    rc_file.write_text(tomli_w.dumps(run_config))
    cmd = [*(prefix or []), bin_path("flwr"), "run", str(app), CONNECTION, "--run-config", str(rc_file), "--stream"]
    if not quiet:
        return subprocess.run(cmd, env=flower_env(flwr_home), timeout=timeout, cwd=workdir, check=False)
    with open(workdir / "flwr_run.log", "ab") as log:
        return subprocess.run(cmd, env=flower_env(flwr_home), timeout=timeout, cwd=workdir,
                              stdout=log, stderr=subprocess.STDOUT, check=False)


def make_certificates(folder: Path, hosts: list[str], days: int = 365) -> dict[str, Path]:
    """A self-signed CA and a SuperLink certificate for `hosts` (DNS names or IPs), PEM files:
    ca.crt (give it to every SuperNode and to `flwr run`), server.pem + server.key (SuperLink)."""
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    folder.mkdir(parents=True, exist_ok=True)
    now = datetime.datetime.now(datetime.UTC)

    def name(cn: str) -> x509.Name:
        return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, cn)])

    def key_pem(key) -> bytes:
        return key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                 serialization.NoEncryption())

    ca_key = ec.generate_private_key(ec.SECP384R1())
    ca = (x509.CertificateBuilder().subject_name(name("fedlora CA")).issuer_name(name("fedlora CA"))
          .public_key(ca_key.public_key()).serial_number(x509.random_serial_number())
          .not_valid_before(now - datetime.timedelta(minutes=5)).not_valid_after(now + datetime.timedelta(days=days))
          .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
          .sign(ca_key, hashes.SHA256()))
    sans: list[x509.GeneralName] = []
    for h in hosts:
        try:
            sans.append(x509.IPAddress(ipaddress.ip_address(h)))
        except ValueError:
            sans.append(x509.DNSName(h))
    key = ec.generate_private_key(ec.SECP384R1())
    cert = (x509.CertificateBuilder().subject_name(name(hosts[0])).issuer_name(ca.subject)
            .public_key(key.public_key()).serial_number(x509.random_serial_number())
            .not_valid_before(now - datetime.timedelta(minutes=5)).not_valid_after(now + datetime.timedelta(days=days))
            .add_extension(x509.SubjectAlternativeName(sans), critical=False)
            .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
            .sign(ca_key, hashes.SHA256()))
    paths = {"ca": folder / "ca.crt", "cert": folder / "server.pem", "key": folder / "server.key"}
    paths["ca"].write_bytes(ca.public_bytes(serialization.Encoding.PEM))
    paths["cert"].write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    paths["key"].write_bytes(key_pem(key))
    os.chmod(paths["key"], 0o600)
    return paths


def make_node_keys(folder: Path, count: int) -> list[tuple[Path, Path]]:
    """`count` SuperNode key pairs (EC P-384, OpenSSH format, as `ssh-keygen -t ecdsa -b 384`):
    node_i (private, passed to flower-supernode --auth-supernode-private-key) and node_i.pub
    (registered on the SuperLink with `flwr supernode register`)."""
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric import ec

    out = []
    for i in range(count):
        key = ec.generate_private_key(ec.SECP384R1())
        private, public = folder / f"node_{i}", folder / f"node_{i}.pub"
        private.write_bytes(key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.OpenSSH,
                                              serialization.NoEncryption()))
        os.chmod(private, 0o600)
        public.write_bytes(key.public_key().public_bytes(serialization.Encoding.OpenSSH,
                                                         serialization.PublicFormat.OpenSSH))
        out.append((private, public))
    return out
