"""Our shipped models and public peer detectors, side by side in one run on DeepPCB pairs at 640x640.

Rows: PyTorch eager (``model.pt``), ONNX Runtime FP32 (``model.onnx``) and INT8 (``model.int8.onnx``), both
also difference-gated (``onnxruntime+gate``: ``pcb_aoi.edge.gate`` with the settings in their contracts), then
YOLOv8n and YOLO11n (``pcb_aoi.deploy.peer``: built from their yaml with random weights, offline, exported
FP32 and quantized to our INT8 format), each timed by the benchmark stage's loops (``deploy.measure``):
``fps`` = pairs / wall time of the edge app's read-ahead stream, p50/p95/p99 one pair at a time with the
file decoding. Ours read test + template, the peers only the test image (on 3 channels). Ratios are to
ORT FP32; the markdown table goes to stdout, everything to ``--out`` (JSON) with the CPU model, its
instruction sets and the load average before and after (numbers from a busy machine are noisy: the
ratios, measured in the same minutes, are the claim).

    pip install 'pcb-aoi[peer]'   # ultralytics (AGPL-3.0), for the peer rows only
    python benchmarks/side_by_side.py --models models --pairs /path/to/DeepPCB --out side_by_side.json

``--models``: the folder with ``model.pt``, ``model.onnx`` and ``model.int8.onnx`` (the pipeline's
``models/``). Our network is fully convolutional and its contract takes any image size (padded to
a multiple of 32), so a model trained on 256 px synthetic boards runs at DeepPCB's 640 px too (the script
checks the ONNX input is not fixed to another size). ``--pairs``: any folder holding ``X_test.*`` /
``X_temp.*`` pairs (DeepPCB's ``PCBData``); the first ``--images`` sorted pairs are used.
Without ultralytics the peer rows are left out (said on stderr) unless ``--peers`` names one.
"""
from __future__ import annotations

import argparse
import importlib.util
import json
import os
import sys
import tempfile
import time
from pathlib import Path

import torch

from pcb_aoi.data.dataset import write_json
from pcb_aoi.deploy import measure, peer
from pcb_aoi.edge import machine
from pcb_aoi.edge.runtime import EdgeModel, read_grey
from pcb_aoi.model import checkpoint
from pcb_aoi.model.inference import torch_runner

CALIBRATION_IMAGES = 8


def find_pairs(folder: Path, limit: int) -> measure.Pairs:
    tests, templates = [], {}
    for test in sorted(folder.rglob("*_test.*")):
        temp = next(iter(sorted(test.parent.glob(test.stem.removesuffix("_test") + "_temp.*"))), None)
        if temp is not None:
            tests.append(test)
            templates[test] = temp
        if len(tests) == limit:
            break
    if not tests:
        raise SystemExit(f"{folder}: no X_test.* / X_temp.* image pairs found")
    return measure.Pairs([t.stem for t in tests], tests, templates)


def check_size(m: EdgeModel, h: int, w: int) -> None:
    """Our contract pads any size to a multiple of 32; refuse a file exported with a fixed other size."""
    shape = m.session.get_inputs()[0].shape[2:]
    if any(isinstance(s, int) and s != want for s, want in zip(shape, (h, w))):
        raise SystemExit(f"{m.path}: input fixed to {shape}, the pairs are {h}x{w}; export it with dynamic axes")


def timed(model, pairs: measure.Pairs, a: argparse.Namespace) -> dict:
    workers = a.workers if hasattr(model, "worker_spec") else 1  # PyTorch: in one process
    return {**measure.latency(model, pairs, a.warmup, a.runs), **measure.stream(model, pairs, a.stream, workers=workers)}


def ours(a: argparse.Namespace, pairs: measure.Pairs, threads: int, h: int, w: int) -> tuple[list[dict], dict]:
    fp32 = EdgeModel(a.models / "model.onnx", threads, gate="none")  # dense rows dense, whatever the contracts say
    check_size(fp32, h, w)
    net, ckpt = checkpoint.load(a.models / "model.pt")
    thr = fp32.contract["score_threshold"]
    runs = [("model.pt", "pytorch-eager", "fp32", "torch", lambda: measure.TorchModel(torch_runner(net), ckpt, thr)),
            ("model.onnx", "onnxruntime", "fp32", "numpy", lambda: fp32)]
    int8 = a.models / "model.int8.onnx"
    if int8.is_file():
        runs.append(("model.int8.onnx", "onnxruntime", "int8", "numpy", lambda: EdgeModel(int8, threads, gate="none")))
    if fp32.needs_template:  # difference-gated (pcb_aoi.edge.gate), whatever the contracts decided
        runs.append(("model.onnx", "onnxruntime+gate", "fp32", "numpy", lambda: EdgeModel(a.models / "model.onnx", threads, gate="tiles")))
        if int8.is_file():
            runs.append(("model.int8.onnx", "onnxruntime+gate", "int8", "numpy", lambda: EdgeModel(int8, threads, gate="tiles")))
    rows = []
    for file, runtime, fmt, decode, make in runs:
        m = make()
        rows.append({"name": "pcb-aoi", "file": file, "runtime": runtime, "format": fmt, "decode": decode,
                     "int8_format": ((m.contract.get("int8") or {}).get("format") if fmt == "int8" else None),
                     "size_mb": round((a.models / file).stat().st_size / 2**20, 3), **timed(m, pairs, a),
                     "note": "test + template pair; decode + NMS included"})
    return rows, fp32.contract


