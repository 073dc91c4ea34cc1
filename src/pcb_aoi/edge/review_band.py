"""``pcb-aoi-detect --review-dir D --review-band LO,HI``: set uncertain images aside for an operator.

An image with any detection scoring in [LO, HI] is copied byte for byte to ``D`` (with its template, if
the model used one), and its result record to ``D/<image>.json``, written last: an image whose ``.json``
is there is complete. The record is the journal's, plus a ``review`` block: the band and the detections
in it that score at or below the operating threshold (near misses, which the record does not list: the
board passed on them). So a band reaching below the threshold catches possible escapes, one above it
the doubtful calls. The operator's verdicts on these images go to ``pcb-aoi-collect`` (docs/feedback.md).
Torch-free.
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from .inspector import log, write_atomic


def parse_band(text: str) -> tuple[float, float]:
    """``"LO,HI"`` -> (LO, HI); ValueError saying what is wrong (0 <= LO <= HI <= 1)."""
    try:
        lo, hi = (float(v) for v in text.split(","))
    except ValueError:
        raise ValueError(f"{text!r}: two scores LO,HI, e.g. 0.2,0.5") from None
    if not 0 <= lo <= hi <= 1:
        raise ValueError(f"{text!r}: needs 0 <= LO <= HI <= 1")
    return lo, hi


@dataclass(frozen=True)
class ReviewBand:
    out: Path
    lo: float
    hi: float

    @staticmethod
    def above(score: float, threshold: float) -> bool:
        """The model's own test of a score against the threshold (``EdgeModel.detect``): in float32, as its
        outputs compare, so detecting down to LO and keeping what is above the threshold gives the
        detections a run without the band reports."""
        return bool(np.float32(score) > np.float32(threshold))

    def wants(self, detections: list) -> bool:
        return any(self.lo <= d.score <= self.hi for d in detections)

    def set_aside(self, image: Path, template: Path | None, record: dict, near_misses: list) -> None:
        """Copy ``image`` (and ``template``) and write the record; a failure is logged, never fatal: the
        inspection's result stands."""
        try:
            self.out.mkdir(parents=True, exist_ok=True)
            for f in (image, template):
                if f is not None:
                    write_atomic(self.out / f.name, f.read_bytes())
            block = {"band": [self.lo, self.hi],
                     "below_threshold": [d.to_dict() for d in near_misses if self.lo <= d.score <= self.hi]}
            write_atomic(self.out / f"{image.name}.json",
                         (json.dumps(record | {"review": block}, indent=1) + "\n").encode())
        except OSError as e:
            log.error("error: %s: not set aside for review in %s (%s)", image, self.out, e.strerror or e)
