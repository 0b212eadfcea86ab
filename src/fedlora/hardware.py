"""Which device a run computes on, what this CPU is, and which compute dtype pays off there.

`model.device: auto` takes a CUDA GPU if torch sees one, else Apple's MPS, else the CPU. On CUDA,
bfloat16 autocast is the common choice where the GPU computes it (Ampere and later). On the CPU,
bfloat16 halves a training step with native bfloat16 (Intel AMX, AVX512-BF16) but is emulated,
several times slower than float32, on others (AVX2-only CPUs such as AMD EPYC Zen 2/3):
docs/benchmarks.md has both measured. So `compute_dtype: auto` asks the device.
"""

from __future__ import annotations

import re
from pathlib import Path

CPUINFO = Path("/proc/cpuinfo")
DEVICE_NAMES = re.compile(r"auto|cpu|mps|cuda(:\d+)?")
DEVICE_CHOICES = "auto, cpu, cuda, cuda:N or mps"


class DeviceUnavailable(ValueError):
    """A device named explicitly that this machine (or this torch build) does not have."""


def resolve_device(name: str) -> str:
    """The torch device for `model.device`: `auto` is cuda, else mps, else cpu; an explicit
    device must exist here (DeviceUnavailable says why not)."""
    import torch

    cuda, mps = torch.cuda.is_available(), torch.backends.mps.is_available()
    if name == "auto":
        return "cuda" if cuda else "mps" if mps else "cpu"
    if name.startswith("cuda"):
        if not cuda:
            build = "a CPU-only torch build" if torch.version.cuda is None else "no CUDA device found"
            raise DeviceUnavailable(f"{name} is not available ({build}, torch {torch.__version__}); "
                                    "use cpu or auto, or install a CUDA build of torch (docs/howto/gpu.md)")
        index, count = int(name.partition(":")[2] or 0), torch.cuda.device_count()
        if index >= count:
            raise DeviceUnavailable(f"{name} is not available: this machine has {count} CUDA device(s)")
    if name == "mps" and not mps:
        raise DeviceUnavailable("mps is not available (Apple silicon with an MPS build of torch only)")
    return name


def accelerator_compute_dtype(device: str) -> str | None:
    """`compute_dtype: auto` on a GPU: bfloat16 where the CUDA device computes it, else float32
    (older CUDA GPUs, MPS); None when the run computes on the CPU (the CPU rule applies)."""
    try:
        device = resolve_device(device)
    except DeviceUnavailable:
        return None  # the run will stop on the device itself, before any dtype matters
    if device.startswith("cuda"):
        import torch

        major, _ = torch.cuda.get_device_capability(torch.device(device))
        return "bfloat16" if major >= 8 else "float32"  # native bfloat16 from Ampere (8.0) on
    return "float32" if device == "mps" else None


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
    AVX2 + FMA: 2 × 8 × 2 = 32; AVX without FMA: 16 (add + mul pipes); else SSE: 8. Zen 1
    (AMD family 23, models below 0x30: EPYC 7001 "Naples") advertises AVX2 but its two FMA
    pipes are 128 bits wide, so a 256-bit FMA takes both: 2 × 4 × 2 = 16 (measured here: a
    2048² float32 product runs at 34 GFLOP/s on one 2.0 GHz core, docs/benchmarks.md).
    """
    text = _cpuinfo(cpuinfo)
    line = re.search(r"^flags\s*:(.*)$", text, re.MULTILINE)
    flags = set(line.group(1).split()) if line else set()
    if "avx512f" in flags:
        return 64, "AVX-512 with 2 FMA pipes: 2 x 16 float32 lanes x 2 FLOPs = 64 FLOPs/cycle/core"
    if {"avx2", "fma"} <= flags and _is_zen1(text):
        return 16, "AVX2+FMA on Zen 1 (AMD family 23 model < 0x30, or Hygon Dhyana), 2 FMA pipes of 128 bits: 2 x 4 float32 lanes x 2 FLOPs = 16 FLOPs/cycle/core"
    if {"avx2", "fma"} <= flags:
        return 32, "AVX2+FMA, 2 FMA pipes: 2 x 8 float32 lanes x 2 FLOPs = 32 FLOPs/cycle/core"
    if "avx" in flags:
        return 16, "AVX without FMA: 8-lane add + 8-lane mul = 16 FLOPs/cycle/core"
    return 8, "SSE (or unknown): 4-lane add + 4-lane mul = 8 FLOPs/cycle/core"


def _is_zen1(text: str) -> bool:
    """AMD family 23 (0x17) below model 0x30: Zen and Zen+, whose FMA units are 128 bits wide;
    also Hygon Dhyana (family 24 = 0x18, models 0–3), a Zen 1 core under another vendor id
    (later Hygon models are left at the full-width count: not known here)."""
    fields = dict(re.findall(r"^(vendor_id|cpu family|model)\s*:\s*(\S+)", text, re.MULTILINE))
    try:
        vendor, family, model = fields.get("vendor_id"), int(fields["cpu family"]), int(fields["model"])
        return (vendor == "AuthenticAMD" and family == 23 and model < 0x30) or (
            vendor == "HygonGenuine" and family == 24 and model < 4)
    except (KeyError, ValueError):
        return False


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
