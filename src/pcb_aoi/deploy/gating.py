"""The difference gate's decision (``gate`` in params.yaml, ``pcb_aoi.edge.gate``), made per model file on
validation like the INT8 gate, and written into the file's contract.

Gating is a speed/accuracy trade: a tile misses context a dense pass sees, a region the difference
mask misses is never looked at. So, as with INT8, the choice is measured on the validation boards
(the test split only without a validation split, ``split.allow_no_val``) through the edge app's own
code (``deploy.measure``: ``EdgeModel`` gated and dense, pairs read and registered by the app's
reader): ``gate.mode: tiles`` turns the gate on for the file only when its DeepPCB AP gated is at most
``gate.max_ap_drop`` below its AP dense. The stage that writes a model file decides for it
(``export_onnx``: FP32 ``model.onnx`` and ``model.e2e.onnx``, which give the same detections;
``quantize``: ``model.int8.onnx``) and writes the settings plus the evidence into the contract's
``gate`` block, so the edge app needs nothing but the file; ``pcb-aoi-detect --gate`` overrides it.
Unlike the INT8 gate this one never fails a stage: a gate that costs accuracy is simply off.
"""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import onnx

from ..data.dataset import Dataset
from ..edge.contract import CONTRACT_KEY, MIN_SCORE
from ..edge.runtime import EdgeModel
from ..evaluation.deeppcb import protocol
from ..pipeline.config import GateConfig
from . import measure

SETTINGS = ("diff_threshold", "tolerance_px", "min_size_px", "margin_px", "max_fraction")


def _run(m: EdgeModel, pairs: measure.Pairs) -> tuple[dict, list[dict | None]]:
    """Detections above MIN_SCORE per image id (``measure.detections``) and each pair's gate record."""
    records: list[dict | None] = []
    return measure.detections(m, pairs, MIN_SCORE, records), records


def decide(cfg: GateConfig, model_path: str | Path, ds: Dataset, ids: list[str], split: str) -> dict:
    """The contract's ``gate`` block for ``model_path``: ``mode`` (tiles | none), the settings, and
    ``decided_on`` (split, images, DeepPCB AP dense and gated, the drop, why it is off)."""
    block = {"mode": "none", **{k: getattr(cfg, k) for k in SETTINGS}}
    dense = EdgeModel(model_path, gate="none")
    if not dense.needs_template:
        return block | {"decided_on": {"why": "the model reads single images: no template to compare with"}}
    if cfg.mode == "none":
        return block | {"decided_on": {"why": "gate.mode: none"}}
    gated = EdgeModel(model_path, gate="tiles")
    gated.gate.update({k: getattr(cfg, k) for k in SETTINGS})
    pairs, thr = measure.Pairs.of(ds, ids), dense.contract["score_threshold"]
    gt = ds.annotations(ids, tuple(dense.classes))
    d_preds, _ = _run(dense, pairs)
    g_preds, records = _run(gated, pairs)
    ap_dense, ap_tiles = protocol(gt, d_preds, thr)["ap"], protocol(gt, g_preds, thr)["ap"]
    drop = round(ap_dense - ap_tiles, 6)
    on = drop <= cfg.max_ap_drop
    evidence = {"split": split, "images": len(ids), "deeppcb_ap_dense": ap_dense, "deeppcb_ap_tiles": ap_tiles,
                "ap_drop": drop, "max_ap_drop": cfg.max_ap_drop,
                "run_fraction_mean": round(float(np.mean([r.get("run_fraction", 1.0) for r in records])), 4),
                "dense_fallbacks": sum(r["mode"] == "dense" for r in records)}
    if not on:
        evidence["why"] = f"{split} DeepPCB AP drops {drop:.4f} gated > gate.max_ap_drop {cfg.max_ap_drop}"
    return block | {"mode": "tiles" if on else "none", "decided_on": evidence}


def write_gate(path: str | Path, block: dict) -> None:
    """Set the ``gate`` block of the contract in the ONNX file ``path`` (in place: callers write a temp file)."""
    proto = onnx.load(str(path))
    for p in proto.metadata_props:
        if p.key == CONTRACT_KEY:
            p.value = json.dumps(json.loads(p.value) | {"gate": block})
            break
    else:
        raise ValueError(f"{path}: no {CONTRACT_KEY} metadata to write the gate into")
    onnx.save(proto, str(path))
