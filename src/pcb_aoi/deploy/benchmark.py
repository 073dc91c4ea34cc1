"""benchmark: every deployable ONNX file, timed and scored through the edge app's own code, beside the
PyTorch eager reference, per execution provider, measured in one run.

Deployable files: ``model.onnx`` (FP32, numpy decoding), ``model.e2e.onnx`` (FP32, decoding and NMS in the
graph: the file the README deploys) and ``model.int8.onnx``. Each runs as ``pcb-aoi-detect`` runs it
(``deploy.measure``: ``edge.inspector.Inspector`` reading the test PNG and its template at once and registering
them when the contract asks, ``edge.runtime.EdgeModel.detect``; sessions whose threads sleep between
pairs). Per variant: latency per pair one at a time (warm-up excluded) p50/p95/p99; ``fps`` = pairs /
wall time over a stream of ``benchmark.stream_pairs`` pairs with the app's read-ahead (the next pair
decoded while the model runs; the test pairs cycled); file size; DeepPCB's protocol (AP, F-score at the
contract's threshold, ``evaluation.deeppcb``) and COCO mAP@0.5 / mAP on the test split from that
runtime's own detections. The FP32 and INT8 files run twice, dense (``gate: none``) and difference-gated
(``gate: tiles``, ``edge.gate``: the network on tiles around what differs from the template), so the
gate's speed and accuracy stand beside the dense ones. Execution providers: every one of CPU, OpenVINO, CUDA and TensorRT that the
installed onnxruntime offers. Plus compute sizing for choosing a training machine: parameters, GFLOPs
per image, forward+backward memory at the training batch, seconds per training epoch, dataset size.
"""
from __future__ import annotations

import json
import os
import tempfile
from dataclasses import dataclass
from pathlib import Path

import onnxruntime as ort
import torch
from torch.utils.flop_counter import FlopCounterMode

from ..data.dataset import Dataset, atomic_dir, test_ids, write_json
from ..edge import machine
from ..edge.contract import GPU_PROVIDERS, MIN_SCORE, PROVIDERS
from ..edge.runtime import EdgeModel, read_grey
from ..evaluation.deeppcb import protocol
from ..evaluation.metrics import coco_metrics
from ..model import checkpoint
from ..model.inference import load_pair, prepare_input, torch_runner
from ..pipeline.config import BenchmarkConfig, QuantizeConfig
from . import measure, peer

PEER_CALIBRATION_IMAGES = 8  # test images the peers' INT8 ranges come from


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

    model: str | Path  # checkpoint written by train: the PyTorch eager reference
    onnx: str | Path  # FP32 ONNX model (raw outputs) written by export_onnx
    clean: str | Path  # clean dataset folder: the test images
    split: str | Path  # folder holding split.parquet
    int8: str | Path | None = None  # INT8 model written by quantize, benchmarked too when given
    train_report: str | Path | None = None  # train's summary (seconds per epoch, peak memory) for compute sizing
    data: tuple[str | Path, ...] = ()  # dataset folders whose size on disk to report
    e2e: str | Path | None = None  # end-to-end FP32 model written by export_onnx, benchmarked too when given


@dataclass(frozen=True)
class TrainStep:
    """The training step whose memory the compute sizing measures (``train.batch_size``, ``train.crop_size``)."""

    batch_size: int
    crop_size: int  # 0 = full images, measured at 640 px


def run(cfg: BenchmarkConfig, inputs: Inputs, out: str | Path, *, train_step: TrainStep | None = None,
        plots_dir: str | Path | None = None) -> dict:
    """Measure every variant, write the report to ``out`` (and the latency-vs-AP plot data to ``plots_dir``).

    PyTorch runs with ``benchmark.threads`` threads meanwhile; the process's setting is restored after (a
    caller that trains next, a test session, must not inherit it: other threads, other float sums)."""
    if cfg.peers:  # before any work: a missing optional dependency must not cost a whole benchmark run
        peer.require("benchmark.peers", cfg.peers)
    threads = cfg.threads or os.cpu_count() or 1
    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        return _run(cfg, inputs, out, threads, train_step, plots_dir)
    finally:
        torch.set_num_threads(before)


