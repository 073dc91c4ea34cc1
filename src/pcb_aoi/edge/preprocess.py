"""The model input contract in numpy and Pillow (no torch): image decoding, registration and input
layout, shared by training, evaluation, export and the torch-free edge app (``runtime.py``), so there is
one implementation to keep right.

Grey uint8 images, copper dark; channels ``test/255, template/255, (test - template)/255`` (or
``test/255`` alone without a template), padded bottom/right to a multiple of 32 with background:
1.0 / 1.0 / 0.0.
"""
from __future__ import annotations

import os
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Callable

import numpy as np
from PIL import Image

try:  # optional: the edge install may lack OpenCV, and Pillow then decodes every image
    import cv2
except ImportError:
    cv2 = None

PAD_MULTIPLE = 32
PAD_VALUES = (1.0, 1.0, 0.0)  # test, template, difference: white background, no difference
_255 = np.float32(255.0)
REFUSED_MODES = {"I", "I;16", "I;16B", "I;16L", "I;16N", "F"}  # >8-bit: no faithful grey conversion


def read_grey_png(path: str | Path) -> np.ndarray | None:
    """An 8-bit grey PNG decoded by OpenCV (about 2x faster than Pillow: ~1.6 vs 3 ms at 640x640), else None.

    PNG is lossless, so the pixels are those Pillow would give; any other file (JPEG, colour, 16-bit,
    unreadable, no OpenCV) returns None and the caller decodes it with Pillow, which also explains errors.
    """
    if cv2 is None or Path(path).suffix.lower() != ".png":
        return None
    image = cv2.imread(str(path), cv2.IMREAD_UNCHANGED)
    return image if image is not None and image.ndim == 2 and image.dtype == np.uint8 else None


def read_grey(path: str | Path) -> np.ndarray:
    """Decode an image file to (H, W) uint8 grey; RGB is averaged (DeepPCB has a few RGB files).

    Raises Pillow's errors for unreadable files and ValueError for >8-bit images, which ``convert("L")``
    would silently clip to white.
    """
    fast = read_grey_png(path)  # the pipeline's own PNGs: OpenCV, 2x faster, same pixels
    if fast is not None:
        return fast
    with Image.open(path) as im:
        im.load()
        if im.mode in REFUSED_MODES:
            raise ValueError(f"{path}: {im.mode} image (16-bit or float); the model expects 8-bit grey, "
                             "convert it first (e.g. scale to 0..255)")
        return np.asarray(im if im.mode == "L" else im.convert("L"))  # an "L" image as it is: no copy to convert


_helper: ThreadPoolExecutor | None = None


def _reset_helper() -> None:  # a forked child (DataLoader worker) has the executor but not its thread
    global _helper
    _helper = None


os.register_at_fork(after_in_child=_reset_helper)


def read_pair(test_path: str | Path, template_path: str | Path | None,
              read: Callable[[str | Path], np.ndarray] | None = None) -> tuple[np.ndarray, np.ndarray | None]:
    """Decode a test image and its template at the same time: the template in a helper thread.

    Both decoders (OpenCV, Pillow) release the GIL, so on a 2-core box the pair takes the time of
    one image (~1.6 ms saved per 640x640 PNG pair; the cores are otherwise idle before inference).
    ``read`` decodes one file (default ``read_grey``); its errors reach the caller, the test's first.
    """
    global _helper
    read = read or read_grey
    if template_path is None:
        return read(test_path), None
    if _helper is None:
        _helper = ThreadPoolExecutor(1, thread_name_prefix="pcb-aoi-decode")
    template = _helper.submit(read, template_path)
    test = read(test_path)  # raises first when both files are bad
    return test, template.result()


