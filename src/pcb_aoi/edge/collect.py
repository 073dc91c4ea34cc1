"""pcb-aoi-collect: turn the line's journal and the operator's verdicts into a labelled folder for ingest.

    pcb-aoi-collect --journal results/results.jsonl --verdicts verdicts.csv --out data/line-2024-06

Labels of an image = its accepted detections + its relabelled ones (with the new class) + the boxes the
operator drew (``missed``); rejected detections (false calls) are dropped, and the image stays: it is
still a useful example. A detection of a reviewed image (one with any verdict line) that no line names
stands as the model called it: the operator names what is wrong. Images without a verdict line are
skipped (``--unreviewed accept``: kept, with the model's detections as labels).

The folder is one that ``ingest`` reads (``pcb_aoi.data.readers``): DeepPCB layout when the images are
``X_test`` / ``X_temp`` pairs (templates kept: ``group<board>/<board>/X_test.png`` + ``X_temp.png``,
labels in ``group<board>/<board>_not/X.txt``), else Pascal VOC (``<image>`` + ``<stem>.xml``). Image files
are copied byte for byte, never re-encoded. ``collect.json`` in it records the summary and the inputs.

Everything is checked before anything is written; the folder is built beside ``--out`` and renamed onto
it, so a refused input or a crash leaves no folder (and an older one intact). The rules and both verdict
formats: ``docs/feedback.md``. Torch-free (the edge box runs it).
"""
from __future__ import annotations

import argparse
import hashlib
import json
import os
import re
import shutil
import sys
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

from PIL import Image

from .inspector import find_template
from .layouts import DEEPPCB_IDS, Board, choose_format, write_deeppcb, write_voc
from .verdicts import FeedbackError, Inspected, Verdict, read_journal, read_verdicts

__all__ = ["DEEPPCB_IDS", "Board", "main", "plan", "run"]

SUMMARY = "collect.json"


@dataclass
class Counts:
    accepted: int = 0  # named by an accept line
    accepted_unnamed: int = 0  # on a reviewed image, named by no line
    relabelled: int = 0
    rejected: int = 0  # false calls dropped
    missed: int = 0  # boxes the operator drew
    empty: list[str] = field(default_factory=list)  # detections whose box has no area (warnings)


def locate(image: Inspected, images_dir: Path | None) -> Path:
    """Where the image's file is now: ``images_dir/<name>``, else the journal's ``file`` as written."""
    path = images_dir / image.name if images_dir else Path(image.file)
    if not path.is_file():
        raise FeedbackError(f"{image.where}: image {path} not found; pass --images DIR, the folder that holds "
                            "the images now")
    return path


def template_of(path: Path) -> Path | None:
    """The template of an ``X_test`` image, ``X_temp`` beside it (the app's pair naming), if it is there."""
    tpl = find_template(path, None, None)
    return tpl if tpl is not None and tpl.is_file() else None


def plan(journal: Path, images: dict[str, Inspected], verdicts: list[Verdict], classes: list[str],
         images_dir: Path | None, unreviewed: str) -> tuple[list[Board], Counts, dict]:
    """The boards to write with their labels; every verdict checked against the journal and the image."""
    by_image: dict[str, list[Verdict]] = {}
    named: dict[tuple[str, int], str] = {}
    for v in verdicts:
        im = images.get(v.image)
        if im is None:
            raise FeedbackError(f"{v.where}: image {v.image!r} is not in the journal {journal}")
        if im.record.get("status") != "ok":
            raise FeedbackError(f"{v.where}: {v.image} was not inspected ({im.where}: "
                                f"{im.record.get('error', 'status ' + repr(im.record.get('status')))})")
        n = len(im.record.get("detections", []))
        if v.detection is not None:
            if v.detection >= n:
                raise FeedbackError(f"{v.where}: {v.image} has no detection {v.detection} "
                                    + (f"(its ids are 0..{n - 1})" if n else "(the app found nothing on it)"))
            if (v.image, v.detection) in named:
                raise FeedbackError(f"{v.where}: detection {v.detection} of {v.image} already has a verdict at "
                                    f"{named[v.image, v.detection]}")
            named[v.image, v.detection] = v.where
        if v.cls and v.cls not in classes:
            raise FeedbackError(f"{v.where}: unknown class {v.cls!r}; the classes are {', '.join(classes)} "
                                "(the model's, from the journal; --classes to give them)")
        by_image.setdefault(v.image, []).append(v)
    boards, counts = [], Counts()
    skipped = {"unreviewed": 0, "not_inspected": 0}
    for name, im in images.items():
        if im.record.get("status") != "ok":
            skipped["not_inspected"] += 1
            continue
        if name not in by_image and unreviewed == "skip":
            skipped["unreviewed"] += 1
            continue
        path = locate(im, images_dir)
        boards.append(_labels(Board(im, path, template_of(path)), by_image.get(name, []), counts))
    return boards, counts, skipped


