"""DeepPCB's own evaluation protocol, and the line's numbers at an operating threshold.

DeepPCB's evaluation script (``evaluation/script.py`` of the DeepPCB repository) scores a submission
per image like this: ground-truth boxes in file order, detections sorted by descending score; each
ground truth takes the first detection not yet taken whose IoU with it is **> 0.33** (float boxes, no
rounding), whatever its class; the pair is *correct* only when the classes agree, and a wrong-class
match still uses up both. Over all images pooled:

- AP = sum over correct detections, sorted by descending score, of (correct so far / rank), divided
  by the number of ground-truth boxes (computed from every detection the model decodes, score >= 0.01);
- precision = correct / detections, recall = correct / ground truths, F = 2PR / (P + R), over the
  detections submitted (those at or above the operating threshold).

This is not COCO's AP at IoU 0.33 (``map33``: 101-point interpolated, matched per class): a detection
of the wrong class that takes a defect hides it from a later right one here.

Because every ground truth takes the *highest-scored* free detection, the matching of the detections
above any threshold is the matching of all detections restricted to them; so one matching serves AP
and every threshold (``Matches``), which makes choosing an operating point a sweep over scores.

The line's numbers at a threshold: an **escape** is a defect no detection matched (a defect called
with the wrong class still stops the board: it is not an escape, but it is not correct either); a
**false call** is a detection that matched no defect. Numpy only: the edge benchmark uses it too.

Board verdicts (``board_verdicts``): each image is one inspected board, and it **fails** (is stopped
for the operator) when any detection scores at or above the threshold, as the edge app's ``verdict``.
From the ground truth: a **defective** board has at least one defect, a **defect-free** board none.
A board escape is a defective board that passes (nothing stops it: it ships with its defects); a
board false call is a defect-free board that fails. A defective board stopped only by false calls
(every defect escaped, something else flagged) is stopped, so not a board escape; it is counted in
``failed_on_false_calls_only`` with the defect-free boards that fail: the failed boards on which no
detection at the threshold matched a defect, the operator's wasted looks.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from ..edge.contract import MIN_SCORE  # 0.01: AP is computed from every detection decoded, scoring at least this

IOU = 0.33  # a match needs IoU strictly above this

# per image: {"boxes": (N, 4) float xyxy px, "labels": (N,) int} (+ "scores": (N,) for detections)
Annotations = dict[str, dict[str, np.ndarray]]


def iou(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """IoU of boxes (N, 4) against boxes (M, 4), float xyxy, no pixel +1: (N, M)."""
    a, b = np.asarray(a, float).reshape(-1, 4), np.asarray(b, float).reshape(-1, 4)
    lt = np.maximum(a[:, None, :2], b[None, :, :2])
    rb = np.minimum(a[:, None, 2:], b[None, :, 2:])
    inter = np.clip(rb - lt, 0, None).prod(-1)
    area = lambda x: (x[:, 2] - x[:, 0]) * (x[:, 3] - x[:, 1])  # noqa: E731
    union = area(a)[:, None] + area(b)[None, :] - inter
    return np.divide(inter, union, out=np.zeros_like(inter), where=union > 0)


def match_image(gt_boxes: np.ndarray, det_boxes: np.ndarray, det_scores: np.ndarray) -> np.ndarray:
    """For each detection (N,), the index of the ground-truth box (M, 4) that took it, or -1.

    Ground truths in their given order; each takes the first free detection in descending score
    (ties: the given order) with IoU > 0.33, whatever the classes.
    """
    taken_by = np.full(len(det_boxes), -1)
    if not len(det_boxes) or not len(gt_boxes):
        return taken_by
    order = np.argsort(-np.asarray(det_scores, float), kind="stable")
    overlaps = iou(gt_boxes, np.asarray(det_boxes)[order]) > IOU  # (M, N) in score order
    for g, row in enumerate(overlaps):
        free = np.flatnonzero(row & (taken_by[order] < 0))
        if free.size:
            taken_by[order[free[0]]] = g
    return taken_by


@dataclass
class Matches:
    """Every detection of a dataset, matched once; the numbers at any threshold follow from it.

    Per detection (D,): ``scores``, ``correct`` (matched a defect of its class), ``matched`` (matched
    any defect), ``image`` (index into ``images``). Per ground truth (G,): ``gt_labels``, ``gt_image``,
    ``gt_found_at`` (score of the detection that took it, -1 if none), ``gt_correct`` (that detection
    has its class).
    """

    images: list[str]
    scores: np.ndarray
    correct: np.ndarray
    matched: np.ndarray
    image: np.ndarray
    gt_labels: np.ndarray
    gt_image: np.ndarray
    gt_found_at: np.ndarray
    gt_correct: np.ndarray

    @classmethod
    def of(cls, gt: Annotations, pred: Annotations, min_score: float = MIN_SCORE) -> Matches:
        images = sorted(gt)
        cols: dict[str, list] = {k: [] for k in ("scores", "correct", "matched", "image", "gt_labels",
                                                 "gt_image", "gt_found_at", "gt_correct")}
        empty = {"boxes": np.zeros((0, 4)), "scores": np.zeros(0), "labels": np.zeros(0, int)}
        for i, image_id in enumerate(images):
            g, p = gt[image_id], pred.get(image_id, empty)
            keep = np.asarray(p["scores"], float) >= min_score
            boxes, scores = np.asarray(p["boxes"], float)[keep], np.asarray(p["scores"], float)[keep]
            labels = np.asarray(p["labels"], int)[keep]
            gl = np.asarray(g["labels"], int)
            taken_by = match_image(np.asarray(g["boxes"], float), boxes, scores)
            hit = taken_by >= 0
            correct = hit & (gl[np.maximum(taken_by, 0)] == labels) if len(gl) else np.zeros(len(labels), bool)
            found_at, found_correct = np.full(len(gl), -1.0), np.zeros(len(gl), bool)
            found_at[taken_by[hit]] = scores[hit]
            found_correct[taken_by[hit]] = correct[hit]
            for k, v in (("scores", scores), ("correct", correct), ("matched", hit), ("image", np.full(len(scores), i)),
                         ("gt_labels", gl), ("gt_image", np.full(len(gl), i)), ("gt_found_at", found_at),
                         ("gt_correct", found_correct)):
                cols[k].append(v)
        arrays = {k: np.concatenate(v) if v else np.zeros(0) for k, v in cols.items()}
        return cls(images, **{k: arrays[k].astype(t) for k, t in (
            ("scores", float), ("correct", bool), ("matched", bool), ("image", int), ("gt_labels", int),
            ("gt_image", int), ("gt_found_at", float), ("gt_correct", bool))})

    def ap(self) -> float:
        """DeepPCB's AP over every detection held (score >= min_score); 0 without ground truth."""
        if not len(self.gt_labels):
            return 0.0
        order = np.argsort(-self.scores, kind="stable")
        correct = self.correct[order]
        ranks = np.arange(1, len(correct) + 1)
        return float((np.cumsum(correct) / ranks)[correct].sum() / len(self.gt_labels))

    def at(self, threshold: float) -> dict[str, int]:
        """Counts at an operating threshold (detections scoring >= it): detections, correct, ground
        truths, escapes (defects no detection matched), false calls (detections matching no defect)."""
        submitted = self.scores >= threshold
        return {"detections": int(submitted.sum()), "correct": int((submitted & self.correct).sum()),
                "ground_truths": len(self.gt_labels), "escapes": int((self.gt_found_at < threshold).sum()),
                "false_calls": int((submitted & ~self.matched).sum())}


