"""Where the inference time goes: per-operator time of PyTorch eager and of ONNX Runtime (FP32 and INT8)
on one 640x640 input, measured in one run, so a missed speed target can be explained, not guessed.

    python benchmarks/profile_ops.py --model models/model.pt --onnx models/model.onnx \\
        --int8 models/model.int8.onnx [--size 640] [--runs 30] [--out profile.json]

Per runtime: the median latency of a plain run (no profiler attached) and the share of the profiled
time taken by each operator type (PyTorch: aten ops, self CPU time; ONNX Runtime: node op types from
its built-in profiler, e.g. ``Conv``, ``QLinearConv``, ``Resize``), plus the share of the convolutions at each
output stride (2, 4, 8, 16), the figure that tells whether the high-resolution stride-4 layers or the deep ones cost
the time.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from collections import defaultdict
from pathlib import Path

import numpy as np
import onnxruntime as ort
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))
from pcb_aoi.edge.contract import INPUT, OUTPUTS  # noqa: E402
from pcb_aoi.model import checkpoint  # noqa: E402


def median_ms(fn, runs: int) -> float:
    for _ in range(3):
        fn()
    times = []
    for _ in range(runs):
        t0 = time.perf_counter()
        fn()
        times.append((time.perf_counter() - t0) * 1e3)
    return round(float(np.median(times)), 3)


def shares(totals: dict[str, float]) -> dict[str, float]:
    """Operator -> percent of the total, largest first, tiny ones (<0.5%) folded into ``other``."""
    total = sum(totals.values()) or 1.0
    out, other = {}, 0.0
    for name, t in sorted(totals.items(), key=lambda kv: -kv[1]):
        pct = 100 * t / total
        if pct < 0.5:
            other += pct
        else:
            out[name] = round(pct, 1)
    if other:
        out["other"] = round(other, 1)
    return out


def profile_torch(model: torch.nn.Module, x: np.ndarray, runs: int) -> dict:
    xt = torch.from_numpy(x)
    with torch.no_grad():
        ms = median_ms(lambda: model(xt), runs)
        with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
            for _ in range(runs):
                model(xt)
    totals = {e.key: e.self_cpu_time_total for e in prof.key_averages()}
    return {"ms_p50": ms, "op_share_pct": shares(totals)}


def profile_ort(path: Path, x: np.ndarray, runs: int, threads: int) -> dict:
    opts = ort.SessionOptions()
    opts.intra_op_num_threads = threads
    plain = ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])
    ms = median_ms(lambda: plain.run(OUTPUTS, {INPUT: x}), runs)
    with tempfile.TemporaryDirectory() as tmp:
        opts.enable_profiling = True
        opts.profile_file_prefix = str(Path(tmp) / "ort")
        sess = ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])
        for _ in range(runs):
            sess.run(OUTPUTS, {INPUT: x})
        events = json.loads(Path(sess.end_profiling()).read_text())
    by_op, conv_by_stride = defaultdict(float), defaultdict(float)
    for e in events:
        args = e.get("args", {})
        if e.get("cat") != "Node" or not e.get("name", "").endswith("_kernel_time"):
            continue
        op = args.get("op_name", "?")
        by_op[op] += e["dur"]
        if "Conv" in op:
            shape = next(iter((args.get("output_type_shape") or [{}])[0].values()), [])
            conv_by_stride[_stride(shape, x.shape[-1])] += e["dur"]
    return {"ms_p50": ms, "op_share_pct": shares(by_op), "conv_share_by_stride_pct": shares(conv_by_stride)}


def _stride(shape: list[int], size: int) -> str:
    """'stride N' of a conv output, NCHW or NHWC (the spatial side is the dimension seen twice)."""
    dims = shape[1:]
    side = next((d for d in dims if dims.count(d) >= 2), dims[-1] if dims else 0)
    return f"stride {size // side}" if side else "?"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", required=True, help="PyTorch checkpoint (models/model.pt)")
    ap.add_argument("--onnx", required=True, help="FP32 ONNX model (models/model.onnx)")
    ap.add_argument("--int8", help="INT8 ONNX model (models/model.int8.onnx)")
    ap.add_argument("--size", type=int, default=640, help="square input side in px, multiple of 32 (default 640)")
    ap.add_argument("--runs", type=int, default=30, help="runs per runtime, after 3 warm-up runs (default 30)")
    ap.add_argument("--threads", type=int, default=0, help="CPU threads for both runtimes; 0 = all cores")
    ap.add_argument("--out", help="also write the result as JSON here")
    args = ap.parse_args()
    threads = args.threads or os.cpu_count() or 1
    torch.set_num_threads(threads)
    model, ckpt = checkpoint.load(args.model)
    channels = ckpt["model_config"]["in_channels"]
    x = np.random.default_rng(0).random((1, channels, args.size, args.size), dtype=np.float32)
    report = {"input": list(x.shape), "threads": threads, "pytorch-eager-fp32": profile_torch(model, x, args.runs),
              "onnxruntime-fp32": profile_ort(Path(args.onnx), x, args.runs, threads)}
    if args.int8:
        report["onnxruntime-int8"] = profile_ort(Path(args.int8), x, args.runs, threads)
    text = json.dumps(report, indent=2)
    print(text)
    if args.out:
        Path(args.out).write_text(text + "\n")


if __name__ == "__main__":
    main()
