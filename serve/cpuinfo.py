"""Which CPU instruction sets this machine has, and what they mean for INT8.

Dependency-free (standard library only) so `kestrel doctor`, the benchmarks and
their reports can record it next to every number: an INT8 speed-up measured on
an AVX2-only CPU says little about a VNNI one, and the other way round.

Sources, first that works: /proc/cpuinfo (Linux), `lscpu` (Linux without
/proc), `sysctl` (macOS); otherwise nothing is known and `summary()` says so.

onnxruntime's INT8 kernels (MLAS) use, best first: AMX-INT8, AVX-512 VNNI or
AVX-VNNI (one instruction per 4 int8 multiply-adds), AVX-512BW / AVX2
(vpmaddubsw: several instructions), on ARM the dot-product and i8mm extensions.
"""

from __future__ import annotations

import platform
import re
import shutil
import subprocess
from pathlib import Path

CPUINFO = Path("/proc/cpuinfo")

# The flags reported by instruction_sets(), Linux spelling.
FLAGS = (
    "sse4_1",
    "sse4_2",
    "avx",
    "fma",
    "f16c",
    "avx2",
    "avx512f",
    "avx512bw",
    "avx512vl",
    "avx512_vnni",
    "avx512_bf16",
    "avx512_fp16",
    "avx_vnni",
    "amx_tile",
    "amx_int8",
    "amx_bf16",
    # ARM (aarch64)
    "asimd",
    "asimddp",
    "i8mm",
)

# Other spellings (macOS sysctl, lscpu variants) -> Linux spelling.
_ALIASES = {
    "sse4.1": "sse4_1",
    "sse4.2": "sse4_2",
    "avx1.0": "avx",
    "avx512vnni": "avx512_vnni",
    "avx512bf16": "avx512_bf16",
    "avx512fp16": "avx512_fp16",
    "avxvnni": "avx_vnni",
    "amxtile": "amx_tile",
    "amxint8": "amx_int8",
    "amxbf16": "amx_bf16",
    # macOS arm64: hw.optional.arm.FEAT_DotProd / FEAT_I8MM / AdvSIMD
    "feat_dotprod": "asimddp",
    "feat_i8mm": "i8mm",
    "advsimd": "asimd",
    "neon": "asimd",
}

# Measured on this project's machines (benchmarks/inprocess.py, mobilenet_v2 /
# resnet50 / xception, batch 1, INT8 latency divided by FP32 latency).
RATIO_VNNI = "0.50-0.62x"
RATIO_AVX2 = "0.74-0.78x"


def _normalize(flag: str) -> str:
    flag = flag.strip().lower()
    return _ALIASES.get(flag, flag)


def parse_flags(text: str) -> set[str]:
    """CPU flags from /proc/cpuinfo or `lscpu` text ("flags", "Features" or "Flags:" lines)."""
    flags: set[str] = set()
    for line in text.splitlines():
        key, sep, value = line.partition(":")
        if sep and key.strip().lower() in ("flags", "features"):
            flags.update(_normalize(f) for f in value.split())
    return flags


def _run(argv: list[str]) -> str:
    if shutil.which(argv[0]) is None:
        return ""
    try:
        done = subprocess.run(argv, capture_output=True, text=True, timeout=5, check=False)
    except (OSError, subprocess.SubprocessError):
        return ""
    return done.stdout if done.returncode == 0 else ""


def _sysctl_flags() -> set[str]:
    """macOS: Intel feature strings, or arm64 hw.optional.* = 1 entries."""
    flags: set[str] = set()
    intel = _run(["sysctl", "-n", "machdep.cpu.features", "machdep.cpu.leaf7_features"])
    flags.update(_normalize(f) for f in intel.split())
    for line in _run(["sysctl", "hw.optional"]).splitlines():
        name, _, value = line.partition(":")
        if value.strip() == "1":
            flags.add(_normalize(name.strip().rsplit(".", 1)[-1]))
    return flags


def cpu_flags(cpuinfo: Path | None = None) -> tuple[set[str], str]:
    """(flags, source): source names where they came from, "" when nothing worked."""
    path = cpuinfo or CPUINFO
    try:
        flags = parse_flags(path.read_text(errors="replace"))
        if flags:
            return flags, str(path)
    except OSError:
        pass
    flags = parse_flags(_run(["lscpu"]))
    if flags:
        return flags, "lscpu"
    if platform.system() == "Darwin":
        flags = _sysctl_flags()
        if flags:
            return flags, "sysctl"
    return set(), ""


