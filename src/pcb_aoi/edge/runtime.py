"""Inference on the edge box: an exported model, numpy, ONNX Runtime and Pillow; no PyTorch.

Reads the preprocessing contract the export stage stores in the ONNX metadata (``pcb_aoi_contract``,
its names in ``contract.py``) and reproduces ``pcb_aoi.model.inference`` exactly: grey uint8 images,
channels ``test/255, template/255, (test - template)/255``, padded bottom/right to a multiple of 32
with 1.0 / 1.0 / 0.0. An end-to-end model (``model.e2e.onnx``) returns final detections; for a raw
model (``model.onnx``, ``model.int8.onnx``) the decoding (sigmoid, 3x3 peaks, top-k, per-class NMS)
runs here in numpy, as ``pcb_aoi.model.inference.decode`` does in torch.

This module must import nothing but the standard library, numpy, onnxruntime and PIL (and OpenCV
when installed, for faster PNG decoding): the ``pcb-aoi[edge]`` install has no torch (a test enforces it).
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnxruntime as ort

from . import gate as _gate
from . import int8, machine
from .contract import (CONTRACT_FORMAT, CONTRACT_KEY, INPUT, NMS_IOU, OUTPUTS, PROVIDER_OPTIONS, PROVIDERS,
                       TOP_K, registered_version)
from .preprocess import PAD_VALUES, register_template
from .preprocess import prepare_input as _prepare
from .preprocess import read_grey as _read_grey
from .preprocess import read_pair as _read_pair


# What ``info`` says of a key a model's provenance lacks (``pipeline.provenance`` writes them; older exports did not).
UNKNOWN_PROVENANCE = {"version": "unregistered", "commit": "unknown", "dirty": "unknown", "params_hash": "unknown",
                      "params_sections": [], "data": "unknown", "metrics": "unknown", "score_threshold": "unknown",
                      "export_commit": "unknown", "export_dirty": "unknown"}


class EdgeError(ValueError):
    """Bad input for the edge app (model, image or template); the message names the file."""


def read_grey(path: str | Path) -> np.ndarray:
    """Decode an image file to (H, W) uint8 grey as the pipeline does (``preprocess.read_grey``), every
    failure an EdgeError naming the file."""
    path = Path(path)
    if not path.is_file():
        raise EdgeError(f"{path}: image not found")
    try:
        return _read_grey(path)
    except ValueError as e:  # >8-bit image: the message says how to fix it
        raise EdgeError(str(e)) from None
    except Exception as e:  # PIL raises UnidentifiedImageError, OSError (truncated), SyntaxError, ...
        raise EdgeError(f"{path}: not a readable image ({type(e).__name__}: {e})") from None


def read_pair(test_path: str | Path, template_path: str | Path | None) -> tuple[np.ndarray, np.ndarray | None]:
    """Test image and template decoded at the same time (``preprocess.read_pair``), errors as ``read_grey``'s."""
    return _read_pair(test_path, template_path, read_grey)


def prepare_input(test: np.ndarray, template: np.ndarray | None, contract: dict,
                  out: np.ndarray | None = None) -> np.ndarray:
    """(H, W) uint8 test (and template) -> (C, H', W') float32, H' W' multiples of the contract's ``pad_multiple``
    (or into ``out``, padded to its size)."""
    if tuple(contract["pad_values"]) != PAD_VALUES[: len(contract["pad_values"])]:
        raise EdgeError(f"model contract pads with {contract['pad_values']}; this app pads with {list(PAD_VALUES)}")
    return _prepare(test, template, bool(contract["needs_template"]), contract["pad_multiple"], out)


def tile_input(test: np.ndarray, template: np.ndarray, tile: _gate.Tile, contract: dict,
               out: np.ndarray | None = None) -> np.ndarray:
    """(C, h, w) model input of one gate tile: the values of that window of ``prepare_input``'s whole padded
    input, computed from the tile's pixels only (into ``out``, one image of a batch, when given)."""
    h, w = test.shape
    inside = np.s_[tile.y0:min(tile.y1, h), tile.x0:min(tile.x1, w)]
    if out is None:
        out = np.empty((3, tile.y1 - tile.y0, tile.x1 - tile.x0), np.float32)
    return prepare_input(test[inside], template[inside], contract, out)


