"""benchmark: PyTorch eager vs ONNX Runtime FP32 and INT8, per execution provider, measured in one run.

Per variant: end-to-end latency per image at batch 1 (decode the test PNG and its template, both at
once as the edge app does + preprocess + inference + post-process: torch for PyTorch, the edge app's
numpy decoding for ONNX Runtime, whose sessions also sleep between images as the app's do; warm-up runs
excluded) p50/p95/p99, inference-only latency, throughput at a larger batch, file size, mAP@0.5 and
COCO mAP on the test split computed with that very runtime, model GFLOPs per image and the GFLOP/s
achieved. Execution providers: every one of CPU, OpenVINO, CUDA and TensorRT that the installed
onnxruntime offers (`pip install onnxruntime-openvino` or `onnxruntime-gpu` to add them). Plus compute
sizing for choosing a training machine: parameters, forward+backward memory at the training batch,
seconds per training epoch, dataset size on disk.
"""
from __future__ import annotations

import json
import os
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnxruntime as ort
import torch
from torch.utils.flop_counter import FlopCounterMode

from ..data.dataset import Dataset, atomic_dir, test_ids, write_json
from ..edge import machine, runtime
from ..edge.contract import GPU_PROVIDERS, MIN_SCORE, PROVIDERS
from ..edge.preprocess import register_template
from ..edge.runtime import ort_runner, ort_session
from ..evaluation.evaluate import score
from ..model import checkpoint
from ..model.inference import Runner, decode, load_pair, prepare_input, stack_padded, torch_runner
from ..pipeline.config import BenchmarkConfig


def _percentiles(ms: list[float]) -> dict:
    a = np.asarray(ms)
    return {q: float(np.percentile(a, int(q[1:]))) for q in ("p50", "p95", "p99")}


def torch_post(heat: np.ndarray, boxes: np.ndarray) -> None:
    decode(torch.from_numpy(heat), torch.from_numpy(boxes))


def numpy_post(heat: np.ndarray, boxes: np.ndarray) -> None:
    """What the torch-free edge app runs after ONNX Runtime."""
    runtime.decode(heat, boxes, MIN_SCORE)  # the torch decode()'s default threshold, as the PyTorch variant


def time_variant(runner: Runner, ds: Dataset, rows: list, use_template: bool, cfg: BenchmarkConfig,
                 post=torch_post, register_px: int = 0) -> dict:
    def end_to_end(row):
        test, template = load_pair(ds, row)
        if register_px:  # as the edge app does (the clean pairs are registered already: same work, no move)
            template, _ = register_template(test, template, register_px)
        x = prepare_input(test, template, use_template)[None]
        t0 = time.perf_counter()
        heat, boxes = runner(x)
        t1 = time.perf_counter()
        post(heat, boxes)
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
    return {"ms_p50": round(lat["p50"], 3), "ms_p95": round(lat["p95"], 3), "ms_p99": round(lat["p99"], 3),
            "infer_ms_p50": round(inf["p50"], 3), "fps": round(1e3 / lat["p50"], 2),
            "batch_size": cfg.batch_size, "batch_fps": round(batch_fps, 2)}


def gflops(model: torch.nn.Module, x: torch.Tensor) -> float:
    """Forward GFLOPs (multiply-add = 2) of one image of ``x``'s size, counted by PyTorch."""
    with torch.no_grad(), FlopCounterMode(display=False) as counter:
        model(x[:1])
    return counter.get_total_flops() / 1e9


def train_memory_mb(model: torch.nn.Module, batch: int, crop: int, channels: int) -> dict:
    """Forward+backward memory at the training batch: weights, gradients, AdamW state and every tensor
    autograd keeps for the backward pass (measured on a real step, device independent)."""
    saved = []

    def pack(t):
        saved.append(t.numel() * t.element_size())
        return t

    model.train()
    x = torch.rand(batch, channels, crop, crop)
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        heat, boxes = model(x)
    (heat.float().mean() + boxes.float().mean()).backward()
    model.zero_grad(set_to_none=True)
    model.eval()
    params = sum(p.numel() * p.element_size() for p in model.parameters())
    activations = sum(saved)
    return {"weights_mb": round(params / 2**20, 2), "activations_mb": round(activations / 2**20, 1),
            "total_mb": round((4 * params + activations) / 2**20, 1),  # weights + grads + 2 AdamW moments
            "batch_size": batch, "crop_size": crop}


def du_mb(path: Path) -> float:
    return round(sum(f.stat().st_size for f in Path(path).rglob("*") if f.is_file()) / 2**20, 1)


@dataclass(frozen=True)
class Inputs:
    """The files the benchmark measures and reports on (the stage's options, ``src/stages/benchmark.py``)."""

    model: str | Path  # checkpoint written by train
    onnx: str | Path  # FP32 ONNX model (raw outputs) written by export_onnx
    clean: str | Path  # clean dataset folder: the test images
    split: str | Path  # folder holding split.parquet
    int8: str | Path | None = None  # INT8 model written by quantize, benchmarked too when given
    train_report: str | Path | None = None  # train's summary (seconds per epoch, peak memory) for compute sizing
    data: tuple[str | Path, ...] = ()  # dataset folders whose size on disk to report


@dataclass(frozen=True)
class TrainStep:
    """The training step whose memory the compute sizing measures (``train.batch_size``, ``train.crop_size``)."""

    batch_size: int
    crop_size: int  # 0 = full images, measured at 640 px


