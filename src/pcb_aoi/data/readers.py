"""Readers for real AOI data: DeepPCB, Pascal VOC, YOLO and COCO folders.

Each reader returns ``(images, boxes)``: lists of dicts in the canonical manifest shape (see
``dataset.py``) except that ``path`` / ``template_path`` are absolute source files, which ``ingest``
copies into the dataset. Class names are the source's own; ``ingest`` maps them to the project's
taxonomy. Every problem raises ``DataError`` naming the file and line (or field); what a reader
skips without failing goes into its ``report`` dict, which ingest writes into ``reports/ingest.json``.
A row may carry what only etl can check against the pixels: ``expected_template`` (the source path of a
template that is not there) and ``declared_width`` / ``declared_height`` (a VOC ``<size>``).
"""
from __future__ import annotations

import json
import re
import xml.etree.ElementTree as ET
from pathlib import Path

import yaml

IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png", ".bmp", ".tif", ".tiff"}
DEEPPCB_CLASSES = {1: "open", 2: "short", 3: "mousebite", 4: "spur", 5: "copper", 6: "pin-hole"}


class DataError(ValueError):
    """The source data is malformed; the message names the file and line or field."""


def _numbers(text: str, n: int, where: str, kind=float) -> list:
    parts = re.split(r"[,\s]+", text.strip())
    if len(parts) != n:
        raise DataError(f"{where}: expected {n} values, got {len(parts)}: {text.strip()!r}")
    try:
        return [kind(p) for p in parts]
    except ValueError:
        raise DataError(f"{where}: non-numeric value in {text.strip()!r}") from None


def _box(image_id: str, cls: str, x1: float, y1: float, x2: float, y2: float, where: str) -> dict:
    if x2 <= x1 or y2 <= y1:
        raise DataError(f"{where}: x2 <= x1 or y2 <= y1 in box {[x1, y1, x2, y2]}")
    return dict(image_id=image_id, class_name=cls, x1=x1, y1=y1, x2=x2, y2=y2)


def _image_row(image_id: str, path: Path, template: Path | None, board: str, split: str = "") -> dict:
    return dict(image_id=image_id, path=str(path), template_path=str(template) if template else "",
                width=0, height=0, board_id=board, source_split=split)  # size: filled in by ingest


LIST_LINES_SHOWN = 20  # missing list lines named in reports/ingest.json; the count covers all


def read_deeppcb(root: Path, board_regex: str = "", report: dict | None = None) -> tuple[list[dict], list[dict]]:
    """``PCBData/groupG/N/X_test.jpg`` + ``X_temp.jpg``, labels ``groupG/N_not/X.txt`` (x1 y1 x2 y2 id).

    Pairs saved with another image suffix (``X_test.png`` + ``X_temp.png``) are read the same way.

    The board id is the group (``board_regex`` is not used); the official ``trainval.txt`` /
    ``test.txt`` lists, when present, fill ``source_split``. A pair without its ``_temp`` file keeps its
    expected path in ``expected_template`` (etl rejects it, naming the path).
    """
    base = root / "PCBData" if (root / "PCBData").is_dir() else root
    groups = sorted(p for p in base.glob("group*") if p.is_dir())
    if not groups:
        raise DataError(f"{root}: no DeepPCB group*/ folders found (expected PCBData/groupNNNNN/...)")
    images, boxes = [], []
    for g in groups:
        for label in sorted(g.glob("*_not/*.txt")):
            stem, folder = label.stem, g / label.parent.name.removesuffix("_not")
            test = _pair_image(folder, f"{stem}_test")
            temp = test.with_name(f"{stem}_temp{test.suffix}")
            if not test.is_file():
                raise DataError(f"{label}: label without image (expected {test})")
            row = _image_row(stem, test, temp if temp.is_file() else None, g.name.removeprefix("group"))
            if not temp.is_file():
                row["expected_template"] = str(temp)
            images.append(row)
            lines = label.read_text().splitlines()
            for n, line in enumerate(lines, 1):
                if not line.strip():
                    continue
                x1, y1, x2, y2, cid = _numbers(line, 5, f"{label}:{n}")
                if cid not in DEEPPCB_CLASSES:
                    raise DataError(f"{label}:{n}: unknown class id {cid:g}; DeepPCB ids are "
                                    + ", ".join(f"{k}={v}" for k, v in DEEPPCB_CLASSES.items()))
                boxes.append(_box(stem, DEEPPCB_CLASSES[int(cid)], x1, y1, x2, y2, f"{label}:{n}"))
        labelled = {Path(r["path"]) for r in images}
        for test in sorted(p for p in g.glob("*/*_test.*") if p.suffix.lower() in IMAGE_SUFFIXES):
            if test not in labelled:
                raise DataError(f"{test}: image without label (expected {test.parent}_not/"
                                f"{test.stem.removesuffix('_test')}.txt)")
    _deeppcb_lists(root, base, images, report if report is not None else {})
    return images, boxes


