"""What machine a number was measured on, and what its CPU can do.

The same code runs 2-3x apart on different cloud CPUs, and some formats are only accurate or fast
with some instruction sets: ONNX Runtime's U8S8 INT8 kernels saturate on x86 CPUs without VNNI
(``pcb_aoi.edge.int8``), and bfloat16 is emulated (about 2.6x slower than fp32) on CPUs without
AVX512-BF16 or AMX. Every timing, accuracy gate and training report therefore records the CPU model
and its instruction sets (``describe``).

Torch-free (the edge app imports it). The instruction sets come from numpy's own CPUID probe, which
sees the CPU the process really runs on (an emulator's too), completed by ``/proc/cpuinfo`` for the
few numpy does not report (AVX-VNNI, AMX, Arm's BF16 and I8MM).
"""
from __future__ import annotations

import functools
import platform
from dataclasses import dataclass
from pathlib import Path

# The instruction sets this project's choices depend on, by the names Linux uses in /proc/cpuinfo.
X86_ISA = ("avx2", "avx512f", "avx512_vnni", "avx_vnni", "avx512_bf16", "amx_bf16", "amx_int8")
ARM_ISA = ("asimd", "asimddp", "i8mm", "bf16", "sve")
# numpy's CPUID feature names for them (numpy._core._multiarray_umath.__cpu_features__).
NUMPY_NAMES = {"AVX2": "avx2", "AVX512F": "avx512f", "AVX512VNNI": "avx512_vnni", "AVX512BF16": "avx512_bf16",
               "ASIMD": "asimd", "ASIMDDP": "asimddp", "SVE": "sve"}
X86_ARCHS = ("x86_64", "amd64", "i386", "i686", "x86")


@dataclass(frozen=True)
class Cpu:
    """A CPU as far as this project's choices go: model name, architecture, instruction sets."""

    model: str
    arch: str  # platform.machine(): x86_64, aarch64, ...
    isa: frozenset[str]  # names from X86_ISA / ARM_ISA that the CPU has

    @property
    def x86(self) -> bool:
        return self.arch.lower() in X86_ARCHS

    @property
    def vnni(self) -> bool:
        """uint8 x int8 dot products summed straight into int32 (AVX512-VNNI or AVX-VNNI)."""
        return bool({"avx512_vnni", "avx_vnni"} & self.isa)

    @property
    def bf16_native(self) -> bool:
        """bfloat16 matrix arithmetic in hardware (x86 AVX512-BF16 or AMX-BF16, Arm BF16)."""
        return bool({"avx512_bf16", "amx_bf16", "bf16"} & self.isa)

    def describe(self) -> dict:
        names = X86_ISA if self.x86 else ARM_ISA
        return {"model": self.model, "arch": self.arch, "isa": [n for n in names if n in self.isa]}

    def __str__(self) -> str:
        d = self.describe()
        return f"{self.model} ({self.arch}; {', '.join(d['isa']) or 'none of ' + '/'.join(X86_ISA if self.x86 else ARM_ISA)})"


def parse_cpuinfo(text: str) -> tuple[str | None, set[str]]:
    """(model name, flags) of the first CPU in a /proc/cpuinfo text (x86 "flags", Arm "Features")."""
    model, flags = None, set()
    for line in text.splitlines():
        key, _, value = line.partition(":")
        key = key.strip().lower()
        if key in ("model name", "cpu model") and model is None:
            model = value.strip()
        elif key in ("flags", "features") and not flags:  # x86 "flags", Arm "Features"
            flags = set(value.split())
    return model, flags


def _proc_cpuinfo() -> tuple[str | None, set[str]]:
    try:
        return parse_cpuinfo(Path("/proc/cpuinfo").read_text())
    except OSError:  # not Linux
        return None, set()


def _numpy_features() -> dict[str, bool]:
    try:
        from numpy._core._multiarray_umath import __cpu_features__
    except ImportError:  # numpy < 2
        try:
            from numpy.core._multiarray_umath import __cpu_features__
        except ImportError:
            return {}
    return dict(__cpu_features__)


@functools.lru_cache(maxsize=1)
def cpu() -> Cpu:
    """This process's CPU (cached). Tests inject other CPUs by building a ``Cpu`` themselves."""
    model, flags = _proc_cpuinfo()
    seen = _numpy_features()
    isa = set()
    for np_name, name in NUMPY_NAMES.items():
        if np_name in seen:
            if seen[np_name]:
                isa.add(name)
        elif name in flags:
            isa.add(name)
    isa |= {n for n in X86_ISA + ARM_ISA if n in flags and n not in NUMPY_NAMES.values()}
    return Cpu(model or platform.processor() or platform.machine() or "unknown", platform.machine() or "unknown",
               frozenset(isa))


def cpu_model() -> str:
    """The CPU's model name (``/proc/cpuinfo`` on Linux), else what ``platform`` knows, else "unknown"."""
    return cpu().model


def describe(gpu: str | None = None) -> dict:
    """What a report records about the machine: CPU model, architecture, instruction sets, and the GPU
    (its name) when the number was measured on one."""
    return {"cpu": cpu().describe(), "gpu": gpu}
