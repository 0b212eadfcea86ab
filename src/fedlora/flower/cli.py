"""`fedlora flower run | local | node-executor | certs`: run on Flower, start a local federation, run a
warm node's executor, make TLS files."""

from __future__ import annotations

import argparse
import signal
import time
from pathlib import Path

from fedlora.cli_common import print_summary, resolve_run, run_options
from fedlora.errors import ConfigError


def _cmd_run(args: argparse.Namespace) -> int:
    from fedlora.config import dump_config
    from fedlora.flower.launch import LocalFederation, flwr_run
    from fedlora.files import read_json

    run_dir, cfg = resolve_run(args, prefix="flower-")  # the ServerApp verifies a resumed run again
    if sum(map(bool, (args.local, args.superlink, args.testbed))) != 1:
        raise ConfigError("config error: give one of --superlink HOST:PORT, --local N, --testbed PROFILE")
    if args.superlink and bool(args.root_certificates) == bool(args.insecure):
        raise ConfigError("config error: --superlink: give --root-certificates CA (TLS) or --insecure")
    if args.min_clients < 1:
        raise ConfigError("config error: --min-clients: must be >= 1")
    profile = None
    if args.testbed:
        from fedlora.testbed import load_profile

        profile = load_profile(args.testbed)
    cfg.check_files()
    if cfg.privacy.mode != "none":  # the stage lives in the in-process runtime so far
        raise ConfigError(f"config error: privacy.mode: {cfg.privacy.mode} is not on the Flower runtime yet; use fedlora run")
    from fedlora.data.task import check_data, run_classes, server_pool

    # a bad data file stops here with one line, not inside the Flower apps
    server_pool(cfg, run_classes(cfg)) if cfg.nodes.local_data else check_data(cfg)
    files = node_files(args.node_data, args.local or 0, cfg.federation.num_clients)
    if profile is not None:
        files = profile_files(profile, Path(args.testbed))
    if files and not cfg.nodes.local_data:
        raise ConfigError("config error: --node-data: the config must set nodes.local_data: true "
                          "(fedlora partition writes such a config.yaml)")
    run_dir = run_dir.resolve()
    run_dir.mkdir(parents=True, exist_ok=True)
    run_config = {
        "config-yaml": dump_config(cfg), "out": str(run_dir), "resume": bool(args.resume),
        "min-clients": args.min_clients, "round-timeout": float(args.round_timeout),
        "node-wait": float(args.node_wait),
    }
    workdir = run_dir / "flower"
    started = time.time()
    if args.local or args.testbed:
        if profile is not None:
            from fedlora.testbed import Testbed

            fed = Testbed(workdir / "testbed", nodes=len(profile.nodes), partitions=cfg.federation.num_clients,
                          profile=profile, data_files=files)
        else:
            fed = LocalFederation(workdir / "local", nodes=args.local, partitions=cfg.federation.num_clients,
                                  data_files=files)
        fed.warm = args.isolation == "warm"
        with fed:
            print(f"SuperLink on {fed.address} with {fed.nodes} SuperNodes (logs: {fed.workdir / 'logs'})")
            proc = flwr_run(workdir, fed.address, run_config, quiet=args.quiet, prefix=fed.flwr_prefix())
    else:
        proc = flwr_run(workdir, args.superlink, run_config, args.root_certificates, quiet=args.quiet)
    summary = run_dir / "summary.json"
    if proc.returncode != 0 or not summary.exists() or summary.stat().st_mtime < started:
        print(f"the Flower run did not finish (flwr exit code {proc.returncode}); "
              f"see its log above; resume with: fedlora flower run --resume {run_dir} ...")
        return 1
    print_summary(run_dir, read_json(summary))
    return 0


