"""Difference-gated inference: run the network only where a registered test image differs from its template.

A registered DeepPCB pair is the same board almost everywhere (a handful of small defects per 640x640
pair), so most of a dense forward pass looks at copper that matches the template. The gate finds
where the pair differs and runs the network on tiles around those places only:

1. ``changed_mask``: a test pixel is changed when it is more than ``diff_threshold`` grey levels darker
   than the darkest, or brighter than the brightest, template pixel within ``tolerance_px`` of it (the
   tolerance comparison of AOI: an edge a pixel off, what sub-pixel misregistration leaves along every
   copper edge, is no change), then an erosion by a ``min_size_px`` square (2: a pixel stays only when
   a 2x2 block around it all changed): any defect with a 2x2 px core stays. On DeepPCB's labelled
   training and validation boards, tolerance 1 and size 2 keep every defect and leave tiles over about
   a fifth of the image (without the tolerance, size 2 leaves half; size 3 loses thin mousebites):
   docs/gate.md.
2. ``plan``: the mask's ``CELL`` x ``CELL`` cells, their 8-connected regions (boxes), each box grown
   by ``margin_px`` (the network looks that far around a defect: a detection with less context
   than that differs from the dense one; measured by ``benchmarks/gate.py``) and snapped outward
   to the contract's ``tile_multiple`` (the network's total downsampling, 16; older contracts: the
   pad multiple), so a tile's feature grid lines up with the dense image's: it differs from the dense
   pass only by the context cut off at its border (blocks at /16 dilated 1, 2, 4 reach ~300 px, so no
   tile reproduces dense; undilated, ``train.model.dilated=false``, a cell 96 px inside a tile does to
   0.05 logit; ``margin_px`` is the context accuracy needs, chosen on validation). Two tiles are merged into their (snapped) union only when the union
   costs no more pixels than the two apart: tiles that overlap a little stay apart and their overlap
   is computed twice, which is cheaper than the corners a union adds. When the tiles cover more than
   ``max_fraction`` of the (padded) image, the changed regions are too many (``MAX_REGIONS``), or
   nothing but noise differs in a pair whose registration failed (the whole layout shows in the
   difference), the pair runs dense: the plan says why.
3. The caller (``runtime.EdgeModel``) batches the tiles of one size in one ONNX Runtime run, adds each
   tile's offset to its boxes, keeps from each tile the detections centred on the regions it was cut
   for (``Tile.owns``: a neighbour's defect cut by the tile's border is that neighbour's tile's to
   find, with its full context) and merges them across tiles with the per-class NMS of the decoding.

numpy only, like the rest of ``pcb_aoi.edge`` (no scipy, no OpenCV needed): torch-free and light.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

MODES = ("none", "tiles")
CELL = 8  # px: the grid on which changed regions are found (8-connected cells)
OWN_SLACK_PX = 16  # a detection belongs to a tile when its centre lies this close to a region the tile owns
MAX_REGIONS = 64  # more separate changed regions than this: scattered change (noise, another board), run dense
# Defaults of the contract's "gate" block (an older model without one, or --gate tiles on it).
DEFAULTS = {"mode": "none", "diff_threshold": 64, "tolerance_px": 1, "min_size_px": 2, "margin_px": 32,
            "max_fraction": 0.5}


@dataclass(frozen=True)
class Tile:
    """A window of the (padded) image: x0 y0 x1 y1 px, multiples of the tile multiple; ``owns``: the changed
    regions (x0 y0 x1 y1 px) it was cut for, whose detections it reports."""

    x0: int
    y0: int
    x1: int
    y1: int
    owns: tuple[tuple[int, int, int, int], ...] = field(default=(), compare=False)

    @property
    def area(self) -> int:
        return (self.x1 - self.x0) * (self.y1 - self.y0)

    def owned(self, boxes: np.ndarray, slack: float) -> np.ndarray:
        """(N,) bool: the (N, 4) boxes (image px) centred within ``slack`` px of a region this tile owns."""
        cx, cy = (boxes[:, 0] + boxes[:, 2]) / 2, (boxes[:, 1] + boxes[:, 3]) / 2
        keep = np.zeros(len(boxes), bool)
        for x0, y0, x1, y1 in self.owns:
            keep |= (cx >= x0 - slack) & (cx <= x1 + slack) & (cy >= y0 - slack) & (cy <= y1 + slack)
        return keep


@dataclass
class Plan:
    """Where to run the network on one pair: ``tiles`` (None: the whole image, ``why`` says why)."""

    tiles: list[Tile] | None
    why: str = ""
    changed_fraction: float = 0.0  # of the image's pixels that differ beyond noise
    run_fraction: float = 1.0  # of the padded image's pixels the network runs on
    regions: list[tuple[int, int, int, int]] = field(default_factory=list)  # changed boxes x0 y0 x1 y1 px

    def record(self) -> dict:
        """The result record's ``gate`` key (``record.py``)."""
        if self.tiles is None:
            return {"mode": "dense", "why": self.why}
        return {"mode": "tiles", "tiles": len(self.tiles), "run_fraction": round(self.run_fraction, 4)}


