"""One model measured through the edge app's own code path: speed (one pair at a time, and a stream with
the app's read-ahead) and detections on the test split for scoring.

Every pass goes through ``pcb_aoi.edge.inspector.Inspector``: ``Inspector.load`` decodes the test PNG and its
template at once and registers the pair when the model's contract asks for it, ``EdgeModel.detect``
preprocesses, runs ONNX Runtime and decodes (numpy, or in the graph for ``model.e2e.onnx``). The
PyTorch reference (``TorchModel``) offers the same three members the Inspector uses, so it is timed by
the very same loops.
"""
from __future__ import annotations

import argparse
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Protocol

import numpy as np
import torch

from ..data.dataset import Dataset
from ..edge.inspector import Inspector
from ..edge.preprocess import register_template
from ..edge.runtime import Detection, EdgeError
from ..model.inference import Runner, decode, prepare_input


class Model(Protocol):
    """What ``Inspector`` needs of a model: ``edge.runtime.EdgeModel``, or ``TorchModel``."""

    classes: list[str]
    needs_template: bool

    def register(self, test: np.ndarray, template: np.ndarray | None) -> np.ndarray | None: ...

    def plan(self, test: np.ndarray, template: np.ndarray | None) -> object | None: ...

    def detect(self, test: np.ndarray, template: np.ndarray | None = None, score_threshold: float | None = None,
               name: str = "image", registered: bool = False, plan: object | None = None) -> list[Detection]: ...


class TorchModel:
    """The PyTorch eager reference behind ``EdgeModel``'s interface: torch preprocessing, the network and
    torch decoding (``model.inference``) on the pair the app's reader decoded and registered."""

    def __init__(self, runner: Runner, ckpt: dict, score_threshold: float):
        spec = ckpt["input_spec"]
        self.runner, self.classes, self.score_threshold = runner, list(ckpt["classes"]), score_threshold
        self.needs_template, self.register_px = bool(spec["use_template"]), int(spec.get("register_max_px", 0))
        self.contract = {"score_threshold": score_threshold}

    def provenance(self) -> dict:
        return {"version": "unregistered"}

    def register(self, test: np.ndarray, template: np.ndarray | None) -> np.ndarray | None:
        """As ``EdgeModel.register``: the template moved onto ``test`` when the model was trained registered."""
        if not self.register_px or template is None or template.shape != test.shape:
            return template
        return register_template(test, template, self.register_px)[0]

    def plan(self, test: np.ndarray, template: np.ndarray | None) -> None:
        return None  # the eager reference runs dense

    def detect(self, test: np.ndarray, template: np.ndarray | None = None, score_threshold: float | None = None,
               name: str = "image", registered: bool = False, plan: None = None) -> list[Detection]:
        thr = self.score_threshold if score_threshold is None else score_threshold
        if not registered:
            template = self.register(test, template)
        heat, boxes = self.runner(prepare_input(test, template, self.needs_template)[None])
        det = decode(torch.from_numpy(heat), torch.from_numpy(boxes), thr)[0]
        h, w = test.shape
        bx = det["boxes"].numpy().copy()
        bx[:, 0::2], bx[:, 1::2] = bx[:, 0::2].clip(0, w), bx[:, 1::2].clip(0, h)
        return [Detection(self.classes[int(c)], float(s), [float(v) for v in b])
                for b, s, c in zip(bx, det["scores"].numpy(), det["labels"].numpy())]


@dataclass(frozen=True)
class Pairs:
    """Test images of a dataset and their templates, as files the app reads."""

    ids: list[str]
    tests: list[Path]
    templates: dict[Path, Path | None]  # test file -> its template file

    @classmethod
    def of(cls, ds: Dataset, ids: list[str]) -> "Pairs":
        rows = ds.rows(ids)
        tests = [ds.root / r.path for r in rows]
        return cls(list(ids), tests, {t: ds.root / r.template_path if r.template_path else None
                                      for t, r in zip(tests, rows)})

    def cycle(self, n: int) -> list[Path]:
        """``n`` test files, the list repeated as often as needed."""
        return [self.tests[i % len(self.tests)] for i in range(n)]


