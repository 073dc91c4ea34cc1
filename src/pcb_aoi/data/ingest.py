"""ingest: bring a source (synthetic, or a DeepPCB / VOC / YOLO / COCO folder from a local path,
an https archive or Azure Blob), or several (``ingest.sources``, see ``combine.py``), into the canonical
dataset layout (see ``dataset.py``)."""
from __future__ import annotations

import os
import shutil
from concurrent.futures import ProcessPoolExecutor
from functools import partial
from pathlib import Path

import pandas as pd
from PIL import Image
from tqdm import tqdm

from ..pipeline.config import IngestConfig, SourceConfig, SynthConfig
from .dataset import Dataset, atomic_dir, image_file, make_boxes_frame, make_images_frame, per_class_counts
from .combine import merge_duplicates
from .readers import READERS, DataError
from .sources import resolve


def _write_board(cfg: SynthConfig, seed: int, out: Path, b: int) -> tuple[list[dict], list[dict]]:
    from .synth import board_samples

    images, boxes = [], []
    for i, s in enumerate(board_samples(cfg, seed, b)):
        image_id = f"b{b:03d}_{i:03d}"
        test, temp = f"images/{image_id}_test.png", f"images/{image_id}_temp.png"
        Image.fromarray(s.test).save(out / test)
        Image.fromarray(s.template).save(out / temp)
        h, w = s.test.shape
        images.append(dict(image_id=image_id, path=test, template_path=temp, width=w, height=h,
                           board_id=f"board{b:03d}", source_split="", source="synthetic"))
        boxes += [dict(image_id=image_id, class_name=d.cls, x1=d.box[0], y1=d.box[1], x2=d.box[2], y2=d.box[3])
                  for d in s.defects]
    return images, boxes


def ingest_synthetic(cfg: SynthConfig, seed: int, out: Path, workers: int | None = None) -> Dataset:
    """Render the synthetic dataset into ``out`` (already existing, empty)."""
    (out / "images").mkdir()
    workers = workers or min(os.cpu_count() or 1, cfg.boards)
    job = partial(_write_board, cfg, seed, out)
    with ProcessPoolExecutor(workers) as pool:
        results = list(tqdm(pool.map(job, range(cfg.boards)), total=cfg.boards, desc="ingest: boards", unit="board"))
    images = [r for imgs, _ in results for r in imgs]
    boxes = [r for _, bxs in results for r in bxs]
    return Dataset(out, make_images_frame(images), make_boxes_frame(boxes))


def _size(path: Path) -> tuple[int, int]:
    """(width, height) from the header; (0, 0) when unreadable (etl rejects it with the reason)."""
    try:
        with Image.open(path) as im:
            return im.size
    except (OSError, SyntaxError):
        return 0, 0


def map_classes(boxes: list[dict], class_map: dict[str, str], classes: tuple[str, ...],
                key: str = "ingest.class_map") -> None:
    """Rename source classes in place; an unmapped unknown class is an error listing the known ones."""
    unknown = sorted({b["class_name"] for b in boxes} - set(class_map) - set(classes))
    if unknown:
        raise DataError(f"unknown class(es) {unknown} in the source; known: {list(classes)}. "
                        f"Map them with {key}, e.g. -S '{key}.{unknown[0]}={classes[0]}'")
    for b in boxes:
        b["class_name"] = class_map.get(b["class_name"], b["class_name"])


