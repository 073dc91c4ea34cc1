"""Peer detectors: public YOLO models timed beside this project's models, through the same loops.

YOLOv8n and YOLO11n are built by ``ultralytics`` from their model yaml (``yolov8n.yaml``, ``yolo11n.yaml``)
with the project's classes (nc = 6 for DeepPCB: the head a peer trained on these boards would have) and
**random weights**: they detect nothing, so their rows are latency only, never accuracy. Nothing is
downloaded: no weights (built from yaml), no font, no update check (``YOLO_OFFLINE=1`` before ultralytics
is imported; a test runs the build with every network connection refused).

Each peer is exported by ultralytics to ONNX FP32 (``opset=17, simplify=False, dynamic=False``) at the
size the project's models run at, then quantized here like ``deploy.quantize`` does: static QDQ,
uint8 activations, per-channel weights in the project's INT8 format (``edge.int8``, ``u8s7`` unless the
project's INT8 model says otherwise), checked with ``quantize.check_format``. The box decoding in the
peer's graph (DFL and grid, from the ``/dfl/`` nodes on) stays float, as the project keeps its own.

``PeerModel`` offers what ``edge.inspector.Inspector`` needs of a model, so ``measure.latency`` and
``measure.stream`` time a peer exactly as the app's models: the same file decoding and read-ahead, the
same ONNX Runtime session options (``edge.runtime.ort_session``); the grey image is replicated to the
3 channels the peer takes, padded bottom/right with 114 (ultralytics' letterbox grey) to the export
size. Its output (1, 4 + nc, anchors) is decoded in numpy (best class score above the threshold,
xywh -> xyxy, the edge app's per-class NMS).

ultralytics is AGPL-3.0: an optional benchmark-only extra (``pip install 'pcb-aoi[peer]'``), imported
only by ``build`` and never by the package or the edge app.
"""
from __future__ import annotations

import logging
import os
from pathlib import Path

import numpy as np
import onnx
from onnxruntime.quantization import CalibrationDataReader, CalibrationMethod, QuantFormat, QuantType, quantize_static
from onnxruntime.quantization.shape_inference import quant_pre_process

from ..edge.contract import NMS_IOU, PROVIDERS, TOP_K
from ..edge.int8 import FORMATS
from ..edge.runtime import Detection, EdgeError, _nms, ort_session
from . import measure
from .measure import Pairs
from .quantize import check_format

PEERS = {"yolov8n": "yolov8n.yaml", "yolo11n": "yolo11n.yaml"}  # name in benchmark.peers -> ultralytics yaml
# The ops of a YOLO body that ONNX Runtime runs in int8 (SiLU is Sigmoid x Mul); the rest stays float.
OP_TYPES = ("Conv", "Add", "Mul", "Sigmoid", "Concat", "MaxPool", "Resize", "Split", "MatMul")
PAD = 114  # ultralytics' letterbox grey
NOTE = ("random weights (built from the model yaml, untrained): latency only, no accuracy; timed as the app's "
        "models (file decoding, read-ahead, ORT session options); grey image replicated to 3 channels; decode + "
        "NMS in numpy included (best class score > threshold, xywh->xyxy, per-class NMS IoU {iou}); untrained, "
        "{cand:.1f} boxes per image passed the threshold, so NMS costs less than it would for a trained model")


class PeerUnavailable(RuntimeError):
    """A peer is asked for but ultralytics is not installed."""


def require(key: str = "benchmark.peers", names: tuple[str, ...] = ()):
    """The ultralytics module, imported offline; PeerUnavailable naming ``key`` when it is missing.

    Importing ultralytics sets process-wide knobs (``OMP_NUM_THREADS=1`` when unset, OpenCV's thread
    count to 0); they are put back so rows timed after a peer was built are timed as before it."""
    os.environ.setdefault("YOLO_OFFLINE", "1")  # no update check, no telemetry, no hub calls
    omp = os.environ.get("OMP_NUM_THREADS")
    try:
        import cv2
        cv2_threads = cv2.getNumThreads()
    except ImportError:
        cv2, cv2_threads = None, 0
    try:
        import ultralytics
        import ultralytics.utils  # noqa: F401  (where the knobs are set)
    except ImportError:
        raise PeerUnavailable(f"{key} names {list(names) or 'a peer'} but ultralytics is not installed: "
                              "pip install 'pcb-aoi[peer]' (AGPL-3.0, used by the benchmark only), or set "
                              f"{key}: []") from None
    finally:
        if omp is None:
            os.environ.pop("OMP_NUM_THREADS", None)
        else:
            os.environ["OMP_NUM_THREADS"] = omp
        if cv2 is not None:
            cv2.setNumThreads(cv2_threads)
    return ultralytics


