"""Several sources in one dataset (``ingest.sources``): the same picture from two sources is kept once.

Two images are the same picture when their decoded grey pixels are equal (``dataset.content_hash`` of
what ``edge.preprocess.read_grey`` gives, which is what the model reads): a copy re-encoded as PNG, or
one with other metadata, is found too, where comparing file bytes would miss it. Duplicates are merged
before the split, so no picture is trained on and also tested on. The copy from the source listed first
is kept; the others' files are deleted and each is listed in the report. When the copies' boxes differ
the sources disagree on what the picture shows: ``ingest.label_conflict: error`` (default) stops naming
both copies and their sources, ``first`` keeps the first source's boxes and lists the conflict, ``last``
keeps the boxes of the source listed last that gives the picture (the id and files stay the first's) and
lists the conflict: list the operator's corrections (``pcb-aoi-collect``'s folder) after the data they
correct and they win, while the picture keeps its id, so ``pcb-aoi-data-diff`` shows the relabelled boxes.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
from PIL import UnidentifiedImageError

from ..edge.preprocess import read_grey
from .dataset import content_hash
from .readers import DataError

BOX_TOL_PX = 1.0  # two copies' boxes agree when the classes match and each coordinate is within this
LISTED = 20  # duplicates / conflicts named in reports/ingest.json; the counts cover all


def picture_hash(path: Path) -> str | None:
    """``content_hash`` of the grey pixels of ``path``; None when it cannot be decoded (etl rejects it
    with the reason, so it is never merged)."""
    try:
        return content_hash(read_grey(path))
    except (OSError, SyntaxError, ValueError, UnidentifiedImageError):
        return None


def same_boxes(a: pd.DataFrame, b: pd.DataFrame, tol: float = BOX_TOL_PX) -> bool:
    """Whether two images' boxes are the same set: equal count per class, and every box of ``a`` within
    ``tol`` px (each coordinate) of an unused box of ``b`` of its class (formats round differently:
    YOLO's normalised coordinates come back as fractions of a pixel)."""
    if sorted(a["class_name"]) != sorted(b["class_name"]):
        return False
    cols = ["x1", "y1", "x2", "y2"]
    for cls, group in a.groupby("class_name"):
        left = group[cols].to_numpy(float)
        right = b.loc[b["class_name"] == cls, cols].to_numpy(float)
        free = np.ones(len(right), bool)
        for box in left:
            close = np.flatnonzero(free & (np.abs(right - box) <= tol).all(1))
            if not len(close):
                return False
            free[close[0]] = False
    return True


def merge_duplicates(images: pd.DataFrame, boxes: pd.DataFrame, root: Path,
                     label_conflict: str) -> tuple[pd.DataFrame, pd.DataFrame, dict]:
    """Keep one copy of each picture that several sources give (``images`` in the order of the sources).

    Returns the images and boxes kept and the report part: ``duplicates`` (kept id -> dropped ids),
    ``label_conflicts`` (copies whose boxes differ). Raises DataError on a conflict when ``label_conflict``
    is ``error``; ``first`` keeps the kept copy's boxes, ``last`` the boxes of the last copy (sources order).
    """
    hashes = [picture_hash(root / p) for p in images["path"]]
    first: dict[str, int] = {}  # picture -> row of the copy kept
    drop, duplicates, conflicts = [], [], []
    by_image = {k: g for k, g in boxes.groupby("image_id", sort=False)}
    none = boxes.iloc[:0]
    relabelled: dict[str, pd.DataFrame] = {}  # label_conflict last: kept id -> the later copy's boxes
    for i, h in enumerate(hashes):
        if h is None:
            continue
        k = first.setdefault(h, i)
        if k == i or images.at[k, "source"] == images.at[i, "source"]:  # within one source: etl's business
            continue
        kept, copy = images.at[k, "image_id"], images.at[i, "image_id"]
        drop.append(i)
        duplicates.append({"kept": kept, "dropped": copy})
        a, b = relabelled.get(kept, by_image.get(kept, none)), by_image.get(copy, none)
        if not same_boxes(a, b):
            conflicts.append({"image": kept, "copy": copy, "sources": [images.at[k, "source"], images.at[i, "source"]],
                              "boxes": [_described(a), _described(b)],
                              "kept_boxes_of": images.at[i if label_conflict == "last" else k, "source"]})
            if label_conflict == "last":
                relabelled[kept] = b.assign(image_id=kept)
    if conflicts and label_conflict == "error":
        c = conflicts[0]
        more = f" ({len(conflicts) - 1} more such pictures)" if len(conflicts) > 1 else ""
        raise DataError(
            f"ingest.sources: {c['image']} ({c['sources'][0]}) and {c['copy']} ({c['sources'][1]}) are the same "
            f"picture with different boxes: {c['sources'][0]} has {c['boxes'][0]}, {c['sources'][1]} has "
            f"{c['boxes'][1]}{more}; correct the labels of one source, or set ingest.label_conflict: first to keep "
            f"the boxes of the source listed first, or last to keep those of the source listed last (corrections)")
    for i in drop:
        for col in ("path", "template_path"):
            if images.at[i, col]:
                (root / images.at[i, col]).unlink(missing_ok=True)
    dropped = set(images.loc[drop, "image_id"])
    kept_boxes = boxes[~boxes["image_id"].isin(dropped | set(relabelled))]
    if relabelled:
        kept_boxes = pd.concat([kept_boxes, *relabelled.values()])
    report = {"duplicates_merged": len(duplicates), "duplicates": duplicates[:LISTED],
              "label_conflicts_count": len(conflicts), "label_conflicts": conflicts[:LISTED]}
    return (images.drop(index=drop).reset_index(drop=True),
            kept_boxes.reset_index(drop=True), report)


def _described(boxes: pd.DataFrame) -> list[str]:
    """Boxes as ``class [x1, y1, x2, y2]`` strings, for the error and the report."""
    return [f"{r.class_name} [{r.x1:g}, {r.y1:g}, {r.x2:g}, {r.y2:g}]" for r in boxes.itertuples(index=False)]
