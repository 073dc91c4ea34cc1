"""What an operator says about the edge app's calls, and the journal of result records it refers to.

A verdict file (``docs/feedback.md``) names an inspected image by its file name, as in the journal, and
one of its detections by ``id`` (``docs/result-record.md``): ``accept`` (a real defect), ``reject`` (a
false call), ``relabel`` (a real defect of another class), or adds a box the model did not call,
``missed``. Two formats, by suffix: ``.csv`` with a header, ``.jsonl`` one object a line. Every
problem raises ``FeedbackError`` naming the file and line. Torch-free, standard library only.
"""
from __future__ import annotations

import csv
import json
import math
from dataclasses import dataclass
from pathlib import Path

ACTIONS = ("accept", "reject", "relabel", "missed")
CSV_COLUMNS = ("image", "detection", "action", "class", "x1", "y1", "x2", "y2")
JSON_KEYS = ("image", "detection", "action", "class", "box")
SCHEMA_PREFIX = "pcb-aoi.result/"


class FeedbackError(ValueError):
    """A journal or verdict file is malformed or does not fit the other; the message names file and line."""


@dataclass(frozen=True)
class Verdict:
    """One line of a verdict file. ``detection``: the record's detection ``id`` (None: ``missed``, or an
    ``accept`` of the whole image); ``cls``: the new class (``relabel``) or the missed box's class;
    ``box``: x1 y1 x2 y2 in image pixels (``missed`` only)."""

    where: str  # "file:line", for error messages
    image: str
    action: str
    detection: int | None = None
    cls: str = ""
    box: tuple[float, float, float, float] | None = None


@dataclass(frozen=True)
class Inspected:
    """One image of the journal: its file name, the ``file`` the app was given, where it is in the journal."""

    name: str
    file: str
    where: str
    record: dict


def read_journal(path: Path) -> tuple[dict[str, Inspected], list[str]]:
    """(file name -> its record, warnings). A line that is not JSON (torn by a kill: the app journals
    that image again at its next start) is a warning; a record without the result schema is an error,
    as is a file name listed twice (a verdict could not say which one it means)."""
    try:
        raw = path.read_text()
    except OSError as e:
        raise FeedbackError(f"{path}: cannot read the journal ({e.strerror or e})") from None
    images: dict[str, Inspected] = {}
    warnings = []
    for i, line in enumerate(raw.splitlines(), 1):
        if not line.strip():
            continue
        try:
            rec = json.loads(line)
        except ValueError:
            warnings.append(f"{path}:{i}: not JSON (torn by a kill?); skipped")
            continue
        if not isinstance(rec, dict) or not str(rec.get("schema", "")).startswith(SCHEMA_PREFIX) or "file" not in rec:
            raise FeedbackError(f"{path}:{i}: not a result record (needs \"schema\": \"{SCHEMA_PREFIX}...\" and "
                                "\"file\"); records from before the schema have no detection ids: inspect the "
                                "images again with pcb-aoi-detect")
        name = Path(rec["file"]).name
        if name in images:
            raise FeedbackError(f"{path}:{i}: {name} is already in the journal at {images[name].where}; a verdict "
                                "names an image by its file name: give each image its own name")
        images[name] = Inspected(name, rec["file"], f"{path}:{i}", rec)
    return images, warnings


def read_verdicts(path: Path) -> list[Verdict]:
    """The verdicts of ``path`` (``.csv`` or ``.jsonl``), each checked on its own (see ``verdict``)."""
    try:
        text = path.read_text(encoding="utf-8-sig")  # a CSV saved by a spreadsheet may start with a BOM
    except (OSError, UnicodeDecodeError) as e:
        raise FeedbackError(f"{path}: cannot read the verdict file ({getattr(e, 'strerror', None) or e})") from None
    if path.suffix.lower() == ".csv":
        return _read_csv(path, text)
    if path.suffix.lower() in (".jsonl", ".ndjson"):
        return _read_jsonl(path, text)
    raise FeedbackError(f"{path}: a verdict file is .csv (with the header {','.join(CSV_COLUMNS)}) or .jsonl")