def cpu_model(cpuinfo: Path | None = None) -> str:
    """The CPU's marketing name ("AMD EPYC 7B13"), or platform.processor() as a fallback."""
    path = cpuinfo or CPUINFO
    texts = []
    try:
        texts.append(path.read_text(errors="replace"))
    except OSError:
        texts.append(_run(["lscpu"]))
    for text in texts:
        for line in text.splitlines():
            key, sep, value = line.partition(":")
            if sep and key.strip().lower() in ("model name", "hardware") and value.strip():
                return re.sub(r"\s+", " ", value.strip())
    if platform.system() == "Darwin":
        name = _run(["sysctl", "-n", "machdep.cpu.brand_string"]).strip()
        if name:
            return name
    return platform.processor() or platform.machine() or "unknown CPU"


def instruction_sets(flags: set[str] | None = None) -> dict[str, bool]:
    """{flag: present} for every name in FLAGS (this machine's unless `flags` is given)."""
    if flags is None:
        flags, _ = cpu_flags()
    return {name: name in flags for name in FLAGS}


def has_vnni(isa: dict[str, bool]) -> bool:
    return bool(isa.get("avx512_vnni") or isa.get("avx_vnni") or isa.get("amx_int8"))


def summary(isa: dict[str, bool] | None = None) -> str:
    """Short label for reports: "AVX2 (no AVX-512, no VNNI)", "AVX-512 VNNI", "AMX-INT8 + AVX-512 VNNI"..."""
    isa = instruction_sets() if isa is None else isa
    if not any(isa.values()):
        return "unknown (no CPU flags found)"
    if isa.get("asimd") or isa.get("asimddp") or isa.get("i8mm"):
        parts = ["ARM NEON"]
        if isa.get("asimddp"):
            parts.append("dot product")
        if isa.get("i8mm"):
            parts.append("i8mm")
        return " + ".join(parts)
    avx512 = isa.get("avx512f", False)
    vnni512 = isa.get("avx512_vnni", False)
    avx_vnni = isa.get("avx_vnni", False)
    if isa.get("amx_int8"):
        return "AMX-INT8 + AVX-512 VNNI" if vnni512 else "AMX-INT8"
    if avx512 and vnni512:
        return "AVX-512 VNNI"
    if avx512:
        return "AVX-512 + AVX-VNNI" if avx_vnni else "AVX-512 (no VNNI)"
    if isa.get("avx2"):
        return "AVX2 + AVX-VNNI (no AVX-512)" if avx_vnni else "AVX2 (no AVX-512, no VNNI)"
    if isa.get("avx"):
        return "AVX (no AVX2)"
    return "SSE only (no AVX)"


def int8_meaning(isa: dict[str, bool] | None = None) -> str:
    """One line: what the instruction sets mean for INT8 speed on onnxruntime."""
    isa = instruction_sets() if isa is None else isa
    if not any(isa.values()):
        return "INT8 speed-up unknown: could not read the CPU's flags"
    if isa.get("amx_int8"):
        return (
            f"AMX does INT8 matrix tiles: expect at least the VNNI gain "
            f"(INT8 at {RATIO_VNNI} of FP32 batch-1 latency, measured with VNNI)"
        )
    if has_vnni(isa):
        return f"VNNI does 4 int8 multiply-adds per instruction: INT8 at about {RATIO_VNNI} of FP32 batch-1 latency (measured)"
    if isa.get("asimddp") or isa.get("i8mm"):
        return "ARM int8 dot product available: INT8 should be faster than FP32 (not measured by this project)"
    if isa.get("avx512bw") or isa.get("avx2"):
        return (
            f"no VNNI: INT8 multiplies take several instructions; INT8 at about {RATIO_AVX2} of FP32 "
            f"batch-1 latency (measured); a VNNI CPU reaches {RATIO_VNNI}"
        )
    return "no AVX2: onnxruntime's INT8 kernels fall back to slow paths; expect little or no speed-up"


def describe() -> dict:
    """Everything a benchmark report records next to its numbers (JSON-ready)."""
    flags, source = cpu_flags()
    isa = instruction_sets(flags)
    return {
        "cpu": cpu_model(),
        "machine": platform.machine(),
        "isa": summary(isa),
        "int8": int8_meaning(isa),
        "flags": isa,
        "source": source or "none",
    }


if __name__ == "__main__":  # pragma: no cover - convenience
    info = describe()
    print(f"{info['cpu']}: {info['isa']}")
    print(info["int8"])
