"""pcb-aoi-data-diff: what changed in the clean dataset between two revisions.

Both revisions' manifests (``data/clean/images.parquet`` and ``boxes.parquet``, see ``dataset.py``) are
read through DVC at the revision (``dvc.api.DVCFileSystem``: no checkout; the data must be in the DVC
cache or a remote, as ``dvc pull`` would need it) or from the workspace. It reports:

- images added, removed, and changed: same id, other pixels (the ``content_hash`` column etl writes;
  a revision older than it is compared by the md5 of its image files);
- images **renamed**: same pixels (``content_hash``), another id, as when a single source becomes one of
  ``ingest.sources`` (``00041000`` -> ``deeppcb:00041000``) or a source is renamed; without this every
  image would read as removed and added again. Their boxes are compared as those of the same id;
- boxes of the images in both revisions (renamed ones too), each base box matched to at most one head box: **relabelled**
  (IoU >= 0.5, another class), **moved** (same class, 0.1 <= IoU < 0.5), **adjusted** (same class,
  IoU >= 0.5, other coordinates), else **removed** / **added**; boxes of added or removed images
  count in the per-class totals, not as box changes;
- counts per class and per board, as markdown (default) or ``--json``; ``--thumbnails DIR`` draws a
  few changed images, base (old boxes, red) beside head (new boxes, green).

    pcb-aoi-data-diff --base main                    # workspace vs main
    pcb-aoi-data-diff --base HEAD~1 --head HEAD --json
    pcb-aoi-data-diff --base v1 --head v2 --thumbnails reports/data-diff

Exit codes: 0 the diff was printed; 2 a user error (bad revision, no manifest at a revision).
"""
from __future__ import annotations

import argparse
import hashlib
import io
import json
import os
import subprocess
import sys
from collections import Counter, defaultdict
from pathlib import Path

import numpy as np
import pandas as pd

from ..evaluation.deeppcb import iou as box_iou  # numpy only: pcb_aoi.data imports no torch
from .diff_pictures import thumbnails

WORKSPACE = "workspace"
SAME_IOU, MOVED_IOU = 0.5, 0.1  # IoU at or above SAME_IOU: the same box; MOVED_IOU..SAME_IOU: moved
KINDS = ("added", "removed", "relabelled", "moved", "adjusted")
LISTED = 20  # changes listed one by one in the markdown; --json lists all


class DiffError(Exception):
    """A user error: not a git + DVC repository, a bad revision, no manifest at a revision."""


class Side:
    """One revision's clean manifests and a reader of its files (``rev`` None: the workspace)."""

    def __init__(self, root: Path, rev: str | None, data: str, label: str):
        self.root, self.rev, self.data, self.label = root, rev, data.strip("/"), label
        self._fs = None
        raw = {name: self.read(f"{self.data}/{name}.parquet") for name in ("images", "boxes")}
        missing = [n for n, b in raw.items() if b is None]
        if missing:
            raise DiffError(f"{label}: {self.data}/{missing[0]}.parquet not found there (not a dataset revision, "
                            f"or its DVC data is not in the cache: `dvc pull` / `dvc fetch` it)")
        self.images = pd.read_parquet(io.BytesIO(raw["images"]))
        self.boxes = pd.read_parquet(io.BytesIO(raw["boxes"]))

    def read(self, path: str) -> bytes | None:
        """Bytes of ``path`` (relative to the repository) at this revision, None when it is not there."""
        if self.rev is None:
            p = self.root / path
            return p.read_bytes() if p.is_file() else None
        if self._fs is None:
            from dvc.api import DVCFileSystem

            self._fs = DVCFileSystem(str(self.root), rev=self.rev)
        try:
            return self._fs.read_bytes(path)
        except Exception:  # no such file, DVC data not in the cache: both mean "not there"
            return None

    @property
    def hashed(self) -> bool:
        """Whether every image has etl's ``content_hash`` (a revision older than the column has none)."""
        return "content_hash" in self.images and bool((self.images["content_hash"] != "").all())

    def fingerprints(self, ids, by_hash: bool) -> dict[str, str]:
        """image id -> what identifies its pixels: ``content_hash`` (``by_hash``), else the md5 of its files."""
        rows = self.images.set_index("image_id").loc[list(ids)]
        if by_hash:
            return rows["content_hash"].to_dict()
        return {i: file_md5(self, r.path, r.template_path) for i, r in rows.iterrows()}


