"""The float32 peak the benchmarks divide by: FLOPs/cycle from the CPU flags, GHz from cpuinfo."""

import pytest

from fedlora.hardware import float32_peak_gflops


@pytest.mark.parametrize(
    "flags, per_cycle",
    [("fpu sse2 avx avx2 fma", 32), ("sse2 avx512f avx2 fma", 64), ("sse2 avx", 16), ("sse2", 8), ("avx avx2", 16)],
)
def test_peak_from_flags_and_clock(tmp_path, flags, per_cycle):
    cpuinfo = tmp_path / "cpuinfo"
    cpuinfo.write_text(f"processor\t: 0\ncpu MHz\t\t: 2450.000\nflags\t\t: {flags}\n")
    peak, why = float32_peak_gflops(2, cpuinfo=cpuinfo)
    assert peak == pytest.approx(2 * 2.45 * per_cycle)
    assert f"{per_cycle} FLOPs/cycle" in why and "2.45 GHz" in why


def test_given_clock_wins_and_missing_cpuinfo_gives_zero(tmp_path):
    cpuinfo = tmp_path / "cpuinfo"
    cpuinfo.write_text("cpu MHz\t: 1000\nflags\t: avx2 fma\n")
    assert float32_peak_gflops(1, ghz=3.0, cpuinfo=cpuinfo)[0] == pytest.approx(96)
    assert float32_peak_gflops(2, cpuinfo=tmp_path / "missing")[0] == 0.0


@pytest.mark.parametrize(
    "vendor, family, model, per_cycle",
    [("AuthenticAMD", 23, 1, 16),      # Zen 1 (EPYC 7001): 128-bit FMA units, this CI machine
     ("AuthenticAMD", 23, 8, 16),      # Zen+
     ("AuthenticAMD", 23, 49, 32),     # Zen 2 (EPYC 7002): full 256-bit FMA
     ("AuthenticAMD", 25, 1, 32),      # Zen 3
     ("HygonGenuine", 24, 1, 16),      # Hygon Dhyana: a Zen 1 core
     ("HygonGenuine", 24, 4, 32),      # later Hygon models: not assumed to be Zen 1
     ("AuthenticAMD", 24, 1, 32),      # family 24 is Hygon's only
     ("GenuineIntel", 23, 1, 32)],     # not AMD: the family number means something else
)
def test_zen1_counts_half_the_avx2_fmas(tmp_path, vendor, family, model, per_cycle):
    cpuinfo = tmp_path / "cpuinfo"
    cpuinfo.write_text(f"processor\t: 0\nvendor_id\t: {vendor}\ncpu family\t: {family}\nmodel\t\t: {model}\n"
                       f"model name\t: AMD EPYC\ncpu MHz\t\t: 2000.000\nflags\t\t: sse2 avx avx2 fma\n")
    peak, why = float32_peak_gflops(2, cpuinfo=cpuinfo)
    assert peak == pytest.approx(2 * 2.0 * per_cycle) and f"{per_cycle} FLOPs/cycle" in why
