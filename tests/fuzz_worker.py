"""A fork server for tests/test_fuzz.py: imports fedlora (and torch) once, then runs each case
as `fedlora ARGV` in a forked child under an address-space, a CPU-time and a wall-clock limit, so a case
costs its own work only and a runaway allocation kills the child, not the suite.

Protocol: one JSON request per stdin line, {"argv": [...], "cwd": DIR, "memory": BYTES,
"seconds": N}; one JSON reply per stdout line, {"rc": CODE, "stdout": TEXT, "stderr": TEXT}.
An exception that escapes `main` is printed as a traceback and gives rc 99; a child killed
by a signal (the limits) gives rc -SIGNAL.
"""

from __future__ import annotations

import json
import os
import resource
import signal
import sys
import traceback


def run_case(argv: list[str], cwd: str, memory: int, seconds: int) -> None:
    """In the forked child: never returns."""
    rc = 99
    try:
        os.chdir(cwd)
        out = os.open("stdout.txt", os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
        err = os.open("stderr.txt", os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
        os.dup2(out, 1)
        os.dup2(err, 2)
        sys.stdout = os.fdopen(1, "w", buffering=1)
        sys.stderr = os.fdopen(2, "w", buffering=1)
        with open("/proc/self/status") as fh:  # the limit is on top of what the warm import mapped
            mapped = next(int(line.split()[1]) * 1024 for line in fh if line.startswith("VmSize:"))
        resource.setrlimit(resource.RLIMIT_AS, (mapped + memory, mapped + memory))
        resource.setrlimit(resource.RLIMIT_CPU, (seconds, seconds))
        signal.alarm(3 * seconds)  # a case blocked on I/O (a planted FIFO) uses no CPU: a wall clock too
        from fedlora.cli import main

        rc = main(argv)
    except SystemExit as exit_:
        rc = exit_.code if isinstance(exit_.code, int) else 2
    except BaseException:  # noqa: BLE001 (what the fuzzer hunts: any escape is a finding)
        traceback.print_exc()
        rc = 99
    finally:
        try:
            sys.stdout.flush()
            sys.stderr.flush()
        finally:
            os._exit(rc)


def serve() -> None:
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    import fedlora.cli  # noqa: F401  (warm: every child starts with these imported)
    import fedlora.export  # noqa: F401
    import fedlora.runtime.evaluation  # noqa: F401
    import fedlora.runtime.inprocess  # noqa: F401

    for line in sys.stdin:
        req = json.loads(line)
        pid = os.fork()
        if pid == 0:
            run_case(req["argv"], req["cwd"], req["memory"], req["seconds"])
        _, status = os.waitpid(pid, 0)
        rc = os.waitstatus_to_exitcode(status)
        texts = {}
        for name in ("stdout", "stderr"):
            try:
                with open(os.path.join(req["cwd"], f"{name}.txt"), errors="replace") as fh:
                    texts[name] = fh.read()[-20000:]
            except OSError:
                texts[name] = ""
        print(json.dumps({"rc": rc, **texts}), flush=True)


if __name__ == "__main__":
    serve()