def file_md5(side: Side, *paths: str) -> str:
    h = hashlib.md5()
    for p in paths:
        if p:
            h.update(side.read(f"{side.data}/{p}") or b"")
    return h.hexdigest()


def match_boxes(base: pd.DataFrame, head: pd.DataFrame) -> list[tuple[str, int | None, int | None, float]]:
    """(kind, base row, head row, IoU) of one image's boxes; kind in KINDS or "same". Pairs are taken
    greedily, highest IoU first: same class at IoU >= 0.5, then another class at IoU >= 0.5
    (relabelled), then same class at 0.1 <= IoU < 0.5 (moved); what is left is removed / added."""
    cols = ["x1", "y1", "x2", "y2"]
    a, b = base[cols].to_numpy(float).reshape(-1, 4), head[cols].to_numpy(float).reshape(-1, 4)
    iou = box_iou(a, b)
    same_class = base["class_name"].to_numpy()[:, None] == head["class_name"].to_numpy()[None, :]
    free_a, free_b, out = np.ones(len(a), bool), np.ones(len(b), bool), []
    for kind, ok in (("same", same_class & (iou >= SAME_IOU)), ("relabelled", ~same_class & (iou >= SAME_IOU)),
                     ("moved", same_class & (iou >= MOVED_IOU))):
        pairs = np.argwhere(ok)
        for i, j in pairs[np.argsort(-iou[ok], kind="stable")]:
            if free_a[i] and free_b[j]:
                free_a[i] = free_b[j] = False
                k = kind if kind != "same" else "same" if (a[i] == b[j]).all() else "adjusted"
                out.append((k, int(i), int(j), float(iou[i, j])))
    out += [("removed", int(i), None, 0.0) for i in np.flatnonzero(free_a)]
    out += [("added", None, int(j), 0.0) for j in np.flatnonzero(free_b)]
    return out


def _box(r) -> list[float]:
    return [round(float(v), 2) for v in (r.x1, r.y1, r.x2, r.y2)]


def diff(base: Side, head: Side) -> dict:
    """The JSON-able comparison of two revisions (see the module docstring)."""
    b_ids, h_ids = set(base.images["image_id"]), set(head.images["image_id"])
    common = sorted(b_ids & h_ids)
    by_hash = base.hashed and head.hashed  # else both by file: a hash and an md5 never compare equal
    b_fp, h_fp = base.fingerprints(common, by_hash), head.fingerprints(common, by_hash)
    renamed = renamed_images(base, head, b_ids - h_ids, h_ids - b_ids) if by_hash else []
    images = {"added": sorted(h_ids - b_ids - {h for _, h in renamed}),
              "removed": sorted(b_ids - h_ids - {b for b, _ in renamed}),
              "changed": [i for i in common if b_fp[i] != h_fp[i]],
              "renamed": [{"from": b, "to": h} for b, h in renamed]}
    board = {**base.images.set_index("image_id")["board_id"].to_dict(),
             **head.images.set_index("image_id")["board_id"].to_dict()}
    b_groups, h_groups = (dict(tuple(s.boxes.groupby("image_id", sort=False))) for s in (base, head))
    none = base.boxes.iloc[:0]
    boxes = []
    for base_id, image_id in [(i, i) for i in common] + renamed:
        a = b_groups.get(base_id, none).reset_index(drop=True)
        b = h_groups.get(image_id, none).reset_index(drop=True)
        for kind, i, j, iou in match_boxes(a, b):
            if kind == "same":
                continue
            old, new = (a.iloc[i] if i is not None else None), (b.iloc[j] if j is not None else None)
            boxes.append({"image_id": image_id, **({"base_image_id": base_id} if base_id != image_id else {}),
                          "board_id": board[image_id], "kind": kind,
                          "class": (new if new is not None else old).class_name,
                          **({"from": old.class_name} if kind == "relabelled" else {}),
                          "base_box": _box(old) if old is not None else None,
                          "head_box": _box(new) if new is not None else None, "iou": round(iou, 3)})
    return {"base": base.label, "head": head.label, "data": base.data,
            "compared_by": "content_hash" if by_hash else "file md5",
            "totals": {"base_images": len(b_ids), "head_images": len(h_ids),
                       "base_boxes": len(base.boxes), "head_boxes": len(head.boxes)},
            "images": images, "image_counts": {k: len(v) for k, v in images.items()},
            "box_counts": {k: sum(e["kind"] == k for e in boxes) for k in KINDS}, "boxes": boxes,
            "per_class": _per_class(base, head, boxes), "per_board": _per_board(images, boxes, board)}


