"""Which device a run computes on, what this CPU is, and which compute dtype pays off there.

`model.device: auto` takes a CUDA GPU if torch sees one, else Apple's MPS, else the CPU. On CUDA,
bfloat16 autocast is the common choice where the GPU computes it (Ampere and later). On the CPU,
bfloat16 halves a training step with native bfloat16 (Intel AMX, AVX512-BF16) but is emulated,
several times slower than float32, on others (AVX2-only CPUs such as AMD EPYC Zen 2/3):
docs/benchmarks.md has both measured. So `compute_dtype: auto` asks the device.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
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


@dataclass(frozen=True)
class CpuFamily:
    """Peak FLOPs per cycle per core of one CPU family, per compute dtype, and why."""

    name: str
    float32: int
    bfloat16: int
    why: str

    def flops_per_cycle(self, dtype: str) -> int:
        if dtype not in PEAK_DTYPES:
            raise ValueError(f"no peak for dtype {dtype!r} (known: {', '.join(PEAK_DTYPES)})")
        return getattr(self, dtype)


PEAK_DTYPES = ("float32", "bfloat16")

EMULATED = "bfloat16 has no native instruction here: torch computes it in float32, so its peak is float32's"

CPU_FAMILIES: dict[str, CpuFamily] = {
    "zen1": CpuFamily(
        "AMD Zen 1 (Zen, Zen+; Hygon Dhyana)", 16, 16,
        "2 FMA pipes of 128 bits, so a 256-bit AVX2 FMA takes both: 2 x 4 float32 lanes x 2 FLOPs "
        "(measured: a 2048² float32 product at 34 GFLOP/s on one 2.0 GHz core, docs/benchmarks.md); " + EMULATED),
    "zen2-3": CpuFamily(
        "AMD Zen 2-3", 32, 32,
        "2 FMA pipes of 256 bits: 2 x 8 float32 lanes x 2 FLOPs; " + EMULATED),
    "zen4": CpuFamily(
        "AMD Zen 4", 32, 64,
        "AVX-512 executed as two 256-bit halves on its 2 FMA pipes: 2 x 8 float32 lanes x 2 FLOPs "
        "(one 512-bit FMA per cycle, not two); AVX512-BF16 dot products (VDPBF16PS) do 2 bfloat16 "
        "products per float32 lane: twice that"),
    "intel-avx2": CpuFamily(
        "Intel without AVX-512", 32, 32,
        "AVX2 with 2 FMA pipes of 256 bits: 2 x 8 float32 lanes x 2 FLOPs; " + EMULATED),
    "intel-avx512": CpuFamily(
        "Intel with AVX-512, without AVX512-BF16 or AMX", 64, 64,
        "2 AVX-512 FMA units (Xeon Gold/Platinum; parts with one unit reach half): 2 x 16 float32 "
        "lanes x 2 FLOPs; " + EMULATED),
    "intel-avx512-bf16": CpuFamily(
        "Intel with AVX512-BF16, without AMX (Cooper Lake)", 64, 128,
        "2 AVX-512 FMA units: 2 x 16 float32 lanes x 2 FLOPs; AVX512-BF16 dot products do 2 "
        "bfloat16 products per float32 lane: twice that"),
    "intel-amx": CpuFamily(
        "Intel with AMX (Sapphire Rapids and later)", 64, 1024,
        "float32 on 2 AVX-512 FMA units: 2 x 16 lanes x 2 FLOPs; bfloat16 on the AMX tile unit: "
        "1024 FLOPs/cycle/core (16 x 32 bfloat16 products accumulated per cycle)"),
    # Unknown vendors or families: the widest FMA the flags advertise, two pipes assumed.
    "avx512": CpuFamily("AVX-512 CPU (family not in this table)", 64, 64,
                        "AVX-512 with 2 FMA pipes assumed: 2 x 16 float32 lanes x 2 FLOPs; " + EMULATED),
    "avx512-bf16": CpuFamily("AVX-512 CPU with AVX512-BF16 (family not in this table)", 64, 128,
                             "AVX-512 with 2 FMA pipes assumed: 2 x 16 float32 lanes x 2 FLOPs; "
                             "AVX512-BF16 dot products: twice that"),
    "avx2": CpuFamily("AVX2 CPU (family not in this table)", 32, 32,
                      "AVX2 with 2 FMA pipes assumed: 2 x 8 float32 lanes x 2 FLOPs; " + EMULATED),
    "avx": CpuFamily("AVX CPU without FMA", 16, 16, "8-lane add + 8-lane mul per cycle; " + EMULATED),
    "sse": CpuFamily("SSE (or unknown)", 8, 8, "4-lane add + 4-lane mul per cycle; " + EMULATED),
}
"""Peak FLOPs/cycle/core per CPU family and dtype: what the benchmarks divide by to say how close
a step came to the hardware. Issue 32: Zen 4 was counted as two full 512-bit pipes (64)."""


def _cpu_fields(text: str) -> tuple[set[str], str | None, int | None, int | None]:
    """(flags, vendor, family, model) of the first processor in a cpuinfo text."""
    line = re.search(r"^flags\s*:(.*)$", text, re.MULTILINE)
    flags = set(line.group(1).split()) if line else set()
    fields = dict(re.findall(r"^(vendor_id|cpu family|model)\s*:\s*(\S+)", text, re.MULTILINE))
    try:
        family, model = int(fields["cpu family"]), int(fields["model"])
    except (KeyError, ValueError):
        family = model = None
    return flags, fields.get("vendor_id"), family, model


def family_key(flags: set[str], vendor: str | None, family: int | None, model: int | None) -> str:
    """The CPU_FAMILIES key of a CPU described by its cpuinfo flags, vendor, family and model."""
    avx512, bf16 = "avx512f" in flags, "avx512_bf16" in flags
    fma = {"avx2", "fma"} <= flags
    if vendor == "AuthenticAMD" and family == 23 and fma:
        return "zen1" if model is not None and model < 0x30 else "zen2-3"  # Zen/Zen+ below 0x30
    if vendor == "HygonGenuine" and family == 24 and model is not None and model < 4 and fma:
        return "zen1"  # Dhyana: a Zen 1 core (later Hygon models are not known here)
    if vendor == "AuthenticAMD" and family == 25:  # Zen 3 and Zen 4 share family 0x19
        return "zen4" if avx512 else "zen2-3" if fma else "avx"
    if vendor == "GenuineIntel":
        if "amx_bf16" in flags:
            return "intel-amx"
        if avx512:
            return "intel-avx512-bf16" if bf16 else "intel-avx512"
        if fma:
            return "intel-avx2"
    if avx512:
        return "avx512-bf16" if bf16 else "avx512"
    if fma:
        return "avx2"
    return "avx" if "avx" in flags else "sse"


def cpu_family(cpuinfo: Path = CPUINFO) -> CpuFamily:
    """This CPU's row of CPU_FAMILIES (the `sse` row when nothing is known, e.g. off Linux)."""
    return CPU_FAMILIES[family_key(*_cpu_fields(_cpuinfo(cpuinfo)))]


