"""The CPU a number was measured on: model name and the instruction sets this project's choices depend on."""
import platform

from pcb_aoi.edge import machine

GRAVITON3 = """processor\t: 0
BogoMIPS\t: 2100.00
Features\t: fp asimd evtstrm aes pmull sha1 sha2 crc32 atomics fphp asimdhp cpuid asimdrdm jscvt fcma lrcpc dcpop sha3 sm3 sm4 asimddp sha512 sve asimdfhm dit uscat ilrcpc flagm ssbs paca pacg dcpodp svei8mm svebf16 i8mm bf16 dgh rng
CPU implementer\t: 0x41
CPU part\t: 0xd40
"""
XEON = """processor\t: 0
vendor_id\t: GenuineIntel
model name\t: Intel(R) Xeon(R) Platinum 8481C CPU @ 2.70GHz
flags\t\t: fpu sse sse2 avx avx2 avx512f avx512_vnni avx512_bf16 amx_bf16 avx_vnni amx_tile amx_int8
processor\t: 1
model name\t: another
"""


def test_cpuinfo_of_arm_and_x86_gives_model_and_the_flags_of_the_first_cpu():
    model, flags = machine.parse_cpuinfo(XEON)
    assert model == "Intel(R) Xeon(R) Platinum 8481C CPU @ 2.70GHz" and {"avx_vnni", "amx_bf16"} <= flags
    model, flags = machine.parse_cpuinfo(GRAVITON3)
    assert model is None and {"asimddp", "i8mm", "bf16", "sve"} <= flags


def test_injected_cpus_answer_vnni_and_bf16_and_describe_themselves():
    xeon = machine.Cpu("Xeon", "x86_64", frozenset(machine.parse_cpuinfo(XEON)[1] & set(machine.X86_ISA)))
    assert xeon.vnni and xeon.bf16_native and xeon.describe()["isa"] == list(machine.X86_ISA)
    avx2 = machine.Cpu("EPYC", "x86_64", frozenset({"avx2"}))
    assert not avx2.vnni and not avx2.bf16_native and str(avx2) == "EPYC (x86_64; avx2)"
    arm = machine.Cpu("Neoverse-V1", "aarch64", frozenset(machine.parse_cpuinfo(GRAVITON3)[1] & set(machine.ARM_ISA)))
    assert not arm.x86 and arm.bf16_native and arm.describe()["isa"] == ["asimd", "asimddp", "i8mm", "bf16", "sve"]


def test_this_cpu_agrees_with_numpys_own_cpuid_probe():
    from numpy._core._multiarray_umath import __cpu_features__ as seen

    cpu = machine.cpu()
    assert cpu.arch == platform.machine() and cpu.model and cpu.model != "unknown"
    for np_name, name in machine.NUMPY_NAMES.items():
        if np_name in seen:
            assert (name in cpu.isa) == seen[np_name], name
    assert machine.describe() == {"cpu": cpu.describe(), "gpu": None}