def _pair_image(folder: Path, name: str) -> Path:
    """``folder/name.jpg`` (DeepPCB's own), or ``name`` with another image suffix when only that is there
    (pairs the line saved as PNG, ``pcb-aoi-collect``); the ``.jpg`` path when none is."""
    for suffix in (".jpg", *sorted(IMAGE_SUFFIXES - {".jpg"})):
        if (folder / f"{name}{suffix}").is_file():
            return folder / f"{name}{suffix}"
    return folder / f"{name}.jpg"


def _deeppcb_lists(root: Path, base: Path, images: list[dict], report: dict) -> None:
    """Fill ``source_split`` from the official lists (lines ``groupG/N/X.jpg groupG/N_not/X.txt``).

    A line naming a pair that is not there is listed in ``report`` (file:line: pair); a list naming
    none that is there is an error: it is for another copy of the data.
    """
    by_path = {Path(r["path"]): r for r in images}
    missing = []
    for name in ("trainval", "test"):
        lst = base / f"{name}.txt"
        if not lst.is_file():
            continue
        lines = [(i, line.split()[0]) for i, line in enumerate(lst.read_text().splitlines(), 1) if line.strip()]
        found = 0
        for i, pair in lines:
            test = base / Path(pair).parent / f"{Path(pair).stem}_test.jpg"
            if test in by_path:
                by_path[test]["source_split"] = name
                found += 1
            else:
                missing.append(f"{lst.relative_to(root)}:{i}: {pair}")
        if not found:
            example = f"; line {lines[0][0]} names {lines[0][1]!r}, no {base / Path(lines[0][1]).parent}/" \
                      f"{Path(lines[0][1]).stem}_test.jpg" if lines else ""
            raise DataError(f"{lst}: none of its {len(lines)} lines names a pair under {base}{example}; "
                            "is the list from another copy of DeepPCB?")
    report["list_lines_missing_count"] = len(missing)
    report["list_lines_missing"] = missing[:LIST_LINES_SHOWN]


def _find_images(root: Path) -> dict[str, Path]:
    return {p.name: p for p in sorted(root.rglob("*")) if p.suffix.lower() in IMAGE_SUFFIXES}


def read_voc(root: Path, board_regex: str = "", report: dict | None = None) -> tuple[list[dict], list[dict]]:
    """Pascal VOC XML files anywhere under ``root``; images found by ``<filename>`` under ``root``.

    The ``<size>`` is kept as ``declared_width`` / ``declared_height`` (0 when absent): etl compares it
    with the image, since boxes drawn on a resized copy do not fit the original.
    """
    xmls = sorted(root.rglob("*.xml"))
    if not xmls:
        raise DataError(f"{root}: no .xml annotation files found")
    by_name = _find_images(root)
    images, boxes = [], []
    for x in xmls:
        try:
            ann = ET.parse(x).getroot()
        except ET.ParseError as e:
            raise DataError(f"{x}: not valid XML ({e})") from None
        if ann.tag != "annotation" or ann.find("filename") is None or ann.find("size") is None:
            raise DataError(f"{x}: not a Pascal VOC annotation (needs <annotation> with <filename> and <size>)")
        name = (ann.findtext("filename") or "").strip()
        img = by_name.get(name) or by_name.get(Path(name).name)
        if img is None:  # <path> points at the annotator's machine: never trust it
            raise DataError(f"{x}: label without image: {name!r} not found under {root}")
        image_id = img.stem
        dw, dh = _declared_size(ann.find("size"), x)
        images.append(_image_row(image_id, img, None, _board(image_id, board_regex))
                      | {"declared_width": dw, "declared_height": dh})
        for k, obj in enumerate(ann.iter("object")):
            where = f"{x}: <object> #{k + 1}"
            bb = obj.find("bndbox")
            cls = (obj.findtext("name") or "").strip()
            if bb is None or not cls:
                raise DataError(f"{where}: needs <name> and <bndbox>")
            coords = [bb.findtext(t) or "" for t in ("xmin", "ymin", "xmax", "ymax")]
            boxes.append(_box(image_id, cls, *_numbers(" ".join(coords), 4, where), where))
    return images, boxes


def _declared_size(size: ET.Element, where: Path) -> tuple[int, int]:
    """(width, height) of a VOC ``<size>``; (0, 0) when it leaves them out or empty (nothing to check)."""
    text = [(size.findtext(t) or "").strip() for t in ("width", "height")]
    if not all(text):
        return 0, 0
    w, h = _numbers(" ".join(text), 2, f"{where}: <size>")
    if w != int(w) or h != int(h) or w < 0 or h < 0:
        raise DataError(f"{where}: <size>: width and height must be whole pixels >= 0, got {w:g}x{h:g}")
    return int(w), int(h)


