"""ingest: bring a source into the canonical dataset layout (see ``dataset.py``)."""
from __future__ import annotations

import os
from concurrent.futures import ProcessPoolExecutor
from functools import partial
from pathlib import Path

from PIL import Image
from tqdm import tqdm

from .config import IngestConfig, SynthConfig
from .dataset import Dataset, atomic_dir, make_boxes_frame, make_images_frame, per_class_counts


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
                           board_id=f"board{b:03d}", source_split=""))
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


def run(cfg: IngestConfig, seed: int, classes: tuple[str, ...], out: str | Path) -> dict:
    """Write the canonical dataset to ``out`` atomically; return the ``reports/ingest.json`` summary."""
    with atomic_dir(out) as tmp:
        if cfg.source == "synthetic":
            ds = ingest_synthetic(cfg.synthetic, seed, tmp)
        else:  # the config loader only admits known sources
            raise AssertionError(cfg.source)
        ds.save(tmp)
    return {
        "source": cfg.source,
        "images": int(len(ds.images)),
        "boxes": int(len(ds.boxes)),
        "boards": int(ds.images["board_id"].nunique()),
        "per_class": per_class_counts(ds.boxes, classes),
    }