class DatasetInspector(Inspector):
    """The app's inspection loop, templates taken from the dataset's manifest instead of file names."""

    def __init__(self, model: Model, pairs: Pairs, score: float | None = None, workers: int = 1):
        super().__init__(model, argparse.Namespace(template=None, template_dir=None, score=score, overlay_dir=None),
                         workers)
        self.pairs = pairs

    def template_path(self, image: Path) -> Path | None:
        return self.pairs.templates[image] if self.model.needs_template else None


def _percentile(ms: list[float], q: int) -> float:
    return round(float(np.percentile(np.asarray(ms), q)), 3)


def latency(model: Model, pairs: Pairs, warmup: int, runs: int) -> dict:
    """Per pair, one at a time (no read-ahead): file decode + registration + ``detect`` at the model's
    threshold, p50/p95/p99 in ms over ``runs`` pairs after ``warmup`` untimed ones."""
    inspector = DatasetInspector(model, pairs)
    ms = []
    for i, image in enumerate(pairs.cycle(warmup + runs)):
        t0, test, template, plan = inspector.load(image)  # t0: perf_counter before reading
        model.detect(test, template, name=str(image), registered=True, plan=plan)
        if i >= warmup:
            ms.append((time.perf_counter() - t0) * 1e3)
    return {"ms_p50": _percentile(ms, 50), "ms_p95": _percentile(ms, 95), "ms_p99": _percentile(ms, 99)}


def stream(model: Model, pairs: Pairs, n: int, clock: Callable[[], float] = time.perf_counter,
           workers: int = 1) -> dict:
    """Throughput as the app runs many files: ``Inspector.process_all`` over ``n`` pairs (the test pairs
    cycled), the next pair decoded while the model runs, or ``workers`` worker processes (started and
    warmed up on a few pairs before the clock starts; ``pcb-aoi-detect --workers``). ``fps`` = pairs / wall
    time from the first read to the last result; warm the model up first (``latency`` does)."""
    with DatasetInspector(model, pairs, workers=workers) as inspector:
        if workers > 1:
            for _ in inspector.process_all(pairs.cycle(2 * workers)):
                pass
        t0 = clock()
        done = 0
        for record in inspector.process_all(pairs.cycle(n)):
            if record["status"] != "ok":
                raise EdgeError(f"{record['file']}: {record['error']}")
            done += 1
        wall = clock() - t0
    out = {"fps": round(done / wall, 2), "stream_pairs": done, "wall_s": round(wall, 4)}
    return out | ({"workers": workers} if workers > 1 else {})


def detections(model: Model, pairs: Pairs, score_threshold: float,
               gates: list | None = None) -> dict[str, dict[str, np.ndarray]]:
    """Image id -> {"boxes" (N, 4) float32 xyxy px, "scores" (N,), "labels" (N,) int64}: the app's
    detections above ``score_threshold`` on every pair once; ``gates``: gets each pair's gate record
    (``runtime.Detections.gate``, None when the model runs dense)."""
    inspector = DatasetInspector(model, pairs)
    index = {c: k for k, c in enumerate(model.classes)}
    out = {}
    for image_id, image in zip(pairs.ids, pairs.tests):
        _, test, template, plan = inspector.load(image)
        dets = model.detect(test, template, score_threshold, name=str(image), registered=True, plan=plan)
        out[image_id] = {"boxes": np.asarray([d.box for d in dets], np.float32).reshape(-1, 4),
                         "scores": np.asarray([d.score for d in dets], np.float32),
                         "labels": np.asarray([index[d.cls] for d in dets], np.int64)}
        if gates is not None:
            gates.append(getattr(dets, "gate", None))
    return out
