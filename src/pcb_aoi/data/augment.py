"""augment: bbox-safe albumentations on the training split only, seeded.

The template gets exactly the same geometric and photometric transform as the test image
(``additional_targets``), so the pair stays aligned. The output folder is a complete dataset:
the original training images plus ``copies`` augmented versions of each.
"""
from __future__ import annotations

import shutil
from pathlib import Path

import albumentations as A
import numpy as np
from PIL import Image
from tqdm import tqdm

from ..edge.preprocess import read_grey
from ..pipeline.config import AugmentConfig
from .dataset import Dataset, atomic_dir, content_hash, image_file, make_boxes_frame, make_images_frame, split_ids


def build(cfg: AugmentConfig, seed: int) -> A.Compose:
    return A.Compose(
        [
            A.HorizontalFlip(p=cfg.hflip_p),
            A.VerticalFlip(p=cfg.vflip_p),
            A.RandomRotate90(p=cfg.rot90_p),
            A.RandomBrightnessContrast(brightness_limit=0.15, contrast_limit=0.15, p=cfg.brightness_contrast_p),
            A.GaussNoise(std_range=(0.01, 0.05), p=cfg.noise_p),
        ],
        bbox_params=A.BboxParams(format="pascal_voc", label_fields=["labels"], min_visibility=0.5),
        additional_targets={"template": "image"},
        seed=seed,
    )


def apply(tf: A.Compose, test: np.ndarray, template: np.ndarray | None, boxes: np.ndarray, labels):
    """Transform one pair; boxes (N, 4) x1 y1 x2 y2 pixels, one label each (names or ids).
    Returns (test, template, boxes, labels)."""
    kw = {"template": template} if template is not None else {}
    out = tf(image=test, bboxes=boxes.reshape(-1, 4), labels=labels, **kw)
    return out["image"], out.get("template"), np.asarray(out["bboxes"], np.float32).reshape(-1, 4), list(out["labels"])


def run(cfg: AugmentConfig, seed: int, src: str | Path, split: str | Path, out: str | Path) -> dict:
    ds = Dataset.load(src)
    train_ids = set(split_ids(split, "train"))
    train = ds.images[ds.images["image_id"].isin(train_ids)]
    tf = build(cfg, seed)
    images, boxes = [], []
    with atomic_dir(out) as tmp:
        (tmp / "images").mkdir()
        for img in tqdm(train.itertuples(index=False), total=len(train), desc="augment", unit="img"):
            own = ds.boxes_of(img.image_id)
            for col in ("path", "template_path"):  # the originals stay in the training set
                if getattr(img, col):
                    (tmp / getattr(img, col)).parent.mkdir(parents=True, exist_ok=True)
                    shutil.copyfile(ds.root / getattr(img, col), tmp / getattr(img, col))
            images.append(img._asdict())
            boxes += own.to_dict("records")
            test = read_grey(ds.root / img.path)
            template = read_grey(ds.root / img.template_path) if img.template_path else None
            xyxy = own[["x1", "y1", "x2", "y2"]].to_numpy(np.float32)
            for k in range(cfg.copies):
                t, tp, bx, labels = apply(tf, test, template, xyxy, own["class_name"].tolist())
                row = dict(img._asdict(), image_id=f"{img.image_id}_aug{k}", width=t.shape[1], height=t.shape[0])
                if "content_hash" in row:  # the original's pixels, not these
                    row["content_hash"] = content_hash(t, *([tp] if tp is not None else []))
                row["path"] = image_file(row["image_id"], "test", ".png")
                Image.fromarray(t).save(tmp / row["path"])
                if tp is not None:
                    row["template_path"] = image_file(row["image_id"], "temp", ".png")
                    Image.fromarray(tp).save(tmp / row["template_path"])
                images.append(row)
                boxes += [dict(image_id=row["image_id"], class_name=c, x1=b[0], y1=b[1], x2=b[2], y2=b[3])
                          for b, c in zip(bx, labels)]
        result = Dataset(tmp, make_images_frame(images), make_boxes_frame(boxes))
        result.save(tmp)
    return {"images": len(images), "boxes": len(boxes), "source_images": len(train)}
