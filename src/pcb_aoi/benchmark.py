"""benchmark: ONNX Runtime vs PyTorch eager on this machine, measured in one run.

Per variant: end-to-end latency per image at batch 1 (decode the PNGs + preprocess + inference +
post-process; warm-up runs excluded), inference-only latency, throughput at a larger batch, file
size and mAP@0.5 on the test split computed with that very runtime.
"""
from __future__ import annotations

import os
import time
from pathlib import Path

import numpy as np
import torch

from . import checkpoint
from .config import BenchmarkConfig
from .dataset import Dataset, write_json
from .evaluate import score, test_ids
from .export import INPUT, OUTPUTS, ort_session
from .inference import Runner, decode, load_pair, prepare_input, stack_padded, torch_runner


def ort_runner(sess) -> Runner:
    def run(x: np.ndarray):
        return tuple(sess.run(OUTPUTS, {INPUT: x}))

    return run


def _percentiles(ms: list[float]) -> dict:
    a = np.asarray(ms)
    return {"p50": float(np.percentile(a, 50)), "p95": float(np.percentile(a, 95))}


def time_variant(runner: Runner, ds: Dataset, rows: list, use_template: bool, cfg: BenchmarkConfig) -> dict:
    def end_to_end(row):
        x = prepare_input(*load_pair(ds, row), use_template)[None]
        t0 = time.perf_counter()
        heat, boxes = runner(x)
        t1 = time.perf_counter()
        decode(torch.from_numpy(heat), torch.from_numpy(boxes))
        return t1 - t0

    e2e, infer = [], []
    for i in range(cfg.warmup + cfg.runs):
        t0 = time.perf_counter()
        inf = end_to_end(rows[i % len(rows)])
        if i >= cfg.warmup:
            e2e.append((time.perf_counter() - t0) * 1e3)
            infer.append(inf * 1e3)
    xb = stack_padded([prepare_input(*load_pair(ds, rows[i % len(rows)]), use_template) for i in range(cfg.batch_size)])
    runner(xb)  # warm-up at this shape
    reps = max(1, cfg.runs // cfg.batch_size)
    t0 = time.perf_counter()
    for _ in range(reps):
        runner(xb)
    batch_fps = reps * cfg.batch_size / (time.perf_counter() - t0)
    lat, inf = _percentiles(e2e), _percentiles(infer)
    return {"ms_p50": round(lat["p50"], 3), "ms_p95": round(lat["p95"], 3), "infer_ms_p50": round(inf["p50"], 3),
            "fps": round(1e3 / lat["p50"], 2), f"batch{cfg.batch_size}_fps": round(batch_fps, 2)}


def run(cfg: BenchmarkConfig, model_path: str | Path, onnx_path: str | Path, clean_dir: str | Path,
        split_dir: str | Path, out: str | Path, int8_path: str | Path | None = None) -> dict:
    threads = cfg.threads or os.cpu_count() or 1
    torch.set_num_threads(threads)
    model, ckpt = checkpoint.load(model_path)
    classes, use_template = tuple(ckpt["classes"]), ckpt["input_spec"]["use_template"]
    ds = Dataset.load(clean_dir)
    ids = test_ids(split_dir)
    rows = ds.rows(ids)
    variants = []
    runs = [("pytorch-eager-fp32", torch_runner(model), model_path),
            ("onnxruntime-fp32", ort_runner(ort_session(onnx_path, threads)), onnx_path)]
    if int8_path:
        runs.append(("onnxruntime-int8", ort_runner(ort_session(int8_path, threads)), int8_path))
    for fmt, runner, path in runs:
        metrics, _ = score(runner, ds, ids, classes, use_template, 0.5)
        variants.append({"format": fmt, "size_mb": round(Path(path).stat().st_size / 2**20, 3),
                         **time_variant(runner, ds, rows, use_template, cfg), "map50": metrics["map50"]})
    by = {v["format"]: v for v in variants}
    report = {
        "threads": threads,
        "image_size": [int(rows[0].width), int(rows[0].height)],
        "variants": variants,
        "ort_vs_torch_speedup": round(by["pytorch-eager-fp32"]["ms_p50"] / by["onnxruntime-fp32"]["ms_p50"], 3),
    }
    if int8_path:
        report["int8_vs_fp32_speedup"] = round(by["onnxruntime-fp32"]["ms_p50"] / by["onnxruntime-int8"]["ms_p50"], 3)
    write_json(out, report)
    return report