def node_files(folder: str | None, nodes: int, partitions: int) -> list[str] | None:
    """Node i's own data file, client_<i>.jsonl of a `fedlora partition` folder (checked here:
    one line if one is missing)."""
    if not folder:
        return None
    from fedlora.data.node_files import node_file

    if nodes > partitions:
        raise ConfigError(f"config error: --node-data: {nodes} nodes for {partitions} partitions")
    files = [node_file(Path(folder), i).resolve() for i in range(nodes)]
    missing = next((f for f in files if not f.is_file()), None)
    if missing is not None:
        raise ConfigError(f"config error: --node-data: {missing}: file not found (written by fedlora partition)")
    return [str(f) for f in files]


def profile_files(profile, path: Path) -> list[str] | None:
    """The testbed nodes' own data files (`nodes[].data_file`, relative to the profile's folder):
    all or none, each an existing file (one line otherwise)."""
    given = [node.data_file for node in profile.nodes]
    if not any(given):
        return None
    if not all(given):
        raise ConfigError(f"config error: testbed profile {path}: give every node a data_file, or none")
    files = [(path.parent / Path(f).expanduser()).resolve() for f in given]  # (an absolute f stays itself)
    missing = next((f for f in files if not f.is_file()), None)
    if missing is not None:
        raise ConfigError(f"config error: testbed profile {path}: data_file {missing}: file not found")
    return [str(f) for f in files]


def _cmd_local(args: argparse.Namespace) -> int:
    from fedlora.flower.launch import LocalFederation

    fed = LocalFederation(Path(args.workdir), nodes=args.nodes, partitions=args.partitions,
                          data_dir=args.data_dir, port=args.port,
                          data_files=node_files(args.node_data, args.nodes, args.partitions or args.nodes),
                          warm=args.isolation == "warm")
    with fed:
        print(f"SuperLink on {fed.address}, {args.nodes} SuperNodes (partition-id 0..{args.nodes - 1} of "
              f"{fed.partitions}); logs in {fed.workdir / 'logs'}")
        print(f"submit a run:  fedlora flower run CONFIG --superlink {fed.address} --insecure")
        print("Ctrl-C (or SIGTERM to this process) stops them all.", flush=True)
        # blocked only now, after the children started (they inherit the mask); then waited for,
        # so a SIGTERM too leaves through `with` and stops every process by its pid
        stop = {signal.SIGINT, signal.SIGTERM}
        signal.pthread_sigmask(signal.SIG_BLOCK, stop)
        signal.sigwait(stop)
    return 0


def _cmd_testbed(args: argparse.Namespace) -> int:
    """`fedlora flower testbed PROFILE CONFIG`: `flower run --testbed PROFILE`, spelt as one command."""
    args.testbed, args.local, args.superlink = args.profile, None, None
    args.root_certificates, args.insecure, args.node_data = None, True, None  # nodes serve their partitions
    return _cmd_run(args)


def _cmd_testbed_cleanup(args: argparse.Namespace) -> int:
    from fedlora.testbed import cleanup

    left = cleanup(Path(args.workdir))
    if left:
        print(f"could not remove: {', '.join(left)}")
        return 1
    print(f"nothing of the testbed in {args.workdir} remains")
    return 0


def _cmd_node_executor(args: argparse.Namespace) -> int:
    """`fedlora flower node-executor`: a warm node's executor beside a `--isolation process`
    SuperNode (fedlora.flower.executor); arguments are checked before anything is imported."""
    import os

    runtime_address(args.runtime_api_address)
    if bool(args.insecure) == bool(args.root_certificates):
        raise ConfigError("config error: node-executor: give --insecure (a Runtime API on plain HTTP) or "
                          "--root-certificates CA (the SuperNode's --ssl-ca-certfile), one of them")
    if args.root_certificates and not Path(args.root_certificates).is_file():
        raise ConfigError(f"config error: --root-certificates: {args.root_certificates}: file not found")
    if args.max_tasks < 1:
        raise ConfigError("config error: --max-tasks: must be >= 1")
    if not 0 <= args.seed < 2**32:
        raise ConfigError("config error: --seed: must be in [0, 2^32 - 1]")
    if args.parent_pid is not None:
        from fedlora.flower.executor import process_alive

        if args.parent_pid <= 0 or args.parent_pid == os.getpid() or not process_alive(args.parent_pid):
            raise ConfigError(f"config error: --parent-pid: no running process {args.parent_pid}")
    from fedlora.flower.executor import serve

    serve(args.runtime_api_address, bool(args.insecure), args.root_certificates, args.parent_pid,
          args.model, args.seed, args.max_tasks)
    return 0


