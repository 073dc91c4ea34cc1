"""Difference-gated inference (``pcb_aoi.edge.gate``) against dense, on DeepPCB-style pairs, in one run:

- per setting (each ``--margins`` value with each ``--max-fractions`` value, ``--set`` for the others):
  the fraction of the image the network runs on, pairs that fall back to dense, and how many dense
  detections the gated run reproduces (same class, IoU >= 0.9, score within 0.05): the receptive field
  shows as detections near a tile border that differ from dense;
- DeepPCB AP (``evaluation.deeppcb``, ``X_not/X.txt`` labels) dense and gated when the pairs have labels;
- stream FPS (pairs / wall time through the app's loop, ``edge.inspector.Inspector``, for each ``--workers``
  value) dense and gated (the model's settings, or ``--stream-margin`` / ``--stream-max-fraction``), side
  by side, alternating rounds so all see the same machine load;
- where the time of a pair goes, ms p50 per stage, one pair at a time: file decode, registration,
  difference + plan, network (ONNX Runtime), input + decoding + NMS.

    python benchmarks/gate.py --models /path/model.int8.onnx /path/model.onnx \\
        --pairs /data/deeppcb-trainval/PCBData --limit 200 --margins 16 32 48 64 --set min_size_px=2 --out gate.json
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

import numpy as np

from pcb_aoi.edge import gate, machine
from pcb_aoi.edge.inspector import Inspector
from pcb_aoi.edge.preprocess import read_pair
from pcb_aoi.edge.runtime import EdgeModel, decode, prepare_input
from pcb_aoi.evaluation.deeppcb import iou, protocol

CLASSES = ["open", "short", "mousebite", "spur", "copper", "pin-hole"]


def find_pairs(folder: Path, limit: int) -> list[tuple[Path, Path, Path | None]]:
    """(test, template, DeepPCB label file or None), every len/limit-th pair of the sorted list."""
    out = []
    for test in sorted(folder.rglob("*_test.*")):
        temp = next(iter(sorted(test.parent.glob(test.stem.removesuffix("_test") + "_temp.*"))), None)
        label = test.parent.with_name(test.parent.name + "_not") / (test.stem.removesuffix("_test") + ".txt")
        if temp is not None:
            out.append((test, temp, label if label.is_file() else None))
    step = max(len(out) // limit, 1) if limit else 1
    return out[::step][:limit or None]


def labels(path: Path) -> dict:
    rows = np.loadtxt(path, ndmin=2).reshape(-1, 5)
    return {"boxes": rows[:, :4].astype(np.float32), "labels": rows[:, 4].astype(np.int64) - 1}


def as_arrays(dets) -> dict:
    return {"boxes": np.asarray([d.box for d in dets], np.float32).reshape(-1, 4),
            "scores": np.asarray([d.score for d in dets], np.float32),
            "labels": np.asarray([CLASSES.index(d.cls) for d in dets], np.int64)}


def inside(boxes: np.ndarray, tiles: list | None) -> np.ndarray:
    """(N,) bool: the box lies wholly inside one of the tiles (all of them when the pair ran dense)."""
    if tiles is None:
        return np.ones(len(boxes), bool)
    ok = np.zeros(len(boxes), bool)
    for t in tiles:
        ok |= (boxes[:, 0] >= t.x0) & (boxes[:, 1] >= t.y0) & (boxes[:, 2] <= t.x1) & (boxes[:, 3] <= t.y1)
    return ok


def agreement(dense: dict, gated: dict) -> int:
    """Dense detections the gated run reproduces: same class, IoU >= 0.9, score within 0.05."""
    if not len(dense["boxes"]) or not len(gated["boxes"]):
        return 0
    m = iou(dense["boxes"], gated["boxes"])
    ok = (m >= 0.9) & (dense["labels"][:, None] == gated["labels"][None]) & \
        (np.abs(dense["scores"][:, None] - gated["scores"][None]) <= 0.05)
    return int(ok.any(1).sum())


class Timed:
    """An ONNX Runtime session whose ``run`` calls are timed (the network's share of a pair)."""

    def __init__(self, sess):
        self.sess, self.s = sess, 0.0

    def run(self, *a, **k):
        t0 = time.perf_counter()
        try:
            return self.sess.run(*a, **k)
        finally:
            self.s += time.perf_counter() - t0


def profile(m: EdgeModel, pairs, thr: float) -> dict:
    """ms p50 per stage of one pair (one at a time): decode files, register, diff + plan, network, decoding."""
    timed, raw_sess = Timed(m.session), m.session
    m.session = timed
    rows = []
    try:
        for test_path, temp_path, _ in pairs:
            t0 = time.perf_counter()
            test, template = read_pair(test_path, temp_path)
            t1 = time.perf_counter()
            template = m.register(test, template)
            t2 = time.perf_counter()
            p = m.plan(test, template)
            t3 = time.perf_counter()
            timed.s = 0.0
            m.detect(test, template, thr, registered=True, plan=p)
            t4 = time.perf_counter()
            rest = (t4 - t3) - timed.s
            rows.append([t1 - t0, t2 - t1, t3 - t2, timed.s, rest, t4 - t0])
    finally:
        m.session = raw_sess
    ms = np.median(np.asarray(rows) * 1e3, axis=0)
    return dict(zip(["file_decode", "register", "diff_plan", "network", "prepare_decode_nms", "total"],
                    [round(float(v), 2) for v in ms]))


def stream_fps(inspector: Inspector, pairs, n: int) -> float:
    """Pairs / wall time through the app's loop (``Inspector.process_all``, workers already started)."""
    tests = [pairs[i % len(pairs)][0] for i in range(n)]
    t0 = time.perf_counter()
    done = sum(r["status"] == "ok" for r in inspector.process_all(tests))
    return done / (time.perf_counter() - t0)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--models", nargs="+", type=Path, required=True)
    ap.add_argument("--pairs", type=Path, required=True, help="folder of X_test.* / X_temp.* pairs (DeepPCB's PCBData)")
    ap.add_argument("--limit", type=int, default=200, help="pairs, spread over the sorted list")
    ap.add_argument("--margins", nargs="+", type=int, default=[16, 32, 48, 64])
    ap.add_argument("--max-fractions", nargs="+", type=float, default=None,
                    help="gate.max_fraction values tried with each margin (default: the model's)")
    ap.add_argument("--set", nargs="*", default=[], metavar="KEY=INT",
                    help="gate settings for every gated run, e.g. min_size_px=2 diff_threshold=48")
    ap.add_argument("--tile-multiple", type=int, default=None,
                    help="override the contract's tile_multiple (a model exported before it was written uses its "
                         "pad multiple, 32; the network's downsampling is 16)")
    ap.add_argument("--stream-pairs", type=int, default=200)
    ap.add_argument("--stream-margin", type=int, default=None, help="margin of the timed gated runs (default: the model's)")
    ap.add_argument("--stream-max-fraction", type=float, default=None, help="max_fraction of the timed gated runs")
    ap.add_argument("--rounds", type=int, default=3, help="alternating dense / gated stream rounds")
    ap.add_argument("--threads", type=int, default=0, help="ONNX Runtime threads (0: all cores, or cores / workers)")
    ap.add_argument("--workers", type=int, nargs="+", default=[1], help="the app's worker processes in the stream "
                    "runs (pcb-aoi-detect --workers; 1: one process with a reader thread); several values are "
                    "timed side by side")
    ap.add_argument("--out", type=Path)
    a = ap.parse_args()
    pairs = find_pairs(a.pairs, a.limit)
    if not pairs:
        raise SystemExit(f"{a.pairs}: no X_test.* / X_temp.* image pairs")
    gt = {str(t): labels(lab) for t, _, lab in pairs if lab is not None}
    report = {"command": "python " + " ".join(sys.argv), "load_average_before": list(os.getloadavg()),
              "machine": machine.describe(), "cpu_count": os.cpu_count(), "pairs": len(pairs),
              "image_size": list(read_pair(*pairs[0][:2])[0].shape[::-1]), "models": {}}
    for path in a.models:
        dense, gated = EdgeModel(path, threads=a.threads, gate="none"), EdgeModel(path, threads=a.threads, gate="tiles")
        if a.tile_multiple:
            gated.gate["tile_multiple"] = a.tile_multiple
        gated.gate.update({k: int(v) for k, v in (kv.split("=", 1) for kv in a.set)})
        shipped = dict(gated.gate)
        thr = dense.contract["score_threshold"]
        res = {"score_threshold": thr, "gate_settings": dict(gated.gate), "settings": {}}
        inputs = []
        for test_path, temp_path, _ in pairs:
            test, template = read_pair(test_path, temp_path)
            inputs.append((str(test_path), test, dense.register(test, template)))
        d_dets = {k: as_arrays(dense.detect(t, tp, 0.01, registered=True)) for k, t, tp in inputs}
        if gt:
            res["dense_deeppcb_ap"] = protocol(gt, d_dets, thr)["ap"]
        for margin, limit in [(m, f) for m in a.margins for f in (a.max_fractions or [shipped["max_fraction"]])]:
            gated.gate.update(margin_px=margin, max_fraction=limit)
            g_dets, run, fallback, same, n_in, n_dense = {}, [], 0, 0, 0, 0
            for k, t, tp in inputs:
                dets = gated.detect(t, tp, 0.01, registered=True)
                g_dets[k] = as_arrays(dets)
                run.append(dets.gate.get("run_fraction", 1.0))
                fallback += dets.gate["mode"] == "dense"
                # dense detections above the threshold lying wholly inside a tile: does the tile reproduce them?
                d = {n: v[d_dets[k]["scores"] > thr] for n, v in d_dets[k].items()}
                tiles = gated.plan(t, tp).tiles
                keep = inside(d["boxes"], tiles)
                n_dense, n_in = n_dense + len(keep), n_in + int(keep.sum())
                g = {n: v[g_dets[k]["scores"] > thr] for n, v in g_dets[k].items()}
                same += agreement({n: v[keep] for n, v in d.items()}, g)
            row = {"run_fraction_mean": round(float(np.mean(run)), 4), "dense_fallbacks": fallback,
                   "dense_detections_in_tiles": f"{n_in}/{n_dense}",
                   "in_tile_detections_reproduced": f"{same}/{n_in}"}
            if gt:
                row["deeppcb_ap"] = protocol(gt, g_dets, thr)["ap"]
                row["ap_drop"] = round(res["dense_deeppcb_ap"] - row["deeppcb_ap"], 6)
            res["settings"][f"margin_px={margin} max_fraction={limit}"] = row
            print(path.name, "margin", margin, "max_fraction", limit, row, flush=True)
        gated.gate = shipped | {k: v for k, v in zip(("margin_px", "max_fraction"), (a.stream_margin, a.stream_max_fraction))
                                if v is not None}
        res["timed_gate_settings"] = dict(gated.gate)
        res["profile_ms_p50"] = {"dense": profile(dense, pairs[:50], thr), "gated": profile(gated, pairs[:50], thr)}
        args = argparse.Namespace(template=None, template_dir=None, score=None, overlay_dir=None)
        apps = {(w, mode): Inspector(m, args, w) for w in a.workers for mode, m in (("dense", dense), ("gated", gated))}
        fps = {k: [] for k in apps}
        try:
            for app in apps.values():
                stream_fps(app, pairs, 10)  # start the workers, warm up
            for _ in range(a.rounds):  # alternating: every setting sees the same machine load
                for k, app in apps.items():
                    fps[k].append(stream_fps(app, pairs, a.stream_pairs))
        finally:
            for app in apps.values():
                app.close()
        res["stream"] = {}
        for w in a.workers:
            row = {mode: {"median": round(float(np.median(fps[w, mode])), 2), "runs": [round(x, 2) for x in fps[w, mode]]}
                   for mode in ("dense", "gated")}
            row["gated_vs_dense"] = round(row["gated"]["median"] / row["dense"]["median"], 3)
            res["stream"][f"workers={w}"] = row
        print(path.name, res["profile_ms_p50"], res["stream"], flush=True)
        report["models"][path.name] = res
    if a.out:
        a.out.write_text(json.dumps(report, indent=1) + "\n")
    print(json.dumps(report, indent=1))


if __name__ == "__main__":
    main()