def flops_per_cycle(dtype: str = "float32", cpuinfo: Path = CPUINFO) -> tuple[int, str]:
    """Peak `dtype` FLOPs per cycle per core of this CPU, and why."""
    family = cpu_family(cpuinfo)
    per_cycle = family.flops_per_cycle(dtype)
    return per_cycle, f"{family.name}: {per_cycle} {dtype} FLOPs/cycle/core ({family.why})"


def peak_gflops(cores: int, dtype: str = "float32", ghz: float | None = None,
                cpuinfo: Path = CPUINFO) -> tuple[float, str]:
    """Theoretical `dtype` peak of `cores` cores (GFLOP/s) = cores × GHz × FLOPs/cycle, and the
    assumption spelled out. GHz: `ghz`, else the first `cpu MHz` in cpuinfo (the clock now,
    not the boost clock), else 0 (unknown: the fraction of peak cannot be computed)."""
    per_cycle, why = flops_per_cycle(dtype, cpuinfo)
    if ghz is None:
        mhz = re.search(r"^cpu MHz\s*:\s*([\d.]+)", _cpuinfo(cpuinfo), re.MULTILINE)
        ghz = float(mhz.group(1)) / 1000 if mhz else 0.0
    peak = cores * ghz * per_cycle
    return peak, f"{cores} cores x {ghz:.2f} GHz x {per_cycle} FLOPs/cycle = {peak:.0f} GFLOP/s {dtype} ({why})"


def float32_peak_gflops(cores: int, ghz: float | None = None, cpuinfo: Path = CPUINFO) -> tuple[float, str]:
    """The float32 peak (`peak_gflops` in float32)."""
    return peak_gflops(cores, "float32", ghz, cpuinfo)
