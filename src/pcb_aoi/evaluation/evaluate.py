"""evaluate: choose the operating threshold on the validation boards, score the model on the test
boards (never seen in training, and no choice made on them).

The operating threshold (``reports/operating_point.json``, which export_onnx writes into the ONNX
contract): ``evaluate.operating_point: fixed`` takes ``evaluate.score_threshold``; ``auto`` picks, on
the validation split, the threshold with the fewest false calls whose escape rate (defects no
detection matched, DeepPCB's matching) is at most ``evaluate.max_escape_rate``.

Test metrics: the ``deeppcb`` block (DeepPCB's own protocol: AP from every detection, precision,
recall, F-score, escapes and false calls per image and per board at the operating threshold,
per-class recall; see ``deeppcb.py``) and the COCO metrics (``map`` = mAP@[.5:.95], ``map50``,
``map33`` = COCO's interpolated AP at IoU 0.33, per-class AP50, and recall / ``escape_rate`` at IoU 0.5
at the threshold). DVC plots: precision-recall curves per class (``pr.csv``, long format: class,
recall, precision), a confusion matrix (``background`` = missed defect / false alarm) and overlay
pictures of true and predicted defects (``overlays``).
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd

from ..data.dataset import Dataset, atomic_dir, split_ids, test_ids, write_json
from ..model import checkpoint
from ..model.inference import Runner, predict, torch_runner
from ..pipeline.config import EvaluateConfig
from . import deeppcb, overlays
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

    boards = dict(zip(ds.images["image_id"], ds.images["board_id"].astype(str)))
    metrics = {
        "deeppcb": deeppcb.protocol(gt, preds, score_threshold, classes, {i: boards[i] for i in ids}),
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


def choose_threshold(cfg: EvaluateConfig, runner: Runner, ds: Dataset, val: list[str], classes: tuple[str, ...],
                     use_template: bool) -> dict:
    """The operating point, chosen on the validation images ``val`` (see the module doc)."""
    if cfg.operating_point == "fixed":
        chosen = {"operating_point": "fixed", "score_threshold": cfg.score_threshold}
        if not val:
            return chosen | {"chosen_on": None}
    elif not val:
        raise ValueError("evaluate.operating_point: auto chooses the threshold on the validation split, and it is "
                         "empty; hold out validation boards (split.val_fraction or split.val_groups) or use "
                         "evaluate.operating_point: fixed")
    matches = deeppcb.Matches.of(ds.annotations(val, classes), predict(runner, ds, val, use_template))
    if cfg.operating_point == "auto":
        try:
            threshold, _ = deeppcb.operating_point(matches, cfg.max_escape_rate)
        except ValueError as e:
            raise ValueError(f"evaluate.max_escape_rate: {e} on the validation split; allow more escapes or "
                             "train a model that finds more defects") from None
        chosen = {"operating_point": "auto", "max_escape_rate": cfg.max_escape_rate, "score_threshold": threshold}
    n = matches.at(chosen["score_threshold"])
    return chosen | {"chosen_on": "val", "val": {
        "images": len(val), **n, "escape_rate": round(n["escapes"] / max(n["ground_truths"], 1), 6),
        "false_calls_per_image": round(n["false_calls"] / len(val), 6)}}


def run(cfg: EvaluateConfig, model_path: str | Path, clean_dir: str | Path, split_dir: str | Path,
        metrics_out: str | Path, plots_dir: str | Path, operating_point_out: str | Path,
        classes: tuple[str, ...] | None = None) -> dict:
    model, ckpt = checkpoint.load(model_path, expect={"classes": list(classes)} if classes else None)
    classes = tuple(ckpt["classes"])
    ds = Dataset.load(clean_dir)
    ids = test_ids(split_dir)
    runner, use_template = torch_runner(model), ckpt["input_spec"]["use_template"]
    chosen = choose_threshold(cfg, runner, ds, split_ids(split_dir, "val"), classes, use_template)
    metrics, plots = score(runner, ds, ids, classes, use_template, chosen["score_threshold"])
    metrics["operating_point"] = chosen["operating_point"]
    with atomic_dir(plots_dir) as tmp:
        overlays.write(tmp / "overlays", ds, ids, plots["gt"], plots["preds"], classes, chosen["score_threshold"],
                       cfg.overlay_samples, cfg.overlay_worst)
        # One long table, a row per (class, recall point): dvc.yaml declares one plot, a curve per class.
        pr = [{"class": c, **point} for c, points in plots["pr"].items() for point in points]
        pd.DataFrame(pr, columns=["class", "recall", "precision"]).to_csv(tmp / "pr.csv", index=False)
        pd.DataFrame(plots["confusion"], columns=["actual", "predicted"]).to_csv(tmp / "confusion.csv", index=False)
    write_json(operating_point_out, chosen)
    write_json(metrics_out, metrics)
    return metrics
