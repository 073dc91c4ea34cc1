"""How far a tile's border reaches into the network's output: raw heat-map logits of windows cut from
a pair against the same cells of the whole pair's output, by distance from the window's border.

The difference gate (``pcb_aoi.edge.gate``) runs the network on windows around changes; a window
computes what the whole image does only where the cut-off context is outside the receptive field.
For each model and pair: a ``--window`` px square at a few positions aligned to the contract's tile
multiple, the largest |window - whole| heat-map logit over the cells at least ``d`` px inside the
window's border, for each ``d`` in ``--inside``; the median over windows and pairs, and the share of
cells whose top-scoring class changes. A network with dilated blocks at /16 (``train.model.dilated``)
sees hundreds of px; an undilated one less.

    python benchmarks/receptive_field.py --models dilated/model.onnx undilated/model.onnx \\
        --pairs /path/to/DeepPCB/PCBData/group44000 --out receptive_field.json
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np

from pcb_aoi.edge import machine
from pcb_aoi.edge.preprocess import read_pair
from pcb_aoi.edge.runtime import EdgeModel, prepare_input

sys.path.insert(0, str(Path(__file__).parent))
from gate import find_pairs  # noqa: E402  (benchmarks/gate.py: X_test / X_temp pairs)


def compare(m: EdgeModel, x: np.ndarray, window: int, inside: list[int], stride: int) -> list[list[float]]:
    """Per window position: the largest |logit| difference over cells >= each ``inside`` px from its border."""
    whole = m.session.run(None, {m.input_name: x[None]})[0][0]  # (classes, H / s, W / s)
    _, h, w = x.shape
    rows = []
    for y0, x0 in ((h - window) // 2, (w - window) // 2), (0, 0), (h - window, w - window):
        y0, x0 = y0 // 16 * 16, x0 // 16 * 16
        out = m.session.run(None, {m.input_name: np.ascontiguousarray(x[None, :, y0:y0 + window, x0:x0 + window])})[0][0]
        ref = whole[:, y0 // stride:(y0 + window) // stride, x0 // stride:(x0 + window) // stride]
        # distance of each cell centre to the nearest window border that is not the image's border
        cy = (np.arange(window // stride) + 0.5) * stride
        top = cy if y0 > 0 else np.inf * np.ones_like(cy)
        bottom = window - cy if y0 + window < h else np.inf * np.ones_like(cy)
        left = cy if x0 > 0 else np.inf * np.ones_like(cy)
        right = window - cy if x0 + window < w else np.inf * np.ones_like(cy)
        dist = np.minimum(np.minimum(top, bottom)[:, None], np.minimum(left, right)[None, :])
        diff = np.abs(out - ref).max(0)
        rows.append([float(diff[dist >= d].max()) if (dist >= d).any() else float("nan") for d in inside])
        rows[-1].append(float((out.argmax(0) != ref.argmax(0)).mean()))
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--models", nargs="+", type=Path, required=True, help="raw-output ONNX files (model.onnx)")
    ap.add_argument("--pairs", type=Path, required=True, help="folder of X_test.* / X_temp.* pairs")
    ap.add_argument("--limit", type=int, default=20, help="pairs, spread over the sorted list")
    ap.add_argument("--window", type=int, default=320, help="window side, px (a multiple of 16)")
    ap.add_argument("--inside", nargs="+", type=int, default=[16, 32, 48, 64, 96, 128])
    ap.add_argument("--out", type=Path)
    a = ap.parse_args()
    pairs = find_pairs(a.pairs, a.limit)
    if not pairs:
        raise SystemExit(f"{a.pairs}: no X_test.* / X_temp.* image pairs")
    report = {"machine": machine.describe(), "pairs": len(pairs), "window_px": a.window, "inside_px": a.inside,
              "models": {}}
    for path in a.models:
        m = EdgeModel(path, gate="none")
        if m.end_to_end:
            raise SystemExit(f"{path}: an end-to-end file; pass the raw-output model.onnx")
        stride = int(m.contract["model_config"]["stride"])
        rows = []
        for test_path, temp_path, _ in pairs:
            test, template = read_pair(test_path, temp_path)
            x = prepare_input(test, m.register(test, template), m.contract)
            rows += compare(m, x, a.window, a.inside, stride)
        med = np.nanmedian(np.asarray(rows), axis=0)
        report["models"][str(path)] = {
            "model_config": m.contract["model_config"],
            "max_logit_diff_median": {f">={d}px": round(float(v), 4) for d, v in zip(a.inside, med[:-1])},
            "top_class_changed_share_median": round(float(med[-1]), 4)}
        print(path, json.dumps(report["models"][str(path)]), flush=True)
    if a.out:
        a.out.write_text(json.dumps(report, indent=1) + "\n")


if __name__ == "__main__":
    main()