def _half(x: np.ndarray) -> np.ndarray:
    """2x2 sums of a uint8 or uint16 image: (H, W) -> (H // 2, W // 2) uint16 (exact; two levels of a
    uint8 image stay below 4081, so the result can be viewed as int16 for differences).

    Two neighbours in a row are read as one integer twice as wide (its low and high halves, on a
    little-endian CPU) and added, then pairs of rows: contiguous arrays only, ~4x faster than strided
    column slices."""
    h, w = x.shape[0] // 2 * 2, x.shape[1] // 2 * 2
    x = x[:h, :w]
    if not np.little_endian:
        cols = x[:, 0::2].astype(np.uint16)
        cols += x[:, 1::2]
        return cols[0::2] + cols[1::2]
    wide, bits = (np.uint16, 8) if x.dtype == np.uint8 else (np.uint32, 16)
    pairs = np.ascontiguousarray(x).view(wide)  # (h, w / 2): x[:, 0::2] in the low half, x[:, 1::2] in the high
    cols = pairs >> bits
    cols += pairs & wide((1 << bits) - 1)
    out = cols[0::2] + cols[1::2]
    return out if wide is np.uint16 else out.astype(np.uint16)


def _best_shift(inner: np.ndarray, moved, shifts, bound: int) -> tuple[int, int]:
    """The (dx, dy) of ``shifts`` with the least sum of |inner - moved(dx, dy)| (int16 arrays of one shape),
    the smallest (sum, dx, dy) on a tie; ``bound``: the largest pixel value.

    Integers throughout, so the search gives the same shift on every machine: one difference buffer
    reused, summed in int32 where no sum can overflow it (about 2x faster than numpy's int64 sum)."""
    diff = np.empty(inner.shape, np.int16)
    acc = np.int32 if diff.size * bound < 2**31 else np.int64
    best = None
    for dx, dy in shifts:
        np.subtract(inner, moved(dx, dy), out=diff)
        np.abs(diff, out=diff)
        key = (int(diff.sum(dtype=acc)), dx, dy)
        best = key if best is None or key < best else best
    return best[1], best[2]


def _search(a: np.ndarray, b: np.ndarray, m: int, shifts, bound: int) -> tuple[int, int]:
    """``_best_shift`` of a(y, x) against b(y - dy, x - dx) over a's interior (margin m >= |dx|, |dy|)."""
    h, w = a.shape
    return _best_shift(a[m:h - m, m:w - m], lambda dx, dy: b[m - dy:h - m - dy, m - dx:w - m - dx], shifts, bound)


