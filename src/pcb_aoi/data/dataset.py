"""The canonical dataset on disk, and atomic writes so a failed stage never leaves half an output.

A dataset is a folder holding image files and two parquet manifests:

- ``images.parquet``: one row per image: ``image_id``, ``path`` and ``template_path`` (relative to
  the folder; template empty when the source has none), ``width``, ``height``, ``board_id``,
  ``source_split`` (empty when the source has none), ``source`` (the reader, or with several sources
  (``ingest.sources``) the source's name, which then also prefixes ``image_id`` and ``board_id``:
  ``deeppcb:00041000`` on board ``deeppcb:00041``; its files lie in ``images/deeppcb/``).
  A clean dataset (etl's) adds ``content_hash``: sha256 of the decoded pixels of the test image and its
  template, what ``pcb-aoi-data-diff`` compares to tell a changed picture from a renamed file.
  A raw dataset (ingest's) may add what only etl can check against the pixels: ``expected_template``
  (the source path of a template the reader did not find) and ``declared_width`` / ``declared_height``
  (a VOC ``<size>``, 0 = not given); they are written only by the readers that fill them.
- ``boxes.parquet``: one row per box: ``image_id``, ``class_name``, ``x1, y1, x2, y2`` in pixels.
"""
from __future__ import annotations

import contextlib
import hashlib
import json
import os
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

import numpy as np
import pandas as pd


IMAGE_COLUMNS = ["image_id", "path", "template_path", "width", "height", "board_id", "source_split", "source"]
BOX_COLUMNS = ["image_id", "class_name", "x1", "y1", "x2", "y2"]
# raw manifests only, when a reader fills them (see the module docstring): column -> value when absent
RAW_IMAGE_COLUMNS = {"expected_template": "", "declared_width": 0, "declared_height": 0}
CLEAN_IMAGE_COLUMNS = {"content_hash": ""}  # clean manifests only (etl writes it)


@contextlib.contextmanager
def atomic_dir(out: str | Path) -> Iterator[Path]:
    """Yield a fresh temp folder beside ``out``; on success it replaces ``out`` in one rename."""
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.tmp-", dir=out.parent))
    try:
        yield tmp
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    old = out.with_name(f".{out.name}.old-{os.getpid()}")
    if out.exists():
        os.replace(out, old)
    os.replace(tmp, out)
    shutil.rmtree(old, ignore_errors=True)


