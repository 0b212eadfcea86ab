"""The peaks the benchmarks divide by: FLOPs/cycle per CPU family and dtype, GHz from cpuinfo."""

import pytest

from fedlora.hardware import CPU_FAMILIES, cpu_family, family_key, float32_peak_gflops, peak_gflops


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


@pytest.mark.parametrize(
    "family, float32, bfloat16",
    [("zen1", 16, 16), ("zen2-3", 32, 32), ("zen4", 32, 64), ("intel-avx2", 32, 32),
     ("intel-avx512", 64, 64), ("intel-avx512-bf16", 64, 128), ("intel-amx", 64, 1024)],
)
def test_peak_table_per_family_and_dtype(family, float32, bfloat16):
    """Zen 4 runs a 512-bit FMA as two 256-bit halves (32, not 64), and AVX512-BF16 doubles it;
    without native bfloat16 torch computes in float32, so bfloat16's peak is float32's."""
    row = CPU_FAMILIES[family]
    assert (row.flops_per_cycle("float32"), row.flops_per_cycle("bfloat16")) == (float32, bfloat16)


ZEN4_FLAGS = "fpu sse2 avx avx2 fma avx512f avx512dq avx512_bf16 avx512_vnni"


@pytest.mark.parametrize(
    "vendor, family, model, flags, key",
    [("AuthenticAMD", 25, 17, ZEN4_FLAGS, "zen4"),                  # this machine: EPYC 9004 (Genoa)
     ("AuthenticAMD", 25, 97, "sse2 avx avx2 fma avx512f avx512_bf16", "zen4"),  # Raphael
     ("AuthenticAMD", 25, 1, "sse2 avx avx2 fma", "zen2-3"),         # Zen 3 (EPYC 7003): same family, no AVX-512
     ("AuthenticAMD", 23, 49, "sse2 avx avx2 fma", "zen2-3"),        # Zen 2
     ("AuthenticAMD", 23, 1, "sse2 avx avx2 fma", "zen1"),
     ("GenuineIntel", 143, 8, "avx2 fma avx512f avx512_bf16 amx_bf16 amx_tile", "intel-amx"),  # Sapphire Rapids
     ("GenuineIntel", 6, 85, "avx2 fma avx512f", "intel-avx512"),     # Skylake-SP / Cascade Lake
     ("GenuineIntel", 6, 85, "avx2 fma avx512f avx512_bf16", "intel-avx512-bf16"),  # Cooper Lake
     ("GenuineIntel", 6, 158, "avx2 fma", "intel-avx2")],
)
def test_known_flags_give_the_family(tmp_path, vendor, family, model, flags, key):
    assert family_key(set(flags.split()), vendor, family, model) == key
    cpuinfo = tmp_path / "cpuinfo"
    cpuinfo.write_text(f"processor\t: 0\nvendor_id\t: {vendor}\ncpu family\t: {family}\nmodel\t\t: {model}\n"
                       f"cpu MHz\t\t: 2000.000\nflags\t\t: {flags}\n")
    assert cpu_family(cpuinfo) is CPU_FAMILIES[key]


def test_zen4_peak_names_its_dtype(tmp_path):
    cpuinfo = tmp_path / "cpuinfo"
    cpuinfo.write_text(f"vendor_id\t: AuthenticAMD\ncpu family\t: 25\nmodel\t\t: 17\n"
                       f"cpu MHz\t\t: 2600.000\nflags\t\t: {ZEN4_FLAGS}\n")
    f32, why32 = peak_gflops(2, "float32", cpuinfo=cpuinfo)
    bf16, why16 = peak_gflops(2, "bfloat16", cpuinfo=cpuinfo)
    assert f32 == pytest.approx(2 * 2.6 * 32) and bf16 == pytest.approx(2 * f32)
    assert "float32" in why32 and "bfloat16" in why16 and "AMD Zen 4" in why32
    assert float32_peak_gflops(2, cpuinfo=cpuinfo)[0] == f32
    with pytest.raises(ValueError, match="float16"):
        peak_gflops(2, "float16", cpuinfo=cpuinfo)