def _ratio(a: float, b: float) -> float | None:
    return round(a / b, 6) if b else None


def protocol(gt: Annotations, pred: Annotations, score_threshold: float, classes: tuple[str, ...] | None = None,
             boards: dict[str, str] | None = None, matches: Matches | None = None) -> dict:
    """DeepPCB's protocol on ``gt`` and ``pred`` (per image, see ``Annotations``), its precision,
    recall and F-score at ``score_threshold``, and the line's numbers there.

    ``classes`` (names in label order) adds per-class recall; ``boards`` (image id -> board id) adds
    false calls per board. Images of ``pred`` that are not in ``gt`` are ignored.
    """
    m = matches or Matches.of(gt, pred)
    n = m.at(score_threshold)
    precision = _ratio(n["correct"], n["detections"])
    recall = _ratio(n["correct"], n["ground_truths"])
    f = round(2 * precision * recall / (precision + recall), 6) if precision and recall else 0.0
    out = {"ap": round(m.ap(), 6), "precision": precision, "recall": recall, "fscore": f,
           "score_threshold": score_threshold, **n,
           "escape_rate": _ratio(n["escapes"], n["ground_truths"]),
           "false_calls_per_image": _ratio(n["false_calls"], len(m.images))}
    if boards is not None:
        board_of = np.array([boards[i] for i in m.images])
        out["boards"] = len(set(board_of))
        out["false_calls_per_board"] = _ratio(n["false_calls"], out["boards"])
    if classes is not None:
        found = (m.gt_found_at >= score_threshold) & m.gt_correct
        out["per_class_recall"] = {c: _ratio(found[m.gt_labels == k].sum(), (m.gt_labels == k).sum())
                                   for k, c in enumerate(classes)}
    out["board_verdicts"] = board_verdicts(m, score_threshold)
    return out


