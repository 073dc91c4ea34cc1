"""export_onnx: the checkpoint as ONNX, with parity gates against PyTorch.

Two files: the raw model (``heatmap``, ``boxes`` maps; the INT8 and benchmark stages use it) and an
end-to-end model with decoding and NMS in the graph (``e2e.EndToEnd``; final detections for the
edge app). Both have dynamic batch and image size axes and carry the preprocessing contract as
ONNX metadata (``pcb_aoi_contract``, its names in ``pcb_aoi.edge.contract``; read by ``pcb_aoi.edge``).
The gates run PyTorch and ONNX Runtime on held-out images at a batch size other than the export one:
raw outputs within ``parity_atol``, and the same detections (classes, boxes within 0.5 px, scores
within ``parity_atol``), or the stage fails saying by how much and the previous files stay in place.
"""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import torch

from ..data.dataset import Dataset, atomic_file
from ..edge.contract import CONTRACT_FORMAT, CONTRACT_KEY, E2E_OUTPUTS, INPUT, MIN_SCORE, NMS_IOU, OUTPUTS, TOP_K
from ..edge.preprocess import PAD_MULTIPLE, PAD_VALUES, prepare_input, stack_padded
from ..edge.runtime import ort_session
from ..model import checkpoint
from ..model.network import DOWNSAMPLING
from ..model.inference import decode, load_pair
from ..pipeline import provenance
from ..pipeline.config import ExportConfig, GateConfig
from . import e2e, gating

PARITY_MIN_SCORE = 0.05
BOX_TOLERANCE_PX = 0.5


class ParityError(RuntimeError):
    pass


def contract(ckpt: dict, score_threshold: float, end_to_end: bool, evaluate: dict | None = None) -> dict:
    """What a runtime without this package needs to feed the model and read its outputs, and where the
    model came from (``provenance``: ``pipeline.provenance.exported``; ``evaluate``: the evaluate stage's
    metrics, reports/metrics.json, or None)."""
    spec = ckpt["input_spec"]
    return {
        "format": CONTRACT_FORMAT,
        "classes": list(ckpt["classes"]),
        "channels": spec["channels"],  # test/255, template/255, (test - template)/255
        "needs_template": bool(spec["use_template"]),
        "image": "uint8 grey (PIL convert('L')), copper dark, any size; template the same size",
        "scale": 1 / 255,
        "pad_multiple": PAD_MULTIPLE,  # pad bottom/right to a multiple of this
        "tile_multiple": DOWNSAMPLING,  # a window cut at multiples of this computes what the whole image does
        "pad_values": list(PAD_VALUES[: len(spec["channels"])]),  # per channel, after scaling
        # > 0: move the template onto the test image first (preprocess.register_template, this search range)
        "register_max_px": int(spec.get("register_max_px", 0)),
        "outputs": "detections" if end_to_end else "raw",
        "output_names": E2E_OUTPUTS if end_to_end else OUTPUTS,
        "decode": {"top_k": TOP_K, "nms_iou": NMS_IOU, "min_score": MIN_SCORE},
        "score_threshold": score_threshold,  # default operating point (evaluate.score_threshold)
        "precision": "fp32",  # the quantize stage writes int8 and the INT8 format (pcb_aoi.edge.int8) into its copy
        "model_config": ckpt["model_config"],
        "provenance": provenance.exported(ckpt.get("provenance", {}), score_threshold, evaluate),
    }