def _run(cfg: BenchmarkConfig, inputs: Inputs, out: str | Path, threads: int, train_step: TrainStep | None,
         plots_dir: str | Path | None) -> dict:
    model, ckpt = checkpoint.load(inputs.model)
    ds = Dataset.load(inputs.clean)
    ids = test_ids(inputs.split)
    available = [k for k, name in PROVIDERS.items() if name in ort.get_available_providers()]
    variants = measure_variants(cfg, inputs, model, ckpt, ds, ids, available, threads)
    by = {(v["file"], v["provider"]): v for v in variants if v.get("gate") in (None, "none")}  # the dense rows
    cpu, onnx, rows = PROVIDERS["cpu"], Path(inputs.onnx).name, ds.rows(ids[:1])
    report = {
        "threads": threads,
        "cpu": machine.cpu_model(),
        # Instruction sets decide speed (VNNI, AVX-512) and, for some INT8 formats, accuracy.
        "machine": machine.describe(torch.cuda.get_device_name(0) if set(GPU_PROVIDERS) & set(available)
                                    and torch.cuda.is_available() else None),
        "image_size": [int(rows[0].width), int(rows[0].height)],
        "test_images": len(ids),
        "providers": [PROVIDERS[k] for k in available],  # in onnxruntime's names
        "fps_measured_as": "pairs / wall time of the edge app's read-ahead loop (edge.inspector.Inspector.process_all) "
                           "over stream_pairs pairs, the test pairs cycled; ms_p50/p95/p99: one pair at a time",
        "variants": variants,
        # the difference gate each file's contract ships (decided on validation by export_onnx / quantize)
        "gate_shipped": {Path(p).name: EdgeModel(p).gate["mode"] for p in (inputs.onnx, inputs.e2e, inputs.int8) if p},
        # Latency ratios, one pair at a time (the stream's fps ratios are in the variants).
        "ort_vs_torch_speedup": round(by[Path(inputs.model).name, "torch-cpu"]["ms_p50"] / by[onnx, cpu]["ms_p50"], 3),
    }
    if inputs.int8:
        m = EdgeModel(inputs.int8)
        report["int8_format"] = (m.contract.get("int8") or {}).get("format")
        report["int8_on_this_cpu"] = m.cpu_verdict()[0]  # exact | saturates | unknown
        report["int8_vs_fp32_speedup"] = round(by[onnx, cpu]["ms_p50"] / by[Path(inputs.int8).name, cpu]["ms_p50"], 3)
    if cfg.peers:
        report["peers"] = peers(cfg, ds, ids, list(ckpt["classes"]), EdgeModel(inputs.onnx).contract["score_threshold"],
                                available, threads, report.get("int8_format"),
                                {v["provider"]: v for v in variants if v["file"] == onnx and v.get("gate", "none") == "none"})
    x1 = torch.from_numpy(prepare_input(*load_pair(ds, rows[0]), ckpt["input_spec"]["use_template"])[None])
    report["compute"] = {"gflops": round(gflops(model, x1), 3), **sizing(model, ckpt, inputs, train_step)}
    if plots_dir:
        with atomic_dir(plots_dir) as tmp:  # latency vs accuracy, one point per variant
            lines = ["variant,ms_p50,fps,map50,deeppcb_ap"] + [
                f"{v['file']}{'+tiles' if v.get('gate') == 'tiles' else ''}@{v['provider']},{v['ms_p50']},{v['fps']},{v['map50']},{v['deeppcb_ap']}" for v in variants]
            (tmp / "latency_map.csv").write_text("\n".join(lines) + "\n")
    write_json(out, report)
    return report


def _clean(v) -> float | None:
    """JSON has no NaN: an undefined metric (no ground truth, no detection) is null."""
    return None if v is None or v != v else round(float(v), 6)


def score(m: measure.Model, pairs: measure.Pairs, gt: dict, classes: tuple[str, ...], threshold: float) -> dict:
    """DeepPCB's protocol at the operating ``threshold`` and COCO mAP, from every detection above MIN_SCORE."""
    preds = measure.detections(m, pairs, MIN_SCORE)
    deeppcb, coco = protocol(gt, preds, score_threshold=threshold), coco_metrics(gt, preds, classes)
    return {"score_threshold": threshold, "deeppcb_ap": _clean(deeppcb["ap"]),
            "deeppcb_fscore": _clean(deeppcb["fscore"]), "deeppcb_escape_rate": _clean(deeppcb["escape_rate"]),
            "deeppcb_false_calls_per_image": _clean(deeppcb["false_calls_per_image"]),
            "map50": _clean(coco["map50"]), "map": _clean(coco["map"])}


