"""What runs on the edge box, without PyTorch: the model contract, image decoding and registration, the
ONNX Runtime model and its numpy decoding, the INT8 formats and CPU checks, the pcb-aoi-detect app and
pcb-aoi-collect (operator verdicts -> a labelled folder)."""
from .._lazy import exports

EXPORTS = {
    "CONTRACT_KEY": "contract", "CONTRACT_FORMAT": "contract", "INPUT": "contract", "OUTPUTS": "contract",
    "E2E_OUTPUTS": "contract", "TOP_K": "contract", "NMS_IOU": "contract", "MIN_SCORE": "contract",
    "PROVIDERS": "contract", "PROVIDER_OPTIONS": "contract",
    "EdgeModel": "runtime", "EdgeError": "runtime", "Detection": "runtime", "Detections": "runtime", "decode": "runtime",
    "read_grey": "runtime", "read_pair": "runtime", "ort_session": "runtime", "load_model": "runtime",
    "detect": "runtime",
    "register_template": "preprocess", "PAD_MULTIPLE": "preprocess", "PAD_VALUES": "preprocess",
    "Cpu": "machine", "cpu": "machine", "FORMATS": "int8", "Int8Format": "int8", "verdict": "int8",
    "Inspector": "inspector", "Journal": "folder", "ReviewBand": "review_band",
    "FeedbackError": "verdicts", "read_verdicts": "verdicts", "read_journal": "verdicts",
}
__all__ = sorted(EXPORTS)
__getattr__, __dir__ = exports(__name__, EXPORTS)