def settings(contract: dict, mode: str | None = None) -> dict:
    """The model's gate settings (the contract's ``gate`` block over ``DEFAULTS``), ``mode`` overriding its mode,
    and ``tile_multiple`` (the contract's, or its pad multiple for a model exported before it was written)."""
    out = DEFAULTS | {"tile_multiple": contract.get("tile_multiple", contract["pad_multiple"])} | (contract.get("gate") or {})
    if mode is not None:
        out["mode"] = mode
    if out["mode"] not in MODES:
        raise ValueError(f"gate mode {out['mode']!r}: must be one of {', '.join(MODES)}")
    return out


def erode(mask: np.ndarray, size: int) -> np.ndarray:
    """(H, W) bool: True where the ``size`` x ``size`` block starting at the pixel is all True (separable)."""
    h, w = mask.shape
    rows = mask.copy()
    for k in range(1, min(size, h)):
        rows[:-k] &= mask[k:]
    rows[max(h - size + 1, 0):] = False
    out = rows.copy()
    flat, src = out.reshape(-1), rows.reshape(-1)  # along each row on the flat image: one long contiguous run
    for k in range(1, min(size, w)):
        flat[:-k] &= src[k:]  # the last k columns read the next row's first pixels; cleared below
    out[:, max(w - size + 1, 0):] = False
    return out


def _spread(image: np.ndarray, radius: int, pick) -> np.ndarray:
    """(H, W) ``pick`` (np.maximum or np.minimum) of ``image`` over the (2 radius + 1)^2 square around each
    pixel (borders: the part inside the image); separable, in the image's dtype.

    The pass along rows runs on the flattened image (contiguous, about 3x faster than column slices);
    the first and last columns, which met the neighbouring rows' ends there, are then computed apart."""
    out = image
    h, w = image.shape
    for _ in range(radius):
        rows = out.copy()
        pick(rows[1:], out[:-1], out=rows[1:])  # the row above
        pick(rows[:-1], out[1:], out=rows[:-1])  # and below (``out`` unchanged: no pixel counts twice)
        if w < 2:
            out = rows
            continue
        out = rows.copy()
        flat, src = out.reshape(-1), rows.reshape(-1)
        pick(flat[1:], src[:-1], out=flat[1:])
        pick(flat[:-1], src[1:], out=flat[:-1])
        out[:, 0] = pick(rows[:, 0], rows[:, 1])
        out[:, -1] = pick(rows[:, -1], rows[:, -2])
    return out