def build(name: str, out_dir: str | Path, imgsz: tuple[int, int], nc: int, seed: int = 0) -> Path:
    """Peer ``name`` (a key of PEERS) with random weights (``seed``) exported to ``out_dir/<name>.onnx``,
    FP32, static input (1, 3, H, W) with ``imgsz`` = (H, W), multiples of 32."""
    if name not in PEERS:
        raise ValueError(f"unknown peer {name!r}; known: {sorted(PEERS)}")
    require(names=(name,))
    import torch
    from ultralytics import YOLO
    from ultralytics.nn.tasks import DetectionModel

    logging.getLogger("ultralytics").setLevel(logging.WARNING)  # its export banner would mix into our output
    torch.manual_seed(seed)
    yolo = YOLO(PEERS[name])
    if yolo.model.yaml["nc"] != nc:  # the head a model trained on our classes has; export reads args/task
        head = DetectionModel(yolo.model.yaml | {"nc": nc}, verbose=False)
        head.args, head.task = yolo.model.args, yolo.model.task
        yolo.model = head
    out_dir = Path(out_dir).resolve()
    out_dir.mkdir(parents=True, exist_ok=True)
    cwd = Path.cwd()
    os.chdir(out_dir)  # ultralytics writes the file next to the yaml's name, in the working directory
    try:
        written = yolo.export(format="onnx", imgsz=list(imgsz), opset=17, simplify=False, dynamic=False,
                              verbose=False)
    finally:
        os.chdir(cwd)
    path = out_dir / f"{name}.onnx"
    os.replace(out_dir / Path(written).name, path)
    return path


def decode_nodes(proto: onnx.ModelProto) -> set[str]:
    """Nodes of the Detect head's box decoding: the ``/dfl/`` nodes and every node they feed."""
    tensors, names = set(), set()
    for n in proto.graph.node:  # topologically sorted
        if "/dfl/" in n.name or tensors.intersection(n.input):
            names.add(n.name)
            tensors.update(n.output)
    return names


class _Reader(CalibrationDataReader):
    def __init__(self, input_name: str, inputs: list[np.ndarray]):
        self.name, self._it = input_name, iter(inputs)

    def get_next(self) -> dict | None:
        x = next(self._it, None)
        return None if x is None else {self.name: x}


def quantize(fp32: str | Path, out: str | Path, images: list[np.ndarray], fmt: str = "u8s7") -> Path:
    """INT8 QDQ model of peer ``fp32`` at ``out``, calibrated (min-max) on ``images`` ((H, W) uint8 grey),
    weights in format ``fmt`` (``edge.int8.FORMATS``), the box decoding kept float.

    ONNX Runtime's pre-processing runs first (``quant_pre_process``, as its docs ask): ultralytics' export
    without ``simplify`` feeds every Conv bias through an Identity node, which the quantizer cannot turn
    into an int32 bias; measured 1.5x faster INT8 with it (yolov8n, 640 px, 2-core AVX2 EPYC)."""
    f, out = FORMATS[fmt], Path(out)
    pre = out.with_name(out.stem + ".pre.onnx")
    quant_pre_process(str(fp32), str(pre), skip_symbolic_shape=True)
    try:
        proto = onnx.load(str(pre))
        inp = proto.graph.input[0]
        shape = tuple(d.dim_value for d in inp.type.tensor_type.shape.dim)[2:]
        quantize_static(
            str(pre), str(out), _Reader(inp.name, [to_input(im, shape) for im in images]),
            quant_format=QuantFormat.QDQ, op_types_to_quantize=list(OP_TYPES), per_channel=True,
            reduce_range=f.reduce_range, activation_type=QuantType.QUInt8,
            weight_type=QuantType.QUInt8 if f.weights == "uint8" else QuantType.QInt8,
            nodes_to_exclude=sorted(decode_nodes(proto)), calibrate_method=CalibrationMethod.MinMax)
    finally:
        pre.unlink(missing_ok=True)
    check_format(onnx.load(str(out)), f, out)
    return out


def to_input(grey: np.ndarray, shape: tuple[int, int]) -> np.ndarray:
    """(H, W) uint8 -> (1, 3, H', W') float32 in [0, 1] at the export ``shape``, padded bottom/right with PAD."""
    h, w = grey.shape
    if h > shape[0] or w > shape[1]:
        raise EdgeError(f"image is {w}x{h} px, larger than the peer's export size {shape[1]}x{shape[0]}")
    x = np.full((1, 3, *shape), PAD / 255, np.float32)
    x[0, :, :h, :w] = grey * np.float32(1 / 255)
    return x