def renamed_images(base: Side, head: Side, gone: set[str], new: set[str]) -> list[tuple[str, str]]:
    """(base id, head id) of the images only one side names whose pixels are the same: a picture found
    under a new id. Each head image is taken once; a picture several times on one side pairs in id order."""
    by_hash: dict[str, list[str]] = defaultdict(list)
    for i, h in sorted(head.fingerprints(new, True).items()):
        by_hash[h].append(i)
    pairs = []
    for i, h in sorted(base.fingerprints(gone, True).items()):
        if by_hash.get(h):
            pairs.append((i, by_hash[h].pop(0)))
    return sorted(pairs, key=lambda p: p[1])


def _per_class(base: Side, head: Side, boxes: list[dict]) -> dict:
    b, h = Counter(base.boxes["class_name"]), Counter(head.boxes["class_name"])
    out = {c: {"base": b[c], "head": h[c], **{k: 0 for k in KINDS}, "relabelled_away": 0}
           for c in sorted(set(b) | set(h))}
    for e in boxes:
        out[e["class"]][e["kind"]] += 1  # relabelled: counted for the new class, and away from the old one
        if e["kind"] == "relabelled":
            out[e["from"]]["relabelled_away"] += 1
    return out


def _per_board(images: dict, boxes: list[dict], board: dict) -> dict:
    out = defaultdict(lambda: {**{f"images_{k}": 0 for k in images}, **{k: 0 for k in KINDS}})
    for k, ids in images.items():
        for i in ids:
            out[board[i["to"] if k == "renamed" else i]][f"images_{k}"] += 1  # renamed: on the head's board
    for e in boxes:
        out[e["board_id"]][e["kind"]] += 1
    return dict(sorted(out.items()))


def _fmt(box: list[float] | None) -> str:
    return "[" + ", ".join(f"{v:g}" for v in box) + "]" if box else ""