def _nms(boxes: np.ndarray, scores: np.ndarray, labels: np.ndarray, iou: float) -> np.ndarray:
    """Indices kept by greedy per-class NMS, in decreasing score (torchvision's batched_nms).

    The IoU of every pair is computed at once; the greedy pass then only ORs rows of booleans.
    """
    order = np.argsort(-scores, kind="stable")
    b, lab = boxes[order], labels[order]
    x1, y1 = np.maximum(b[:, None, 0], b[None, :, 0]), np.maximum(b[:, None, 1], b[None, :, 1])
    x2, y2 = np.minimum(b[:, None, 2], b[None, :, 2]), np.minimum(b[:, None, 3], b[None, :, 3])
    inter = np.clip(x2 - x1, 0, None) * np.clip(y2 - y1, 0, None)
    area = (b[:, 2] - b[:, 0]) * (b[:, 3] - b[:, 1])
    with np.errstate(invalid="ignore", divide="ignore"):  # degenerate boxes: IoU nan, never suppresses
        suppress = (inter / (area[:, None] + area[None, :] - inter) > iou) & (lab[:, None] == lab[None, :])
    removed = np.zeros(len(order), bool)
    keep = []
    for i in range(len(order)):
        if not removed[i]:
            keep.append(i)
            removed |= suppress[i]
    return order[np.asarray(keep, dtype=np.int64)]


def _sigmoid(x: np.ndarray) -> np.ndarray:
    return (1.0 / (1.0 + np.exp(-x))).astype(np.float32)


def _max_pool3(x: np.ndarray) -> np.ndarray:
    """3x3 max over the last two axes, stride 1, only the neighbours that exist at borders (separable)."""
    m = x.copy()
    np.maximum(m[..., 1:], x[..., :-1], out=m[..., 1:])
    np.maximum(m[..., :-1], x[..., 1:], out=m[..., :-1])
    out = m.copy()
    np.maximum(out[..., 1:, :], m[..., :-1, :], out=out[..., 1:, :])
    np.maximum(out[..., :-1, :], m[..., 1:, :], out=out[..., :-1, :])
    return out


def candidates(heatmap: np.ndarray, boxes: np.ndarray, score_threshold: float,
               top_k: int = TOP_K) -> list[tuple[np.ndarray, np.ndarray, np.ndarray]]:
    """Raw outputs (B, K, h, w) logits and (B, 4, h, w) boxes -> per image (boxes (N, 4), scores (N,), labels
    (N,)) of its ``top_k`` best 3x3 local maxima above the threshold, in decreasing score: ``decode`` before NMS."""
    heat = _sigmoid(heatmap)
    peak = (_max_pool3(heat) == heat) & (heat > np.float32(score_threshold))
    out = []
    for i in range(len(heat)):
        kk, yy, xx = np.nonzero(peak[i])  # in flat (class, y, x) order
        score = heat[i, kk, yy, xx]
        top = np.argsort(-score, kind="stable")[:top_k]
        kk, yy, xx = kk[top], yy[top], xx[top]
        out.append((boxes[i][:, yy, xx].T.astype(np.float32).reshape(-1, 4), score[top], kk))
    return out


def decode(heatmap: np.ndarray, boxes: np.ndarray, score_threshold: float, top_k: int = TOP_K,
           nms_iou: float = NMS_IOU) -> list[dict[str, np.ndarray]]:
    """Raw outputs (B, K, h, w) logits and (B, 4, h, w) boxes -> per image {boxes, scores, labels}.

    The same detections as ``pcb_aoi.model.inference.decode``: sigmoid, 3x3 local maxima, top-k, per-class NMS.
    Only peaks above the threshold are sorted, and NMS compares all pairs at once: ~2 ms for a
    640x640 image's maps.
    """
    out = []
    for bx, sc, kk in candidates(heatmap, boxes, score_threshold, top_k):
        kept = _nms(bx, sc, kk, nms_iou)
        out.append({"boxes": bx[kept], "scores": sc[kept], "labels": kk[kept].astype(np.int64)})
    return out