def table(rows: list[dict]) -> str:
    lines = ["| model | file | runtime | precision | stream FPS | p50 ms | p99 ms | FPS / ORT FP32 | p50 / ORT FP32 |",
             "|---|---|---|---|---:|---:|---:|---:|---:|"]
    for r in rows:
        lines.append(f"| {r['name']} | {r['file']} | {r['runtime']} | {r['format']}"
                     f"{' ' + r['int8_format'] if r.get('int8_format') else ''} | {r['fps']} | {r['ms_p50']} | "
                     f"{r['ms_p99']} | {r['fps_vs_onnx_fp32']} | {r['ms_p50_vs_onnx_fp32']} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--models", type=Path, default=Path("models"), help="folder with model.pt, model.onnx, model.int8.onnx")
    ap.add_argument("--pairs", type=Path, required=True, help="folder with X_test.* / X_temp.* pairs (DeepPCB)")
    ap.add_argument("--out", type=Path, required=True, help="JSON to write")
    ap.add_argument("--images", type=int, default=32, help="pairs used (cycled by the stream)")
    ap.add_argument("--peers", nargs="*", choices=sorted(peer.PEERS), default=None,
                    help="peers to time (default: all when ultralytics is installed)")
    ap.add_argument("--threads", type=int, default=0, help="threads for both runtimes; 0 = all cores")
    ap.add_argument("--warmup", type=int, default=5)
    ap.add_argument("--runs", type=int, default=50, help="pairs timed one at a time")
    ap.add_argument("--stream", type=int, default=100, help="pairs in the read-ahead stream")
    ap.add_argument("--workers", type=int, default=1, help="the app's worker processes in the stream "
                    "(pcb-aoi-detect --workers; the threads split among them); PyTorch streams in one process")
    a = ap.parse_args(argv)
    names = a.peers if a.peers is not None else (sorted(peer.PEERS) if importlib.util.find_spec("ultralytics") else [])
    if a.peers is None and not names:
        print("ultralytics not installed: no peer rows (pip install 'pcb-aoi[peer]')", file=sys.stderr)
    if names:
        peer.require("--peers", tuple(names))  # fail before measuring anything
    threads = a.threads or os.cpu_count() or 1
    torch.set_num_threads(threads)
    load_before, t0 = os.getloadavg(), time.time()
    pairs = find_pairs(a.pairs, a.images)
    h, w = read_grey(pairs.tests[0]).shape
    rows, contract = ours(a, pairs, threads, h, w)  # before ultralytics is imported (it sets process knobs)
    if names:
        fmt = next((r["int8_format"] for r in rows if r["int8_format"]), None) or "u8s7"
        with tempfile.TemporaryDirectory(prefix="pcb-aoi-peers-") as tmp:
            files = peer.build_all(tuple(names), tmp, peer.export_size(h, w), len(contract["classes"]),
                                   [read_grey(t) for t in pairs.tests[:CALIBRATION_IMAGES]], fmt)
            for r in peer.time_all(files, pairs, contract["classes"], contract["score_threshold"], a.warmup,
                                   a.runs, a.stream, threads, ["cpu"], fmt, a.workers):
                rows.append({"name": r.pop("peer"), **r})
    ref = next(r for r in rows if r["file"] == "model.onnx")
    for r in rows:
        r["fps_vs_onnx_fp32"] = round(r["fps"] / ref["fps"], 3)
        r["ms_p50_vs_onnx_fp32"] = round(r["ms_p50"] / ref["ms_p50"], 3)
    report = {"command": " ".join(["python", "benchmarks/side_by_side.py", *(argv or sys.argv[1:])]),
              "machine": machine.describe(), "cpu": str(machine.cpu()), "threads": threads,
              "image_size": [w, h], "pairs": len(pairs.tests), "pairs_folder": str(a.pairs),
              "score_threshold": contract["score_threshold"],
              "load_average_before": [round(x, 2) for x in load_before],
              "load_average_after": [round(x, 2) for x in os.getloadavg()], "seconds": round(time.time() - t0, 1),
              "workers": a.workers,
              "fps_measured_as": "pairs / wall time of the edge app's loop over --stream pairs (cycled; --workers "
                                 "processes, or one with its read-ahead thread); "
                                 "ms_p50/p95/p99: one pair at a time, file decoding included",
              "rows": rows}
    print(f"{report['cpu']}, {threads} threads, {len(pairs.tests)} pairs {w}x{h}, load average "
          f"{report['load_average_before']} -> {report['load_average_after']}\n")
    print(table(rows))
    write_json(a.out, report)
    return report


if __name__ == "__main__":
    main()
