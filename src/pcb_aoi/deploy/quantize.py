"""quantize: the FP32 ONNX model as INT8 (ONNX Runtime static quantization, QDQ), with an accuracy gate.

Calibrated on training images (``data/augmented``: the training split and its augmented copies);
activations uint8, weights per channel in the format ``quantize.format`` (``pcb_aoi.edge.int8``: the default
``u8s7`` computes exactly on every CPU; ``u8s8`` saturates on x86 CPUs without VNNI). The format goes
into the model's contract, and the stage checks the written file against it: with a format that
claims to be exact everywhere, no quantized convolution may hold two weights whose products with
uint8 activations can overflow int16.
Only the ops in ``quantize.op_types`` are quantized; the box decoding after the box head (exp, grid
offsets, pixel coordinates up to the image size, where 8 bits would round boxes by several pixels)
and nodes whose name contains one of ``quantize.keep_float`` stay float.

**Gate**: mAP@0.5 on the validation split with the INT8 model may drop at most
``quantize.max_map50_drop`` below the FP32 model's, else the stage fails saying by how much and the
previous ``model.int8.onnx`` stays in place. Shipping INT8 or not is a choice, so it is made on
validation boards, never on the test boards whose scores are reported; only without a validation
split (``split.allow_no_val``) does the gate read the test split. ``gate_split`` in the report says
which split ``fp32_map50`` / ``int8_map50`` / ``map50_drop`` come from. The report names the CPU the
gate was measured on and the CPUs the file is exact on.
"""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import onnx
from onnxruntime.quantization import (CalibrationDataReader, CalibrationMethod, QuantFormat, QuantType,
                                      quantize_static)

from ..data.dataset import Dataset, atomic_file, split_ids
from ..edge import machine
from ..edge.contract import CONTRACT_KEY, INPUT
from ..edge.int8 import FORMATS, INT16_MAX, UINT8_MAX, Int8Format, verdict
from ..edge.runtime import ort_runner, ort_session
from ..evaluation.evaluate import score
from ..model.inference import load_pair, prepare_input
from ..pipeline.config import GateConfig, QuantizeConfig
from . import gating


class AccuracyGateError(RuntimeError):
    pass


class FormatError(RuntimeError):
    """The written INT8 file does not keep the promise of its format (an onnxruntime change, say)."""


class ImageReader(CalibrationDataReader):
    """Feeds calibration inputs one at a time (batch 1, each image at its own size)."""

    def __init__(self, inputs: list[np.ndarray]):
        self._it = iter(inputs)

    def get_next(self) -> dict | None:
        x = next(self._it, None)
        return None if x is None else {INPUT: x[None]}


def calibration_inputs(train_dir: str | Path, n: int, use_template: bool) -> list[np.ndarray]:
    """``n`` training images (original and augmented), evenly spaced over the sorted ids, as model inputs."""
    ds = Dataset.load(train_dir)
    ids = sorted(ds.images["image_id"].tolist())
    if not ids:
        raise ValueError(f"{train_dir}: no training images to calibrate on")
    pick = np.linspace(0, len(ids) - 1, min(n, len(ids))).round().astype(int)
    return [prepare_input(*load_pair(ds, r), use_template) for r in ds.rows([ids[i] for i in pick])]


def box_decode_nodes(proto: onnx.ModelProto) -> set[str]:
    """Nodes fed (directly or not) by the box head's last Conv: the box decoding to pixels."""
    convs = [n for n in proto.graph.node if n.op_type == "Conv" and "box_head" in n.name]
    if not convs:
        return set()
    tensors, names = set(convs[-1].output), set()
    for n in proto.graph.node:  # nodes are topologically sorted
        if tensors.intersection(n.input):
            names.add(n.name)
            tensors.update(n.output)
    return names


def quantized_conv_weights(proto: onnx.ModelProto) -> dict[str, np.ndarray]:
    """Conv node name -> its quantized weights (O, I, kh, kw) as stored (int8 or uint8), for a QDQ model."""
    inits = {t.name: t for t in proto.graph.initializer}
    dq = {n.output[0]: n for n in proto.graph.node if n.op_type == "DequantizeLinear"}
    out = {}
    for n in proto.graph.node:
        if n.op_type == "Conv" and len(n.input) > 1 and n.input[1] in dq and dq[n.input[1]].input[0] in inits:
            out[n.name] = onnx.numpy_helper.to_array(inits[dq[n.input[1]].input[0]])
    return out