def runtime_address(value: str) -> tuple[str, int]:
    """HOST:PORT (an IPv6 host in brackets), or a one-line ConfigError."""
    host, sep, port = value.rpartition(":")
    if host.startswith("[") and host.endswith("]"):
        host = host[1:-1]
    if not sep or not host or not port.isdigit() or not 1 <= int(port) <= 65535:
        raise ConfigError(f"config error: --runtime-api-address: {value!r} is not HOST:PORT (port 1-65535)")
    return host, int(port)


def _cmd_certs(args: argparse.Namespace) -> int:
    from fedlora.flower.launch import make_certificates, make_node_keys

    paths = make_certificates(Path(args.out), args.host)
    for role, path in paths.items():
        print(f"{role:>5}: {path}")
    for i, (private, public) in enumerate(make_node_keys(Path(args.out), args.node_keys)):
        print(f"node {i}: {private} (stays on the SuperNode) {public} (register on the SuperLink)")
    return 0


def _profile_argument() -> argparse.ArgumentParser:
    """PROFILE before CONFIG: `fedlora flower testbed PROFILE CONFIG`."""
    parent = argparse.ArgumentParser(add_help=False)
    parent.add_argument("profile", help="testbed profile YAML (nodes: [{device, cpu, uplink_mbps, ...}])")
    return parent


