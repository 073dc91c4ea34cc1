"""etl: decode every image, normalise it to 8-bit grey PNG, and check every box.

An image is rejected, with its boxes, when it cannot be decoded, duplicates an earlier image byte
for byte, its template is missing (in a dataset of test/template pairs) or does not match its size,
its VOC ``<size>`` is not the image's (unless ``etl.voc_size_mismatch: rescale``, which scales its
boxes), or one of its boxes is invalid (unknown class, degenerate, or outside the image unless
``etl.out_of_image: clip``). Rejections and clips are listed
in the report with the reason; nothing is dropped silently. Images larger than ``etl.tile_size``
(PKU-style photos) are cut into overlapping tiles; a cut box keeps its label when at least
``etl.tile_min_visibility`` of it lies in the tile. With ``etl.register_max_px`` > 0 each template is
registered to its test image (moved by the integer shift that best matches them, see
``edge.preprocess.registration_shift``); the moves are listed in the report and the clean folder records
the setting, which the model's contract then passes on to the edge app.
"""
from __future__ import annotations

import hashlib
import json
from pathlib import Path

import numpy as np
import pandas as pd
from PIL import Image, UnidentifiedImageError
from tqdm import tqdm

from ..edge.preprocess import read_grey, register_template
from ..pipeline.config import EtlConfig
from .dataset import (IMAGE_COLUMNS, REGISTRATION, Dataset, atomic_dir, content_hash, image_file, make_boxes_frame,
                      make_images_frame, per_class_counts)


def box_problem(row, width: int, height: int, classes: tuple[str, ...], min_px: float) -> str | None:
    """Why a box row is invalid, or None when it is fine."""
    if row.class_name not in classes:
        return f"unknown class {row.class_name!r} (known: {', '.join(classes)})"
    x1, y1, x2, y2 = (float(v) for v in (row.x1, row.y1, row.x2, row.y2))
    if not all(np.isfinite([x1, y1, x2, y2])):
        return f"non-finite coordinate in {[x1, y1, x2, y2]}"
    if x2 - x1 < min_px or y2 - y1 < min_px:
        return f"degenerate box {[x1, y1, x2, y2]} (needs x2-x1 and y2-y1 >= {min_px})"
    if x1 < 0 or y1 < 0 or x2 > width or y2 > height:
        return f"box {[x1, y1, x2, y2]} outside the {width}x{height} image"
    return None


def _decode(path: Path) -> tuple[np.ndarray | None, str | None]:
    try:
        return read_grey(path), None
    except FileNotFoundError:
        return None, f"{path}: file not found"
    except (UnidentifiedImageError, OSError, SyntaxError) as e:
        return None, f"{path}: cannot decode image ({e})"
    except ValueError as e:  # a >8-bit image, named with the fix
        return None, str(e)


def tile_starts(n: int, tile: int, overlap: int) -> list[int]:
    """Offsets of tiles of ``tile`` px covering ``n`` px with at least ``overlap`` px shared."""
    if n <= tile:
        return [0]
    starts = list(range(0, n - tile, tile - overlap))
    return starts + [n - tile]


def cut_boxes(boxes: pd.DataFrame, x0: int, y0: int, w: int, h: int, min_visibility: float) -> pd.DataFrame:
    """Boxes of the tile at (x0, y0) of size w x h, clipped and shifted; slivers below
    ``min_visibility`` of their area are dropped."""
    b = boxes.copy()
    area = (b.x2 - b.x1) * (b.y2 - b.y1)
    b["x1"], b["x2"] = (b.x1 - x0).clip(0, w), (b.x2 - x0).clip(0, w)
    b["y1"], b["y2"] = (b.y1 - y0).clip(0, h), (b.y2 - y0).clip(0, h)
    visible = (b.x2 - b.x1) * (b.y2 - b.y1) / area
    return b[visible >= min_visibility]


def _tiles(cfg: EtlConfig, test: np.ndarray):
    """(x0, y0, w, h) windows of one image: the whole image unless it is larger than the tile size."""
    h, w = test.shape
    t = cfg.tile_size
    if not t or (h <= t and w <= t):
        return [(0, 0, w, h)]
    tw, th = min(t, w), min(t, h)
    return [(x, y, tw, th) for y in tile_starts(h, th, cfg.tile_overlap) for x in tile_starts(w, tw, cfg.tile_overlap)]


