"""etl: decode every image, normalise it to 8-bit grey PNG, and check every box.

An image is rejected, with its boxes, when it cannot be decoded, its template does not match its
size, or one of its boxes is invalid (unknown class, outside the image, degenerate). Rejections are
listed in the report with the reason; nothing is dropped silently.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
from PIL import Image, UnidentifiedImageError
from tqdm import tqdm

from .config import EtlConfig
from .dataset import Dataset, atomic_dir, make_boxes_frame, make_images_frame, per_class_counts, read_grey


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


def run(cfg: EtlConfig, classes: tuple[str, ...], src: str | Path, out: str | Path) -> dict:
    """Clean dataset ``src`` into ``out`` atomically; return the ``reports/etl.json`` summary."""
    ds = Dataset.load(src)
    images, boxes, rejected = [], [], []
    with atomic_dir(out) as tmp:
        (tmp / "images").mkdir()
        for img in tqdm(ds.images.itertuples(index=False), total=len(ds.images), desc="etl", unit="img"):
            test, why = _decode(ds.root / img.path)
            template = None
            if why is None and img.template_path:
                template, why = _decode(ds.root / img.template_path)
                if why is None and template.shape != test.shape:
                    why = f"{img.template_path}: template is {template.shape[::-1]}, test image is {test.shape[::-1]}"
            if why is None and (test.shape[1], test.shape[0]) != (img.width, img.height):
                why = f"{img.path}: manifest says {img.width}x{img.height}, file is {test.shape[1]}x{test.shape[0]}"
            own = ds.boxes_of(img.image_id)
            if why is None:
                problems = [(i, p) for i, r in enumerate(own.itertuples(index=False))
                            if (p := box_problem(r, img.width, img.height, classes, cfg.min_box_px))]
                if problems:
                    why = "; ".join(f"box {i}: {p}" for i, p in problems)
            if why is not None:
                rejected.append({"image_id": img.image_id, "file": str(img.path), "reason": why})
                continue
            row = img._asdict()
            row["path"] = f"images/{img.image_id}_test.png"
            Image.fromarray(test).save(tmp / row["path"])
            if template is not None:
                row["template_path"] = f"images/{img.image_id}_temp.png"
                Image.fromarray(template).save(tmp / row["template_path"])
            images.append(row)
            boxes += own.to_dict("records")
        clean = Dataset(tmp, make_images_frame(images), make_boxes_frame(boxes))
        clean.save(tmp)
    return {
        "images": len(images),
        "boxes": len(boxes),
        "rejected_images": len(rejected),
        "per_class": per_class_counts(clean.boxes, classes),
        "rejected": rejected,
    }