def measure_variants(cfg: BenchmarkConfig, inputs: Inputs, model: torch.nn.Module, ckpt: dict, ds: Dataset,
                     ids: list[str], providers: list[str], threads: int) -> list[dict]:
    """One result per variant: PyTorch eager, then every deployable file (``onnx``, ``e2e``, ``int8``) on
    each of ``providers`` (keys of ``edge.contract.PROVIDERS``) as the edge app runs it."""
    classes, pairs = tuple(ckpt["classes"]), measure.Pairs.of(ds, ids)
    gt = ds.annotations(ids, classes)
    threshold = EdgeModel(inputs.onnx).contract["score_threshold"]  # the operating point export wrote
    runs = [({"runtime": "pytorch-eager", "format": "fp32", "provider": "torch-cpu", "decode": "torch"},
             inputs.model, lambda: measure.TorchModel(torch_runner(model), ckpt, threshold))]
    # Every file dense, then the FP32 and INT8 files difference-gated (edge.gate) beside them, whatever their
    # contract ships (the "gate" of each file's contract is in the report's gate_shipped).
    gated = [p for p in (inputs.onnx, inputs.int8) if p] if ckpt["input_spec"]["use_template"] else []
    for mode, paths in (("none", (inputs.onnx, inputs.e2e, inputs.int8)), ("tiles", gated)):
        for key in providers:
            for path in (p for p in paths if p):
                runs.append(({"runtime": "onnxruntime", "provider": PROVIDERS[key]}, path,
                             lambda k=key, p=path, g=mode: EdgeModel(p, threads, k, spin=False, gate=g)))  # as the app
    variants = []
    for row, path, make in runs:
        m, thr = make(), threshold
        if isinstance(m, EdgeModel):
            row = {"runtime": "onnxruntime", "format": m.precision, "provider": row["provider"],
                   "decode": "in-graph" if m.end_to_end else "numpy", "gate": m.gate["mode"]}
            thr = m.contract["score_threshold"]
        timing = {**measure.latency(m, pairs, cfg.warmup, cfg.runs), **measure.stream(m, pairs, cfg.stream_pairs)}
        metrics = score(m, pairs, gt, classes, thr)
        variants.append({"file": Path(path).name, **row, "size_mb": round(Path(path).stat().st_size / 2**20, 3),
                         **timing, **metrics, "threads": threads})
    return variants


def peers(cfg: BenchmarkConfig, ds: Dataset, ids: list[str], classes: list[str], threshold: float,
          providers: list[str], threads: int, int8_format: str | None, ours: dict[str, dict]) -> list[dict]:
    """``deploy.peer`` rows for ``benchmark.peers``: each built with ``classes``, exported at the test images'
    size, quantized in our INT8 format (``u8s7`` without an INT8 model) on the first test images (latency
    only: no score is reported, so calibrating on them favours nothing), timed on the same pairs at our
    operating ``threshold``; ratios to our ORT FP32 file on the same provider (``ours``: provider -> row)."""
    pairs, row0 = measure.Pairs.of(ds, ids), ds.rows(ids[:1])[0]
    calibration = [read_grey(t) for t in pairs.tests[:PEER_CALIBRATION_IMAGES]]
    fmt = int8_format or QuantizeConfig().format
    with tempfile.TemporaryDirectory(prefix="pcb-aoi-peers-") as tmp:  # rebuilt each run: seconds per peer
        files = peer.build_all(cfg.peers, tmp, peer.export_size(int(row0.height), int(row0.width)), len(classes),
                               calibration, fmt)
        out = peer.time_all(files, pairs, classes, threshold, cfg.warmup, cfg.runs, cfg.stream_pairs, threads,
                           providers, fmt)
    for row in out:
        ref = ours[row["provider"]]
        row["fps_vs_onnx_fp32"] = round(row["fps"] / ref["fps"], 3)
        row["ms_p50_vs_onnx_fp32"] = round(row["ms_p50"] / ref["ms_p50"], 3)
    return out


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