def add_parser(sub) -> None:
    """The `flower` command group (called from fedlora.cli.build_parser)."""
    flower = sub.add_parser("flower", help="run on Flower: SuperLink + SuperNodes, across machines")
    fsub = flower.add_subparsers(dest="flower_command", required=True)

    run = fsub.add_parser("run", help="submit a run to a SuperLink (flwr run) and wait for it", parents=[
        run_options("YAML config (the same as for `fedlora run`)", "runs/flower-<method>-<time>, on the SuperLink host",
                    "continue an interrupted run from its checkpoint")])
    run.add_argument("--superlink", metavar="HOST:PORT", help="the SuperLink's address (default port 8000)")
    run.add_argument("--root-certificates", metavar="CA", help="CA certificate of a TLS SuperLink")
    run.add_argument("--insecure", action="store_true", help="plain HTTP (a local trial only)")
    run.add_argument("--node-data", metavar="DIR", help="with --local: node i serves DIR/client_<i>.jsonl only "
                     "(a `fedlora partition` folder; the config needs nodes.local_data)")
    run.add_argument("--local", type=int, metavar="N",
                     help="start a SuperLink and N SuperNodes on 127.0.0.1 for this run, stop them after")
    run.add_argument("--testbed", metavar="PROFILE",
                     help="start an emulated heterogeneous testbed for this run (root: namespaces, shaped links, "
                     "CPU quotas; see `fedlora flower testbed`), remove it after")
    run.add_argument("--min-clients", type=int, default=1,
                     help="a round needs this many accepted updates, else the run stops (resumable)")
    run.add_argument("--round-timeout", type=float, default=600.0, help="seconds to wait for clients' updates")
    run.add_argument("--node-wait", type=float, default=300.0,
                     help="seconds to wait for min-clients SuperNodes before a round")
    run.add_argument("--quiet", action="store_true", help="write the run's log to RUN_DIR/flower/flwr_run.log instead of the terminal")
    run.add_argument("--isolation", choices=("warm", "subprocess"), default="warm",
                     help="--local/--testbed nodes: warm executors (imports and model kept in memory) or "
                     "Flower's subprocess isolation (a new process per message)")
    run.set_defaults(func=_cmd_run)

    local = fsub.add_parser("local", help="start a SuperLink and N SuperNodes on 127.0.0.1 until Ctrl-C")
    local.add_argument("--nodes", type=int, default=3)
    local.add_argument("--partitions", type=int, help="num-partitions (default: --nodes)")
    local.add_argument("--port", type=int, default=0, help="SuperLink port (default: a free one)")
    local.add_argument("--workdir", default="runs/flower-local", help="logs and client state")
    local.add_argument("--data-dir", help="data directory the clients read (default: the config's)")
    local.add_argument("--node-data", metavar="DIR", help="node i serves DIR/client_<i>.jsonl only (fedlora partition)")
    local.add_argument("--isolation", choices=("warm", "subprocess"), default="warm",
                       help="as for `fedlora flower run`")
    local.set_defaults(func=_cmd_local)

    testbed = fsub.add_parser("testbed", help="run CONFIG on an emulated heterogeneous testbed described by "
                              "PROFILE: each SuperNode in its own network namespace, link rate and CPU quota",
                              parents=[_profile_argument(),
                                       run_options("YAML config (the same as for `fedlora run`)",
                                                   "runs/flower-<method>-<time>", "continue an interrupted run")])
    testbed.add_argument("--min-clients", type=int, default=1, help="as for `fedlora flower run`")
    testbed.add_argument("--round-timeout", type=float, default=600.0, help="as for `fedlora flower run`")
    testbed.add_argument("--node-wait", type=float, default=300.0, help="as for `fedlora flower run`")
    testbed.add_argument("--quiet", action="store_true", help="as for `fedlora flower run`")
    testbed.add_argument("--isolation", choices=("warm", "subprocess"), default="warm",
                         help="as for `fedlora flower run`")
    testbed.set_defaults(func=_cmd_testbed)

    cleanup = fsub.add_parser("testbed-cleanup", help="remove what a killed testbed left (from WORKDIR/testbed.json)")
    cleanup.add_argument("workdir", help="the testbed's work folder (RUN_DIR/flower/testbed)")
    cleanup.set_defaults(func=_cmd_testbed_cleanup)

    ex = fsub.add_parser("node-executor", help="a warm node: run a `--isolation process` SuperNode's ClientApps "
                         "in forks of one process that keeps torch, fedlora and the model loaded")
    ex.add_argument("--runtime-api-address", required=True, metavar="HOST:PORT",
                    help="the SuperNode's Runtime API (its --host and --port, e.g. 127.0.0.1:9094)")
    ex.add_argument("--insecure", action="store_true", help="the Runtime API is plain HTTP (on 127.0.0.1)")
    ex.add_argument("--root-certificates", metavar="CA",
                    help="CA certificate of a TLS Runtime API (the SuperNode's --ssl-ca-certfile)")
    ex.add_argument("--parent-pid", type=int, metavar="PID",
                    help="the SuperNode's pid: the executor stops when it ends")
    ex.add_argument("--model", metavar="NAME", help="load this base model now (default: keep warm the model the "
                    "first message loads)")
    ex.add_argument("--seed", type=int, default=0, help="with a tiny random --model: its run's seed")
    ex.add_argument("--max-tasks", type=int, default=2, help="ClientApp tasks run at once (more wait in the SuperNode)")
    ex.set_defaults(func=_cmd_node_executor)

    certs = fsub.add_parser("certs", help="a CA, a SuperLink TLS certificate and SuperNode auth keys")
    certs.add_argument("--out", required=True, help="folder for the files")
    certs.add_argument("--host", action="append", required=True,
                       help="DNS name or IP clients use to reach the SuperLink (repeatable)")
    certs.add_argument("--node-keys", type=int, default=0, help="also make N SuperNode key pairs")
    certs.set_defaults(func=_cmd_certs)