def export(model: torch.nn.Module, ckpt: dict, example: torch.Tensor, path: Path, opset: int,
           end_to_end: bool = False, score_threshold: float = 0.3, evaluate: dict | None = None) -> None:
    """Write ``model`` (raw maps) or ``EndToEnd(model)`` (final detections) to ``path`` with metadata."""
    net, outputs = (e2e.EndToEnd(model), E2E_OUTPUTS) if end_to_end else (model, OUTPUTS)
    if end_to_end:
        axes = {o: {0: "detections"} for o in E2E_OUTPUTS[:-1]} | {E2E_OUTPUTS[-1]: {0: "batch"}}
    else:
        axes = {o: {0: "batch", 2: "out_height", 3: "out_width"} for o in OUTPUTS}
    torch.onnx.export(
        net.eval(), (example,), str(path), input_names=[INPUT], output_names=outputs, opset_version=opset,
        dynamic_axes={INPUT: {0: "batch", 2: "height", 3: "width"}, **axes},
        dynamo=False,  # the TorchScript exporter needs no onnxscript and writes a single file
    )
    proto = onnx.load(str(path))
    meta = {"classes": json.dumps(ckpt["classes"]), "input_spec": json.dumps(ckpt["input_spec"]),
            "model_config": json.dumps(ckpt["model_config"]), "producer": "pcb-aoi",
            CONTRACT_KEY: json.dumps(contract(ckpt, score_threshold, end_to_end, evaluate))}
    for k, v in meta.items():
        proto.metadata_props.add(key=k, value=v)
    onnx.checker.check_model(proto, full_check=True)
    onnx.save(proto, str(path))


def match_detections(dt: list[dict], do: list[dict]) -> tuple[bool, float, float]:
    """Pair two runtimes' detections per image -> (same classes and counts, max box px, max score diff).

    Each detection is paired with the closest unpaired one of its class: scores that differ in
    the 7th digit may swap the order of near ties, which is not a difference a user could see.
    """
    same, box, score = True, 0.0, 0.0
    for a, b in zip(dt, do):
        ab, bb = np.asarray(a["boxes"], np.float64).reshape(-1, 4), np.asarray(b["boxes"], np.float64).reshape(-1, 4)
        al, bl = np.asarray(a["labels"]), np.asarray(b["labels"])
        if len(al) != len(bl) or sorted(al.tolist()) != sorted(bl.tolist()):
            same = False
            continue
        free = np.ones(len(bl), bool)
        for i in range(len(al)):
            dist = np.where(free & (bl == al[i]), np.abs(bb - ab[i]).max(1), np.inf)
            j = int(dist.argmin())
            free[j] = False
            box = max(box, float(dist[j]))
            score = max(score, abs(float(np.asarray(a["scores"])[i]) - float(np.asarray(b["scores"])[j])))
    return same, box, score


def parity(model: torch.nn.Module, sess: ort.InferenceSession, x: np.ndarray, atol: float) -> dict:
    """Compare raw outputs and decoded detections of PyTorch and ONNX Runtime on batch ``x``."""
    with torch.no_grad():
        th, tb = (t.numpy() for t in model(torch.from_numpy(x)))
    oh, ob = sess.run(OUTPUTS, {INPUT: x})
    diff = {"heatmap": float(np.abs(th - oh).max()), "boxes": float(np.abs(tb - ob).max())}
    # Compare detections a user could act on: below 5% the flip of a score across the cut-off
    # by 1e-6 would read as a parity failure without meaning anything.
    dt = decode(torch.from_numpy(th), torch.from_numpy(tb), score_threshold=PARITY_MIN_SCORE)
    do = decode(torch.from_numpy(oh), torch.from_numpy(ob), score_threshold=PARITY_MIN_SCORE)
    same, box, _ = match_detections(dt, do)
    same = same and box <= BOX_TOLERANCE_PX
    report = {"images": int(len(x)), "atol": atol, "max_abs_diff": diff, "same_detections": same,
              "detections": int(sum(len(d["labels"]) for d in dt))}
    if max(diff.values()) > atol or not same:
        raise ParityError(f"ONNX parity failed: max |torch - onnxruntime| = {diff} (allowed {atol}), "
                          f"same detections: {same} (max box difference {box:.4g} px)")
    return report