def ort_session(path: str | Path, threads: int = 0, provider: str = "cpu", spin: bool = True,
                quiet: bool = False) -> ort.InferenceSession:
    """An ONNX Runtime session over the model file ``path`` on ``provider`` (a key of ``contract.PROVIDERS``,
    with its ``PROVIDER_OPTIONS``), the CPU taking the operators another provider lacks.

    ``threads``: intra-op threads, 0 = all cores. ``spin=False`` as the edge app runs it: threads sleep
    between runs instead of busy-waiting. ``quiet``: only errors in ONNX Runtime's log.
    """
    opts = ort.SessionOptions()
    opts.intra_op_num_threads = threads
    if quiet:
        opts.log_severity_level = 3
    if not spin:
        opts.add_session_config_entry("session.intra_op.allow_spinning", "0")
    first = (PROVIDERS[provider], PROVIDER_OPTIONS[provider]) if provider in PROVIDER_OPTIONS else PROVIDERS[provider]
    providers = [first] + (["CPUExecutionProvider"] if provider != "cpu" else [])
    return ort.InferenceSession(str(path), opts, providers=providers)


def ort_runner(sess: ort.InferenceSession):
    """A Runner (``model.inference.Runner``) over a raw-output model: (B, C, H, W) -> (heatmap, boxes)."""
    return lambda x: tuple(sess.run(OUTPUTS, {INPUT: x}))


class Detections(list):
    """``EdgeModel.detect``'s detections (a list, decreasing score) and ``gate``: how the pair was run
    (``gate.Plan.record``: tiles, or dense and why; None for a model without the gate)."""

    gate: dict | None = None


@dataclass
class Detection:
    cls: str
    score: float
    box: list[float]  # x1 y1 x2 y2, image pixels, clipped to the image

    def to_dict(self) -> dict:
        return {"class": self.cls, "score": round(self.score, 6), "box": [round(v, 2) for v in self.box]}


