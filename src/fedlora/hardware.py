"""What this CPU is, and which compute dtype pays off on it.

bfloat16 autocast halves a training step on CPUs with native bfloat16 (Intel AMX, AVX512-BF16)
but is emulated, several times slower than float32, on others (AVX2-only CPUs such as AMD EPYC
Zen 2/3): docs/benchmarks.md has both measured. So `compute_dtype: auto` asks the CPU.
"""

from __future__ import annotations

import re
from pathlib import Path

CPUINFO = Path("/proc/cpuinfo")


def _cpuinfo(path: Path) -> str:
    try:
        return path.read_text()
    except OSError:  # not Linux: no cpuinfo, nothing claimed
        return ""


def preferred_compute_dtype(cpuinfo: Path = CPUINFO) -> str:
    """bfloat16 if the CPU has native bfloat16 instructions, else float32 (also off Linux)."""
    return "bfloat16" if re.search(r"\b(amx_bf16|avx512_bf16)\b", _cpuinfo(cpuinfo)) else "float32"


def cpu_model(cpuinfo: Path = CPUINFO) -> str | None:
    """The CPU's model name (e.g. "AMD EPYC"), for run environments and benchmark records."""
    match = re.search(r"^model name\s*:\s*(.+)$", _cpuinfo(cpuinfo), re.MULTILINE)
    return match.group(1).strip() if match else None