def _labels(board: Board, verdicts: list[Verdict], counts: Counts) -> Board:
    dets = board.image.record.get("detections", [])
    action = {v.detection: v for v in verdicts if v.detection is not None}
    for i, d in enumerate(dets):
        v = action.get(i)
        if v is not None and v.action == "reject":
            counts.rejected += 1
            continue
        x1, y1, x2, y2 = d["box"]
        if x2 <= x1 or y2 <= y1:  # clipped to the image edge to nothing: no box a reader would take
            counts.empty.append(f"{board.image.where}: detection {i} of {board.image.name} has an empty box "
                                f"{d['box']}; not a label")
            continue
        if v is not None and v.action == "relabel":
            counts.relabelled += 1
        elif v is not None:
            counts.accepted += 1
        elif verdicts:
            counts.accepted_unnamed += 1
        board.labels.append((v.cls if v is not None and v.action == "relabel" else d["class"], tuple(d["box"])))
    missed = [v for v in verdicts if v.action == "missed"]
    if missed:
        with Image.open(board.path) as im:  # reads the header only
            w, h = im.size
        for v in missed:
            x1, y1, x2, y2 = v.box
            if x1 < 0 or y1 < 0 or x2 > w or y2 > h:
                raise FeedbackError(f"{v.where}: box {list(v.box)} is outside {board.image.name} ({w}x{h} px)")
            board.labels.append((v.cls, v.box))
            counts.missed += 1
    return board


def journal_classes(images: dict[str, Inspected]) -> list[str]:
    """The model's classes, in its order: the ``counts`` keys of the records (every class, 0 included)."""
    classes: list[str] = []
    for im in images.values():
        for c in im.record.get("counts", {}):
            if c not in classes:
                classes.append(c)
    return classes


def _replace_dir(tmp: Path, out: Path) -> None:
    old = out.with_name(f".{out.name}.old-{os.getpid()}")
    if out.exists():
        os.replace(out, old)
    os.replace(tmp, out)
    shutil.rmtree(old, ignore_errors=True)


def run(journal: Path, verdicts_path: Path, out: Path, images_dir: Path | None = None, classes: list[str] | None = None,
        fmt: str = "auto", board: str = "line", unreviewed: str = "skip") -> dict:
    """Check everything, then write the folder ``out`` atomically; returns the summary (``collect.json``)."""
    if out.exists() and not (out.is_dir() and (not any(out.iterdir()) or (out / SUMMARY).is_file())):
        raise FeedbackError(f"{out}: exists and was not written by pcb-aoi-collect; choose another --out")
    if not re.fullmatch(r"[A-Za-z0-9_-]+", board):
        raise FeedbackError(f"--board {board!r}: letters, digits, _ and - only (it names folders)")
    images, warnings = read_journal(journal)
    verdicts = read_verdicts(verdicts_path)
    classes = classes or journal_classes(images)
    boards, counts, skipped = plan(journal, images, verdicts, classes, images_dir, unreviewed)
    if not boards:
        raise FeedbackError(f"{verdicts_path}: no image to collect ({skipped['unreviewed']} inspected image(s) "
                            "without a verdict line: --unreviewed accept keeps them)")
    fmt = choose_format(boards, fmt)
    labels = {c: 0 for c in classes}
    for b in boards:
        for c, _ in b.labels:
            labels[c] = labels.get(c, 0) + 1
    summary = {
        "format": fmt, "images": len(boards),
        "templates": sum(b.template is not None for b in boards) if fmt == "deeppcb" else 0,
        "labels": labels, "accepted": counts.accepted, "accepted_unnamed": counts.accepted_unnamed,
        "relabelled": counts.relabelled, "false_calls_rejected": counts.rejected, "missed_added": counts.missed,
        "skipped_unreviewed": skipped["unreviewed"], "skipped_not_inspected": skipped["not_inspected"],
        "unreviewed": unreviewed, "warnings": warnings + counts.empty,
        "journal": str(journal), "verdicts": str(verdicts_path),
        "verdicts_sha256": hashlib.sha256(verdicts_path.read_bytes()).hexdigest(),
        "models": _models(boards),
    }
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.tmp-", dir=out.parent))
    try:
        (write_deeppcb(boards, tmp, board) if fmt == "deeppcb" else write_voc(boards, tmp))
        (tmp / SUMMARY).write_text(json.dumps(summary, indent=1) + "\n")
        _replace_dir(tmp, out)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return summary


