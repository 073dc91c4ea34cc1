"""pcb-aoi-detect: find PCB defects with an exported model, on files or on a folder the line fills.

Runs with the light ``pcb-aoi[edge]`` install (numpy, onnxruntime, pillow; no torch).

Files:   pcb-aoi-detect --model model.e2e.onnx a_test.png b_test.png [--out results.jsonl]
Folder:  pcb-aoi-detect --model model.e2e.onnx --watch incoming/ --out-dir results/

Model:   pcb-aoi-detect --model model.int8.onnx --info   (contract, INT8 format, this CPU, verdict)

One JSON line per image: ``{"file", "status": "ok", "detections": [{"class", "score", "box"}], "ms"}``
(box = x1 y1 x2 y2 in image pixels), or ``{"file", "status": "error", "error"}``.

Templates (models that compare with a defect-free board): ``--template T`` for every image (one
board type on the line), ``--template-dir D`` (the file of the same name in D), or else DeepPCB
pairs: ``X_test.<ext>`` is compared with ``X_temp.<ext>`` beside it (``*_temp.*`` files are never
inspected themselves).

Folder mode processes every image that appears in the folder once. ``OUT_DIR/results.jsonl`` is
the journal: an image listed there (ok or error) is never processed again, also after a restart.
Per image it also writes ``OUT_DIR/<name>.json`` atomically. Files still being written are left
alone until their size and time stamp stay the same for ``--settle`` seconds; hidden files and
``*.tmp``/``*.part`` names are ignored (write ``x.png.tmp`` and rename it, the safe way to drop a
file). SIGINT/SIGTERM: the current image is finished, then the app exits 0.

Errors never stop the app: any exception on one image (a corrupt file, an ONNX Runtime error, a
bug) becomes that image's ``{"status": "error", "error": "<Type>: <message>"}`` record (an EdgeError
gives just its message, which names the file) and the next image is processed; with a list of files
the exit status is then 1. What cannot be caught (SIGKILL, a segfault in a decoder, the OOM killer,
a power cut) is handled at the next start: before an image is read, its name goes into
``OUT_DIR/inflight.json`` (rewritten atomically, so never torn; it lists the image being inspected
and the one read ahead). At start, an image listed there without a line in the journal is
journaled once: with its ``<name>.json`` if that was written (the stop came between the two
writes), else as an error "the process stopped while inspecting this image (killed or crashed);
not retried", so an image that crashes the process is never retried in a loop. A journal line torn
by a kill is skipped with a warning (its image is then recovered as above).

INT8 models: the arithmetic of some INT8 formats depends on the CPU (``pcb_aoi.edge.int8``: full-range int8
weights saturate on x86 CPUs without VNNI). At start the app warns, naming the model's format and this
CPU's instruction sets, when the model is known to lose accuracy here or when its format is unknown
(quantized before pcb-aoi recorded it); ``--info`` prints the verdict.

Files are decoded (and pairs registered, for models that want it) one ahead in a reader thread while
the model runs on the current one (file reads, PNG decoding and numpy release the GIL), so on a
stream of images the decoding mostly hides behind inference; ``ms`` in a record is still that
image's own latency, from the start of its read.
"""
from __future__ import annotations

import argparse
import json
import logging
import os
import signal
import sys
import tempfile
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Iterable, Iterator

from PIL import Image, ImageDraw

from .contract import PROVIDERS
from .runtime import EdgeError, EdgeModel, read_grey, read_pair

IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff"}
PARTIAL_SUFFIXES = (".tmp", ".part", ".partial", ".crdownload", ".filepart", "~")
JOURNAL = "results.jsonl"
INFLIGHT = "inflight.json"
STOPPED = "the process stopped while inspecting this image (killed or crashed); not retried"


log = logging.getLogger(__name__)  # the app's lines on stderr, "HH:MM:SS message" (setup_logging)
image_log = log.getChild("images")  # one line per image inspected; --quiet silences it


