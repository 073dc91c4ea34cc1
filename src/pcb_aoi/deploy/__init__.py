"""From checkpoint to edge model: ONNX export with parity gates (raw and end to end), INT8 quantization
with an accuracy gate, and the benchmark of every runtime and execution provider."""
from .._lazy import exports

EXPORTS = {
    "EndToEnd": "e2e", "ParityError": "export", "AccuracyGateError": "quantize", "FormatError": "quantize",
}
__all__ = sorted(EXPORTS)
__getattr__, __dir__ = exports(__name__, EXPORTS)