def run(cfg: EtlConfig, classes: tuple[str, ...], src: str | Path, out: str | Path) -> dict:
    """Clean dataset ``src`` into ``out`` atomically; return the ``reports/etl.json`` summary."""
    ds = Dataset.load(src)
    images, boxes, rejected, clipped, moved, rescaled, seen = [], [], [], [], [], [], {}
    # test/template pairs (DeepPCB, synthetic): an image without its template cannot be used as a pair, and a
    # model trained on pairs cannot read it; sources without templates (VOC, YOLO, COCO) have none at all
    paired = bool(ds.images["template_path"].astype(bool).any())
    with atomic_dir(out) as tmp:
        (tmp / "images").mkdir()
        for img in tqdm(ds.images.itertuples(index=False), total=len(ds.images), desc="etl", unit="img"):
            test, why = _decode(ds.root / img.path)
            template = None
            if why is None:
                digest = hashlib.sha256((ds.root / img.path).read_bytes()).hexdigest()
                if digest in seen:  # the same picture twice could land in two splits
                    why = f"{img.path}: duplicate of image {seen[digest]!r} (same bytes)"
                seen.setdefault(digest, img.image_id)
            if why is None and paired and not img.template_path:
                expected = getattr(img, "expected_template", "") or "no template_path in images.parquet"
                why = f"template missing: {expected}"
            if why is None and img.template_path:
                template, why = _decode(ds.root / img.template_path)
                if why is None and template.shape != test.shape:
                    why = f"{img.template_path}: template is {template.shape[::-1]}, test image is {test.shape[::-1]}"
            if why is None and template is not None and cfg.register_max_px:
                template, shift = register_template(test, template, cfg.register_max_px)
                if shift != (0, 0):
                    moved.append({"image_id": img.image_id, "dx": shift[0], "dy": shift[1]})
            if why is None and (test.shape[1], test.shape[0]) != (img.width, img.height):
                why = f"{img.path}: manifest says {img.width}x{img.height}, file is {test.shape[1]}x{test.shape[0]}"
            own = ds.boxes_of(img.image_id)
            if why is None and getattr(img, "declared_width", 0) and getattr(img, "declared_height", 0):
                own, why = _declared_size(cfg, own, img, rescaled)
            if why is None:
                own, why = _check_boxes(cfg, own, img, classes, clipped)
            if why is not None:
                rejected.append({"image_id": img.image_id, "file": str(img.path), "reason": why})
                continue
            windows = _tiles(cfg, test)
            for x0, y0, w, h in windows:
                # raw-only columns stay behind; a raw manifest older than the source column has none
                row = {c: getattr(img, c, "") if c == "source" else getattr(img, c) for c in IMAGE_COLUMNS}
                if len(windows) > 1:
                    row.update(image_id=f"{img.image_id}_x{x0}_y{y0}", width=w, height=h)
                row["path"] = image_file(row["image_id"], "test", ".png")
                (tmp / row["path"]).parent.mkdir(parents=True, exist_ok=True)
                pixels = [test[y0:y0 + h, x0:x0 + w]]
                Image.fromarray(pixels[0]).save(tmp / row["path"])
                if template is not None:
                    row["template_path"] = image_file(row["image_id"], "temp", ".png")
                    pixels.append(template[y0:y0 + h, x0:x0 + w])
                    Image.fromarray(pixels[1]).save(tmp / row["template_path"])
                row["content_hash"] = content_hash(*pixels)
                images.append(row)
                part = cut_boxes(own, x0, y0, w, h, cfg.tile_min_visibility) if len(windows) > 1 else own
                boxes += part.assign(image_id=row["image_id"]).to_dict("records")
        clean = Dataset(tmp, make_images_frame(images), make_boxes_frame(boxes))
        clean.save(tmp)
        if cfg.register_max_px:
            (tmp / REGISTRATION).write_text(json.dumps({"max_px": cfg.register_max_px}) + "\n")
    return {
        "images": len(images),
        "boxes": len(boxes),
        "source_images": int(len(ds.images)),
        "rejected_images": len(rejected),
        "clipped_boxes": len(clipped),
        "registered_pairs_moved": len(moved),  # templates moved onto their test image (etl.register_max_px)
        "voc_size_rescaled_images": len(rescaled),  # boxes scaled to the image (etl.voc_size_mismatch: rescale)
        "per_class": per_class_counts(clean.boxes, classes),
        "rejected": rejected,
        "clipped": clipped,
        "registration_moves": moved,
        "voc_size_rescales": rescaled,
    }


def _declared_size(cfg: EtlConfig, own: pd.DataFrame, img, rescaled: list) -> tuple[pd.DataFrame, str | None]:
    """Boxes of an image whose annotation declares its size (VOC ``<size>``): as they are when it is the
    image's; else the image is rejected, or (``etl.voc_size_mismatch: rescale``) its boxes are scaled by
    image / declared per axis, taken to be drawn on a resized copy."""
    declared, actual = (int(img.declared_width), int(img.declared_height)), (int(img.width), int(img.height))
    if declared == actual:
        return own, None
    if cfg.voc_size_mismatch == "reject":
        return own, (f"{img.path}: the VOC <size> says {declared[0]}x{declared[1]}, the image is "
                     f"{actual[0]}x{actual[1]} (boxes drawn on a resized copy?); etl.voc_size_mismatch: rescale "
                     "scales its boxes to the image")
    sx, sy = actual[0] / declared[0], actual[1] / declared[1]
    own = own.assign(x1=own.x1 * sx, x2=own.x2 * sx, y1=own.y1 * sy, y2=own.y2 * sy)
    rescaled.append({"image_id": img.image_id, "declared": list(declared), "image": list(actual),
                     "scale": [round(sx, 6), round(sy, 6)]})
    return own, None


def _check_boxes(cfg: EtlConfig, own: pd.DataFrame, img, classes, clipped: list) -> tuple[pd.DataFrame, str | None]:
    """Validate the boxes of one image; clip those crossing the border when the params say so."""
    own = own.copy()
    problems = []
    for i, r in enumerate(own.itertuples(index=False)):
        p = box_problem(r, img.width, img.height, classes, cfg.min_box_px)
        if p and "outside" in p and cfg.out_of_image == "clip":
            c = [max(r.x1, 0), max(r.y1, 0), min(r.x2, img.width), min(r.y2, img.height)]
            own.iloc[i, own.columns.get_indexer(["x1", "y1", "x2", "y2"])] = c
            if c[2] - c[0] >= cfg.min_box_px and c[3] - c[1] >= cfg.min_box_px:
                clipped.append({"image_id": img.image_id, "box": i, "reason": p, "clipped_to": c})
                continue
        if p:
            problems.append(f"box {i}: {p}")
    return own, "; ".join(problems) or None
