"""Pictures of what the detector gets right and wrong, for people reviewing a model change.

Each overlay is the test image (grey, enlarged so 3-px defects stay visible) with a caption strip on
top and, at the operating point (``evaluate.score_threshold``, IoU 0.5, the same matching as the
recall and escape rate in ``metrics.json``):

- true defects it found: green box (drawn just outside the defect);
- true defects it missed or gave the wrong class: thick magenta box labelled ``MISS <class>``;
- its detections: red box labelled ``<class> <score>``; false alarms orange, labelled ``FA``.

Two sets, as DVC image plots: ``sample/`` holds a fixed choice of test images (the same files in
every revision, so ``dvc plots diff`` shows one image of both models side by side) and ``worst/`` the
images with the most misses, then the most false alarms.
"""
from __future__ import annotations

import re
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw, ImageFont

from ..data.dataset import Dataset
from ..edge.preprocess import read_grey
from .metrics import NO_DETECTIONS, Annotations, above, match

TARGET_SIDE = 512  # small images are enlarged (nearest neighbour, integer factor) to about this side
HEADER = 16  # px of caption strip above the image
FOUND, MISSED, PREDICTED, FALSE_ALARM = (0, 190, 0), (255, 0, 255), (230, 0, 0), (255, 140, 0)


def scale_of(width: int, height: int) -> int:
    """Integer enlargement of an image of this size in its overlay."""
    return max(1, TARGET_SIDE // max(width, height))


def outcome(gt: dict[str, np.ndarray], pred: dict[str, np.ndarray], score_threshold: float):
    """(detections above the threshold, their matched true box or -1, indices of true boxes found
    with the right class): the matching behind recall and escape rate (``metrics.operating_point``)."""
    pred = above(pred, score_threshold)
    to_gt = match(pred["boxes"], pred["scores"], gt["boxes"])
    gl = np.asarray(gt["labels"], int)
    found = {int(j) for j, label in zip(to_gt, pred["labels"]) if j >= 0 and gl[j] == label}
    return pred, to_gt, found


def draw(image: np.ndarray, gt: dict[str, np.ndarray], pred: dict[str, np.ndarray], classes: tuple[str, ...],
         score_threshold: float, title: str) -> Image.Image:
    """(H, W) uint8 grey image + its true boxes + detections above the threshold -> RGB overlay.

    Pixel (x, y) of the image is at (x * s, y * s + HEADER) in the overlay, s = ``scale_of(W, H)``.
    """
    h, w = image.shape
    s = scale_of(w, h)
    canvas = Image.new("RGB", (w * s, h * s + HEADER), "white")
    canvas.paste(Image.fromarray(image).convert("RGB").resize((w * s, h * s), Image.NEAREST), (0, HEADER))
    pen = ImageDraw.Draw(canvas)
    font = ImageFont.load_default()
    pred, to_gt, found = outcome(gt, pred, score_threshold)
    gl = np.asarray(gt["labels"], int)

    def box(xyxy, color, width, outset=0):
        x1, y1, x2, y2 = (float(v) * s for v in xyxy)
        pen.rectangle([x1 - outset, y1 + HEADER - outset, x2 + outset, y2 + HEADER + outset], outline=color, width=width)
        return x1 - outset, y1 + HEADER - outset

    def label(xy, text, color):
        x, y = xy
        y = max(HEADER, y - 11)
        left, top, right, bottom = pen.textbbox((x, y), text, font=font)
        pen.rectangle([left - 1, top - 1, right + 1, bottom + 1], fill=color)
        pen.text((x, y), text, fill="white" if color != FOUND else "black", font=font)

    for j in sorted(found):
        box(gt["boxes"][j], FOUND, 2, outset=2)
    for xyxy, k, score, j in zip(pred["boxes"], pred["labels"], pred["scores"], to_gt):
        hit = j >= 0
        corner = box(xyxy, PREDICTED if hit else FALSE_ALARM, 1)
        label(corner, f"{'' if hit else 'FA '}{classes[int(k)]} {score:.2f}", PREDICTED if hit else FALSE_ALARM)
    missed = [j for j in range(len(gl)) if j not in found]
    for j in missed:  # last, so a miss is never hidden under another box
        label(box(gt["boxes"][j], MISSED, 3, outset=3), f"MISS {classes[gl[j]]}", MISSED)
    false_alarms = int((to_gt < 0).sum())
    caption = (f"{title}  found {len(found)}/{len(gl)}  missed {len(missed)}  false alarms {false_alarms}"
               f"  (score >= {score_threshold:g})")
    pen.text((2, 2), caption, fill="black", font=font)
    return canvas


def errors(gt: dict[str, np.ndarray], pred: dict[str, np.ndarray], score_threshold: float) -> tuple[int, int]:
    """(missed true defects, false alarms) of one image at the operating point."""
    _, to_gt, found = outcome(gt, pred, score_threshold)
    return len(gt["labels"]) - len(found), int((to_gt < 0).sum())


def pick(ids: list[str], gt: Annotations, preds: Annotations, score_threshold: float, samples: int,
         worst: int) -> tuple[list[str], list[str]]:
    """(fixed sample, worst images). The sample is evenly spaced over the sorted ids, so it does not
    depend on the model; the worst are ordered by misses, then false alarms, then id."""
    ordered = sorted(ids)
    n = min(samples, len(ordered))
    sample = [ordered[i * len(ordered) // n] for i in range(n)]
    errs = {i: errors(gt[i], preds.get(i, NO_DETECTIONS), score_threshold) for i in ordered}
    bad = sorted((i for i in ordered if any(errs[i])), key=lambda i: (-errs[i][0], -errs[i][1], i))
    return sample, bad[:worst]


def safe_name(image_id: str) -> str:
    return re.sub(r"[^\w.-]", "_", image_id)


def write(out_dir: str | Path, ds: Dataset, ids: list[str], gt: Annotations, preds: Annotations,
          classes: tuple[str, ...], score_threshold: float, samples: int, worst: int) -> dict[str, int]:
    """Write ``out_dir/sample/<id>.png`` and ``out_dir/worst/<rank>_<id>.png``; returns the counts."""
    sample, bad = pick(ids, gt, preds, score_threshold, samples, worst)
    rows = {r.image_id: r for r in ds.rows(sorted(set(sample) | set(bad)))}
    jobs = [("sample", i, safe_name(i)) for i in sample] + \
           [("worst", i, f"{rank:02d}_{safe_name(i)}") for rank, i in enumerate(bad, 1)]
    for folder, image_id, name in jobs:
        image = read_grey(ds.root / rows[image_id].path)
        pic = draw(image, gt[image_id], preds.get(image_id, NO_DETECTIONS), classes, score_threshold, image_id)
        (Path(out_dir) / folder).mkdir(parents=True, exist_ok=True)
        pic.save(Path(out_dir) / folder / f"{name}.png", optimize=True)
    return {"sample": len(sample), "worst": len(bad)}
