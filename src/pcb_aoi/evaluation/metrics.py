"""Detection metrics: COCO-style AP with faster-coco-eval, plus the AOI operating point.

``coco_metrics`` runs one COCO evaluation with IoU thresholds 0.33 and 0.50:0.05:0.95, and reads
``map``, ``map50``, ``map33`` (COCO's 101-point interpolated AP at IoU 0.33, matched per class: *not*
DeepPCB's protocol, which ``deeppcb.py`` implements) and per-class AP50 from its precision array. ``operating_point`` matches detections above the score threshold to ground truth
(IoU >= 0.5, greedy by score) for per-class recall, the escape rate and a confusion matrix.
"""
from __future__ import annotations

import contextlib
import io

import numpy as np
import torch
from faster_coco_eval import COCO, COCOeval_faster
from torchvision.ops import box_iou

IOU_THRESHOLDS = np.array([0.33] + [round(0.5 + 0.05 * i, 2) for i in range(10)])

# per image: {"boxes": (N, 4) xyxy px, "labels": (N,) int} (+ "scores": (N,) for predictions)
Annotations = dict[str, dict[str, np.ndarray]]


def _coco(gt: Annotations, pred: Annotations, classes: tuple[str, ...]) -> tuple[COCO, COCO]:
    ids = {image_id: i + 1 for i, image_id in enumerate(sorted(gt))}

    def anns(src, with_score):
        out = []
        for image_id, a in src.items():
            for j, (box, label) in enumerate(zip(a["boxes"], a["labels"])):
                x1, y1, x2, y2 = (float(v) for v in box)
                ann = {"id": len(out) + 1, "image_id": ids[image_id], "category_id": int(label) + 1,
                       "bbox": [x1, y1, x2 - x1, y2 - y1], "area": (x2 - x1) * (y2 - y1), "iscrowd": 0}
                if with_score:
                    ann["score"] = float(a["scores"][j])
                out.append(ann)
        return out

    dataset = {"images": [{"id": i} for i in ids.values()],
               "categories": [{"id": k + 1, "name": c} for k, c in enumerate(classes)],
               "annotations": anns(gt, False)}
    with contextlib.redirect_stdout(io.StringIO()):
        gt_coco = COCO(dataset)
        dt = anns({k: v for k, v in pred.items() if k in ids}, True)
        dt_coco = gt_coco.loadRes(dt) if dt else None
    return gt_coco, dt_coco


def coco_metrics(gt: Annotations, pred: Annotations, classes: tuple[str, ...]) -> dict:
    """mAPs and per-class AP50 and precision-recall curves (IoU 0.5, 101 recall points)."""
    gt_coco, dt_coco = _coco(gt, pred, classes)
    n = len(classes)
    if dt_coco is None:  # no detections at all: every AP is 0
        zeros = {c: 0.0 for c in classes}
        return {"map": 0.0, "map50": 0.0, "map33": 0.0, "ap50": zeros, "pr": {c: [] for c in classes}}
    ev = COCOeval_faster(gt_coco, dt_coco, iouType="bbox", print_function=lambda *a: None)
    ev.params.iouThrs = IOU_THRESHOLDS
    ev.params.maxDets = [1, 10, 100]
    with contextlib.redirect_stdout(io.StringIO()):
        ev.evaluate()
        ev.accumulate()
    prec = ev.eval["precision"][:, :, :, 0, -1]  # (T, R, K): area "all", 100 detections

    def ap(t_idx, k=slice(None)):
        p = prec[t_idx][..., k]
        p = p[p > -1]  # -1: class without ground truth
        return float(p.mean()) if p.size else 0.0

    has_gt = [bool((prec[1, :, k] > -1).any()) for k in range(n)]
    per_class = {c: ap(1, k) if has_gt[k] else float("nan") for k, c in enumerate(classes)}
    rec = ev.params.recThrs
    pr = {c: [{"recall": float(r), "precision": float(max(p, 0.0))} for r, p in zip(rec, prec[1, :, k])]
          for k, c in enumerate(classes)}
    return {
        "map": float(np.mean([ap(t) for t in range(1, len(IOU_THRESHOLDS))])),
        "map50": ap(1),
        "map33": ap(0),
        "ap50": per_class,
        "pr": pr,
    }


def match(pred_boxes: np.ndarray, pred_scores: np.ndarray, gt_boxes: np.ndarray, iou: float = 0.5) -> np.ndarray:
    """Greedy matching by score, whatever the classes: for each prediction (N,), the index of the
    ground-truth box (M, 4) it matches at IoU >= ``iou``, or -1. A ground-truth box matches once."""
    out = np.full(len(pred_boxes), -1)
    if not len(pred_boxes) or not len(gt_boxes):
        return out
    ious = box_iou(torch.tensor(pred_boxes, dtype=torch.float32), torch.tensor(gt_boxes, dtype=torch.float32)).numpy()
    matched = np.zeros(len(gt_boxes), bool)
    for i in np.argsort(-np.asarray(pred_scores), kind="stable"):
        cand = np.where(matched, -1.0, ious[i])
        j = int(cand.argmax())
        if cand[j] >= iou:
            matched[j] = True
            out[i] = j
    return out


def above(p: dict[str, np.ndarray], score_threshold: float) -> dict[str, np.ndarray]:
    """The detections of one image scoring at least ``score_threshold``."""
    keep = p["scores"] >= score_threshold
    return {k: p[k][keep] for k in ("boxes", "scores", "labels")}


NO_DETECTIONS = {"boxes": np.zeros((0, 4)), "scores": np.zeros(0), "labels": np.zeros(0, int)}


def operating_point(gt: Annotations, pred: Annotations, n_classes: int, score_threshold: float,
                    iou: float = 0.5) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Greedy matching by score at ``score_threshold`` (see ``match``).

    Returns (found per class (K,), total per class (K,), confusion (K+1, K+1)) where confusion rows
    are ground truth, columns predictions, and index K is background (missed / false alarm).
    """
    found = np.zeros(n_classes, int)
    total = np.zeros(n_classes, int)
    confusion = np.zeros((n_classes + 1, n_classes + 1), int)
    for image_id, g in gt.items():
        p = above(pred.get(image_id, NO_DETECTIONS), score_threshold)
        gl = np.asarray(g["labels"], int)
        np.add.at(total, gl, 1)
        to_gt = match(p["boxes"], p["scores"], g["boxes"], iou)
        for label, j in zip(p["labels"].astype(int), to_gt):
            if j >= 0:
                confusion[gl[j], label] += 1
                found[gl[j]] += int(gl[j] == label)
            else:
                confusion[n_classes, label] += 1  # false alarm
        for j in np.setdiff1d(np.arange(len(gl)), to_gt):
            confusion[gl[j], n_classes] += 1  # escape
    return found, total, confusion