class EdgeModel:
    """An exported pcb-aoi ONNX model and its contract; ``detect`` takes grey uint8 arrays."""

    def __init__(self, path: str | Path, threads: int = 0, provider: str = "cpu", spin: bool = False,
                 gate: str | None = None):
        """``gate``: ``none`` | ``tiles`` overrides the contract's gate (``edge.gate``; None = the model's).
        ``spin``: ONNX Runtime's threads busy-wait between runs (its default). Off here: the sleeping
        threads leave the cores to the file decoding and read-ahead threads (measured 4 % more FPS one
        by one and in stream mode on 2 cores, INT8, CPU provider)."""
        path = Path(path)
        if not path.is_file():
            raise EdgeError(f"{path}: model file not found")
        self.options = {"threads": threads, "provider": provider, "spin": spin, "gate": gate}  # how to load it again
        if PROVIDERS.get(provider) not in ort.get_available_providers():
            have = [k for k, v in PROVIDERS.items() if v in ort.get_available_providers()]
            raise EdgeError(f"execution provider {provider!r} is not available in this onnxruntime (available: "
                            f"{', '.join(have)}); e.g. pip install onnxruntime-openvino (instead of onnxruntime) "
                            "for openvino, onnxruntime-gpu for cuda/tensorrt")
        try:
            self.session = ort_session(path, threads, provider, spin, quiet=True)
        except Exception as e:
            raise EdgeError(f"{path}: not a loadable ONNX model ({type(e).__name__}: {str(e)[:200]})") from None
        meta = self.session.get_modelmeta().custom_metadata_map
        if CONTRACT_KEY not in meta:
            raise EdgeError(f"{path}: ONNX model without pcb-aoi metadata ({CONTRACT_KEY}); export it with the "
                            "export_onnx stage of pcb-aoi (dvc repro export_onnx)")
        self.contract = json.loads(meta[CONTRACT_KEY])
        if self.contract.get("format") != CONTRACT_FORMAT:
            raise EdgeError(f"{path}: contract format {self.contract.get('format')!r}; this app reads "
                            f"{CONTRACT_FORMAT!r} (update pcb-aoi or re-export the model)")
        self.path, self.classes = path, self.contract["classes"]
        self.needs_template = bool(self.contract["needs_template"])
        self.register_px = int(self.contract.get("register_max_px", 0))  # older models: pairs as given
        self.end_to_end = self.contract["outputs"] == "detections"
        self.input_name = self.session.get_inputs()[0].name
        # Models quantized before the contract recorded a precision carry only the "quantization" key.
        self.precision = self.contract.get("precision", "int8" if "quantization" in meta else "fp32")
        if gate is not None and gate not in _gate.MODES:
            raise EdgeError(f"gate {gate!r}: must be one of {', '.join(_gate.MODES)}")
        if gate == "tiles" and not self.needs_template:
            raise EdgeError(f"{path}: --gate tiles needs a model that compares each image with its template; this "
                            "model reads single images (needs_template: false), so there is no difference to gate on")
        self.gate = _gate.settings(self.contract, gate)
        if not self.needs_template:
            self.gate["mode"] = "none"

    def worker_spec(self, threads: int) -> tuple:
        """How a worker process loads this model again (``inspector``): class, arguments, keyword arguments."""
        return type(self), (self.path,), self.options | {"threads": threads}

    def cpu_verdict(self, cpu: machine.Cpu | None = None) -> tuple[str, str]:
        """Does this model compute on ``cpu`` (default: this one) what its accuracy gate measured?
        (``exact`` | ``saturates`` | ``unknown``, a sentence naming the format and the CPU); ``pcb_aoi.edge.int8``."""
        cpu = cpu or machine.cpu()
        if self.precision != "int8":
            return "exact", f"{self.precision} model: no integer arithmetic that depends on the CPU ({cpu})"
        return int8.verdict(self.contract.get("int8"), cpu)

    def info(self, cpu: machine.Cpu | None = None) -> dict:
        """What ``pcb-aoi-detect --info`` prints: the model's contract, where it came from (``provenance``,
        every key present: ``"unknown"`` for a model exported before pcb-aoi recorded it) and how it
        fares on this CPU."""
        cpu = cpu or machine.cpu()
        status, why = self.cpu_verdict(cpu)
        c, prov = self.contract, self.provenance()
        return {"model": str(self.path), "precision": self.precision, "int8": c.get("int8"),
                "classes": self.classes, "needs_template": self.needs_template, "outputs": c["outputs"],
                "register_max_px": self.register_px, "gate": self.gate, "score_threshold": c["score_threshold"],
                "model_config": c.get("model_config"), "cpu": cpu.describe(), "on_this_cpu": status, "why": why,
                "providers": self.session.get_providers(), "version": prov["version"],  # registered (pcb-aoi-registry fetch) or "unregistered"
                "provenance": UNKNOWN_PROVENANCE | {"score_threshold": c["score_threshold"]} | prov}

    def provenance(self) -> dict:
        """Where this model came from, as every result record carries it (``record.py``): the registered
        version (the sidecar ``<model>.registry.json`` written when the model was fetched from the
        registry) or ``"unregistered"``, then what the export stored in the contract (``provenance``)."""
        return {"version": registered_version(self.path), **self.contract.get("provenance", {})}

    def register(self, test: np.ndarray, template: np.ndarray) -> np.ndarray:
        """The template moved onto ``test`` when the model was trained on registered pairs, else as given."""
        if not self.register_px or template is None or template.shape != test.shape:
            return template
        return register_template(test, template, self.register_px)[0]

    def plan(self, test: np.ndarray, template: np.ndarray | None) -> _gate.Plan | None:
        """Where the network runs on this registered pair (``gate.plan``); None when the model runs dense
        (gate off, or no template to compare with)."""
        if self.gate["mode"] != "tiles" or template is None or template.shape != test.shape:
            return None
        return _gate.plan(test, template, self.gate)

    def detect(self, test: np.ndarray, template: np.ndarray | None = None, score_threshold: float | None = None,
               name: str = "image", registered: bool = False, plan: _gate.Plan | None = None) -> list[Detection]:
        """Detections on one (H, W) uint8 image (and its template), score above the threshold.

        ``registered``: the caller already ran ``register`` on this pair (the app does it while reading);
        ``plan``: the caller already ran ``plan`` on the registered pair (the app does it while reading).
        """
        thr = self.contract["score_threshold"] if score_threshold is None else score_threshold
        if self.needs_template:
            if template is None:
                raise EdgeError(f"{name}: no template; this model compares each image with its defect-free "
                                "template (--template, --template-dir, or X_test/X_temp pairs)")
            if template.shape != test.shape:
                raise EdgeError(f"{name}: template is {template.shape[1]}x{template.shape[0]} px, image "
                                f"{test.shape[1]}x{test.shape[0]} px; they must be the same size")
        if not registered:  # a model trained on registered pairs: register this one too
            template = self.register(test, template)
        if plan is None:
            plan = self.plan(test, template)
        if plan is None or plan.tiles is None:
            boxes, scores, labels = self._run(prepare_input(test, template, self.contract)[None], thr)[0]
        else:
            boxes, scores, labels = self._run_tiles(test, template, plan.tiles, thr)
        h, w = test.shape
        boxes = boxes.astype(np.float32).copy()
        boxes[:, 0::2] = boxes[:, 0::2].clip(0, w)
        boxes[:, 1::2] = boxes[:, 1::2].clip(0, h)
        out = Detections(Detection(self.classes[int(c)], float(s), [float(v) for v in b])
                         for b, s, c in zip(boxes, scores, labels))
        out.gate = None if plan is None else plan.record()
        return out

    def _run(self, x: np.ndarray, thr: float) -> list[tuple[np.ndarray, np.ndarray, np.ndarray]]:
        """(B, C, H, W) input -> per image (boxes (N, 4) input px, scores (N,), labels (N,)), score above ``thr``."""
        outputs = self.session.run(None, {self.input_name: x})
        if self.end_to_end:
            boxes, scores, labels, batch = outputs[0], outputs[1], outputs[2], outputs[3]
            keep = [(batch == i) & (scores > thr) for i in range(len(x))]
            return [(boxes[k], scores[k], labels[k]) for k in keep]
        d = self.contract["decode"]
        return [(det["boxes"], det["scores"], det["labels"])
                for det in decode(outputs[0], outputs[1], thr, d["top_k"], d["nms_iou"])]

    def _run_tiles(self, test: np.ndarray, template: np.ndarray, tiles: list,
                   thr: float) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """The network on ``tiles`` of the registered pair (one run per tile size), each tile's peaks (its
        top-k 3x3 local maxima above ``thr``) moved to image px and kept where centred on a region the
        tile owns (``gate.Tile.owned``: a defect its border cuts is another tile's), then one per-class NMS
        over all tiles and the top-k, as the dense decoding does over the whole image."""
        d = self.contract["decode"]
        boxes, scores, labels = [np.zeros((0, 4), np.float32)], [np.zeros(0, np.float32)], [np.zeros(0, np.int64)]
        for group, batch in _gate.cut(tiles, lambda t, out: tile_input(test, template, t, self.contract, out)).values():
            if self.end_to_end:  # the graph decodes each tile with its NMS
                found = self._run(batch, thr)
            else:
                found = candidates(*self.session.run(OUTPUTS, {self.input_name: batch}), thr, d["top_k"])
            for t, (b, s, c) in zip(group, found):
                b = b.reshape(-1, 4) + np.float32([t.x0, t.y0, t.x0, t.y0])
                own = t.owned(b, _gate.OWN_SLACK_PX)
                boxes.append(b[own])
                scores.append(s[own])
                labels.append(c[own])
        b, s, c = np.concatenate(boxes).astype(np.float32), np.concatenate(scores), np.concatenate(labels).astype(np.int64)
        kept = _nms(b, s, c, d["nms_iou"])[: d["top_k"]]
        return b[kept], s[kept], c[kept]


def load_model(path: str | Path, **kw) -> EdgeModel:
    """An exported model (``model.e2e.onnx``, ``model.onnx`` or ``model.int8.onnx``) with its contract;
    ``kw``: ``EdgeModel``'s ``threads``, ``provider`` (a key of ``contract.PROVIDERS``) and ``spin``."""
    return EdgeModel(path, **kw)


def detect(model: EdgeModel, test: np.ndarray | str | Path, template: np.ndarray | str | Path | None = None,
           score_threshold: float | None = None) -> list[Detection]:
    """Defects on one board: ``test`` (and its defect-free ``template``) as (H, W) uint8 grey arrays or image
    files; detections above ``score_threshold`` (default: the model's, ``evaluate.score_threshold``)."""
    name = str(test) if isinstance(test, (str, Path)) else "image"
    if isinstance(test, (str, Path)):
        test = read_grey(test)
    if isinstance(template, (str, Path)):
        template = read_grey(template)
    return model.detect(test, template, score_threshold, name=name)
