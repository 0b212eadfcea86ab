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


def float32_flops_per_cycle(cpuinfo: Path = CPUINFO) -> tuple[int, str]:
    """float32 FLOPs per cycle per core from the widest FMA the CPU advertises, and why.

    Two FMA pipes per core is assumed (Zen 2/3/4, most Intel cores): AVX-512: 2 × 16 lanes × 2;
    AVX2 + FMA: 2 × 8 × 2 = 32; AVX without FMA: 16 (add + mul pipes); else SSE: 8.
    """
    line = re.search(r"^flags\s*:(.*)$", _cpuinfo(cpuinfo), re.MULTILINE)
    flags = set(line.group(1).split()) if line else set()
    if "avx512f" in flags:
        return 64, "AVX-512 with 2 FMA pipes: 2 x 16 float32 lanes x 2 FLOPs = 64 FLOPs/cycle/core"
    if {"avx2", "fma"} <= flags:
        return 32, "AVX2+FMA, 2 FMA pipes: 2 x 8 float32 lanes x 2 FLOPs = 32 FLOPs/cycle/core"
    if "avx" in flags:
        return 16, "AVX without FMA: 8-lane add + 8-lane mul = 16 FLOPs/cycle/core"
    return 8, "SSE (or unknown): 4-lane add + 4-lane mul = 8 FLOPs/cycle/core"


def float32_peak_gflops(cores: int, ghz: float | None = None, cpuinfo: Path = CPUINFO) -> tuple[float, str]:
    """Theoretical float32 peak of `cores` cores (GFLOP/s) = cores × GHz × FLOPs/cycle, and the
    assumption spelled out. GHz: `ghz`, else the first `cpu MHz` in cpuinfo (the clock now,
    not the boost clock), else 0 (unknown: the fraction of peak cannot be computed)."""
    per_cycle, why = float32_flops_per_cycle(cpuinfo)
    if ghz is None:
        mhz = re.search(r"^cpu MHz\s*:\s*([\d.]+)", _cpuinfo(cpuinfo), re.MULTILINE)
        ghz = float(mhz.group(1)) / 1000 if mhz else 0.0
    peak = cores * ghz * per_cycle
    return peak, f"{cores} cores x {ghz:.2f} GHz x {per_cycle} FLOPs/cycle = {peak:.0f} GFLOP/s ({why})"