@contextlib.contextmanager
def atomic_file(path: str | Path) -> Iterator[Path]:
    """Yield a temp path beside ``path``; it is renamed onto ``path`` only if the block succeeds."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.tmp-", suffix=path.suffix, dir=path.parent)
    os.close(fd)
    try:
        yield Path(tmp)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def write_json(path: str | Path, obj) -> None:
    with atomic_file(path) as tmp:
        tmp.write_text(json.dumps(obj, indent=2, sort_keys=False) + "\n")


def read_json(path: str | Path, key: str | None):
    """``key`` of the JSON object in ``path`` (None: the whole object); ValueError naming the file when it
    is missing, not JSON or lacks the key."""
    try:
        obj = json.loads(Path(path).read_text())
    except FileNotFoundError:
        raise ValueError(f"{path}: not found; run the stage that writes it (dvc repro)") from None
    except json.JSONDecodeError as e:
        raise ValueError(f"{path}: not valid JSON ({e})") from None
    if not isinstance(obj, dict) or (key is not None and key not in obj):
        raise ValueError(f"{path}: has no '{key}'; re-run the stage that writes it (dvc repro)")
    return obj if key is None else obj[key]


@dataclass
class Dataset:
    """Manifests of one dataset folder; image paths resolve against ``root``."""

    root: Path
    images: pd.DataFrame
    boxes: pd.DataFrame

    @classmethod
    def load(cls, root: str | Path) -> "Dataset":
        root = Path(root)
        for name in ("images.parquet", "boxes.parquet"):
            if not (root / name).is_file():
                raise FileNotFoundError(f"{root / name}: manifest missing; run the stage that writes {root}")
        return cls(root, pd.read_parquet(root / "images.parquet"), pd.read_parquet(root / "boxes.parquet"))

    def save(self, root: str | Path) -> None:
        """Write the manifests into ``root`` (image files are the caller's business)."""
        root = Path(root)
        extra = [c for c in {**RAW_IMAGE_COLUMNS, **CLEAN_IMAGE_COLUMNS} if c in self.images]
        self.images[IMAGE_COLUMNS + extra].to_parquet(root / "images.parquet", index=False)
        self.boxes[BOX_COLUMNS].to_parquet(root / "boxes.parquet", index=False)

    def annotations(self, image_ids, classes: tuple[str, ...]) -> dict[str, dict[str, np.ndarray]]:
        """Ground truth per image: {"boxes": (N, 4) float32 xyxy px, "labels": (N,) int64 class index}."""
        index = {c: k for k, c in enumerate(classes)}
        out = {}
        for image_id in image_ids:
            b = self.boxes_of(image_id)
            out[image_id] = {"boxes": b[["x1", "y1", "x2", "y2"]].to_numpy(np.float32).reshape(-1, 4),
                             "labels": b["class_name"].map(index).to_numpy(np.int64)}
        return out

    def rows(self, image_ids) -> list:
        """Image rows (namedtuples) for ``image_ids``, in that order."""
        return list(self.images.set_index("image_id").loc[list(image_ids)].reset_index().itertuples(index=False))

    def boxes_of(self, image_id: str) -> pd.DataFrame:
        return self._groups.get(image_id, self.boxes.iloc[:0])

    @property
    def _groups(self) -> dict[str, pd.DataFrame]:
        if not hasattr(self, "_g"):
            self._g = {k: g for k, g in self.boxes.groupby("image_id", sort=False)}
        return self._g


def split_ids(split_dir: str | Path, name: str) -> list[str]:
    """Image ids of split ``name`` (train / val / test) in ``split_dir/split.parquet``."""
    table = pd.read_parquet(Path(split_dir) / "split.parquet")
    return table.loc[table["split"] == name, "image_id"].tolist()


def test_ids(split_dir: str | Path) -> list[str]:
    """Image ids of the test split; ValueError when it is empty (nothing to score a model on)."""
    ids = split_ids(split_dir, "test")
    if not ids:
        raise ValueError(f"{split_dir}/split.parquet: the test split is empty")
    return ids


def make_images_frame(rows: list[dict]) -> pd.DataFrame:
    """The images manifest of ``rows``; a ``RAW_IMAGE_COLUMNS`` / ``CLEAN_IMAGE_COLUMNS`` column only when
    some row has it; ``source`` "" where a row has none (manifests written before it existed)."""
    extra = {c: v for c, v in {**RAW_IMAGE_COLUMNS, **CLEAN_IMAGE_COLUMNS}.items() if any(c in r for r in rows)}
    df = pd.DataFrame(rows, columns=IMAGE_COLUMNS + list(extra))
    df["source"] = df["source"].astype(object).fillna("")
    if extra:
        df = df.fillna(extra)
    sizes = [c for c in ("width", "height", "declared_width", "declared_height") if c in df]
    return df.astype({c: "int32" for c in sizes})


def image_file(image_id: str, tag: str, suffix: str) -> str:
    """Path of an image file inside a dataset folder: ``images/<id>_<tag><suffix>``, a namespaced id's
    source as a sub-folder (``deeppcb:00041000`` -> ``images/deeppcb/00041000_test.png``: no ``:`` in file
    names, which Windows and some object stores refuse)."""
    return f"images/{image_id.replace(':', '/')}_{tag}{suffix}"


def content_hash(*pixels: np.ndarray) -> str:
    """sha256 of decoded images (their shapes, dtypes and pixels): the same picture re-encoded (PNG vs
    BMP, other metadata) hashes the same, any changed pixel does not."""
    h = hashlib.sha256()
    for a in pixels:
        a = np.ascontiguousarray(a)
        h.update(f"{a.shape}{a.dtype}".encode())
        h.update(a.tobytes())
    return h.hexdigest()


def make_boxes_frame(rows: list[dict]) -> pd.DataFrame:
    df = pd.DataFrame(rows, columns=BOX_COLUMNS)
    return df.astype({c: "float32" for c in ("x1", "y1", "x2", "y2")})


REGISTRATION = "registration.json"  # in a clean dataset folder: {"max_px": N} when etl registered its pairs


def registration_px(root: str | Path) -> int:
    """The registration search range etl applied to the pairs in ``root`` (0: pairs as given)."""
    path = Path(root) / REGISTRATION
    return int(json.loads(path.read_text())["max_px"]) if path.is_file() else 0


def per_class_counts(boxes: pd.DataFrame, classes: tuple[str, ...]) -> dict[str, int]:
    counts = boxes["class_name"].value_counts()
    return {c: int(counts.get(c, 0)) for c in classes}