class PeerModel:
    """A peer's ONNX file behind ``edge.runtime.EdgeModel``'s interface (what ``Inspector`` uses)."""

    needs_template = False

    def __init__(self, path: str | Path, classes: list[str], score_threshold: float, threads: int = 0,
                 provider: str = "cpu"):
        self.path, self.classes = Path(path), list(classes)
        self.options = {"threads": threads, "provider": provider}
        self.session = ort_session(path, threads, provider, spin=False, quiet=True)  # as EdgeModel opens it
        inp = self.session.get_inputs()[0]
        self.input_name, self.shape = inp.name, (int(inp.shape[2]), int(inp.shape[3]))
        self.contract = {"score_threshold": score_threshold}
        self.candidates: list[int] = []  # boxes above the threshold per call, before NMS

    def worker_spec(self, threads: int) -> tuple:
        """How a worker process of the app's loop loads this peer again (``edge.inspector``)."""
        return type(self), (self.path, self.classes, self.contract["score_threshold"]), self.options | {"threads": threads}

    def provenance(self) -> dict:
        return {"version": "unregistered", "peer": self.path.stem}

    def register(self, test: np.ndarray, template: np.ndarray | None) -> np.ndarray | None:
        return template

    def plan(self, test: np.ndarray, template: np.ndarray | None) -> None:
        return None  # single images, dense

    def detect(self, test: np.ndarray, template: np.ndarray | None = None, score_threshold: float | None = None,
               name: str = "image", registered: bool = False, plan: None = None) -> list[Detection]:
        thr = self.contract["score_threshold"] if score_threshold is None else score_threshold
        out = self.session.run(None, {self.input_name: to_input(test, self.shape)})[0][0]  # (4 + nc, anchors)
        cls = out[4:]
        score = cls.max(0)
        keep = np.flatnonzero(score > thr)
        self.candidates.append(len(keep))
        labels, score = cls[:, keep].argmax(0), score[keep]
        cx, cy, bw, bh = out[:4, keep]
        boxes = np.stack([cx - bw / 2, cy - bh / 2, cx + bw / 2, cy + bh / 2], 1).astype(np.float32)
        kept = _nms(boxes, score, labels, NMS_IOU)[:TOP_K]
        h, w = test.shape
        boxes = boxes[kept]
        boxes[:, 0::2], boxes[:, 1::2] = boxes[:, 0::2].clip(0, w), boxes[:, 1::2].clip(0, h)
        return [Detection(self.classes[int(c)], float(s), [float(v) for v in b])
                for b, s, c in zip(boxes, score[kept], labels[kept])]

    def note(self) -> str:
        return NOTE.format(iou=NMS_IOU, cand=float(np.mean(self.candidates)) if self.candidates else 0.0)


def export_size(h: int, w: int, multiple: int = 32) -> tuple[int, int]:
    """The static export size for (h, w) images: each side rounded up to the model's stride."""
    return -(-h // multiple) * multiple, -(-w // multiple) * multiple


def build_all(names: tuple[str, ...], out_dir: str | Path, imgsz: tuple[int, int], nc: int,
              calibration: list[np.ndarray], fmt: str) -> dict[str, tuple[Path, Path]]:
    """Peer name -> (FP32 file, INT8 file) in ``out_dir``, both for ``imgsz``."""
    require(names=names)
    files = {}
    for name in names:
        fp32 = build(name, out_dir, imgsz, nc)
        files[name] = (fp32, quantize(fp32, Path(out_dir) / f"{name}.int8.onnx", calibration, fmt))
    return files


def time_all(files: dict[str, tuple[Path, Path]], pairs: Pairs, classes: list[str], threshold: float,
            warmup: int, runs: int, stream_pairs: int, threads: int, providers: list[str],
            int8_format: str, workers: int = 1) -> list[dict]:
    """One row per peer, precision and provider (keys of ``edge.contract.PROVIDERS``): ``deploy.measure``'s
    latency p50/p95/p99 and stream fps (the app's loop with ``workers`` processes), as the project's
    variants are timed."""
    rows = []
    for key in providers:
        for name, (fp32, int8) in files.items():
            for fmt, path in (("fp32", fp32), ("int8", int8)):
                model = PeerModel(path, classes, threshold, threads, key)
                timing = {**measure.latency(model, pairs, warmup, runs),
                          **measure.stream(model, pairs, stream_pairs, workers=workers)}
                rows.append({"peer": name, "file": Path(path).name, "runtime": "onnxruntime", "format": fmt,
                             "int8_format": int8_format if fmt == "int8" else None, "provider": PROVIDERS[key],
                             "decode": "numpy", "input_size": [model.shape[1], model.shape[0]],
                             "classes": len(classes), "size_mb": round(Path(path).stat().st_size / 2**20, 3),
                             **timing, "threads": threads, "note": model.note()})
    return rows
