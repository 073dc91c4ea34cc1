"""The contract between an exported model and the runtimes that feed it, each name written once: the ONNX
metadata key and format, the tensor names, the decoding constants and the execution providers.

``deploy.export`` writes these into every model's metadata (``pcb_aoi_contract``, JSON); the edge app
(``edge.runtime``), the end-to-end graph (``deploy.e2e``), the torch decoding (``model.inference``) and
the benchmark read them from here. Plain constants: torch-free, like the rest of ``pcb_aoi.edge``.
"""
from __future__ import annotations

import json
from pathlib import Path

CONTRACT_KEY = "pcb_aoi_contract"  # the ONNX metadata key holding the contract
CONTRACT_FORMAT = "pcb-aoi-onnx/1"  # its version: a runtime refuses a contract format it does not know

INPUT = "input"  # (B, C, H, W) float32, H and W multiples of the contract's pad_multiple
OUTPUTS = ["heatmap", "boxes"]  # raw model: (B, K, h, w) class logits, (B, 4, h, w) x1 y1 x2 y2 input px
# End-to-end model (decoding and NMS in the graph), M detections sorted by image, then score descending:
# boxes (M, 4) x1 y1 x2 y2 input px, scores (M,), labels (M,) int64, image index (M,) int64, count (B,) int64.
E2E_OUTPUTS = ["det_boxes", "det_scores", "det_labels", "det_batch", "det_count"]

# Decoding of the heat map, the same in torch (model.inference), numpy (edge.runtime) and the ONNX graph
# (deploy.e2e): 3x3 local maxima, the TOP_K best per image, per-class NMS at IoU NMS_IOU.
TOP_K, NMS_IOU = 100, 0.5
MIN_SCORE = 0.01  # the lowest score decoded by default; callers filter at their operating point

# Execution providers of the edge app (--provider) and the benchmark: the app's name -> ONNX Runtime's.
# openvino needs the onnxruntime-openvino build, cuda and tensorrt onnxruntime-gpu (instead of onnxruntime).
PROVIDERS = {"cpu": "CPUExecutionProvider", "openvino": "OpenVINOExecutionProvider",
             "cuda": "CUDAExecutionProvider", "tensorrt": "TensorrtExecutionProvider"}
GPU_PROVIDERS = ("cuda", "tensorrt")
# ONNX Runtime options per provider, passed when a session is made (edge.runtime.ort_session); e.g.
# "tensorrt": {"trt_fp16_enable": True, "trt_engine_cache_enable": True, "trt_engine_cache_path": "trt"}.
PROVIDER_OPTIONS: dict[str, dict[str, object]] = {}


# The registry (pcb_aoi.lifecycle, ``pcb-aoi-registry fetch``) writes ``<model file>.registry.json`` beside
# each file it fetches; whatever reads a model reads its version from there.
SIDECAR = ".registry.json"


def registered_version(path: str | Path) -> str:
    """The registry version of the model file ``path`` (its ``SIDECAR``), else ``"unregistered"``."""
    try:
        return json.loads(Path(str(path) + SIDECAR).read_text()).get("version", "unregistered")
    except (OSError, ValueError, AttributeError):
        return "unregistered"