def changed_mask(test: np.ndarray, template: np.ndarray, threshold: int, size: int = 2,
                 tolerance: int = 0) -> np.ndarray:
    """(H, W) bool: ``test`` beyond ``threshold`` of every ``template`` pixel within ``tolerance`` px, on a
    whole ``size`` x ``size`` block (its top-left pixel marks it).

    In uint8 and without a scalar maximum (slow in numpy): ``test > hi + threshold`` is
    ``test >= threshold and test - threshold > hi``, ``test < lo - threshold`` is ``lo >= threshold and
    test < lo - threshold``, each subtraction exact where its condition holds."""
    if not 0 <= threshold <= 255:
        raise ValueError(f"gate diff_threshold {threshold}: must be 0..255 grey levels")
    thr = np.uint8(threshold)
    test = np.ascontiguousarray(test)
    if tolerance <= 0:
        hi = lo = np.ascontiguousarray(template)
    else:
        hi, lo = _spread(template, tolerance, np.maximum), _spread(template, tolerance, np.minimum)
    changed = (test - thr) > hi  # wraps below zero where test < threshold: masked next
    changed &= test >= thr
    below = test < (lo - thr)
    below &= lo >= thr
    changed |= below
    return erode(changed, size)


def _cells(mask: np.ndarray) -> np.ndarray:
    """(H, W) bool -> (ceil(H / CELL), ceil(W / CELL)) bool: any pixel of the cell set.

    Each row's 8 bools of a cell are read as one 8-byte integer (non-zero: one is set), then the 8
    rows of a cell are or-ed: ~20x faster than ``any`` over the two strided cell axes."""
    h, w = mask.shape
    if h % CELL or w % CELL:
        padded = np.zeros((-(-h // CELL) * CELL, -(-w // CELL) * CELL), bool)
        padded[:h, :w] = mask
        mask = padded
    rows = np.ascontiguousarray(mask).view(np.uint8).view(np.uint64) != 0  # (H, W / 8): CELL == 8 bytes
    return rows.reshape(rows.shape[0] // CELL, CELL, rows.shape[1]).any(axis=1)


def regions(cells: np.ndarray, most: int | None = None) -> list[tuple[int, int, int, int]] | None:
    """Bounding boxes (c0, r0, c1, r1, in cells, exclusive end) of the 8-connected regions of ``cells``;
    None as soon as there are more than ``most``.

    A flood fill over the set cells only: a few dozen on a registered pair; the caller falls back to
    dense before a pair with thousands of changed cells gets here."""
    left = set(zip(*(a.tolist() for a in np.nonzero(cells))))  # python ints: set lookups, not array indexing
    out = []
    while left:
        r, c = left.pop()
        stack, box = [(r, c)], [c, r, c + 1, r + 1]
        while stack:
            y, x = stack.pop()
            box = [min(box[0], x), min(box[1], y), max(box[2], x + 1), max(box[3], y + 1)]
            for n in ((y - 1, x - 1), (y - 1, x), (y - 1, x + 1), (y, x - 1), (y, x + 1),
                      (y + 1, x - 1), (y + 1, x), (y + 1, x + 1)):
                if n in left:
                    left.remove(n)
                    stack.append(n)
        out.append(tuple(box))
        if most is not None and len(out) > most:
            return None
    return sorted(out, key=lambda b: (b[1], b[0]))


def _snap(x0: float, y0: float, x1: float, y1: float, multiple: int, w: int, h: int, owns: tuple = ()) -> Tile:
    """The box grown outward to multiples of ``multiple`` and clipped to the padded image (w x h, multiples)."""
    def lo(v):
        return max(int(v) // multiple * multiple, 0)

    def hi(v, limit):
        return min(-(-int(np.ceil(v)) // multiple) * multiple, limit)

    return Tile(lo(x0), lo(y0), hi(x1, w), hi(y1, h), owns)


def merge(tiles: list[Tile]) -> list[Tile]:
    """Tiles merged pairwise into their union while a union costs no more pixels than its two tiles apart
    (the pair that saves most first); the rest may overlap. Unions of snapped tiles stay snapped."""
    b = [(t.x0, t.y0, t.x1, t.y1) for t in tiles]  # plain tuples: a few dozen tiles, pairs checked in python
    owns = [t.owns for t in tiles]
    while True:
        best, pick = -1, None
        for i, (ax0, ay0, ax1, ay1) in enumerate(b):
            area = (ax1 - ax0) * (ay1 - ay0)
            for j in range(i + 1, len(b)):
                bx0, by0, bx1, by1 = b[j]
                if ax0 < bx1 and bx0 < ax1 and ay0 < by1 and by0 < ay1:  # they overlap
                    saved = area + (bx1 - bx0) * (by1 - by0) - (max(ax1, bx1) - min(ax0, bx0)) * (max(ay1, by1) - min(ay0, by0))
                    if saved > best:
                        best, pick = saved, (i, j)
        if pick is None:
            break
        i, j = pick
        (ax0, ay0, ax1, ay1), (bx0, by0, bx1, by1) = b[i], b[j]
        b[i], owns[i] = (min(ax0, bx0), min(ay0, by0), max(ax1, bx1), max(ay1, by1)), owns[i] + owns[j]
        del b[j], owns[j]
    return sorted((Tile(*t, o) for t, o in zip(b, owns)), key=lambda t: (t.y0, t.x0))


def plan(test: np.ndarray, template: np.ndarray, settings: dict) -> Plan:
    """Where to run the network on a registered pair of (H, W) uint8 images, by the gate ``settings``
    (``settings()``: its ``tile_multiple`` divides the padded image size)."""
    h, w = test.shape
    multiple = int(settings["tile_multiple"])
    ph, pw = -(-h // multiple) * multiple, -(-w // multiple) * multiple
    mask = changed_mask(test, template, int(settings["diff_threshold"]), int(settings["min_size_px"]),
                        int(settings.get("tolerance_px", 0)))
    changed = np.count_nonzero(mask) / mask.size
    cells = _cells(mask)
    limit = float(settings["max_fraction"])
    share = np.count_nonzero(cells) / cells.size
    if share > limit:  # most of the image differs: a failed registration, another board, a light change
        return Plan(None, f"{share:.0%} of the image differs from the template (more than "
                    f"max_fraction {limit:.0%}): registration failed or another board", changed)
    found = regions(cells, MAX_REGIONS)
    if found is None:
        return Plan(None, f"more than {MAX_REGIONS} separate regions differ from the template (scattered change, "
                    "not a few defects): registration failed or another board", changed)
    boxes = [(c0 * CELL, r0 * CELL, min(c1 * CELL, w), min(r1 * CELL, h)) for c0, r0, c1, r1 in found]
    m = int(settings["margin_px"])
    tiles = merge([_snap(x0 - m, y0 - m, x1 + m, y1 + m, multiple, pw, ph, ((x0, y0, x1, y1),))
                   for x0, y0, x1, y1 in boxes])
    # the share of the image the network computes; a pixel in two overlapping tiles is computed twice
    run = sum(t.area for t in tiles) / (pw * ph)
    if run > limit:
        return Plan(None, f"tiles would cover {run:.0%} of the image (more than max_fraction {limit:.0%})", changed,
                    regions=boxes)
    return Plan(tiles, "", changed, run, boxes)


def cut(tiles: list[Tile], window) -> dict[tuple[int, int], tuple[list[Tile], np.ndarray]]:
    """{(h, w): (tiles, (N, C, h, w) batch)}: one batch per tile size, ``window(tile, out)`` writing a tile's
    model input into ``out`` (its (C, h, w) place in the batch; only the tiles' pixels are prepared)."""
    groups: dict[tuple[int, int], list[Tile]] = {}
    for t in tiles:
        groups.setdefault((t.y1 - t.y0, t.x1 - t.x0), []).append(t)
    out = {}
    for (h, w), ts in groups.items():
        batch = np.empty((len(ts), 3, h, w), np.float32)
        for t, x in zip(ts, batch):
            window(t, x)
        out[h, w] = ts, batch
    return out
