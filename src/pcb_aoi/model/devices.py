"""Where training runs: the device, the DistributedDataParallel process group (torchrun) and the
arithmetic precision, each resolved from ``train.*`` and this machine."""
from __future__ import annotations

import os

import torch
import torch.distributed as dist

from ..edge import machine


def resolve_device(name: str, local_rank: int = 0) -> torch.device:
    """``train.device``: auto = the GPU when torch sees one, else the CPU."""
    if name == "cuda" and not torch.cuda.is_available():
        raise ValueError("train.device: cuda requested but torch sees no GPU "
                         "(torch.cuda.is_available() is False); use auto or cpu")
    if name == "cuda" or (name == "auto" and torch.cuda.is_available()):
        return torch.device("cuda", local_rank)
    return torch.device("cpu")


class Ddp:
    """Process-group facts from the torchrun environment (world size 1 without torchrun)."""

    def __init__(self):
        self.world = int(os.environ.get("WORLD_SIZE", "1"))
        self.rank = int(os.environ.get("RANK", "0"))
        self.local_rank = int(os.environ.get("LOCAL_RANK", "0"))
        self.main = self.rank == 0

    def start(self, device: torch.device) -> None:
        if self.world > 1 and not dist.is_initialized():
            dist.init_process_group("nccl" if device.type == "cuda" else "gloo")

    def barrier(self) -> None:
        if self.world > 1:
            dist.barrier()

    def stop(self) -> None:
        if self.world > 1 and dist.is_initialized():
            dist.destroy_process_group()


# bf16 emulated in fp32 arithmetic, measured side by side on a 2-core AVX2-only EPYC (batch 16, 192 px crops).
BF16_EMULATED_SLOWDOWN = 2.6


def resolve_precision(requested: str, device: torch.device, cpu: machine.Cpu | None = None) -> tuple[str, str | None]:
    """``train.precision`` -> (fp32 | bf16, a warning or None).

    auto: bf16 where the hardware computes it (a GPU that supports it; a CPU with AVX512-BF16, AMX-BF16
    or Arm BF16), else fp32. An explicit bf16 on a CPU that emulates it is kept, with a warning.
    """
    if device.type == "cuda":
        native, where = torch.cuda.is_bf16_supported(), torch.cuda.get_device_name(device)
    else:
        cpu = cpu or machine.cpu()
        native, where = cpu.bf16_native, str(cpu)
    if requested == "auto":
        return ("bf16" if native else "fp32"), None
    if requested == "bf16" and not native:
        return "bf16", (f"train.precision=bf16 on {where}: no native bfloat16 (AVX512-BF16, AMX or Arm BF16), so it "
                        f"is emulated, about {BF16_EMULATED_SLOWDOWN}x slower than fp32; use train.precision=auto or fp32")
    return requested, None
