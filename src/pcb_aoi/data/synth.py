"""Synthetic PCB-AOI data in the style of DeepPCB: aligned, binarised template/test pairs.

A *board* is a random copper layout (traces of several widths in 0/45/90/135 degree directions,
pads with drill holes, vias, SMD pads) drawn on a canvas twice the image size. Each *image* is a
crop of its board into which the six DeepPCB defect classes are injected; the template is the
same crop without defects, misaligned by a sub-pixel shift. Copper is black, background white,
as in DeepPCB. Boxes are tight around the pixels each defect changed, in pixel-edge coordinates
(``x2 = last changed column + 1``).

Everything is deterministic given the seed: board ``b`` draws from ``default_rng([seed, b])`` and
its image ``i`` from ``default_rng([seed, b, i])``.
"""
from __future__ import annotations

import io
from dataclasses import dataclass

import numpy as np
from PIL import Image, ImageDraw
from scipy import ndimage

from ..pipeline.config import CLASSES, SynthConfig

DIRECTIONS = np.array([(1, 0), (1, 1), (0, 1), (-1, 1), (-1, 0), (-1, -1), (0, -1), (1, -1)], float)
DIRECTIONS /= np.linalg.norm(DIRECTIONS, axis=1, keepdims=True)
WIDTHS = (3, 4, 5, 6, 8, 10)
CLEARANCE = 3  # px between copper features of different nets


@dataclass
class Segment:
    p0: np.ndarray  # (2,) x, y
    p1: np.ndarray
    width: int
    net: int


@dataclass
class Board:
    nets: np.ndarray  # (B, B) int32, 0 = background, k = copper of net k
    segments: list[Segment]


@dataclass
class Defect:
    cls: str
    box: tuple[int, int, int, int]  # x1, y1, x2, y2 (pixel edges)
    changed: np.ndarray  # (H, W) bool, pixels this defect flipped


@dataclass
class Sample:
    test: np.ndarray  # (H, W) uint8, with defects, noise applied
    template: np.ndarray  # (H, W) uint8, defect-free, misaligned, noise applied
    defects: list[Defect]
    clean: np.ndarray  # (H, W) bool copper before defects (aligned with test)
    copper: np.ndarray  # (H, W) bool copper after defects


def _mask(shape: tuple[int, int], draw_fn) -> np.ndarray:
    img = Image.new("L", (shape[1], shape[0]), 0)
    draw_fn(ImageDraw.Draw(img))
    return np.asarray(img) > 0


def _disc(d: ImageDraw.ImageDraw, c, r: float) -> None:
    d.ellipse([c[0] - r, c[1] - r, c[0] + r, c[1] + r], fill=255)


def make_board(rng: np.random.Generator, size: int) -> Board:
    """Random layout on a ``size`` x ``size`` canvas, filled until ~30% is copper."""
    shape = (size, size)
    nets = np.zeros(shape, np.int32)
    segments: list[Segment] = []
    net = 0
    for _ in range(600):
        if (nets > 0).mean() > 0.35:
            break
        kind = rng.random()
        start = rng.uniform(0, size, 2)
        if kind < 0.15:  # SMD pad or via: wide copper where pin-holes live
            w, h = rng.uniform(8, 22, 2)
            if rng.random() < 0.5:
                fn = lambda d, s=start, w=w, h=h: d.rectangle([s[0], s[1], s[0] + w, s[1] + h], fill=255)
            else:
                r = rng.uniform(5, 10)
                fn = lambda d, s=start, r=r: _disc(d, s, r)
            pts, width = None, 0
        else:
            width = int(rng.choice(WIDTHS))
            pts = [start]
            heading = int(rng.integers(8))
            for _ in range(int(rng.integers(1, 4))):
                pts.append(pts[-1] + DIRECTIONS[heading] * rng.uniform(20, size / 3))
                heading = (heading + int(rng.choice([-2, -1, 1, 2]))) % 8
            pad_r = width / 2 + rng.uniform(2, 5)

            def fn(d, pts=pts, width=width, pad_r=pad_r):
                d.line([tuple(p) for p in pts], fill=255, width=width, joint="curve")
                for p in (pts[0], pts[-1]):
                    _disc(d, p, pad_r)

        copper = _mask(shape, fn)
        ys, xs = np.nonzero(copper)
        if len(xs) == 0:
            continue
        # Collision test in the feature's window only: dilating the whole canvas is 20x slower.
        y0, x0 = max(ys.min() - CLEARANCE, 0), max(xs.min() - CLEARANCE, 0)
        win = (slice(y0, ys.max() + CLEARANCE + 1), slice(x0, xs.max() + CLEARANCE + 1))
        if (ndimage.binary_dilation(copper[win], iterations=CLEARANCE) & (nets[win] > 0)).any():
            continue
        net += 1
        nets[copper] = net
        if pts is not None:
            segments += [Segment(a, b, width, net) for a, b in zip(pts[:-1], pts[1:])]
            for p in (pts[0], pts[-1]):  # drill holes in the end pads
                if rng.random() < 0.6:
                    nets[_mask(shape, lambda d, p=p: _disc(d, p, max(1.5, width / 4)))] = 0
    return Board(nets, segments)


