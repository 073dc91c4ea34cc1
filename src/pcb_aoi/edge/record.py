"""The result record: what ``pcb-aoi-detect`` writes for each image, one JSON object per line.

One versioned schema (``SCHEMA``), documented in ``docs/result-record.md``; later fields extend it and
readers ignore keys they do not know. Torch-free.

ok:     {"schema", "file", "status": "ok", "verdict": "pass" | "fail", "threshold", "counts": {class: n},
         "detections": [{"id", "class", "score", "box"}], "ms", "model": {...}[, "gate": {...}]}
error:  {"schema", "file", "status": "error", "error", "model": {...}}

- ``id``: the detection's index in the record (0, 1, ... in decreasing score); an operator's verdict
  names a detection by (file, id).
- ``verdict``: ``fail`` when any detection is at or above the operating threshold (``threshold``: the
  one the app used, the model's unless ``--score``), else ``pass``. ``counts`` has every class of the
  model, 0 included.
- ``model``: where the model came from (``EdgeModel.provenance``): ``version`` (registered, or
  ``"unregistered"``), ``commit``, ``dirty``, ``params_hash``, ``params_sections``, ``data`` (DVC md5 of
  clean/split/augmented), ``metrics``, ``score_threshold``, ``export_commit``, ``export_dirty``, ``notes``
  (``pcb_aoi.pipeline.provenance``; docs/result-record.md says what each means).
- ``gate`` (difference-gated models, ``gate.py``): how the pair was run, ``{"mode": "tiles", "tiles": n,
  "run_fraction": f}`` (the network ran on n tiles around the places that differ from the template,
  fraction f of the image) or ``{"mode": "dense", "why": "..."}`` (the whole image, and why: the
  difference covers too much of it, e.g. a failed registration). Absent when the gate is off.
"""
from __future__ import annotations

SCHEMA = "pcb-aoi.result/1"


def ok_record(file: str, detections: list, threshold: float, classes: list[str], ms: float,
              model: dict | None = None, gate: dict | None = None) -> dict:
    """The record of an inspected image; ``detections``: ``runtime.Detection`` objects in decreasing score;
    ``gate``: ``gate.Plan.record()`` when the model runs gated."""
    counts = dict.fromkeys(classes, 0)
    dets = []
    for i, d in enumerate(detections):
        counts[d.cls] = counts.get(d.cls, 0) + 1
        dets.append({"id": i, **d.to_dict()})
    out = {"schema": SCHEMA, "file": file, "status": "ok", "verdict": "fail" if dets else "pass",
           "threshold": round(float(threshold), 6), "counts": counts, "detections": dets, "ms": round(ms, 2),
           "model": model or {}}
    if gate is not None:
        out["gate"] = gate
    return out


def error_record(file: str, error: str, model: dict | None = None) -> dict:
    """The record of an image that could not be inspected; ``error`` names why."""
    return {"schema": SCHEMA, "file": file, "status": "error", "error": error, "model": model or {}}
