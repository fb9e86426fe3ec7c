"""scripts/cpu.py: how the benchmark, the seed spreads and the fresh-clone timings name the CPU they ran on."""

import platform

from scripts.cpu import cpu_name

ZEN2 = """processor\t: 0
vendor_id\t: AuthenticAMD
cpu family\t: 23
model\t\t: 49
model name\t: AMD EPYC
flags\t\t: fpu sse2 avx avx2 fma

processor\t: 1
cpu family\t: 23
model\t\t: 49
model name\t: AMD EPYC
flags\t\t: fpu sse2 avx avx2 fma
"""


def test_two_cpus_of_one_model_name_are_told_apart_by_family_model_and_vector_extensions(tmp_path):
    zen2, zen4 = tmp_path / "zen2", tmp_path / "zen4"
    zen2.write_text(ZEN2)
    zen4.write_text(ZEN2.replace("23", "25").replace("49", "17").replace("avx2", "avx2 avx512f avx512_vnni"))
    assert cpu_name(zen2) == "AMD EPYC (family 23 model 49; AVX2)"
    assert cpu_name(zen4) == "AMD EPYC (family 25 model 17; AVX2, AVX-512, AVX-512 VNNI)"


def test_a_cpu_without_avx2_says_so_and_one_without_x86_fields_is_named_by_platform(tmp_path):
    old = tmp_path / "old"
    old.write_text(ZEN2.replace(" avx2", ""))
    assert cpu_name(old) == "AMD EPYC (family 23 model 49; no AVX2)"
    arm = tmp_path / "arm"
    arm.write_text("processor\t: 0\nBogoMIPS\t: 243.75\nFeatures\t: fp asimd\nCPU implementer\t: 0x41\n")
    assert cpu_name(arm) == (platform.processor() or platform.machine())
    assert cpu_name(tmp_path / "missing") == (platform.processor() or platform.machine())