class _Injector:
    """Places defects into one crop; each method returns the changed-pixel mask or None."""

    def __init__(self, nets: np.ndarray, segments: list[Segment], rng: np.random.Generator):
        self.nets, self.segments, self.rng = nets, segments, rng
        self.copper = nets > 0
        self.shape = nets.shape
        self.reserved = np.zeros(self.shape, bool)  # around earlier defects: keep them apart

    def _edge_point(self, min_len: float = 12):
        """A point on a trace centreline well inside the crop, its direction and normal."""
        h, w = self.shape
        cands = [s for s in self.segments if np.linalg.norm(s.p1 - s.p0) >= min_len]
        if not cands:
            return None
        s = cands[int(self.rng.integers(len(cands)))]
        p = s.p0 + (s.p1 - s.p0) * self.rng.uniform(0.2, 0.8)
        if not (12 <= p[0] < w - 12 and 12 <= p[1] < h - 12):
            return None
        d = (s.p1 - s.p0) / np.linalg.norm(s.p1 - s.p0)
        n = np.array([-d[1], d[0]]) * self.rng.choice([-1, 1])
        return s, p, d, n

    def open(self):
        if (e := self._edge_point()) is None:
            return None
        s, p, d, n = e
        gap = self.rng.uniform(3.0, max(4.0, s.width * 1.2))
        a, b = p - n * (s.width + 2), p + n * (s.width + 2)
        band = _mask(self.shape, lambda dr: dr.line([tuple(a), tuple(b)], fill=255, width=round(gap)))
        return band & (self.nets == s.net)

    def mousebite(self):
        if (e := self._edge_point()) is None or e[0].width < 5:
            return None
        s, p, d, n = e
        edge = p + n * s.width / 2
        r = max(2.0, self.rng.uniform(0.4, 0.6) * s.width)
        k = int(self.rng.integers(2, 5))

        def fn(dr):
            for i in range(k):
                _disc(dr, edge + d * (i - (k - 1) / 2) * r * 1.4, r)

        return _mask(self.shape, fn) & (self.nets == s.net)

    def _clear_of_other_nets(self, mask: np.ndarray, net: int, margin: int) -> bool:
        fat = ndimage.binary_dilation(mask, iterations=margin)
        return not (fat & self.copper & (self.nets != net)).any()

    def spur(self):
        if (e := self._edge_point()) is None:
            return None
        s, p, d, n = e
        edge = p + n * (s.width / 2 - 1)
        base = self.rng.uniform(3, 6)
        tip = edge + n * self.rng.uniform(5, 12) + d * self.rng.uniform(-3, 3)
        poly = [tuple(edge - d * base / 2), tuple(edge + d * base / 2), tuple(tip)]
        m = _mask(self.shape, lambda dr: dr.polygon(poly, fill=255)) & ~self.copper
        return m if self._clear_of_other_nets(m, s.net, 3) else None

    def short(self):
        if (e := self._edge_point()) is None:
            return None
        s, p, d, n = e
        edge = p + n * s.width / 2
        for t in range(2, 24):  # walk outwards until copper of another net
            q = np.round(edge + n * t).astype(int)
            if not (0 <= q[0] < self.shape[1] and 0 <= q[1] < self.shape[0]):
                return None
            other = self.nets[q[1], q[0]]
            if other not in (0, s.net):
                w = round(self.rng.uniform(2, 4.5))
                a, b = tuple(edge - n), tuple(edge + n * (t + 1))
                return _mask(self.shape, lambda dr: dr.line([a, b], fill=255, width=w)) & ~self.copper
            if other == s.net:
                return None
        return None

    def copper_blob(self):
        dist = ndimage.distance_transform_edt(~self.copper)
        r = self.rng.uniform(3, 8)
        ys, xs = np.nonzero(dist[10:-10, 10:-10] > r + 4)
        if len(xs) == 0:
            return None
        i = int(self.rng.integers(len(xs)))
        c = np.array([xs[i] + 10, ys[i] + 10], float)
        ang = np.sort(self.rng.uniform(0, 2 * np.pi, int(self.rng.integers(5, 9))))
        rad = r * self.rng.uniform(0.6, 1.0, len(ang))
        poly = [tuple(c + rr * np.array([np.cos(a), np.sin(a)])) for a, rr in zip(ang, rad)]
        return _mask(self.shape, lambda dr: dr.polygon(poly, fill=255)) & ~self.copper

    def pin_hole(self):
        dist = ndimage.distance_transform_edt(self.copper)
        r = self.rng.uniform(2, 4)
        ys, xs = np.nonzero(dist[8:-8, 8:-8] >= r + 2)
        if len(xs) == 0:
            return None
        i = int(self.rng.integers(len(xs)))
        c = (xs[i] + 8, ys[i] + 8)
        return _mask(self.shape, lambda dr: _disc(dr, c, r)) & self.copper

    def inject(self, cls: str, tries: int = 100) -> Defect | None:
        method = {"open": self.open, "short": self.short, "mousebite": self.mousebite,
                  "spur": self.spur, "copper": self.copper_blob, "pin-hole": self.pin_hole}[cls]
        for _ in range(tries):
            changed = method()
            if changed is None or changed.sum() < 4 or (changed & self.reserved).any():
                continue
            ys, xs = np.nonzero(changed)
            box = (int(xs.min()), int(ys.min()), int(xs.max()) + 1, int(ys.max()) + 1)
            if min(box[2] - box[0], box[3] - box[1]) < 4:  # a one-pixel sliver is not a defect
                continue
            self.copper ^= changed
            self.nets = np.where(self.copper, np.where(self.nets == 0, -1, self.nets), 0)  # -1: added copper
            self.reserved |= ndimage.binary_dilation(changed, iterations=8)
            return Defect(cls, box, changed)
        return None


