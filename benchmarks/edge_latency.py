"""End-to-end latency of the torch-free edge app (what `pcb-aoi-detect` does per image): read the test
and template files, preprocess, ONNX Runtime, decode + NMS, per execution provider and model, measured
side by side in one run. Needs only the `edge` install (numpy, onnxruntime, pillow), so it also runs in
an environment with `onnxruntime-openvino` instead of `onnxruntime`:

    python -m venv /tmp/ov && /tmp/ov/bin/pip install onnxruntime-openvino numpy pillow opencv-python-headless
    /tmp/ov/bin/pip install --no-deps .
    /tmp/ov/bin/python benchmarks/edge_latency.py --models models/model.onnx models/model.int8.onnx \\
        --pairs data/clean --providers cpu openvino --out edge_latency.json

`--pairs` is a folder of `X_test.*` images with `X_temp.*` templates (the clean dataset of a DeepPCB
run, or the DeepPCB folder itself); per image and provider: p50/p95/p99 of the whole `detect` call
plus file decoding, and the same without file decoding. Then the app's stream
mode (`pcb-aoi-detect` on many files, or its folder mode): the next pair is read in a thread while the
current one is inferred; `stream_fps` = images / wall time over the timed runs (measured, the only FPS), and `stream_ms_p50`
the per-image latency there (read start to detections).
"""
from __future__ import annotations

import argparse
import itertools
import json
import os
import time
from pathlib import Path

import numpy as np

from pcb_aoi.edge import machine
from pcb_aoi.edge.inspector import Inspector
from pcb_aoi.edge.contract import PROVIDERS
from pcb_aoi.edge.runtime import EdgeModel, read_grey, read_pair


def find_pairs(folder: Path, limit: int) -> list[tuple[Path, Path]]:
    pairs = []
    for test in sorted(folder.rglob("*_test.*")):
        temp = next(iter(sorted(test.parent.glob(test.stem.removesuffix("_test") + "_temp.*"))), None)
        if temp is not None:
            pairs.append((test, temp))
        if len(pairs) == limit:
            break
    if not pairs:
        raise SystemExit(f"{folder}: no X_test.* / X_temp.* image pairs found")
    return pairs


def measure(model: EdgeModel, pairs: list, warmup: int, runs: int) -> dict:
    total, compute = [], []
    for i in range(warmup + runs):
        test_path, temp_path = pairs[i % len(pairs)]
        t0 = time.perf_counter()
        test, template = read_pair(test_path, temp_path)  # as the app: both files at once
        t1 = time.perf_counter()
        model.detect(test, template)
        t2 = time.perf_counter()
        if i >= warmup:
            total.append((t2 - t0) * 1e3)
            compute.append((t2 - t1) * 1e3)
    p = lambda a, q: round(float(np.percentile(a, q)), 3)  # noqa: E731
    return {"ms_p50": p(total, 50), "ms_p95": p(total, 95), "ms_p99": p(total, 99),
            "without_file_decode_ms_p50": p(compute, 50)}


def measure_stream(model: EdgeModel, pairs: list, warmup: int, runs: int) -> dict:
    """Throughput of the app's read-ahead loop (``Inspector.process_all``) over the test images; no line per
    image (the app's logging is not set up here)."""
    det = Inspector(model, argparse.Namespace(template=None, template_dir=None, score=None, overlay_dir=None))
    images = [pairs[i % len(pairs)][0] for i in range(warmup + runs)]
    stamps, latency = [], []
    for i, record in enumerate(det.process_all(images)):
        if record["status"] != "ok":
            raise SystemExit(f"{record['file']}: {record['error']}")
        stamps.append(time.perf_counter())
        if i >= warmup:
            latency.append(record["ms"])
    seconds = stamps[-1] - stamps[warmup - 1] if warmup else None
    if seconds is None:  # no warm-up: time from the first result (one image fewer)
        seconds, runs = stamps[-1] - stamps[0], runs - 1
    return {"stream_fps": round(runs / seconds, 2) if seconds > 0 else None,
            "stream_ms_p50": round(float(np.percentile(latency, 50)), 3)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--models", nargs="+", type=Path, required=True, help="exported pcb-aoi ONNX models")
    ap.add_argument("--pairs", type=Path, required=True, help="folder with X_test.* / X_temp.* images")
    ap.add_argument("--providers", nargs="+", default=["cpu"], choices=sorted(PROVIDERS))
    ap.add_argument("--images", type=int, default=50, help="distinct image pairs, cycled (default 50)")
    ap.add_argument("--runs", type=int, default=200, help="timed images per model and provider (default 200)")
    ap.add_argument("--warmup", type=int, default=10)
    ap.add_argument("--threads", type=int, default=0, help="ONNX Runtime threads; 0 = all cores")
    ap.add_argument("--spin", nargs="+", default=["off"], choices=["on", "off"],
                    help="ONNX Runtime threads busy-wait between runs (on, ONNX Runtime's default) or sleep "
                         "(off, the app's default); give both to compare (default: off)")
    ap.add_argument("--out", type=Path, help="also write the result as JSON here")
    args = ap.parse_args()
    pairs = find_pairs(args.pairs, args.images)
    size = read_grey(pairs[0][0]).shape
    results = []
    for provider in args.providers:
        for path, spin in itertools.product(args.models, args.spin):
            model = EdgeModel(path, threads=args.threads, provider=provider, spin=spin == "on")
            r = {"model": path.name, "provider": provider, "spin": spin, "end_to_end": model.end_to_end,
                 **measure(model, pairs, args.warmup, args.runs), **measure_stream(model, pairs, args.warmup, args.runs)}
            results.append(r)
            print(json.dumps(r), flush=True)
    report = {"image_size": [size[1], size[0]], "threads": args.threads or os.cpu_count(), "cpu": machine.cpu_model(), "machine": machine.describe(),
              "runs": args.runs, "results": results}
    if args.out:
        args.out.write_text(json.dumps(report, indent=2) + "\n")


if __name__ == "__main__":
    main()
