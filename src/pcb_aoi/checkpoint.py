"""Self-describing checkpoints: weights plus everything needed to rebuild and feed the model."""
from __future__ import annotations

from pathlib import Path

import torch

from .dataset import atomic_file
from .inference import PAD_MULTIPLE
from .model import Detector, DetectorConfig


def input_spec(use_template: bool) -> dict:
    return {
        "channels": ["test", "template", "test-template"] if use_template else ["test"],
        "use_template": use_template,
        "dtype": "uint8 grey, copper dark",
        "scale": 1 / 255,
        "pad_multiple": PAD_MULTIPLE,
        "pad_value": "1.0 for images, 0.0 for the difference",
    }


def save(path: str | Path, model: Detector, classes: tuple[str, ...], use_template: bool, **provenance) -> None:
    state = {
        "format": "pcb-aoi-checkpoint/1",
        "model_state": model.state_dict(),
        "model_config": model.cfg.to_dict(),
        "classes": list(classes),
        "input_spec": input_spec(use_template),
        "provenance": provenance,
    }
    with atomic_file(path) as tmp:
        torch.save(state, tmp)


def load(path: str | Path) -> tuple[Detector, dict]:
    """Rebuild the model from the checkpoint alone; returns (model in eval mode, checkpoint dict)."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: checkpoint not found; run the train stage first")
    ckpt = torch.load(path, map_location="cpu", weights_only=True)
    if ckpt.get("format") != "pcb-aoi-checkpoint/1":
        raise ValueError(f"{path}: not a pcb-aoi checkpoint (format {ckpt.get('format')!r})")
    model = Detector(DetectorConfig(**ckpt["model_config"]))
    model.load_state_dict(ckpt["model_state"])
    return model.eval(), ckpt