def split_detections(outputs: list[np.ndarray], min_score: float = 0.0) -> list[dict]:
    """End-to-end model outputs -> per image {boxes, scores, labels} with score > ``min_score``."""
    boxes, scores, labels, batch, count = outputs
    out = []
    for i in range(len(count)):
        keep = (batch == i) & (scores > min_score)
        out.append({"boxes": boxes[keep], "scores": scores[keep], "labels": labels[keep]})
    return out


def parity_e2e(model: torch.nn.Module, sess: ort.InferenceSession, x: np.ndarray, atol: float) -> dict:
    """The end-to-end graph in ONNX Runtime against PyTorch + ``model.inference.decode`` on batch ``x``."""
    with torch.no_grad():
        dt = decode(*model(torch.from_numpy(x)), score_threshold=PARITY_MIN_SCORE, top_k=TOP_K, nms_iou=NMS_IOU)
    outputs = sess.run(E2E_OUTPUTS, {INPUT: x})
    do = split_detections(outputs, PARITY_MIN_SCORE)
    same, box, score = match_detections(dt, do)
    counts = [len(d["labels"]) for d in dt], [len(d["labels"]) for d in do]
    report = {"images": int(len(x)), "same_detections": same, "max_box_diff_px": box, "max_score_diff": score,
              "detections": int(sum(counts[0]))}
    if not same or box > BOX_TOLERANCE_PX or score > atol or len(outputs[4]) != len(x):
        raise ParityError(f"end-to-end ONNX parity failed: detections per image torch {counts[0]} vs onnxruntime "
                          f"{counts[1]}, same classes: {same}, max box difference {box:.4g} px (allowed "
                          f"{BOX_TOLERANCE_PX}), max score difference {score:.4g} (allowed {atol})")
    return report


def run(cfg: ExportConfig, model_path: str | Path, clean_dir: str | Path, image_ids: list[str],
        onnx_out: str | Path, e2e_out: str | Path | None = None, score_threshold: float = 0.3,
        evaluate: dict | None = None, gate: GateConfig | None = None,
        gate_ids: tuple[str, list[str]] | None = None) -> dict:
    """Export the checkpoint ``model_path``, check parity, and (``gate``, on ``gate_ids`` = (split name,
    image ids)) decide the difference gate of the FP32 files (``gating.decide``: the raw model's detections,
    which the end-to-end one matches). ``evaluate``: the evaluate stage's metrics (reports/metrics.json) for
    the models' provenance, None: their test metrics are unknown."""
    model, ckpt = checkpoint.load(model_path)
    use_template = ckpt["input_spec"]["use_template"]
    ds = Dataset.load(clean_dir)
    x = stack_padded([prepare_input(*load_pair(ds, r), use_template) for r in ds.rows(image_ids[: cfg.parity_images])])
    example = torch.from_numpy(x[:1])  # exported at batch 1, checked at batch N
    with atomic_file(onnx_out) as tmp:
        export(model, ckpt, example, tmp, cfg.opset, score_threshold=score_threshold, evaluate=evaluate)
        report = parity(model, ort_session(tmp), x, cfg.parity_atol)
        block = None
        if gate is not None and gate_ids is not None:
            block = gating.decide(gate, tmp, ds, gate_ids[1], gate_ids[0])
            gating.write_gate(tmp, block)
            report["gate"] = block
        if e2e_out:  # both files are replaced only when both gates pass
            with atomic_file(e2e_out) as tmp_e2e:
                export(model, ckpt, example, tmp_e2e, cfg.opset, end_to_end=True, score_threshold=score_threshold,
                       evaluate=evaluate)
                if block is not None:
                    gating.write_gate(tmp_e2e, block)
                report["end_to_end"] = parity_e2e(model, ort_session(tmp_e2e), x, cfg.parity_atol)
                report["end_to_end"]["size_mb"] = round(tmp_e2e.stat().st_size / 2**20, 3)
    report["size_mb"] = round(Path(onnx_out).stat().st_size / 2**20, 3)
    report["opset"] = cfg.opset
    return report
