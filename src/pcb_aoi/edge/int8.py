"""The INT8 formats the quantize stage can write, and on which CPUs each one computes what it was gated on.

ONNX Runtime runs a quantized convolution as uint8 activations times int8 (U8S8) or uint8 (U8U8)
weights. How a CPU adds the products decides whether the result is exact:

- x86 with VNNI (AVX512-VNNI, AVX-VNNI): four uint8 x int8 products summed straight into int32. Exact.
- x86 without VNNI (AVX2, AVX-512 without VNNI): ``vpmaddubsw`` adds each *pair* of adjacent
  uint8 x int8 products into int16, saturating at 32767. With 8-bit weights a pair reaches
  255 x 127 x 2 = 64770: large activations on large weights are clipped. Measured on a 2-core AVX2
  EPYC: mAP@0.5 0.846 instead of 0.977 for the DeepPCB recipe's model (docs/int8-formats.md).
- Arm: widening multiplies or SDOT/UDOT into int32. Exact.

Formats (``quantize.format``):

- ``u8s7``: int8 weights limited to [-64, 64] (ONNX Runtime's ``reduce_range``). A pair is at most
  255 x 64 x 2 = 32640 < 32767, so the U8S8 kernels are exact on every CPU. The default.
- ``u8s8``: full-range int8 weights. Exact only with VNNI or on Arm; saturates on other x86 CPUs.
- ``u8u8``: uint8 weights; ONNX Runtime's U8U8 kernels widen to int16 first. Exact everywhere,
  slower on x86 (measured 1.5x the latency of U8S8 on AVX2).

Torch- and onnx-free: the edge app reads a model's format from its contract and asks ``verdict``.
"""
from __future__ import annotations

from dataclasses import dataclass

from .machine import Cpu

INT16_MAX = 32767
UINT8_MAX = 255


@dataclass(frozen=True)
class Int8Format:
    name: str
    weights: str  # ONNX element type of the weights: int8 | uint8
    weight_range: tuple[int, int]  # the quantized weight values the quantizer may write
    reduce_range: bool  # onnxruntime.quantization's reduce_range
    needs_vnni_on_x86: bool  # saturates on x86 CPUs without VNNI
    summary: str

    def contract(self) -> dict:
        """What the model's contract says about its INT8 arithmetic (``pcb_aoi_contract["int8"]``)."""
        return {"format": self.name, "activations": "uint8", "weights": self.weights,
                "weight_range": list(self.weight_range), "needs_vnni_on_x86": self.needs_vnni_on_x86,
                "summary": self.summary}


FORMATS = {
    "u8s7": Int8Format("u8s7", "int8", (-64, 64), True, False,
                       "uint8 activations, int8 weights in [-64, 64]: exact on every x86 and Arm CPU"),
    "u8s8": Int8Format("u8s8", "int8", (-127, 127), False, True,
                       "uint8 activations, int8 weights in [-127, 127]: exact on Arm and on x86 CPUs with VNNI "
                       "(AVX512-VNNI or AVX-VNNI); saturates on other x86 CPUs (AVX2)"),
    "u8u8": Int8Format("u8u8", "uint8", (0, 255), False, False,
                       "uint8 activations and weights: exact on every CPU, slower on x86"),
}


def verdict(int8: dict | None, cpu: Cpu) -> tuple[str, str]:
    """Whether an INT8 model computes on ``cpu`` what its accuracy gate measured.

    ``int8``: the contract's ``int8`` field; None for an INT8 model exported before formats were
    recorded. Returns (``exact`` | ``saturates`` | ``unknown``, a sentence naming format and CPU).
    """
    if int8 is None:
        return "unknown", (f"this INT8 model records no INT8 format (quantized before pcb-aoi recorded it), so its "
                           f"accuracy on {cpu} is unknown: on x86 CPUs without VNNI an 8-bit-weight model loses "
                           "accuracy. Re-run the quantize stage (quantize.format: u8s7) or check it on labelled pairs")
    name = int8.get("format", "?")
    if "needs_vnni_on_x86" not in int8:  # a format this version does not know
        return "unknown", f"INT8 format {name} is unknown to this pcb-aoi; its accuracy on {cpu} is unknown"
    if int8["needs_vnni_on_x86"] and cpu.x86 and not cpu.vnni:
        return "saturates", (f"INT8 format {name} ({int8.get('summary', '')}) loses accuracy on {cpu}: this CPU "
                             "has no VNNI, so ONNX Runtime adds pairs of uint8 x int8 products into int16 and they "
                             "saturate. Use the FP32 model here, or re-quantize with quantize.format: u8s7")
    return "exact", f"INT8 format {name} computes exactly on {cpu}"
