"""export_onnx: the checkpoint as ONNX, with a parity gate against PyTorch.

Dynamic batch (and image size) axes; the preprocessing contract is stored as ONNX metadata. The
gate runs both on held-out images at a batch size other than the export one: raw outputs must
agree within ``parity_atol`` and the final detections must be the same, or the stage fails and
the previous ``model.onnx`` stays where it was.
"""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import torch

from . import checkpoint
from .config import ExportConfig
from .dataset import Dataset, atomic_file
from .inference import decode, load_pair, prepare_input, stack_padded

INPUT, OUTPUTS = "input", ["heatmap", "boxes"]
PARITY_MIN_SCORE = 0.05


class ParityError(RuntimeError):
    pass


def ort_session(path: str | Path, threads: int = 0) -> ort.InferenceSession:
    opts = ort.SessionOptions()
    opts.intra_op_num_threads = threads
    return ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])


def export(model: torch.nn.Module, ckpt: dict, example: torch.Tensor, path: Path, opset: int) -> None:
    torch.onnx.export(
        model, (example,), str(path), input_names=[INPUT], output_names=OUTPUTS, opset_version=opset,
        dynamic_axes={INPUT: {0: "batch", 2: "height", 3: "width"},
                      **{o: {0: "batch", 2: "out_height", 3: "out_width"} for o in OUTPUTS}},
        dynamo=False,  # the TorchScript exporter needs no onnxscript and writes a single file
    )
    proto = onnx.load(str(path))
    meta = {"classes": json.dumps(ckpt["classes"]), "input_spec": json.dumps(ckpt["input_spec"]),
            "model_config": json.dumps(ckpt["model_config"]), "producer": "pcb-aoi"}
    for k, v in meta.items():
        proto.metadata_props.add(key=k, value=v)
    onnx.checker.check_model(proto, full_check=True)
    onnx.save(proto, str(path))


def parity(model: torch.nn.Module, sess: ort.InferenceSession, x: np.ndarray, atol: float) -> dict:
    """Compare raw outputs and decoded detections of PyTorch and ONNX Runtime on batch ``x``."""
    with torch.no_grad():
        th, tb = (t.numpy() for t in model(torch.from_numpy(x)))
    oh, ob = sess.run(OUTPUTS, {INPUT: x})
    diff = {"heatmap": float(np.abs(th - oh).max()), "boxes": float(np.abs(tb - ob).max())}
    # Compare detections a user could act on: below 5% the flip of a score across the cut-off
    # by 1e-6 would read as a parity failure without meaning anything.
    dt = decode(torch.from_numpy(th), torch.from_numpy(tb), score_threshold=PARITY_MIN_SCORE)
    do = decode(torch.from_numpy(oh), torch.from_numpy(ob), score_threshold=PARITY_MIN_SCORE)
    same = all(
        len(a["labels"]) == len(b["labels"]) and bool((a["labels"] == b["labels"]).all())
        and bool(((a["boxes"] - b["boxes"]).abs() <= 0.5).all()) for a, b in zip(dt, do)
    )
    report = {"images": int(len(x)), "atol": atol, "max_abs_diff": diff, "same_detections": same,
              "detections": int(sum(len(d["labels"]) for d in dt))}
    if max(diff.values()) > atol or not same:
        raise ParityError(f"ONNX parity failed: max |torch - onnxruntime| = {diff} (allowed {atol}), "
                          f"same detections: {same}")
    return report


def run(cfg: ExportConfig, model_path: str | Path, clean_dir: str | Path, image_ids: list[str],
        onnx_out: str | Path) -> dict:
    model, ckpt = checkpoint.load(model_path)
    use_template = ckpt["input_spec"]["use_template"]
    ds = Dataset.load(clean_dir)
    x = stack_padded([prepare_input(*load_pair(ds, r), use_template) for r in ds.rows(image_ids[: cfg.parity_images])])
    with atomic_file(onnx_out) as tmp:
        export(model, ckpt, torch.from_numpy(x[:1]), tmp, cfg.opset)  # exported at batch 1 ...
        report = parity(model, ort_session(tmp), x, cfg.parity_atol)  # ... checked at batch N
    report["size_mb"] = round(Path(onnx_out).stat().st_size / 2**20, 3)
    report["opset"] = cfg.opset
    return report