def markdown(d: dict) -> str:
    """The diff as markdown: totals, counts, the per-class and per-board tables, the first changes."""
    t, ic, bc = d["totals"], d["image_counts"], d["box_counts"]
    sign = lambda n: f"{n:+d}" if n else "0"  # noqa: E731
    lines = [f"| `{d['data']}` | base | head | change |", "|---|---:|---:|---:|",
             f"| images | {t['base_images']} | {t['head_images']} | {sign(t['head_images'] - t['base_images'])} |",
             f"| boxes | {t['base_boxes']} | {t['head_boxes']} | {sign(t['head_boxes'] - t['base_boxes'])} |", "",
             f"**Images:** {ic['added']} added, {ic['removed']} removed, {ic['changed']} changed "
             f"(other pixels, by {d['compared_by']})"
             + (f", {ic['renamed']} renamed (same pixels, new id)." if ic["renamed"] else "."),
             "**Boxes** (images in both revisions): " + ", ".join(f"{bc[k]} {k}" for k in KINDS) + "."]
    if not (any(ic.values()) or any(bc.values())):
        return "\n".join(lines + ["", "_The dataset did not change._"])
    lines += ["", "| class | base | head | added | removed | relabelled to | relabelled away | moved | adjusted |",
              "|---|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for c, v in d["per_class"].items():
        lines.append(f"| {c} | {v['base']} | {v['head']} | {v['added']} | {v['removed']} | {v['relabelled']} | "
                     f"{v['relabelled_away']} | {v['moved']} | {v['adjusted']} |")
    lines += ["", "| board | images added | images removed | images changed | images renamed | boxes added | "
              "boxes removed | relabelled | moved | adjusted |", "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for b, v in d["per_board"].items():
        lines.append(f"| {b} | {v['images_added']} | {v['images_removed']} | {v['images_changed']} | "
                     f"{v['images_renamed']} | " + " | ".join(str(v[k]) for k in KINDS) + " |")
    changes = [f"- image added: `{i}`" for i in d["images"]["added"]]
    changes += [f"- image removed: `{i}`" for i in d["images"]["removed"]]
    changes += [f"- image changed (pixels): `{i}`" for i in d["images"]["changed"]]
    changes += [f"- image renamed: `{r['from']}` → `{r['to']}`" for r in d["images"]["renamed"]]
    for e in d["boxes"]:
        old, new = (_fmt(e[k]) for k in ("base_box", "head_box"))
        if e["kind"] in ("added", "removed"):
            what = f"{e['class']} {new if e['kind'] == 'added' else old}"
        elif e["kind"] == "relabelled":
            what = f"{e['from']} → {e['class']} at {new} (IoU {e['iou']:g})"
        else:
            what = f"{e['class']} {old} → {new} (IoU {e['iou']:g})"
        changes.append(f"- box {e['kind']}: `{e['image_id']}` {what}"
                       + (f" (was `{e['base_image_id']}`)" if "base_image_id" in e else ""))
    more = [f"- … {len(changes) - LISTED} more (`--json` lists all)"] if len(changes) > LISTED else []
    return "\n".join(lines + ["", "**Changes:**", "", *changes[:LISTED], *more])


def git_root(cwd: Path | None = None) -> Path:
    r = subprocess.run(["git", "rev-parse", "--show-toplevel"], cwd=cwd, capture_output=True, text=True)
    if r.returncode or not (Path(r.stdout.strip()) / ".dvc").is_dir():
        raise DiffError(f"{cwd or Path.cwd()} is not inside a git + DVC repository; run from the project checkout")
    return Path(r.stdout.strip())


def commit_of(root: Path, rev: str, role: str) -> str:
    r = subprocess.run(["git", "rev-parse", "--verify", "--quiet", f"{rev}^{{commit}}"], cwd=root,
                       capture_output=True, text=True)
    if r.returncode:
        raise DiffError(f"{role} revision {rev!r} does not exist in this git repository")
    return r.stdout.strip()


def sides(root: Path, base: str, head: str, data: str) -> tuple[Side, Side]:
    """The two revisions to compare; ``head`` WORKSPACE = the files as they are."""
    b = commit_of(root, base, "base")
    h = None if head == WORKSPACE else commit_of(root, head, "head")
    return (Side(root, b, data, f"{base} ({b[:7]})"),
            Side(root, h, data, WORKSPACE if h is None else f"{head} ({h[:7]})"))


def data_section(root: Path, base_rev: str, head_rev: str | None, data: str = "data/clean") -> str:
    """The diff of two commits' datasets as markdown for ``pcb-aoi-review`` (``head_rev`` None: the
    workspace), or one line saying why there is none (a revision without the dataset or its DVC data)."""
    try:
        return markdown(diff(Side(root, base_rev, data, "base"), Side(root, head_rev, data, "head")))
    except DiffError as e:
        return f"_No data comparison: {e}._"


def parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="pcb-aoi-data-diff", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--base", required=True, help="git revision to compare against (branch, tag, sha)")
    ap.add_argument("--head", default=WORKSPACE, help="revision compared (default: the workspace)")
    ap.add_argument("--data", default="data/clean", help="the dataset folder, etl's output (default: %(default)s)")
    ap.add_argument("--json", action="store_true", help="print the whole comparison as JSON, not markdown")
    ap.add_argument("--thumbnails", type=Path, metavar="DIR",
                    help="write base | head PNGs of a few changed images here (replaced)")
    ap.add_argument("--max-thumbnails", type=int, default=8, help="at most this many (default: %(default)s)")
    return ap


def main(argv: list[str] | None = None) -> None:
    args = parser().parse_args(argv)
    os.environ.setdefault("DVC_NO_ANALYTICS", "1")
    try:
        base, head = sides(git_root(), args.base, args.head, args.data)
        d = diff(base, head)
    except DiffError as e:
        print(f"error: data-diff: {e}", file=sys.stderr)
        sys.exit(2)
    if args.thumbnails:
        d["thumbnails"] = thumbnails(d, base, head, args.thumbnails, args.max_thumbnails)
    print(json.dumps(d, indent=2) if args.json else f"## Data: {head.label} vs {base.label}\n\n{markdown(d)}")


if __name__ == "__main__":
    main()
