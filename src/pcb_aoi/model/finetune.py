"""Fine-tuning: start training from an earlier pcb-aoi checkpoint (``train.init_from``) instead of random weights.

The source is checked before any data is read or any step is taken: it must be a pcb-aoi checkpoint
with the same input contract (template or single image, registration range) and the same architecture
(``train.model.width/stride/blocks``); any difference is refused naming the key and both values.
Classes are matched by name: each of ``classes`` that the source knows keeps its row of the
classification head's last convolution (weights and bias of its output channel), a new one keeps
the fresh network's own row, and a source class not in ``classes`` is dropped.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch

from ..data.sources import sha256_of
from ..edge.contract import registered_version
from ..pipeline.config import TrainConfig
from . import checkpoint
from .network import Detector

HEAD = "cls_head.1"  # the classification head's last 1x1 convolution: output channel k = class k (network.py)
FIX = "set train.model.{key} to the checkpoint's value or leave train.init_from empty (train from scratch)"


@dataclass(frozen=True)
class Init:
    """A checked source checkpoint: its weights and how its classes map onto ``classes``."""

    path: Path
    sha256: str
    state: dict[str, torch.Tensor]  # the source's model_state
    kept: dict[str, int]  # class -> its row in the source's head
    new: tuple[str, ...]  # classes the source does not know: fresh rows
    dropped: tuple[str, ...]  # source classes not in ``classes``

    def report(self) -> dict:
        """What reports/train.json and the checkpoint's provenance record."""
        return {"init_from": str(self.path), "init_sha256": self.sha256, "init_version": registered_version(self.path),
                "init_classes": {"kept": dict(self.kept), "new": list(self.new), "dropped": list(self.dropped)}}

    def log_lines(self) -> list[str]:
        """One line per class: kept, new or dropped."""
        return ([f"train: init_from {self.path}: class {c!r} kept (source head row {i})" for c, i in self.kept.items()]
                + [f"train: init_from {self.path}: class {c!r} new (fresh head row)" for c in self.new]
                + [f"train: init_from {self.path}: class {c!r} of the source dropped (not in classes)"
                   for c in self.dropped])


def load_init(cfg: TrainConfig, classes: tuple[str, ...], register_max_px: int,
              within: str | Path | None = None) -> Init | None:
    """The checked source of ``cfg.init_from`` (None when empty: from scratch).

    ``register_max_px`` is the registration range of the training data (``etl.register_max_px`` as
    applied); ``within``, when given, is the folder the source must lie in (the train stage's DVC dep,
    so that a changed source re-runs training). Raises IncompatibleCheckpoint / FileNotFoundError /
    ValueError naming the difference and how to fix it.
    """
    if not cfg.init_from:
        return None
    path = Path(cfg.init_from)
    if within is not None and not path.resolve().is_relative_to(Path(within).resolve()):
        raise ValueError(f"train.init_from: {path} is outside {within}, the folder the train stage depends on "
                         f"(dvc.yaml), so DVC would not re-run training when it changes; copy it there "
                         f"(cp {path} {Path(within) / path.name}) and set train.init_from to the copy")
    if not path.is_file():
        raise FileNotFoundError(f"train.init_from: {path}: no such file; give a pcb-aoi checkpoint (.pt) or leave "
                                "train.init_from empty (train from scratch)")
    _, ckpt = checkpoint.load(path)
    where = f"train.init_from: {path}"
    spec, arch = ckpt["input_spec"], ckpt["model_config"]
    if spec.get("use_template") != cfg.model.use_template:
        mode = {True: "template (reference-based)", False: "single-image"}
        raise checkpoint.IncompatibleCheckpoint(
            f"{where}: another input contract: use_template is {spec.get('use_template')} in the checkpoint "
            f"({mode.get(spec.get('use_template'), '?')}), {cfg.model.use_template} in train.model.use_template "
            f"({mode[cfg.model.use_template]}); {FIX.format(key='use_template')}")
    if spec.get("register_max_px", 0) != register_max_px:
        raise checkpoint.IncompatibleCheckpoint(
            f"{where}: another input contract: register_max_px is {spec.get('register_max_px')} in the checkpoint, "
            f"{register_max_px} in the training data (etl.register_max_px); set etl.register_max_px to the "
            "checkpoint's value or leave train.init_from empty (train from scratch)")
    for key in ("width", "stride", "blocks", "dilated"):
        theirs, mine = arch.get(key, True if key == "dilated" else None), getattr(cfg.model, key)  # older: dilated
        if (list(theirs) if key == "blocks" else theirs) != (list(mine) if key == "blocks" else mine):
            raise checkpoint.IncompatibleCheckpoint(
                f"{where}: another architecture: train.model.{key} is {_show(theirs)} in the checkpoint, "
                f"{_show(mine)} in params; {FIX.format(key=key)}")
    source = list(ckpt["classes"])
    kept = {c: source.index(c) for c in classes if c in source}
    return Init(path, sha256_of(path), ckpt["model_state"], kept, tuple(c for c in classes if c not in source),
                tuple(c for c in source if c not in classes))


def _show(v) -> str:
    return str(list(v)) if isinstance(v, (list, tuple)) else str(v)


@torch.no_grad()
def apply(net: Detector, init: Init, classes: tuple[str, ...]) -> None:
    """Copy the source's weights into ``net`` (built for ``classes``): every tensor as is except the
    classification head's output rows, taken by class name; new classes keep ``net``'s own rows."""
    own = net.state_dict()
    state = {k: v for k, v in init.state.items() if not k.startswith(HEAD + ".")}
    for name in ("weight", "bias"):  # weight (K, f, 1, 1), bias (K,)
        key = f"{HEAD}.{name}"
        row = own[key].clone()
        for k, c in enumerate(classes):
            if c in init.kept:
                row[k] = init.state[key][init.kept[c]]
        state[key] = row
    net.load_state_dict(state)