def int16_pair_bounds(weights: dict[str, np.ndarray]) -> dict[str, int | None]:
    """Per quantized Conv (``quantized_conv_weights``): the largest |sum| of two uint8 x int8 products that an x86 CPU without VNNI
    adds into int16 (None: uint8 weights, which ONNX Runtime never adds that way).

    Which two products are paired depends on how ONNX Runtime packs the weights, so this takes the two
    largest |weights| of each output channel: an upper bound for any pairing.
    """
    bounds = {}
    for name, w in weights.items():
        if w.dtype == np.uint8:
            bounds[name] = None
            continue
        a = np.sort(np.abs(w.reshape(len(w), -1).astype(np.int64)), axis=1)
        top2 = a[:, -2:].sum(1) if a.shape[1] > 1 else a[:, -1]
        bounds[name] = int(UINT8_MAX * top2.max())
    return bounds


def check_format(proto: onnx.ModelProto, fmt: Int8Format, path: Path) -> None:
    """Raise FormatError when ``proto`` breaks what ``fmt`` promises about its weights."""
    weights = quantized_conv_weights(proto)
    if not weights:
        raise FormatError(f"{path}: no quantized convolution found; quantize.op_types must include Conv")
    lo, hi = fmt.weight_range
    for name, w in weights.items():
        if w.dtype != np.dtype(fmt.weights) or w.min() < lo or w.max() > hi:
            raise FormatError(f"{path}: Conv {name} has {w.dtype} weights in [{w.min()}, {w.max()}], outside format "
                              f"{fmt.name}'s {fmt.weights} [{lo}, {hi}]")
    if not fmt.needs_vnni_on_x86:
        over = {k: v for k, v in int16_pair_bounds(weights).items() if v is not None and v > INT16_MAX}
        if over:
            raise FormatError(f"{path}: format {fmt.name} must not overflow int16, but pairs of products reach "
                              f"{over} (> {INT16_MAX})")


def quantize(cfg: QuantizeConfig, fp32: Path, out: Path, inputs: list[np.ndarray]) -> list[str]:
    """Write the INT8 QDQ model of ``fp32`` to ``out`` in ``cfg.format`` (metadata copied, the contract
    extended with the format); returns the nodes kept float."""
    fmt = FORMATS[cfg.format]
    proto = onnx.load(str(fp32))
    decode = box_decode_nodes(proto)
    keep = [n.name for n in proto.graph.node if n.name in decode or any(k in n.name for k in cfg.keep_float)]
    quantize_static(
        str(fp32), str(out), ImageReader(inputs), quant_format=QuantFormat.QDQ, op_types_to_quantize=list(cfg.op_types),
        per_channel=True, reduce_range=fmt.reduce_range, activation_type=QuantType.QUInt8,
        weight_type=QuantType.QUInt8 if fmt.weights == "uint8" else QuantType.QInt8, nodes_to_exclude=keep,
        calibrate_method=CalibrationMethod.Percentile if cfg.calibration == "percentile" else CalibrationMethod.MinMax,
    )
    q = onnx.load(str(out))
    check_format(q, fmt, out)
    del q.metadata_props[:]
    for p in proto.metadata_props:  # the preprocessing contract travels with the INT8 model too
        value = p.value
        if p.key == CONTRACT_KEY:
            value = json.dumps(json.loads(value) | {"precision": "int8", "int8": fmt.contract()})
        q.metadata_props.add(key=p.key, value=value)
    q.metadata_props.add(key="quantization", value=f"int8 static QDQ (onnxruntime), weights per channel, {fmt.name}")
    onnx.save(q, str(out))
    return keep