def _models(boards: list[Board]) -> list[dict]:
    """The distinct ``model`` blocks of the records collected: which model made the calls reviewed."""
    seen: list[dict] = []
    for b in boards:
        m = b.image.record.get("model") or {}
        if m not in seen:
            seen.append(m)
    return seen


def describe(s: dict, out: Path) -> str:
    labels = ", ".join(f"{c} {n}" for c, n in s["labels"].items() if n) or "none"
    lines = [f"collected {s['images']} image(s) into {out} ({s['format']}"
             + (f", {s['templates']} template(s) kept)" if s["format"] == "deeppcb" else ")"),
             f"labels: {labels}",
             f"accepted {s['accepted']} (+{s['accepted_unnamed']} named by no line on a reviewed image), relabelled "
             f"{s['relabelled']}, false calls rejected {s['false_calls_rejected']}, missed boxes added {s['missed_added']}"]
    if s["skipped_unreviewed"]:
        lines.append(f"skipped {s['skipped_unreviewed']} image(s) without a verdict line (--unreviewed accept keeps "
                     "them, with the model's detections as labels)")
    if s["skipped_not_inspected"]:
        lines.append(f"skipped {s['skipped_not_inspected']} image(s) the app could not inspect (error records)")
    lines += [f"warning: {w}" for w in s["warnings"]]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="pcb-aoi-collect", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--journal", required=True, type=Path, help="results.jsonl of pcb-aoi-detect (folder mode's "
                    "journal, or --out of a run on files)")
    ap.add_argument("--verdicts", required=True, type=Path, help="the operator's verdicts, .csv or .jsonl "
                    "(docs/feedback.md)")
    ap.add_argument("--out", required=True, type=Path, help="the labelled folder to write (replaced if an "
                    "earlier pcb-aoi-collect wrote it)")
    ap.add_argument("--images", type=Path, help="folder holding the images (and X_temp templates) now; default: "
                    "the path in the journal")
    ap.add_argument("--classes", help="comma-separated class names allowed in relabel / missed (default: the "
                    "model's, from the journal)")
    ap.add_argument("--format", default="auto", choices=["auto", "deeppcb", "voc"], help="folder layout "
                    "(%(default)s: deeppcb for X_test/X_temp pairs, else voc)")
    ap.add_argument("--board", default="line", help="DeepPCB layout: the group's name, ingest's board id (%(default)s)")
    ap.add_argument("--unreviewed", default="skip", choices=["skip", "accept"], help="images without a verdict "
                    "line: skipped (%(default)s), or kept with the model's detections as labels")
    args = ap.parse_args(argv)
    classes = [c.strip() for c in args.classes.split(",") if c.strip()] if args.classes else None
    try:
        summary = run(args.journal, args.verdicts, args.out, args.images, classes, args.format, args.board,
                      args.unreviewed)
    except (FeedbackError, OSError) as e:
        print(f"error: pcb-aoi-collect: {e}", file=sys.stderr)
        return 2
    print(describe(summary, args.out))
    return 0


if __name__ == "__main__":
    sys.exit(main())
