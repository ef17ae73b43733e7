"""serve/cpuinfo.py: instruction sets from /proc/cpuinfo or lscpu, and their labels."""

from pathlib import Path

import pytest

from serve import cpuinfo

EPYC_AVX2 = """processor\t: 0
vendor_id\t: AuthenticAMD
model name\t: AMD EPYC 7B13
flags\t\t: fpu vme sse sse2 ssse3 fma sse4_1 sse4_2 avx f16c sse4a avx2 bmi2
"""
SAPPHIRE_RAPIDS = """model name\t: Intel(R) Xeon(R) Platinum 8480+
flags\t\t: sse4_2 avx avx2 fma avx512f avx512bw avx512vl avx512_vnni avx512_bf16 avx_vnni amx_bf16 amx_tile amx_int8
"""
CASCADE_LAKE = "flags : avx avx2 avx512f avx512bw avx512vl avx512_vnni\n"
SKYLAKE_X = "flags : avx avx2 avx512f avx512bw avx512vl\n"
ALDER_LAKE = "flags : avx avx2 fma avx_vnni\n"
GRAVITON = "processor\t: 0\nFeatures\t: fp asimd evtstrm aes pmull sha1 sha2 crc32 atomics asimddp i8mm\n"
LSCPU = "Architecture:        x86_64\nModel name:          AMD EPYC 9654\nFlags:               sse4_2 avx avx2 avx512f avx512_vnni\n"


def _isa(text):
    return cpuinfo.instruction_sets(cpuinfo.parse_flags(text))


@pytest.mark.parametrize(
    "text, label",
    [
        (EPYC_AVX2, "AVX2 (no AVX-512, no VNNI)"),
        (CASCADE_LAKE, "AVX-512 VNNI"),
        (SKYLAKE_X, "AVX-512 (no VNNI)"),
        (ALDER_LAKE, "AVX2 + AVX-VNNI (no AVX-512)"),
        (SAPPHIRE_RAPIDS, "AMX-INT8 + AVX-512 VNNI"),
        (GRAVITON, "ARM NEON + dot product + i8mm"),
        ("flags : sse sse2 sse4_2\n", "SSE only (no AVX)"),
        ("", "unknown (no CPU flags found)"),
    ],
)
def test_summary_labels(text, label):
    assert cpuinfo.summary(_isa(text)) == label


def test_instruction_sets_reports_every_flag_as_bool():
    isa = _isa(SAPPHIRE_RAPIDS)
    assert set(isa) == set(cpuinfo.FLAGS)
    assert all(isinstance(v, bool) for v in isa.values())
    assert isa["amx_int8"] and isa["avx512_vnni"] and isa["avx_vnni"]
    assert not isa["asimddp"]
    avx2 = _isa(EPYC_AVX2)
    assert avx2["avx2"] and avx2["fma"] and not avx2["avx512f"] and not avx2["avx512_vnni"] and not avx2["avx_vnni"]


def test_int8_meaning_names_the_measured_ratio():
    assert cpuinfo.RATIO_AVX2 in cpuinfo.int8_meaning(_isa(EPYC_AVX2))
    assert "no VNNI" in cpuinfo.int8_meaning(_isa(EPYC_AVX2))
    assert cpuinfo.RATIO_VNNI in cpuinfo.int8_meaning(_isa(CASCADE_LAKE))
    assert cpuinfo.RATIO_VNNI in cpuinfo.int8_meaning(_isa(ALDER_LAKE))
    assert "AMX" in cpuinfo.int8_meaning(_isa(SAPPHIRE_RAPIDS))
    assert "not measured" in cpuinfo.int8_meaning(_isa(GRAVITON))
    assert "unknown" in cpuinfo.int8_meaning(_isa(""))


def test_macos_spellings_are_normalized():
    flags = cpuinfo.parse_flags("flags: AVX1.0 AVX2 AVX512F AVX512VNNI SSE4.2\n")
    assert {"avx", "avx2", "avx512f", "avx512_vnni", "sse4_2"} <= flags


def test_falls_back_to_lscpu_when_cpuinfo_is_missing(tmp_path, monkeypatch):
    calls = []

    def fake_run(argv):
        calls.append(argv)
        return LSCPU if argv == ["lscpu"] else ""

    monkeypatch.setattr(cpuinfo, "_run", fake_run)
    missing = tmp_path / "cpuinfo"
    flags, source = cpuinfo.cpu_flags(missing)
    assert source == "lscpu"
    assert {"avx2", "avx512f", "avx512_vnni"} <= flags
    assert cpuinfo.cpu_model(missing) == "AMD EPYC 9654"
    assert ["lscpu"] in calls


def test_nothing_found_says_so(tmp_path, monkeypatch):
    monkeypatch.setattr(cpuinfo, "_run", lambda argv: "")
    monkeypatch.setattr(cpuinfo.platform, "system", lambda: "Linux")
    flags, source = cpuinfo.cpu_flags(tmp_path / "none")
    assert flags == set() and source == ""


def test_cpu_model_from_cpuinfo(tmp_path):
    path = tmp_path / "cpuinfo"
    path.write_text(EPYC_AVX2)
    assert cpuinfo.cpu_model(path) == "AMD EPYC 7B13"
    assert cpuinfo.cpu_flags(path)[1] == str(path)


@pytest.mark.skipif(not Path("/proc/cpuinfo").exists(), reason="no /proc/cpuinfo on this system")
def test_this_machine_matches_proc_cpuinfo():
    text = Path("/proc/cpuinfo").read_text()
    flags = set()
    for line in text.splitlines():
        if line.startswith("flags") or line.startswith("Features"):
            flags.update(line.split(":", 1)[1].split())
    isa = cpuinfo.instruction_sets()
    for name in ("avx2", "avx512f", "avx512_vnni", "avx_vnni", "amx_int8"):
        assert isa[name] == (name in flags), name
    info = cpuinfo.describe()
    assert info["isa"] == cpuinfo.summary(isa)
    assert info["flags"] == isa and info["source"] == "/proc/cpuinfo"
