"""Difference-gated inference: run the network only where a registered test image differs from its template.

A registered DeepPCB pair is the same board almost everywhere (a handful of small defects per 640x640
pair), so most of a dense forward pass looks at copper that matches the template. The gate finds
where the pair differs and runs the network on tiles around those places only:

1. ``changed_mask``: |test - template| > ``diff_threshold`` grey levels, then an erosion by a
   ``min_size_px`` square (3: a pixel stays only when a 3x3 block around it all differs): the one- and
   two-pixel lines that a local misalignment or JPEG noise leaves along copper edges go, any defect
   with a 3x3 px core stays.
2. ``plan``: the mask's ``CELL`` x ``CELL`` cells, their 8-connected regions (boxes), each box grown
   by ``margin_px`` (the network looks that far around a defect: a detection with less context
   than that differs from the dense one; measured by ``benchmarks/gate.py``) and snapped outward
   to the contract's ``pad_multiple``, so a tile's feature grid lines up with the dense image's and
   its interior computes what the dense pass computes. Tiles that overlap are merged (their union,
   again snapped) until none do. When the tiles cover more than ``max_fraction`` of the (padded)
   image, or nothing but noise differs in a pair whose registration failed (the whole layout
   shows in the difference), the pair runs dense: the plan says why.
3. The caller (``runtime.EdgeModel``) batches the tiles of one size in one ONNX Runtime run, adds each
   tile's offset to its boxes and merges them across tiles with the per-class NMS of the decoding.

numpy only, like the rest of ``pcb_aoi.edge`` (no scipy, no OpenCV needed): torch-free and light.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

MODES = ("none", "tiles")
CELL = 8  # px: the grid on which changed regions are found (8-connected cells)
# Defaults of the contract's "gate" block (an older model without one, or --gate tiles on it).
DEFAULTS = {"mode": "none", "diff_threshold": 64, "min_size_px": 3, "margin_px": 48, "max_fraction": 0.5}


@dataclass(frozen=True)
class Tile:
    """A window of the (padded) image: x0 y0 x1 y1 px, x0 y0 multiples of the pad multiple."""

    x0: int
    y0: int
    x1: int
    y1: int

    @property
    def area(self) -> int:
        return (self.x1 - self.x0) * (self.y1 - self.y0)

    def overlaps(self, o: "Tile") -> bool:
        return self.x0 < o.x1 and o.x0 < self.x1 and self.y0 < o.y1 and o.y0 < self.y1

    def union(self, o: "Tile") -> "Tile":
        return Tile(min(self.x0, o.x0), min(self.y0, o.y0), max(self.x1, o.x1), max(self.y1, o.y1))


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
    """The model's gate settings (the contract's ``gate`` block over ``DEFAULTS``), ``mode`` overriding its mode."""
    out = DEFAULTS | (contract.get("gate") or {})
    if mode is not None:
        out["mode"] = mode
    if out["mode"] not in MODES:
        raise ValueError(f"gate mode {out['mode']!r}: must be one of {', '.join(MODES)}")
    return out


def erode(mask: np.ndarray, size: int) -> np.ndarray:
    """(H, W) bool: True where the ``size`` x ``size`` block starting at the pixel is all True (separable)."""
    out = mask
    for axis in (0, 1):
        run = out.copy()
        for k in range(1, size):
            if axis == 0:
                run[:-k] &= out[k:]
                run[-k:] = False
            else:
                run[:, :-k] &= out[:, k:]
                run[:, -k:] = False
        out = run
    return out


def changed_mask(test: np.ndarray, template: np.ndarray, threshold: int, size: int = 3) -> np.ndarray:
    """(H, W) bool: |test - template| > ``threshold`` on a whole ``size`` x ``size`` block (its top-left pixel
    marks it): thinner lines, what a local misalignment leaves along copper edges, are noise."""
    return erode(np.abs(test.astype(np.int16) - template.astype(np.int16)) > threshold, size)


def _cells(mask: np.ndarray) -> np.ndarray:
    """(H, W) bool -> (ceil(H / CELL), ceil(W / CELL)) bool: any pixel of the cell set."""
    h, w = mask.shape
    padded = np.zeros((-(-h // CELL) * CELL, -(-w // CELL) * CELL), bool)
    padded[:h, :w] = mask
    return padded.reshape(padded.shape[0] // CELL, CELL, padded.shape[1] // CELL, CELL).any(axis=(1, 3))


def regions(cells: np.ndarray) -> list[tuple[int, int, int, int]]:
    """Bounding boxes (c0, r0, c1, r1, in cells, exclusive end) of the 8-connected regions of ``cells``.

    A flood fill over the set cells only: a few dozen on a registered pair; the caller falls back to
    dense before a pair with thousands of changed cells gets here."""
    seen = np.zeros_like(cells)
    rows, cols = cells.shape
    out = []
    for r, c in zip(*np.nonzero(cells)):
        if seen[r, c]:
            continue
        seen[r, c] = True
        stack, box = [(r, c)], [c, r, c + 1, r + 1]
        while stack:
            y, x = stack.pop()
            box = [min(box[0], x), min(box[1], y), max(box[2], x + 1), max(box[3], y + 1)]
            for yy in range(max(y - 1, 0), min(y + 2, rows)):
                for xx in range(max(x - 1, 0), min(x + 2, cols)):
                    if cells[yy, xx] and not seen[yy, xx]:
                        seen[yy, xx] = True
                        stack.append((yy, xx))
        out.append(tuple(int(v) for v in box))
    return out


def _snap(x0: float, y0: float, x1: float, y1: float, multiple: int, w: int, h: int) -> Tile:
    """The box grown outward to multiples of ``multiple`` and clipped to the padded image (w x h, multiples)."""
    def lo(v):
        return max(int(v) // multiple * multiple, 0)

    def hi(v, limit):
        return min(-(-int(np.ceil(v)) // multiple) * multiple, limit)

    return Tile(lo(x0), lo(y0), hi(x1, w), hi(y1, h))


def merge(tiles: list[Tile], multiple: int, w: int, h: int) -> list[Tile]:
    """Tiles that overlap replaced by their union until none overlap (unions of snapped tiles stay snapped)."""
    tiles = list(tiles)
    merged = True
    while merged:
        merged = False
        for i in range(len(tiles)):
            for j in range(i + 1, len(tiles)):
                if tiles[i].overlaps(tiles[j]):
                    tiles[i] = tiles[i].union(tiles.pop(j))
                    merged = True
                    break
            if merged:
                break
    return sorted(tiles, key=lambda t: (t.y0, t.x0))


def plan(test: np.ndarray, template: np.ndarray, settings: dict, pad_multiple: int) -> Plan:
    """Where to run the network on a registered pair of (H, W) uint8 images, by the gate ``settings``."""
    h, w = test.shape
    ph, pw = -(-h // pad_multiple) * pad_multiple, -(-w // pad_multiple) * pad_multiple
    mask = changed_mask(test, template, int(settings["diff_threshold"]), int(settings["min_size_px"]))
    changed = float(mask.mean())
    cells = _cells(mask)
    limit = float(settings["max_fraction"])
    if cells.mean() > limit:  # most of the image differs: a failed registration, another board, a light change
        return Plan(None, f"{cells.mean():.0%} of the image differs from the template (more than "
                    f"max_fraction {limit:.0%}): registration failed or another board", changed)
    boxes = [(c0 * CELL, r0 * CELL, min(c1 * CELL, w), min(r1 * CELL, h)) for c0, r0, c1, r1 in regions(cells)]
    m = int(settings["margin_px"])
    tiles = merge([_snap(x0 - m, y0 - m, x1 + m, y1 + m, pad_multiple, pw, ph) for x0, y0, x1, y1 in boxes],
                  pad_multiple, pw, ph)
    run = sum(t.area for t in tiles) / (pw * ph)
    if run > limit:
        return Plan(None, f"tiles would cover {run:.0%} of the image (more than max_fraction {limit:.0%})", changed,
                    regions=boxes)
    return Plan(tiles, "", changed, run, boxes)


def cut(x: np.ndarray, tiles: list[Tile]) -> dict[tuple[int, int], tuple[list[Tile], np.ndarray]]:
    """(C, H', W') padded model input -> {(h, w): (tiles, (N, C, h, w) batch)}: one batch per tile size."""
    groups: dict[tuple[int, int], list[Tile]] = {}
    for t in tiles:
        groups.setdefault((t.y1 - t.y0, t.x1 - t.x0), []).append(t)
    return {size: (ts, np.stack([x[:, t.y0:t.y1, t.x0:t.x1] for t in ts])) for size, ts in groups.items()}