def board_verdicts(m: Matches, threshold: float) -> dict:
    """Pass/fail per image (= one inspected board) at ``threshold``, against the ground truth (see the
    module doc). Rates are None when their denominator is 0 (a test split without defect-free boards
    has no board false-call rate: ``failed_on_false_calls_only`` still counts the wasted stops)."""
    n = len(m.images)
    submitted = m.scores >= threshold
    failed = np.bincount(m.image[submitted], minlength=n) > 0  # (I,) the board is stopped
    true_call = np.bincount(m.image[submitted & m.matched], minlength=n) > 0  # a detection found a defect
    defective = np.bincount(m.gt_image, minlength=n) > 0
    escapes, false_calls = int((defective & ~failed).sum()), int((~defective & failed).sum())
    n_defective = int(defective.sum())
    return {"boards": n, "defective": n_defective, "defect_free": n - n_defective,
            "failed": int(failed.sum()), "escapes": escapes, "escape_rate": _ratio(escapes, n_defective),
            "false_calls": false_calls, "false_call_rate": _ratio(false_calls, n - n_defective),
            "failed_on_false_calls_only": int((failed & ~true_call).sum())}


def operating_point(matches: Matches, max_escape_rate: float) -> tuple[float, dict]:
    """The threshold with the fewest false calls whose escape rate is at most ``max_escape_rate``.

    False calls fall and escapes rise as the threshold rises, so it is the highest threshold that
    keeps enough defects: the score of the detection that finds the last defect allowed to be
    found, floored to 4 decimals (so the JSON value is exact and keeps that detection). Returns
    (threshold, counts there). Raises ValueError naming the best escape rate any threshold reaches.
    """
    total = len(matches.gt_labels)
    if not total:
        raise ValueError("no ground-truth defects to choose an operating point on")
    found = np.sort(matches.gt_found_at[matches.gt_found_at >= 0])[::-1]  # (F,) descending
    allowed = int(np.floor(max_escape_rate * total + 1e-9))  # escapes allowed
    need = total - allowed  # defects that must be found
    if need <= 0:
        threshold = 1.0
    elif len(found) < need:
        best = (total - len(found)) / total
        raise ValueError(f"no threshold reaches escape rate <= {max_escape_rate}: the best reachable is "
                         f"{best:.4f} ({total - len(found)} of {total} defects never matched by a detection "
                         f"scoring >= {MIN_SCORE})")
    else:
        threshold = float(np.floor(found[need - 1] * 1e4) / 1e4)
    return threshold, matches.at(threshold)