def _render(copper: np.ndarray, rng: np.random.Generator, cfg: SynthConfig, shift=(0.0, 0.0)) -> np.ndarray:
    """Binarised grey image (copper black), optionally shifted, plus grey noise and JPEG loss."""
    img = np.where(copper, 0.0, 255.0)
    if any(shift):
        img = ndimage.shift(img, (shift[1], shift[0]), order=1, mode="nearest")
        img = np.where(img < 127.5, 0.0, 255.0)  # DeepPCB pairs are binarised after alignment
    img = np.clip(img + rng.normal(0, cfg.noise_std, img.shape), 0, 255).astype(np.uint8)
    buf = io.BytesIO()
    Image.fromarray(img).save(buf, "JPEG", quality=int(rng.integers(cfg.jpeg_quality[0], cfg.jpeg_quality[1] + 1)))
    return np.asarray(Image.open(buf).convert("L"))


def make_sample(board: Board, rng: np.random.Generator, cfg: SynthConfig) -> Sample:
    """One image of ``board``: random crop, defects drawn from ``cfg.class_mix``, misaligned template."""
    s = cfg.image_size
    ox, oy = rng.integers(0, board.nets.shape[0] - s + 1, 2)
    nets = board.nets[oy:oy + s, ox:ox + s].copy()
    off = np.array([ox, oy], float)
    segments = [Segment(g.p0 - off, g.p1 - off, g.width, g.net) for g in board.segments]
    injector = _Injector(nets, segments, rng)
    clean = injector.copper.copy()
    names = [c for c in CLASSES if cfg.class_mix.get(c, 0) > 0]
    weights = np.array([cfg.class_mix[c] for c in names], float)
    n = int(rng.integers(cfg.defects_per_image[0], cfg.defects_per_image[1] + 1))
    defects = []
    for cls in rng.choice(names, size=n, p=weights / weights.sum()) if names else []:
        if (d := injector.inject(str(cls))) is not None:
            defects.append(d)
    shift = tuple(rng.uniform(-cfg.max_shift_px, cfg.max_shift_px, 2))
    test = _render(injector.copper, rng, cfg)
    template = _render(clean, rng, cfg, shift=shift)
    return Sample(test, template, defects, clean, injector.copper)


def board_samples(cfg: SynthConfig, seed: int, b: int) -> list[Sample]:
    """All images of board ``b``; boards are independent, so callers may run them in parallel."""
    board = make_board(np.random.default_rng([seed, b]), cfg.image_size * 2)
    return [make_sample(board, np.random.default_rng([seed, b, i]), cfg) for i in range(cfg.images_per_board)]