def _board(image_id: str, regex: str) -> str:
    """Board id from the file stem via ``ingest.board_regex`` (group 1), else the image itself."""
    if regex and (m := re.search(regex, image_id)):
        return m.group(1) if m.groups() else m.group(0)
    return image_id


def read_yolo(root: Path, board_regex: str = "", report: dict | None = None) -> tuple[list[dict], list[dict]]:
    """``data.yaml`` (names) + ``images/**`` + ``labels/**`` with normalised ``cls cx cy w h`` lines.

    An image without a label file has no defects (the YOLO convention); sizes are read by ingest, so
    boxes are kept normalised here and scaled there (``x1..y2`` in 0..1, flagged by ``normalised``).
    """
    cfg_file = next((p for p in (root / "data.yaml", root / "dataset.yaml") if p.is_file()), None)
    if cfg_file is None:
        raise DataError(f"{root}: data.yaml with the class names not found")
    names = (yaml.safe_load(cfg_file.read_text()) or {}).get("names")
    if isinstance(names, list):
        names = dict(enumerate(names))
    if not isinstance(names, dict) or not names:
        raise DataError(f"{cfg_file}: `names` must be a list or a mapping of class names")
    img_root, lbl_root = root / "images", root / "labels"
    images, boxes, seen = [], [], set()
    for img in sorted(p for p in img_root.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES):
        rel = img.relative_to(img_root)
        image_id = str(rel.with_suffix("")).replace("/", "__")
        split = rel.parts[0] if len(rel.parts) > 1 and rel.parts[0] in ("train", "val", "test") else ""
        images.append(_image_row(image_id, img, None, _board(img.stem, board_regex), split))
        label = lbl_root / rel.with_suffix(".txt")
        seen.add(label)
        if not label.is_file():
            continue
        for n, line in enumerate(label.read_text().splitlines(), 1):
            if not line.strip():
                continue
            c, cx, cy, w, h = _numbers(line, 5, f"{label}:{n}")
            if c not in names:
                raise DataError(f"{label}:{n}: unknown class id {c:g}; data.yaml names {names}")
            if w <= 0 or h <= 0:
                raise DataError(f"{label}:{n}: width and height must be > 0")
            b = _box(image_id, names[int(c)], cx - w / 2, cy - h / 2, cx + w / 2, cy + h / 2, f"{label}:{n}")
            boxes.append(b | {"normalised": True})
    for label in sorted(lbl_root.rglob("*.txt")):
        if label not in seen:
            raise DataError(f"{label}: label without image under {img_root}")
    return images, boxes


def read_coco(root: Path, board_regex: str = "", report: dict | None = None) -> tuple[list[dict], list[dict]]:
    """A COCO instances JSON (``root`` itself, or the single ``*.json`` in it)."""
    jsons = [root] if root.is_file() else sorted(root.rglob("*.json"))
    if len(jsons) != 1:
        raise DataError(f"{root}: expected exactly one COCO .json, found {len(jsons)}")
    src = jsons[0]
    try:
        coco = json.loads(src.read_text())
    except json.JSONDecodeError as e:
        raise DataError(f"{src}: not valid JSON ({e})") from None
    if not isinstance(coco, dict) or not {"images", "annotations", "categories"} <= set(coco):
        raise DataError(f"{src}: not a COCO instances file (needs images, annotations, categories)")
    cats = {c["id"]: c["name"] for c in coco["categories"]}
    by_name = _find_images(src.parent)
    images, boxes, ids = [], [], {}
    for i, im in enumerate(coco["images"]):
        img = by_name.get(Path(im.get("file_name", "")).name)
        if img is None:
            raise DataError(f"{src}: images[{i}]: file {im.get('file_name')!r} not found under {src.parent}")
        ids[im["id"]] = img.stem
        images.append(_image_row(img.stem, img, None, _board(img.stem, board_regex)))
    for i, a in enumerate(coco["annotations"]):
        where = f"{src}: annotations[{i}]"
        if a.get("image_id") not in ids:
            raise DataError(f"{where}: image_id {a.get('image_id')!r} is not in images")
        if a.get("category_id") not in cats:
            raise DataError(f"{where}: category_id {a.get('category_id')!r} is not in categories {cats}")
        bbox = a.get("bbox")
        if not (isinstance(bbox, list) and len(bbox) == 4 and all(isinstance(v, (int, float)) for v in bbox)):
            raise DataError(f"{where}: bbox must be 4 numbers [x, y, w, h], got {bbox!r}")
        x, y, w, h = bbox
        boxes.append(_box(ids[a["image_id"]], cats[a["category_id"]], x, y, x + w, y + h, where))
    return images, boxes


READERS = {"deeppcb": read_deeppcb, "voc": read_voc, "yolo": read_yolo, "coco": read_coco}
