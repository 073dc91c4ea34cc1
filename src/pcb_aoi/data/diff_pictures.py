"""``pcb-aoi-data-diff --thumbnails``: changed images drawn base | head, old boxes red, new boxes green."""
from __future__ import annotations

import io
from pathlib import Path

from PIL import Image, ImageDraw, ImageFont

from .dataset import atomic_dir

OLD, NEW = (220, 30, 30), (20, 170, 60)
TOP, GAP = 14, 6  # px: label row above the pictures, gap between them


def _drawn(side, image_id: str, colour) -> Image.Image | None:
    """The image of ``image_id`` at ``side``'s revision with its boxes; None when its file is not there."""
    row = side.images.set_index("image_id").loc[image_id]
    raw = side.read(f"{side.data}/{row.path}")
    if raw is None:
        return None
    pic = Image.open(io.BytesIO(raw)).convert("RGB")
    pen = ImageDraw.Draw(pic)
    for b in side.boxes[side.boxes["image_id"] == image_id].itertuples(index=False):
        pen.rectangle([b.x1, b.y1, b.x2 - 1, b.y2 - 1], outline=colour)
        pen.text((b.x1 + 1, max(b.y1 - 11, 0)), b.class_name, fill=colour, font=ImageFont.load_default())
    return pic


def thumbnails(d: dict, base, head, out: Path, limit: int) -> list[str]:
    """Write up to ``limit`` PNGs (base | head) of images in both revisions whose boxes or pixels changed,
    box changes first; returns their file names. ``out`` is replaced as a whole."""
    ids = list(dict.fromkeys([(e.get("base_image_id", e["image_id"]), e["image_id"]) for e in d["boxes"]]
                             + [(i, i) for i in d["images"]["changed"]]))[:limit]  # (base id, head id): renamed
    names = []
    with atomic_dir(out) as tmp:
        for base_id, image_id in ids:
            left, right = _drawn(base, base_id, OLD), _drawn(head, image_id, NEW)
            if left is None or right is None:
                continue
            pic = Image.new("RGB", (left.width + GAP + right.width, TOP + max(left.height, right.height)), "white")
            pic.paste(left, (0, TOP))
            pic.paste(right, (left.width + GAP, TOP))
            pen = ImageDraw.Draw(pic)
            pen.text((2, 1), f"base {base.label}", fill=OLD, font=ImageFont.load_default())
            pen.text((left.width + GAP + 2, 1), f"head {head.label}", fill=NEW, font=ImageFont.load_default())
            name = image_id.replace(":", "__").replace("/", "__") + ".png"
            pic.save(tmp / name)
            names.append(name)
    return names