def setup_logging(quiet: bool = False) -> None:
    """The app's log lines go to the current stderr as ``HH:MM:SS message``; ``quiet``: no line per image."""
    handler = next((h for h in log.handlers if getattr(h, "pcb_aoi_app", False)), None)
    if handler is None:  # once per process: main() may run again (tests), with another sys.stderr
        handler = logging.StreamHandler()
        handler.pcb_aoi_app = True
        handler.setFormatter(logging.Formatter("%(asctime)s %(message)s", datefmt="%H:%M:%S"))
        log.addHandler(handler)
        log.propagate = False
    handler.stream = sys.stderr  # not setStream: it flushes the old one, which may be closed
    log.setLevel(logging.INFO)
    image_log.setLevel(logging.WARNING if quiet else logging.NOTSET)


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

    def load(self, image: Path) -> tuple[float, object, object]:
        """(start time, test, registered template) of ``image``; runs in the reader thread, raises EdgeError.

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
        return t0, test, self.model.register(test, template)

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
        try:
            t0, test, template = loading.result()
            dets = self.model.detect(test, template, self.args.score, name=str(image), registered=True)
            if self.args.overlay_dir:
                write_overlay(image, dets, self.args.overlay_dir)
        except Exception as e:  # any error is this image's record; the app goes on with the next one
            why = str(e) if isinstance(e, EdgeError) else f"{type(e).__name__}: {str(e).strip()}"
            log.error("error: %s", why if isinstance(e, EdgeError) else f"{image}: {why}")
            return {"file": str(image), "status": "error", "error": why}
        ms = (time.perf_counter() - t0) * 1e3
        image_log.info("ok %s: %d defect(s) (%.1f ms)", image.name, len(dets), ms)
        return {"file": str(image), "status": "ok", "detections": [d.to_dict() for d in dets], "ms": round(ms, 2)}


def run_files(inspector: Inspector, images: list[Path], out: Path | None) -> int:
    records = list(inspector.process_all(images))
    lines = "".join(json.dumps(r) + "\n" for r in records)
    if out:
        out.parent.mkdir(parents=True, exist_ok=True)
        write_atomic(out, lines.encode())
    else:
        sys.stdout.write(lines)
    failed = sum(r["status"] != "ok" for r in records)
    if failed:
        log.error("%d of %d image(s) failed", failed, len(records))
    return 1 if failed else 0


class Journal:
    """Folder mode's record of work, in ``out_dir``: ``results.jsonl``, one complete line per finished image
    (what it lists is never redone), and ``inflight.json``, the images started and not yet journaled.

    Opening it finishes what a killed run left: each image in ``inflight.json`` without a journal line is
    journaled once (its ``<name>.json`` if written, else an error, ``STOPPED``); see the module docstring."""

    def __init__(self, out_dir: Path):
        self.out_dir, self.path, self.done = out_dir, out_dir / JOURNAL, set()
        self.inflight: dict[str, str] = {}  # name -> path, in the order started
        if self.path.exists():
            raw = self.path.read_bytes()
            for i, line in enumerate(raw.splitlines(), 1):
                try:
                    self.done.add(Path(json.loads(line)["file"]).name)
                except (ValueError, KeyError, TypeError):
                    if line.strip():
                        log.warning("warning: %s line %d is torn (the process stopped while writing it); "
                                    "skipped", self.path, i)
            if raw and not raw.endswith(b"\n"):
                with open(self.path, "ab") as f:
                    f.write(b"\n")
        self._recover()

    def _recover(self) -> None:
        path = self.out_dir / INFLIGHT
        try:
            started = json.loads(path.read_text())["files"] if path.exists() else []
        except (ValueError, KeyError, TypeError, OSError) as e:  # written atomically: only if edited by hand
            log.warning("warning: %s unreadable (%s); images in flight before the restart are not known", path, e)
            started = []
        for file in started:
            name = Path(file).name
            if name in self.done:
                continue
            record = None
            try:  # the per-image result is written before the journal line: a stop in between left it
                record = json.loads((self.out_dir / f"{name}.json").read_text())
                if Path(record["file"]).name != name or record["status"] not in ("ok", "error"):
                    record = None
            except (OSError, ValueError, KeyError, TypeError):
                pass
            if record is None:
                log.error("error: %s: %s", file, STOPPED)
                record = {"file": file, "status": "error", "error": STOPPED}
                write_atomic(self.out_dir / f"{name}.json", (json.dumps(record, indent=1) + "\n").encode())
            else:
                log.warning("warning: %s: finished before the process stopped; journaled from %s.json", file, name)
            self.add(record)
        self._write_inflight()

    def _write_inflight(self) -> None:
        write_atomic(self.out_dir / INFLIGHT, json.dumps({"files": list(self.inflight.values())}).encode())

    def start(self, image: Path) -> None:
        """``image`` is about to be read and inspected: listed in ``inflight.json`` (fsynced) first."""
        self.inflight = {n: f for n, f in self.inflight.items() if n not in self.done}  # finished: dropped here
        self.inflight[image.name] = str(image)
        self._write_inflight()

    def release(self) -> None:
        """Stopping cleanly: the image read ahead and not inspected is no longer in flight (the next run does it)."""
        self.inflight = {}
        self._write_inflight()

    def add(self, record: dict) -> None:
        with open(self.path, "ab") as f:
            f.write((json.dumps(record) + "\n").encode())
            f.flush()
            os.fsync(f.fileno())
        self.done.add(Path(record["file"]).name)


def candidates(in_dir: Path) -> list[Path]:
    out = []
    for p in sorted(in_dir.iterdir()):
        if (p.name.startswith(".") or p.name.endswith(PARTIAL_SUFFIXES) or p.suffix.lower() not in IMAGE_SUFFIXES
                or is_template_name(p) or not p.is_file()):
            continue
        out.append(p)
    return out


def watch(inspector: Inspector, in_dir: Path, out_dir: Path, args: argparse.Namespace) -> int:
    if not in_dir.is_dir():
        raise EdgeError(f"{in_dir}: watch folder not found")
    out_dir.mkdir(parents=True, exist_ok=True)
    journal = Journal(out_dir)
    stop = threading.Event()

    def on_signal(signum, _frame):
        log.info("%s: stopping after the current image", signal.Signals(signum).name)
        stop.set()

    for s in (signal.SIGINT, signal.SIGTERM):
        signal.signal(s, on_signal)
    log.info("watching %s -> %s (%d image(s) already done)", in_dir, out_dir, len(journal.done))
    seen: dict[str, tuple] = {}  # name -> (size, mtime_ns) at the last poll
    waiting: dict[str, float] = {}  # name -> when it started waiting for its template
    processed = 0
    while not stop.is_set():
        now, ready = time.time(), []
        for p in candidates(in_dir):
            if p.name in journal.done:
                continue
            try:
                st = p.stat()
            except OSError:  # renamed or deleted between listing and stat (or unreadable: try again later)
                continue
            sig, prev = (st.st_size, st.st_mtime_ns), seen.get(p.name)
            seen[p.name] = sig
            if sig != prev or now - st.st_mtime < args.settle:
                continue  # still being written (or just arrived): look again next poll
            if inspector.model.needs_template and not args.template and not args.template_dir:
                tpl = find_template(p, None, None)
                if tpl is not None and not tpl.is_file() and now - waiting.setdefault(p.name, now) < args.template_wait:
                    continue  # the pair's template may still be on its way
            ready.append(p)
        records = inspector.process_all(ready, on_start=journal.start)
        try:
            for p, record in zip(ready, records):
                write_atomic(out_dir / f"{p.name}.json", (json.dumps(record, indent=1) + "\n").encode())
                journal.add(record)  # after the result file: a restart after a kill in between journals that
                processed += 1
                if stop.is_set():
                    break
        finally:
            records.close()  # waits for the reader thread
        if stop.is_set():
            journal.release()  # the image read ahead is not journaled: the next run does it
        stop.wait(args.poll)
    log.info("stopped; %d image(s) processed in this run", processed)
    return 0


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(prog="pcb-aoi-detect", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", required=True, type=Path, help="ONNX model exported by pcb-aoi (model.e2e.onnx, "
                    "model.onnx or model.int8.onnx)")
    ap.add_argument("images", nargs="*", type=Path, help="image files to inspect")
    ap.add_argument("--template", type=Path, help="template (defect-free board) for every image")
    ap.add_argument("--template-dir", type=Path, help="folder holding each image's template under the same name")
    ap.add_argument("--score", type=float, help="report detections above this score (default: the model's, "
                    "evaluate.score_threshold at export)")
    ap.add_argument("--out", type=Path, help="JSON lines file to write (default: stdout)")
    ap.add_argument("--overlay-dir", type=Path, help="also write <image>.overlay.png with the boxes drawn here")
    ap.add_argument("--watch", type=Path, help="folder mode: process each new image in this folder once")
    ap.add_argument("--out-dir", type=Path, help="folder mode: results.jsonl (journal) and <image>.json go here")
    ap.add_argument("--poll", type=float, default=0.5, help="folder mode: seconds between scans (%(default)s)")
    ap.add_argument("--settle", type=float, default=1.0, help="folder mode: a file is ready when unchanged for "
                    "this many seconds (%(default)s)")
    ap.add_argument("--template-wait", type=float, default=30.0, help="folder mode: seconds to wait for the "
                    "X_temp file of an X_test file before recording an error (%(default)s)")
    ap.add_argument("--info", action="store_true", help="print the model's contract (classes, template, INT8 "
                    "format), this CPU's instruction sets and whether the model computes exactly on it, as JSON; "
                    "then exit")
    ap.add_argument("--quiet", action="store_true", help="log errors only, not a line per image")
    ap.add_argument("--threads", type=int, default=0, help="ONNX Runtime threads, 0 = all cores")
    ap.add_argument("--provider", default="cpu", choices=sorted(PROVIDERS), help="ONNX Runtime execution provider "
                    "(%(default)s); openvino needs onnxruntime-openvino, cuda/tensorrt onnxruntime-gpu")
    ap.add_argument("--spin", default="off", choices=["on", "off"], help="ONNX Runtime threads busy-wait between "
                    "images (on, ONNX Runtime's default) or sleep (off, this app's default: leaves the cores to "
                    "the file decoding and read-ahead threads)")
    args = ap.parse_args(argv)
    if args.template and args.template_dir:
        ap.error("give --template or --template-dir, not both")
    if args.watch and (args.images or args.out or not args.out_dir):
        ap.error("--watch takes --out-dir and no image arguments or --out")
    if args.info and (args.images or args.watch):
        ap.error("--info takes only --model (and --provider)")
    if not args.watch and not args.images and not args.info:
        ap.error("give image files, or --watch FOLDER --out-dir FOLDER (or --info)")
    if args.score is not None and not 0 <= args.score <= 1:
        ap.error(f"--score {args.score}: must be between 0 and 1")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    setup_logging(args.quiet)
    try:
        model = EdgeModel(args.model, threads=args.threads, provider=args.provider, spin=args.spin == "on")
        if args.info:
            print(json.dumps(model.info(), indent=1))
            return 0
        status, why = model.cpu_verdict()
        if status != "exact":
            log.warning("warning: %s: %s", args.model, why)
        inspector = Inspector(model, args)
        if args.watch:
            return watch(inspector, args.watch, args.out_dir, args)
        return run_files(inspector, args.images, args.out)
    except EdgeError as e:
        print(f"error: pcb-aoi-detect: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
