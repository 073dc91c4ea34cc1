"""The edge app's inspection loop: find each image's template, decode the pair (one ahead, in a reader
thread), run the model, and turn each image into one JSON record; errors become that image's record.

``pcb-aoi-detect`` (``app``) drives it over a list of files or a watched folder (``folder``); the
benchmark stage times it as it is (``pcb_aoi.deploy.measure``). Torch-free.
"""
from __future__ import annotations

import argparse
import logging
import os
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Iterable, Iterator

from PIL import Image, ImageDraw

from .record import error_record, ok_record
from .runtime import EdgeError, EdgeModel, read_grey, read_pair

IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff"}

# The app's lines on stderr, "HH:MM:SS message" (app.setup_logging); the logger keeps the app's name.
log = logging.getLogger("pcb_aoi.edge.app")
image_log = log.getChild("images")  # one line per image inspected; --quiet silences it


def is_template_name(path: Path) -> bool:
    return path.stem.endswith("_temp")


def find_template(image: Path, template: Path | None, template_dir: Path | None) -> Path | None:
    """The template of ``image`` by the conventions in the module docstring; None if there is none."""
    if template:
        return template
    if template_dir:
        return template_dir / image.name
    if image.stem.endswith("_test"):
        base = image.stem.removesuffix("_test") + "_temp"
        for suffix in [image.suffix, *sorted(IMAGE_SUFFIXES)]:
            if (image.with_name(base + suffix)).is_file():
                return image.with_name(base + suffix)
        return image.with_name(base + image.suffix)
    return None


def write_atomic(path: Path, data: bytes) -> None:
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def write_overlay(image: Path, detections: list, out_dir: Path) -> None:
    with Image.open(image) as im:
        rgb = im.convert("RGB")
    draw = ImageDraw.Draw(rgb)
    for d in detections:
        draw.rectangle(d.box, outline=(255, 0, 0), width=2)
        draw.text((d.box[0], max(0.0, d.box[1] - 11)), f"{d.cls} {d.score:.2f}", fill=(255, 0, 0))
    out_dir.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{image.stem}.", suffix=".png", dir=out_dir)
    os.close(fd)
    rgb.save(tmp, format="PNG")
    os.replace(tmp, out_dir / f"{image.stem}.overlay.png")


class Inspector:
    """The model plus how to find templates and where overlays go; ``process_all`` -> one JSON record per image.

    (``Detector`` is the network, ``pcb_aoi.model.network``; this is the app's inspection loop around an
    exported one.)"""

    def __init__(self, model: EdgeModel, args: argparse.Namespace):
        self.model, self.args = model, args
        self._templates: dict[tuple, object] = {}
        self.threshold = model.contract["score_threshold"] if args.score is None else args.score
        self.provenance = model.provenance()  # the same block in every record

    def template_path(self, image: Path) -> Path | None:
        if not self.model.needs_template:
            return None
        path = find_template(image, self.args.template, self.args.template_dir)
        if path is None:
            raise EdgeError(f"{image}: no template; this model compares each image with its defect-free template: "
                            "pass --template or --template-dir, or name pairs X_test.png / X_temp.png")
        if not path.is_file():
            raise EdgeError(f"{image}: template {path} not found")
        return path

    def load(self, image: Path) -> tuple[float, object, object, object]:
        """(start time, test, registered template, gate plan) of ``image``; runs in the reader thread, raises
        EdgeError. The plan (``EdgeModel.plan``: where the network runs, None for dense) is made here too, so
        the difference and tiling of the next pair overlap the network's run on this one.

        A template used again (``--template``: one for the whole run) is decoded once; a new one is decoded
        at the same time as the image."""
        t0 = time.perf_counter()
        path = self.template_path(image) if image.is_file() else None  # else read_grey names the missing image
        key = (str(path), path.stat().st_mtime_ns) if path else None
        if path is None or key in self._templates:
            test, template = read_grey(image), self._templates.get(key)
        else:
            test, template = read_pair(image, path)
            self._templates = {key: template}
        template = self.model.register(test, template)
        return t0, test, template, self.model.plan(test, template)

    def process_all(self, images: Iterable[Path], on_start=None) -> Iterator[dict]:
        """One record per image, in order; the next image is read while the current one is inferred.

        ``on_start(image)`` runs just before an image starts to be read (folder mode: ``Journal.start``)."""
        def submit(image):
            if on_start is not None:
                on_start(image)
            return reader.submit(self.load, image)

        with ThreadPoolExecutor(1, thread_name_prefix="pcb-aoi-reader") as reader:
            it = iter(images)
            image = next(it, None)
            loading = submit(image) if image is not None else None
            while image is not None:
                current, current_loading = image, loading
                image = next(it, None)
                if image is not None:
                    loading = submit(image)  # read ahead
                yield self._infer(current, current_loading)

    def _infer(self, image: Path, loading) -> dict:
        t0 = time.perf_counter()
        review = getattr(self.args, "review", None)  # review_band.ReviewBand (--review-dir) or None
        try:
            t0, test, template, plan = loading.result()
            low = self.threshold if review is None else min(self.threshold, review.lo)  # near misses too
            found = self.model.detect(test, template, low, name=str(image), registered=True, plan=plan)
            dets = found if low == self.threshold else [d for d in found if review.above(d.score, self.threshold)]
            if self.args.overlay_dir:
                write_overlay(image, dets, self.args.overlay_dir)
        except Exception as e:  # any error is this image's record; the app goes on with the next one
            why = str(e) if isinstance(e, EdgeError) else f"{type(e).__name__}: {str(e).strip()}"
            log.error("error: %s", why if isinstance(e, EdgeError) else f"{image}: {why}")
            return error_record(str(image), why, self.provenance)
        ms = (time.perf_counter() - t0) * 1e3
        image_log.info("ok %s: %d defect(s) (%.1f ms)", image.name, len(dets), ms)
        record = ok_record(str(image), dets, self.threshold, self.model.classes, ms, self.provenance,
                           getattr(found, "gate", None))
        if review is not None and review.wants(found):
            review.set_aside(image, self.template_path(image), record, [d for d in found if d not in dets])
        return record