def registration_shift(test: np.ndarray, template: np.ndarray, max_px: int) -> tuple[int, int]:
    """The integer (dx, dy), |dx|, |dy| <= max_px, with test(y, x) ~ template(y - dy, x - dx).

    AOI compares a board with a registered template, but real pairs are off by a few px (DeepPCB: 57
    of group 20085's 291 pairs by 1.5-7 px), and a shifted template paints the whole layout into the
    difference channel. Coarse to fine on a 2x pyramid, minimising the sum of absolute differences:
    an exhaustive search at 1/4 scale, then +-1 px at 1/2 and at full scale (on every other pixel:
    test's even rows and columns from the margin against the template's pixels of the matching
    parity, each parity a contiguous array). About 2 ms at 640x640, in integers; (0, 0) for images too
    small to search.
    """
    t2, m2 = _half(test), _half(template)
    t4, m4 = _half(t2).view(np.int16), _half(m2).view(np.int16)
    t2, m2 = t2.view(np.int16), m2.view(np.int16)
    r = -(-max_px // 4)  # search radius at 1/4 scale
    if max_px <= 0 or min(t4.shape) <= 4 * (r + 2):
        return 0, 0

    def around(cx, cy):
        return [(dx, dy) for dy in range(cy - 1, cy + 2) for dx in range(cx - 1, cx + 2)]

    cx, cy = _search(t4, m4, r + 1, [(dx, dy) for dy in range(-r, r + 1) for dx in range(-r, r + 1)], 16 * 255)
    cx, cy = _search(t2, m2, 2 * r + 2, around(2 * cx, 2 * cy), 4 * 255)
    m, (h, w) = 4 * r + 4, test.shape
    a = test[m:h - m:2, m:w - m:2].astype(np.int16)
    phases: dict[tuple[int, int], np.ndarray] = {}

    def moved(dx, dy):  # template(m + 2i - dy, m + 2j - dx): its phase ((m - dy) % 2, (m - dx) % 2)
        (y0, py), (x0, px) = divmod(m - dy, 2), divmod(m - dx, 2)
        if (py, px) not in phases:
            phases[py, px] = template[py::2, px::2].astype(np.int16)
        return phases[py, px][y0:y0 + a.shape[0], x0:x0 + a.shape[1]]

    cx, cy = _best_shift(a, moved, around(2 * cx, 2 * cy), 255)
    if max(abs(cx), abs(cy)) > max_px:
        return 0, 0
    return cx, cy


def move_image(image: np.ndarray, dx: int, dy: int) -> np.ndarray:
    """(H, W) ``image`` moved by (dx, dy) px: out(y, x) = image(y - dy, x - dx), the uncovered border
    strips filled by repeating the nearest row / column (as ``np.pad(mode="edge")``, without its cost)."""
    if (dx, dy) == (0, 0):
        return image
    h, w = image.shape
    out = np.empty_like(image)
    y0, y1, x0, x1 = max(dy, 0), h + min(dy, 0), max(dx, 0), w + min(dx, 0)  # where the image lands
    out[y0:y1, x0:x1] = image[y0 - dy:y1 - dy, x0 - dx:x1 - dx]
    out[:y0], out[y1:] = out[y0], out[y1 - 1]  # repeat the border rows, then columns, into the gap
    out[:, :x0], out[:, x1:] = out[:, x0:x0 + 1], out[:, x1 - 1:x1]
    return out


def register_template(test: np.ndarray, template: np.ndarray, max_px: int) -> tuple[np.ndarray, tuple[int, int]]:
    """``template`` moved onto ``test`` (borders repeated) and the (dx, dy) it was moved by."""
    dx, dy = registration_shift(test, template, max_px)
    return move_image(template, dx, dy), (dx, dy)


def prepare_input(test: np.ndarray, template: np.ndarray | None, use_template: bool,
                  pad_multiple: int = PAD_MULTIPLE, out: np.ndarray | None = None) -> np.ndarray:
    """(H, W) uint8 test (and template) -> (C, H', W') float32 model input, H' W' multiples of ``pad_multiple``.

    Written into one preallocated array (no per-channel copies): at 640x640 this is ~1 ms, where
    stacking and padding each channel took ~10 ms, a large share of an edge box's time per image.
    ``out``: write into this (C, H' >= H, W' >= W) float32 array instead (one image of a batch), padded
    to its size.
    """
    if use_template and template is None:
        raise ValueError("this model is reference-based and needs a template image")
    h, w = test.shape
    channels = 3 if use_template else 1
    if out is None:
        out = np.empty((channels, h + -h % pad_multiple, w + -w % pad_multiple), np.float32)
    if out.shape[1] != h or out.shape[2] != w:
        for c in range(channels):
            out[c].fill(PAD_VALUES[c])
    np.divide(test, _255, out=out[0, :h, :w], casting="unsafe")  # bit-identical to astype / 255
    if use_template:
        np.divide(template, _255, out=out[1, :h, :w], casting="unsafe")
        np.subtract(out[0, :h, :w], out[1, :h, :w], out=out[2, :h, :w])
    return out


def pad_to(x: np.ndarray, h: int, w: int) -> np.ndarray:
    """Pad (C, H, W) input bottom/right to (C, h, w) with the background values."""
    if x.shape[1:] == (h, w):
        return x
    out = np.empty((len(x), h, w), np.float32)
    for c in range(len(x)):
        out[c].fill(PAD_VALUES[c])
    out[:, : x.shape[1], : x.shape[2]] = x
    return out


def stack_padded(inputs: list[np.ndarray]) -> np.ndarray:
    """Batch inputs of different sizes (tiles at image borders, mixed sources) by padding."""
    h, w = max(x.shape[1] for x in inputs), max(x.shape[2] for x in inputs)
    return np.stack([pad_to(x, h, w) for x in inputs])