def ingest_folder(cfg: IngestConfig | SourceConfig, classes: tuple[str, ...], root: Path, out: Path,
                  report: dict | None = None, namespace: str = "", class_map_key: str = "ingest.class_map") -> Dataset:
    """Read ``root`` with the reader of ``cfg.source`` and copy its images into ``out/images``; what the
    reader skipped goes into ``report``. A ``namespace`` (one of several sources) prefixes the image and
    board ids (``deeppcb:00041000`` on board ``deeppcb:00041``) and is the ``source`` column, else the reader is."""
    images, boxes = READERS[cfg.source](root, cfg.board_regex, report)
    map_classes(boxes, cfg.class_map, classes, class_map_key)
    dup = pd.Series([r["image_id"] for r in images]).duplicated()
    if dup.any():
        raise DataError(f"{root}: image id {images[int(dup.idxmax())]['image_id']!r} appears twice (same file stem)")
    if namespace:
        for r in images:
            r.update(image_id=f"{namespace}:{r['image_id']}", board_id=f"{namespace}:{r['board_id']}")
        for b in boxes:
            b["image_id"] = f"{namespace}:{b['image_id']}"
    (out / "images").mkdir(exist_ok=True)
    sizes = {}
    for r in tqdm(images, desc=f"ingest: copy {namespace}".rstrip(), unit="img"):
        r["source"] = namespace or cfg.source
        for col, tag in (("path", "test"), ("template_path", "temp")):
            if r[col]:
                src = Path(r[col])
                r[col] = image_file(r["image_id"], tag, src.suffix.lower())
                (out / r[col]).parent.mkdir(parents=True, exist_ok=True)
                shutil.copyfile(src, out / r[col])
        r["width"], r["height"] = sizes[r["image_id"]] = _size(out / r["path"])
    for b in boxes:
        if b.pop("normalised", False):  # YOLO: relative to the image size
            w, h = sizes[b["image_id"]]
            b.update(x1=b["x1"] * w, x2=b["x2"] * w, y1=b["y1"] * h, y2=b["y2"] * h)
    return Dataset(out, make_images_frame(images), make_boxes_frame(boxes))


def ingest_sources(cfg: IngestConfig, classes: tuple[str, ...], out: Path, report: dict) -> Dataset:
    """Every ``ingest.sources`` entry into ``out``, ids prefixed by the source's name, the same picture from
    two sources kept once (``combine.merge_duplicates``); ``report`` gets the counts per source."""
    images, boxes, skipped, read = [], [], {}, {}
    for i, s in enumerate(cfg.sources):
        key = f"ingest.sources[{i}]"
        try:
            ds = ingest_folder(s, classes, resolve(s.uri, s.sha256), out, skipped.setdefault(s.namespace, {}),
                               namespace=s.namespace, class_map_key=f"{key}.class_map")
        except DataError as e:
            raise DataError(f"{key} ({s.namespace}): {e}") from None
        images += ds.images.to_dict("records")
        read[s.namespace] = len(ds.images)
        boxes += ds.boxes.to_dict("records")
    kept_images, kept_boxes, merged = merge_duplicates(make_images_frame(images), make_boxes_frame(boxes), out,
                                                       cfg.label_conflict)
    per_source = {}
    for s in cfg.sources:
        mine = kept_images[kept_images["source"] == s.namespace]
        own_boxes = kept_boxes[kept_boxes["image_id"].isin(mine["image_id"])]
        per_source[s.namespace] = {
            "source": s.source, "uri": s.uri, "images": int(len(mine)), "boxes": int(len(own_boxes)),
            "boards": int(mine["board_id"].nunique()),
            "duplicates_dropped": read[s.namespace] - int(len(mine)),  # copies of an earlier source's picture
            "per_class": per_class_counts(own_boxes, classes), **skipped[s.namespace]}
    report.update(sources=per_source, **merged)
    return Dataset(out, kept_images, kept_boxes)


def run(cfg: IngestConfig, seed: int, classes: tuple[str, ...], out: str | Path) -> dict:
    """Write the canonical dataset to ``out`` atomically; return the ``reports/ingest.json`` summary."""
    skipped = {}  # what the reader skipped (DeepPCB: list lines naming no pair); per source with several
    with atomic_dir(out) as tmp:
        if cfg.sources:
            ds = ingest_sources(cfg, classes, tmp, skipped)
        elif cfg.source == "synthetic":
            ds = ingest_synthetic(cfg.synthetic, seed, tmp)
        else:
            ds = ingest_folder(cfg, classes, resolve(cfg.uri, cfg.sha256), tmp, skipped)
        ds.save(tmp)
    return {
        "source": "+".join(s.namespace for s in cfg.sources) if cfg.sources else cfg.source,
        "images": int(len(ds.images)),
        "boxes": int(len(ds.boxes)),
        "boards": int(ds.images["board_id"].nunique()),
        "per_class": per_class_counts(ds.boxes, classes),
        **skipped,
    }