def record_gate(path: Path, metrics: dict) -> None:
    """Add the accuracy gate's numbers to the headline metrics in ``path``'s contract (``provenance.metrics``,
    ``pipeline.provenance``): the INT8 file's own measurement beside the checkpoint's copied from the FP32 file."""
    proto = onnx.load(str(path))
    for p in proto.metadata_props:
        if p.key == CONTRACT_KEY:
            c = json.loads(p.value)
            prov = c.setdefault("provenance", {})
            prov["metrics"] = {**prov.get("metrics", {}), **metrics}
            p.value = json.dumps(c)
    onnx.save(proto, str(path))


def run(cfg: QuantizeConfig, fp32_path: str | Path, train_dir: str | Path, clean_dir: str | Path,
        split_dir: str | Path, out: str | Path, gate: GateConfig | None = None) -> dict:
    """Quantize, gate on accuracy, and (``gate``) decide the INT8 file's difference gate on the same split
    (``gating.decide``; the FP32 file's decision would not do: INT8 scores differ)."""
    fp32_path = Path(fp32_path)
    if not fp32_path.is_file():
        raise FileNotFoundError(f"{fp32_path}: ONNX model not found; run the export_onnx stage first")
    meta = onnx.load(str(fp32_path), load_external_data=False).metadata_props
    contract = next((json.loads(p.value) for p in meta if p.key == CONTRACT_KEY), None)
    if contract is None:
        raise ValueError(f"{fp32_path}: no {CONTRACT_KEY} metadata; re-run the export_onnx stage")
    use_template, classes = contract["needs_template"], tuple(contract["classes"])
    ds, ids, gate_split = Dataset.load(clean_dir), split_ids(split_dir, "val"), "val"
    if not ids:  # no validation split (split.allow_no_val: true): the only held-out boards are the test ones
        ids, gate_split = split_ids(split_dir, "test"), "test"
    if not ids:
        raise ValueError(f"{split_dir}/split.parquet: the val and test splits are empty; the accuracy gate needs one")
    inputs = calibration_inputs(train_dir, cfg.calibration_images, use_template)
    fmt = FORMATS[cfg.format]
    with atomic_file(out) as tmp:
        keep = quantize(cfg, fp32_path, tmp, inputs)
        fp32_m, _ = score(ort_runner(ort_session(fp32_path)), ds, ids, classes, use_template, 0.5)
        int8_m, _ = score(ort_runner(ort_session(tmp)), ds, ids, classes, use_template, 0.5)
        drop = round((fp32_m["map50"] or 0.0) - (int8_m["map50"] or 0.0), 6)
        status, why = verdict(fmt.contract(), machine.cpu())
        if drop > cfg.max_map50_drop:
            fix = (why if status == "saturates" else "keep more layers in float (quantize.keep_float), try "
                   "quantize.calibration: percentile, or more calibration_images")
            raise AccuracyGateError(
                f"INT8 accuracy gate failed: {gate_split} mAP@0.5 {int8_m['map50']} vs FP32 {fp32_m['map50']}, a drop "
                f"of {drop:.4f} > quantize.max_map50_drop {cfg.max_map50_drop}; {fix}. Measured on {machine.cpu()}. "
                f"Kept the previous {out}")
        record_gate(tmp, {"int8_gate_split": gate_split, "int8_map50": int8_m["map50"], "fp32_map50": fp32_m["map50"]})
        gate_block = None
        if gate is not None:
            gate_block = gating.decide(gate, tmp, ds, ids, gate_split)
            gating.write_gate(tmp, gate_block)
        size = tmp.stat().st_size
    return {"gate": gate_block, "calibration_images": len(inputs), "gate_split": gate_split, "gate_images": len(ids),
            "fp32_map50": fp32_m["map50"], "int8_map50": int8_m["map50"], "map50_drop": drop, "max_map50_drop": cfg.max_map50_drop,
            "fp32_map": fp32_m["map"], "int8_map": int8_m["map"], "nodes_kept_float": len(keep),
            "size_mb": round(size / 2**20, 3), "fp32_size_mb": round(fp32_path.stat().st_size / 2**20, 3),
            "format": fmt.name, "exact_on": fmt.summary,
            # The gate's numbers hold on another CPU only where the format is exact there too.
            "gate_measured_on": machine.describe(), "exact_on_gate_machine": status}