def run(cfg: BenchmarkConfig, inputs: Inputs, out: str | Path, *, train_step: TrainStep | None = None,
        plots_dir: str | Path | None = None) -> dict:
    """Measure every variant, write the report to ``out`` (and the latency-vs-mAP plot data to ``plots_dir``)."""
    threads = cfg.threads or os.cpu_count() or 1
    torch.set_num_threads(threads)
    model, ckpt = checkpoint.load(inputs.model)
    ds = Dataset.load(inputs.clean)
    ids = test_ids(inputs.split)
    rows = ds.rows(ids)
    available = [k for k, name in PROVIDERS.items() if name in ort.get_available_providers()]
    variants = measure_variants(cfg, inputs, model, ckpt, ds, ids, rows, available, threads)
    by = {(v["format"], v["provider"]): v for v in variants}
    cpu = PROVIDERS["cpu"]
    report = {
        "threads": threads,
        "cpu": machine.cpu_model(),
        # Instruction sets decide speed (VNNI, AVX-512) and, for some INT8 formats, accuracy.
        "machine": machine.describe(torch.cuda.get_device_name(0) if set(GPU_PROVIDERS) & set(available)
                                    and torch.cuda.is_available() else None),
        "image_size": [int(rows[0].width), int(rows[0].height)],
        "providers": [PROVIDERS[k] for k in available],  # in onnxruntime's names
        "variants": variants,
        "ort_vs_torch_speedup": round(by["pytorch-eager-fp32", "torch-cpu"]["ms_p50"]
                                      / by["onnxruntime-fp32", cpu]["ms_p50"], 3),
    }
    if inputs.int8:
        m = runtime.EdgeModel(inputs.int8)
        report["int8_format"] = (m.contract.get("int8") or {}).get("format")
        report["int8_on_this_cpu"] = m.cpu_verdict()[0]  # exact | saturates | unknown
        report["int8_vs_fp32_speedup"] = round(by["onnxruntime-fp32", cpu]["ms_p50"]
                                               / by["onnxruntime-int8", cpu]["ms_p50"], 3)
    report["compute"] = sizing(model, ckpt, inputs, train_step)
    if plots_dir:
        with atomic_dir(plots_dir) as tmp:  # latency vs accuracy, one point per variant
            lines = ["variant,ms_p50,map50"] + [f"{v['format']}@{v['provider']},{v['ms_p50']},{v['map50']}"
                                                for v in variants]
            (tmp / "latency_map.csv").write_text("\n".join(lines) + "\n")
    write_json(out, report)
    return report


def measure_variants(cfg: BenchmarkConfig, inputs: Inputs, model: torch.nn.Module, ckpt: dict, ds: Dataset,
                     ids: list[str], rows: list, providers: list[str], threads: int) -> list[dict]:
    """One result per variant: PyTorch eager, then ONNX Runtime FP32 (and INT8) on each of ``providers``
    (keys of ``edge.contract.PROVIDERS``): size, latency, throughput, accuracy and GFLOP/s."""
    classes, use_template = tuple(ckpt["classes"]), ckpt["input_spec"]["use_template"]
    x1 = torch.from_numpy(prepare_input(*load_pair(ds, rows[0]), use_template)[None])
    flops = gflops(model, x1)
    runs = [("pytorch-eager-fp32", "torch-cpu", lambda: torch_runner(model), inputs.model)]
    for key in providers:  # sessions as the edge app runs them: threads sleep, not spin, between images
        runs.append(("onnxruntime-fp32", PROVIDERS[key],
                     lambda k=key: ort_runner(ort_session(inputs.onnx, threads, k, spin=False)), inputs.onnx))
        if inputs.int8:
            runs.append(("onnxruntime-int8", PROVIDERS[key],
                         lambda k=key: ort_runner(ort_session(inputs.int8, threads, k, spin=False)), inputs.int8))
    variants = []
    for fmt, provider, make, path in runs:
        runner = make()
        metrics, _ = score(runner, ds, ids, classes, use_template, 0.5)
        post = torch_post if fmt.startswith("pytorch") else numpy_post
        timing = time_variant(runner, ds, rows, use_template, cfg, post, ckpt["input_spec"].get("register_max_px", 0))
        variants.append({"format": fmt, "provider": provider, "size_mb": round(Path(path).stat().st_size / 2**20, 3),
                         **timing, "map50": metrics["map50"], "map": metrics["map"], "threads": threads,
                         "gflops": round(flops, 3), "gflops_per_s": round(flops / (timing["infer_ms_p50"] / 1e3), 2)})
    return variants


def sizing(model: torch.nn.Module, ckpt: dict, inputs: Inputs, train_step: TrainStep | None) -> dict:
    """What a user needs to pick an AzureML compute size."""
    out = {"parameters": sum(p.numel() for p in model.parameters())}
    if train_step is not None:
        crop = train_step.crop_size or 640
        out["train_step_memory"] = train_memory_mb(model, train_step.batch_size, crop,
                                                   ckpt["model_config"]["in_channels"])
    train_report = inputs.train_report
    if train_report and Path(train_report).is_file():
        t = json.loads(Path(train_report).read_text())
        out.update({k: t.get(k) for k in ("seconds_per_epoch", "epochs", "peak_rss_mb", "train_images", "device",
                                          "threads")})
        cpu = f"{t.get('cpu_count')} cores of {t.get('cpu', 'an unknown CPU')}"
        out["measured_on"] = cpu if t.get("device", "cpu") == "cpu" else t.get("device")
    out["dataset_mb"] = {Path(d).name: du_mb(d) for d in inputs.data}
    return out
