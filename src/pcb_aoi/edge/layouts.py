"""The folders ``pcb-aoi-collect`` writes, in formats ``ingest`` reads (``pcb_aoi.data.readers``): DeepPCB
pairs (templates kept) or Pascal VOC. Image files are copied byte for byte, never re-encoded. Torch-free.
"""
from __future__ import annotations

import shutil
import xml.etree.ElementTree as ET
from dataclasses import dataclass, field
from pathlib import Path

from PIL import Image

from .verdicts import FeedbackError, Inspected

# pcb_aoi.data.readers.DEEPPCB_CLASSES, inverted (readers imports yaml, which the edge box has not; a test
# checks that the two agree)
DEEPPCB_IDS = {"open": 1, "short": 2, "mousebite": 3, "spur": 4, "copper": 5, "pin-hole": 6}

Box = tuple[float, float, float, float]


@dataclass
class Board:
    """One image to write: where its files are now and its labels (class, box)."""

    image: Inspected
    path: Path
    template: Path | None
    labels: list[tuple[str, Box]] = field(default_factory=list)


def _num(v: float) -> str:
    return repr(float(v))  # shortest exact text: the box reads back as the same float


def write_voc(boards: list[Board], tmp: Path) -> None:
    for b in boards:
        shutil.copyfile(b.path, tmp / b.image.name)
        with Image.open(b.path) as im:
            (w, h), depth = im.size, len(im.getbands())
        ann = ET.Element("annotation")
        ET.SubElement(ann, "filename").text = b.image.name
        size = ET.SubElement(ann, "size")
        for tag, v in (("width", w), ("height", h), ("depth", depth)):
            ET.SubElement(size, tag).text = str(v)
        for cls, box in b.labels:
            obj = ET.SubElement(ann, "object")
            ET.SubElement(obj, "name").text = cls
            bb = ET.SubElement(obj, "bndbox")
            for tag, v in zip(("xmin", "ymin", "xmax", "ymax"), box):
                ET.SubElement(bb, tag).text = _num(v)
        ET.indent(ann)
        ET.ElementTree(ann).write(tmp / f"{Path(b.image.name).stem}.xml", encoding="utf-8", xml_declaration=True)


def write_deeppcb(boards: list[Board], tmp: Path, board: str) -> None:
    folder, labels = tmp / f"group{board}" / board, tmp / f"group{board}" / f"{board}_not"
    folder.mkdir(parents=True)
    labels.mkdir()
    for b in boards:
        shutil.copyfile(b.path, folder / b.image.name)
        shutil.copyfile(b.template, folder / b.template.name)
        lines = [" ".join([*map(_num, box), str(DEEPPCB_IDS[cls])]) for cls, box in b.labels]
        stem = Path(b.image.name).stem.removesuffix("_test")
        (labels / f"{stem}.txt").write_text("".join(line + "\n" for line in lines))


def choose_format(boards: list[Board], fmt: str) -> str:
    """``auto``: DeepPCB when the images are pairs (their templates are kept), VOC otherwise; the chosen
    format's needs checked for every board."""
    paired = [b for b in boards if b.template is not None]
    if fmt == "auto":
        fmt = "deeppcb" if boards and len(paired) == len(boards) else "voc"
        if paired and fmt == "voc":
            raise FeedbackError(f"{len(paired)} of {len(boards)} image(s) have an X_temp template (e.g. "
                                f"{paired[0].image.name}), the others not: pass --format voc (templates dropped) "
                                "or --format deeppcb (needs a template for every image)")
    stems: dict[str, str] = {}
    for b in boards:
        stem = Path(b.image.name).stem
        if stem in stems:
            raise FeedbackError(f"{b.image.where}: {b.image.name} and {stems[stem]} have the same stem: "
                                "ingest names an image by its stem")
        stems[stem] = b.image.name
        if fmt != "deeppcb":
            continue
        if b.template is None or b.template.suffix != b.path.suffix:
            raise FeedbackError(f"{b.image.where}: {b.image.name}: the DeepPCB layout needs an X_test / X_temp "
                                "pair with one suffix; pass --format voc (no templates)")
        unknown = sorted({c for c, _ in b.labels} - set(DEEPPCB_IDS))
        if unknown:
            raise FeedbackError(f"{b.image.where}: class {unknown[0]!r} has no DeepPCB id ({', '.join(DEEPPCB_IDS)}); "
                                "pass --format voc")
    return fmt
