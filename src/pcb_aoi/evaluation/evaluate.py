"""evaluate: score the trained model on the test split (boards never seen in training).

Writes the metrics (COCO mAP, mAP@0.5, mAP@0.33 = DeepPCB's protocol, per-class AP50 and recall
at the operating threshold, escape rate) and DVC plots: precision-recall curves per class (``pr.csv``,
long format: class, recall, precision), a confusion matrix (``background`` = missed defect / false
alarm) and overlay pictures of true and predicted defects (``overlays``).
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd

from ..data.dataset import Dataset, atomic_dir, test_ids, write_json
from ..model import checkpoint
from ..model.inference import Runner, predict, torch_runner
from ..pipeline.config import EvaluateConfig
from . import overlays
from .metrics import coco_metrics, operating_point


def score(runner: Runner, ds: Dataset, ids: list[str], classes: tuple[str, ...], use_template: bool,
          score_threshold: float) -> tuple[dict, dict]:
    """(metrics dict, plot data) for one model on ``ids``."""
    gt = ds.annotations(ids, classes)
    preds = predict(runner, ds, ids, use_template)
    coco = coco_metrics(gt, preds, classes)
    found, total, confusion = operating_point(gt, preds, len(classes), score_threshold)

    def clean(v: float):  # JSON has no NaN; a class absent from the test split has no AP
        return None if v is None or np.isnan(v) else round(float(v), 6)

    metrics = {
        "map": clean(coco["map"]),
        "map50": clean(coco["map50"]),
        "map33": clean(coco["map33"]),
        "escape_rate": clean(1 - found.sum() / total.sum()) if total.sum() else None,
        "score_threshold": score_threshold,
        "test_images": len(ids),
        "per_class": {c: {"ap50": clean(coco["ap50"][c]),
                          "recall": clean(found[k] / total[k]) if total[k] else None,
                          "boxes": int(total[k])}
                      for k, c in enumerate(classes)},
    }
    names = list(classes) + ["background"]
    cells = [{"actual": names[i], "predicted": names[j]}
             for i in range(len(names)) for j in range(len(names)) for _ in range(confusion[i, j])]
    return metrics, {"pr": coco["pr"], "confusion": cells, "gt": gt, "preds": preds}


def run(cfg: EvaluateConfig, model_path: str | Path, clean_dir: str | Path, split_dir: str | Path,
        metrics_out: str | Path, plots_dir: str | Path, classes: tuple[str, ...] | None = None) -> dict:
    model, ckpt = checkpoint.load(model_path, expect={"classes": list(classes)} if classes else None)
    classes = tuple(ckpt["classes"])
    ds = Dataset.load(clean_dir)
    ids = test_ids(split_dir)
    metrics, plots = score(torch_runner(model), ds, ids, classes, ckpt["input_spec"]["use_template"],
                           cfg.score_threshold)
    with atomic_dir(plots_dir) as tmp:
        overlays.write(tmp / "overlays", ds, ids, plots["gt"], plots["preds"], classes, cfg.score_threshold,
                       cfg.overlay_samples, cfg.overlay_worst)
        # One long table, a row per (class, recall point): dvc.yaml declares one plot, a curve per class.
        pr = [{"class": c, **point} for c, points in plots["pr"].items() for point in points]
        pd.DataFrame(pr, columns=["class", "recall", "precision"]).to_csv(tmp / "pr.csv", index=False)
        pd.DataFrame(plots["confusion"], columns=["actual", "predicted"]).to_csv(tmp / "confusion.csv", index=False)
    write_json(metrics_out, metrics)
    return metrics