def _read_csv(path: Path, text: str) -> list[Verdict]:
    reader = csv.DictReader(text.splitlines(keepends=True))
    header = [h.strip() for h in reader.fieldnames or []]
    unknown = [h for h in header if h not in CSV_COLUMNS]
    if not header or unknown or not {"image", "action"} <= set(header):
        raise FeedbackError(f"{path}:1: the header must name the columns image, action and, as needed, detection, "
                            f"class, x1, y1, x2, y2" + (f"; unknown: {', '.join(unknown)}" if unknown else ""))
    reader.fieldnames = header
    out = []
    for row in reader:
        where = f"{path}:{reader.line_num}"
        if None in row:  # more fields than the header
            raise FeedbackError(f"{where}: {len(header) + len(row[None])} fields, the header has {len(header)}")
        row = {k: (v or "").strip() for k, v in row.items()}
        if not any(row.values()):
            continue
        coords = [row.get(k, "") for k in ("x1", "y1", "x2", "y2")]
        box = None if not any(coords) else coords
        out.append(verdict(where, row["image"], row["action"], row.get("detection", ""), row.get("class", ""), box))
    return out


def _read_jsonl(path: Path, text: str) -> list[Verdict]:
    out = []
    for i, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue
        where = f"{path}:{i}"
        try:
            obj = json.loads(line)
        except ValueError as e:
            raise FeedbackError(f"{where}: not JSON ({e})") from None
        unknown = sorted(set(obj) - set(JSON_KEYS)) if isinstance(obj, dict) else []
        if not isinstance(obj, dict) or unknown:
            raise FeedbackError(f"{where}: a verdict is an object with the keys {', '.join(JSON_KEYS)}"
                                + (f"; unknown: {', '.join(unknown)}" if unknown else ""))
        box = obj.get("box")
        if box is not None and not (isinstance(box, list) and len(box) == 4):
            raise FeedbackError(f"{where}: box must be [x1, y1, x2, y2], got {box!r}")
        det = obj.get("detection")
        out.append(verdict(where, str(obj.get("image") or ""), str(obj.get("action") or ""),
                           "" if det is None else str(det), str(obj.get("class") or ""), box))
    return out


def verdict(where: str, image: str, action: str, detection: str, cls: str, box: list | None) -> Verdict:
    """One verdict from its fields as text, checked on its own: what each action needs and takes."""
    action = action.strip().lower()
    if action not in ACTIONS:
        raise FeedbackError(f"{where}: action {action!r}: one of {', '.join(ACTIONS)}")
    if not image.strip():
        raise FeedbackError(f"{where}: no image: name the image's file as in the journal")
    det = None
    if detection.strip():
        try:
            det = int(detection)
        except ValueError:
            raise FeedbackError(f"{where}: detection {detection!r}: the detection's id in the record, 0, 1, ...") from None
        if det < 0:
            raise FeedbackError(f"{where}: detection {det}: ids are 0, 1, ...")
    needs = {"accept": "", "reject": "detection", "relabel": "detection, class", "missed": "class, box"}[action]
    given = {"detection": det is not None, "class": bool(cls.strip()), "box": box is not None}
    for field, present in given.items():
        if field in needs and not present:
            raise FeedbackError(f"{where}: {action} needs {needs}; {field} is missing")
        if field not in needs and present and not (action == "accept" and field == "detection"):
            raise FeedbackError(f"{where}: {action} takes no {field}" + (" (a missed box is not one of the "
                                "model's detections)" if action == "missed" else ""))
    coords = None
    if box is not None:
        try:
            coords = tuple(float(v) for v in box)
        except (TypeError, ValueError):
            raise FeedbackError(f"{where}: box {box!r}: four numbers x1 y1 x2 y2 (image pixels)") from None
        if len(coords) != 4 or not all(map(math.isfinite, coords)):
            raise FeedbackError(f"{where}: box {box!r}: four numbers x1 y1 x2 y2 (image pixels)")
        if coords[2] <= coords[0] or coords[3] <= coords[1]:
            raise FeedbackError(f"{where}: box {list(coords)}: needs x1 < x2 and y1 < y2")
    return Verdict(where, Path(image.strip()).name, action, det, cls.strip(), coords)
