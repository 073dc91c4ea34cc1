"""pcb-aoi-detect: find PCB defects with an exported model, on files or on a folder the line fills.

Runs with the light ``pcb-aoi[edge]`` install (numpy, onnxruntime, pillow; no torch).

Files:   pcb-aoi-detect --model model.e2e.onnx a_test.png b_test.png [--out results.jsonl]
Folder:  pcb-aoi-detect --model model.e2e.onnx --watch incoming/ --out-dir results/

Model:   pcb-aoi-detect --model model.int8.onnx --info   (contract, INT8 format, this CPU, verdict)

One JSON line per image (the result record, ``docs/result-record.md``): ``{"schema", "file", "status": "ok",
"verdict": "pass" | "fail", "threshold", "counts", "detections": [{"id", "class", "score", "box"}], "ms",
"model"}`` (box = x1 y1 x2 y2 in image pixels), or ``{"schema", "file", "status": "error", "error", "model"}``.

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

Review: ``--review-dir D --review-band LO,HI`` copies each image with a detection scoring in [LO, HI]
(with its template) to D beside its record ``<image>.json``, for an operator; the band may reach below
the threshold (near misses, listed in the record's ``review`` block). Verdicts: ``pcb-aoi-collect``.

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

Speed: by default (``--workers 1``) files are decoded (and pairs registered and gated, for models that
want it) one ahead in a reader thread while the model runs on the current one. ``--workers N`` runs
N worker processes instead, each inspecting whole images with its own ONNX Runtime session
(``--threads`` split among them: cores / N by default), the records still written in the images' order: on a
2-core CPU ``--workers 2`` inspects about 1.2x (dense) and 1.6-1.8x (gated) as many DeepPCB pairs
per second as one process, whose reader and inference threads contend for Python's GIL (README, *Edge
deployment*). A worker that dies (killed, crashed) stops the app with an error naming an image; folder
mode then recovers the images in flight at the next start, as above. ``ms`` in a record is that
image's own latency, from the start of its read.
"""
from __future__ import annotations

import argparse
import json
import logging
import sys
from pathlib import Path

from .contract import PROVIDERS
from .folder import Journal, watch
from .inspector import Inspector, image_log, log, write_atomic
from .review_band import ReviewBand, parse_band
from .runtime import EdgeError, EdgeModel

__all__ = ["Inspector", "Journal", "main", "run_files", "watch"]


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


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(prog="pcb-aoi-detect", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", required=True, type=Path, help="ONNX model exported by pcb-aoi (model.e2e.onnx, "
                    "model.onnx or model.int8.onnx)")
    ap.add_argument("images", nargs="*", type=Path, help="image files to inspect")
    ap.add_argument("--template", type=Path, help="template (defect-free board) for every image")
    ap.add_argument("--template-dir", type=Path, help="folder holding each image's template under the same name")
    ap.add_argument("--score", type=float, help="report detections above this score (default: the model's operating point, "
                    "chosen by the evaluate stage: reports/operating_point.json)")
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
    ap.add_argument("--review-dir", type=Path, help="set aside for an operator: an image with a detection scoring "
                    "in --review-band is copied here (with its template) beside its record <image>.json")
    ap.add_argument("--review-band", help="LO,HI: the scores that send an image to --review-dir, 0 <= LO <= HI <= 1; "
                    "below the threshold too (near misses, listed in the copied record's \"review\" block)")
    ap.add_argument("--quiet", action="store_true", help="log errors only, not a line per image")
    ap.add_argument("--threads", type=int, default=0, help="ONNX Runtime threads, 0 = all cores; with --workers "
                    "N they are split among the workers (at least 1 each)")
    ap.add_argument("--workers", type=int, default=1, help="worker processes inspecting images side by side, "
                    "each with its own ONNX Runtime session; 1 = this process, with a read-ahead thread "
                    "(%(default)s). On a 2-core CPU, 2 inspects the most images per second")
    ap.add_argument("--provider", default="cpu", choices=sorted(PROVIDERS), help="ONNX Runtime execution provider "
                    "(%(default)s); openvino needs onnxruntime-openvino, cuda/tensorrt onnxruntime-gpu")
    ap.add_argument("--spin", default="off", choices=["on", "off"], help="ONNX Runtime threads busy-wait between "
                    "images (on, ONNX Runtime's default) or sleep (off, this app's default: leaves the cores to "
                    "the file decoding and read-ahead threads)")
    ap.add_argument("--gate", choices=["none", "tiles"], help="difference gate: run the network only on tiles "
                    "around the places where the image differs from its template (tiles) or on the whole image "
                    "(none); default: the model's setting, decided on validation when it was exported")
    args = ap.parse_args(argv)
    if args.template and args.template_dir:
        ap.error("give --template or --template-dir, not both")
    if args.watch and (args.images or args.out or not args.out_dir):
        ap.error("--watch takes --out-dir and no image arguments or --out")
    if args.info and (args.images or args.watch):
        ap.error("--info takes only --model (and --provider)")
    if not args.watch and not args.images and not args.info:
        ap.error("give image files, or --watch FOLDER --out-dir FOLDER (or --info)")
    if args.workers < 1:
        ap.error(f"--workers {args.workers}: must be 1 or more")
    if args.score is not None and not 0 <= args.score <= 1:
        ap.error(f"--score {args.score}: must be between 0 and 1")
    args.review = None
    if bool(args.review_dir) != bool(args.review_band):
        ap.error("--review-dir and --review-band go together")
    if args.review_dir:
        try:
            args.review = ReviewBand(args.review_dir, *parse_band(args.review_band))
        except ValueError as e:
            ap.error(f"--review-band {e}")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    setup_logging(args.quiet)
    try:
        model = EdgeModel(args.model, threads=args.threads, provider=args.provider, spin=args.spin == "on",
                            gate=args.gate)
        if args.info:
            print(json.dumps(model.info(), indent=1))
            return 0
        status, why = model.cpu_verdict()
        if status != "exact":
            log.warning("warning: %s: %s", args.model, why)
        with Inspector(model, args, args.workers) as inspector:
            if args.watch:
                return watch(inspector, args.watch, args.out_dir, args)
            return run_files(inspector, args.images, args.out)
    except EdgeError as e:
        print(f"error: pcb-aoi-detect: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
