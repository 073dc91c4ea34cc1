"""The edge app's inspection loop: find each image's template, decode the pair, run the model, and turn each
image into one JSON record; errors become that image's record.

Two ways to run a stream of images, the same records in the same order:

- ``workers=1``: in this process, the next pair decoded, registered and planned in a reader thread while
  the model runs on the current one;
- ``workers=N`` (N > 1): N worker processes (spawned once, kept for the inspector's life), each inspecting
  whole images with its own ONNX Runtime session. Decoding, registration, the gate's plan and the
  decoding of detections are many short numpy and Python steps that hold the GIL between them: in one
  process the reader thread and the inference thread slow each other down by about a third (measured,
  ``docs/gate.md``), processes do not.

``pcb-aoi-detect`` (``app``) drives it over a list of files or a watched folder (``folder``); the
benchmark stage times it as it is (``pcb_aoi.deploy.measure``). Torch-free.
"""
from __future__ import annotations

import argparse
import logging
import multiprocessing
import multiprocessing.connection
import os
import signal
import tempfile
import time
from collections import deque
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Callable, Iterable, Iterator

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


def _serve(conn, inspector: "Inspector", spec: tuple, gate: dict | None) -> None:
    """A worker process: load the model (``spec``: its class, arguments and keyword arguments; the parent's
    gate settings), then inspect each image path received on ``conn`` and send back (record, log lines),
    until None or the other end closes. The app stops its workers itself (after the images in flight), so
    SIGINT / SIGTERM sent to the whole process group leave them running."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    make, args, kwargs = spec
    inspector.model = make(*args, **kwargs)
    if gate is not None:
        inspector.model.gate = gate
    while True:
        try:
            image = conn.recv()
        except EOFError:
            return
        if image is None:
            return
        conn.send(inspector.inspect(image, lambda: inspector.load(image)))


class _Workers:
    """``n`` worker processes (``_serve``), each with a pipe. An image goes to the worker with the fewest
    images in hand; each worker answers in the order it was sent images, so an answer belongs to that
    worker's oldest image without one. Pipes, not a ``concurrent.futures`` pool: no helper threads in this
    process (a pool cost ~0.3 ms of CPU per image in them, measured: a few percent of a gated image)."""

    def __init__(self, n: int, inspector: "Inspector", model, threads: int):
        ctx = multiprocessing.get_context("spawn")  # no fork of a process holding ONNX Runtime's threads
        self.conns, self.procs = [], []
        for i in range(n):
            here, there = ctx.Pipe()
            proc = ctx.Process(target=_serve, args=(there, inspector, model.worker_spec(threads), getattr(model, "gate", None)),
                               daemon=True, name=f"pcb-aoi-worker-{i}")
            proc.start()
            there.close()
            self.conns.append(here)
            self.procs.append(proc)
        self.waiting: list[deque] = [deque() for _ in range(n)]  # per worker: [image, answer] entries sent

    def send(self, image: Path) -> list:
        """Send ``image`` to the least busy worker; its entry [image, answer (None until it comes)]."""
        k = min(range(len(self.conns)), key=lambda i: len(self.waiting[i]))
        entry = [image, None]
        try:
            self.conns[k].send(image)
        except OSError:  # the worker is gone (its end of the pipe closed)
            raise EdgeError(f"{image}: a worker process stopped (killed or crashed); the images in flight were "
                            "not inspected") from None
        self.waiting[k].append(entry)
        return entry

    def collect(self, timeout: float | None) -> None:
        """Read the answers that are there (waiting up to ``timeout`` s for one; None: until one comes)."""
        busy = {self.conns[k]: k for k in range(len(self.conns)) if self.waiting[k]}
        for conn in multiprocessing.connection.wait(list(busy), timeout):
            entry = self.waiting[busy[conn]].popleft()
            try:
                entry[1] = conn.recv()
            except (EOFError, OSError):
                raise EdgeError(f"{entry[0]}: a worker process stopped (killed or crashed) while inspecting this "
                                "image; the images in flight were not inspected") from None

    def close(self) -> None:
        for conn in self.conns:
            try:
                conn.send(None)
            except OSError:  # that worker is gone
                pass
        for proc in self.procs:
            proc.join(timeout=10)
            if proc.is_alive():
                proc.terminate()
                proc.join()
        for conn in self.conns:
            conn.close()


class Inspector:
    """The model plus how to find templates and where overlays go; ``process_all`` -> one JSON record per image.

    (``Detector`` is the network, ``pcb_aoi.model.network``; this is the app's inspection loop around an
    exported one.) ``workers`` > 1 (a model with ``worker_spec``: ``EdgeModel``, a peer's): worker processes,
    started at the first ``process_all`` and stopped by ``close`` (or ``with``), sharing the model's ONNX
    Runtime threads (its ``threads``, 0 = all cores; at least 1 each)."""

    def __init__(self, model: EdgeModel, args: argparse.Namespace, workers: int = 1):
        self.model, self.args = model, args
        self._templates: dict[tuple, object] = {}
        self.threshold = model.contract["score_threshold"] if args.score is None else args.score
        self.provenance = model.provenance()  # the same block in every record
        if workers > 1 and not hasattr(model, "worker_spec"):
            raise ValueError(f"workers={workers} needs a model a worker process can load (EdgeModel), not "
                             f"{type(model).__name__}")
        self.workers, self._pool = workers, None

    def __getstate__(self) -> dict:  # what a worker process gets: no model (it loads its own), no pool
        return self.__dict__ | {"model": None, "_pool": None, "_templates": {}}

    def __enter__(self) -> "Inspector":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def close(self) -> None:
        """Stop the worker processes (after the images they are inspecting)."""
        if self._pool is not None:
            self._pool.close()
            self._pool = None

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
        """(start time, test, registered template, gate plan) of ``image``; runs in the reader thread (or a
        worker process), raises EdgeError. The plan (``EdgeModel.plan``: where the network runs, None for dense) is made here too, so
        the difference and tiling of the next pair overlap the network's run on this one.

        A template used again (``--template``: one for the whole run) is decoded once; a new one is decoded
        at the same time as the image in one process, after it in a worker process (the other workers keep
        the cores busy: a second thread would only add its hand-over, ~0.2 ms of CPU per pair measured)."""
        t0 = time.perf_counter()
        path = self.template_path(image) if image.is_file() else None  # else read_grey names the missing image
        key = (str(path), path.stat().st_mtime_ns) if path else None
        if path is None or key in self._templates:
            test, template = read_grey(image), self._templates.get(key)
        else:
            test, template = read_pair(image, path) if self.workers == 1 else (read_grey(image), read_grey(path))
            self._templates = {key: template}
        template = self.model.register(test, template)
        return t0, test, template, self.model.plan(test, template)

    def process_all(self, images: Iterable[Path], on_start: Callable[[Path], None] | None = None) -> Iterator[dict]:
        """One record per image, in order (``workers``: in this process with a reader thread, or in worker processes).

        ``on_start(image)`` runs just before an image starts to be read (folder mode: ``Journal.start``); with
        worker processes up to 3 x ``workers`` images are in flight. Closing the iterator early drops the
        images not yet returned (those being inspected finish first)."""
        emit = self._log_lines
        if self.workers > 1:
            yield from map(emit, self._in_workers(images, on_start))
            return

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
                yield emit(self.inspect(current, current_loading.result))

    def _in_workers(self, images: Iterable[Path], on_start) -> Iterator[tuple[dict, list]]:
        """Up to 3 x ``workers`` images in flight; answers yielded in the images' order as soon as they are in."""
        if self._pool is None:
            threads = max(1, (self.model.options["threads"] or os.cpu_count() or 1) // self.workers)
            self._pool = _Workers(self.workers, self, self.model, threads)
        pool, flight = self._pool, deque()  # entries [image, answer] in the images' order

        def ready(block: bool):  # the answers in; with ``block``, at least the oldest image's
            pool.collect(0)
            while block and flight[0][1] is None:
                pool.collect(None)
            while flight and flight[0][1] is not None:
                yield flight.popleft()[1]

        try:
            for image in images:
                while len(flight) >= 3 * self.workers:
                    yield from ready(block=True)
                if on_start is not None:
                    on_start(image)
                flight.append(pool.send(image))
                yield from ready(block=False)
            while flight:
                yield from ready(block=True)
        except EdgeError:
            self.close()
            raise
        finally:  # closed early: the answers still to come are read and dropped, so the pipes stay in step
            while self._pool is pool and any(pool.waiting):
                try:
                    pool.collect(None)
                except EdgeError:
                    self.close()

    @staticmethod
    def _log_lines(result: tuple[dict, list]) -> dict:
        record, lines = result
        for logger, level, message in lines:
            logger.log(level, "%s", message)
        return record

    def inspect(self, image: Path, load: Callable[[], tuple]) -> tuple[dict, list]:
        """``image``'s record and its log lines ([(logger, level, message)]): ``load()`` gives what ``load``
        returns (the reader thread's result, or ``load`` itself in a worker process) or raises."""
        t0 = time.perf_counter()
        review = getattr(self.args, "review", None)  # review_band.ReviewBand (--review-dir) or None
        try:
            t0, test, template, plan = load()
            low = self.threshold if review is None else min(self.threshold, review.lo)  # near misses too
            found = self.model.detect(test, template, low, name=str(image), registered=True, plan=plan)
            dets = found if low == self.threshold else [d for d in found if review.above(d.score, self.threshold)]
            if self.args.overlay_dir:
                write_overlay(image, dets, self.args.overlay_dir)
        except Exception as e:  # any error is this image's record; the app goes on with the next one
            why = str(e) if isinstance(e, EdgeError) else f"{type(e).__name__}: {str(e).strip()}"
            line = (log, logging.ERROR, "error: " + (why if isinstance(e, EdgeError) else f"{image}: {why}"))
            return error_record(str(image), why, self.provenance), [line]
        ms = (time.perf_counter() - t0) * 1e3
        line = (image_log, logging.INFO, f"ok {image.name}: {len(dets)} defect(s) ({ms:.1f} ms)")
        record = ok_record(str(image), dets, self.threshold, self.model.classes, ms, self.provenance,
                           getattr(found, "gate", None))
        if review is not None and review.wants(found):
            review.set_aside(image, self.template_path(image), record, [d for d in found if d not in dets])
        return record, [line]
