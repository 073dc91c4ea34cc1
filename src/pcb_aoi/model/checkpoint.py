"""Self-describing checkpoints: weights plus everything needed to rebuild and feed the model."""
from __future__ import annotations

from pathlib import Path

import torch

from ..data.dataset import atomic_file
from ..edge.preprocess import PAD_MULTIPLE
from .network import Detector, DetectorConfig

FORMAT = "pcb-aoi-checkpoint/1"
KEYS = ("model_state", "model_config", "classes", "input_spec")  # what every reader needs


def input_spec(use_template: bool, register_max_px: int = 0) -> dict:
    return {
        "channels": ["test", "template", "test-template"] if use_template else ["test"],
        "use_template": use_template,
        "dtype": "uint8 grey, copper dark",
        "scale": 1 / 255,
        "pad_multiple": PAD_MULTIPLE,
        "pad_value": "1.0 for images, 0.0 for the difference",
        "register_max_px": register_max_px if use_template else 0,  # template moved onto the test image first
    }


def save(path: str | Path, model: Detector, classes: tuple[str, ...], use_template: bool, register_max_px: int = 0,
         **provenance) -> None:
    state = {
        "format": FORMAT,
        "model_state": model.state_dict(),
        "model_config": model.cfg.to_dict(),
        "classes": list(classes),
        "input_spec": input_spec(use_template, register_max_px),
        "provenance": provenance,
    }
    with atomic_file(path) as tmp:
        torch.save(state, tmp)


class IncompatibleCheckpoint(ValueError):
    """A checkpoint that this code or these params cannot use; the message names the keys."""


def load(path: str | Path, expect: dict | None = None) -> tuple[Detector, dict]:
    """Rebuild the model from the checkpoint alone; returns (model in eval mode, checkpoint dict).

    ``expect`` maps checkpoint keys (e.g. ``classes``) to the values the caller's params need; any
    difference, or a model config / weights layout this code does not know, is refused naming the keys.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: checkpoint not found; run the train stage first")
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:
        raise IncompatibleCheckpoint(f"{path}: not a readable PyTorch checkpoint ({e})") from None
    if not isinstance(ckpt, dict) or ckpt.get("format") != FORMAT:
        got = ckpt.get("format") if isinstance(ckpt, dict) else type(ckpt).__name__
        raise IncompatibleCheckpoint(f"{path}: not a {FORMAT} checkpoint (format {got!r})")
    missing_keys = [k for k in KEYS if k not in ckpt]
    if missing_keys:
        raise IncompatibleCheckpoint(f"{path}: not a complete {FORMAT} checkpoint, missing keys: "
                                     f"{', '.join(missing_keys)}")
    differ = [f"{k} (checkpoint {ckpt.get(k)!r}, params {v!r})" for k, v in (expect or {}).items() if ckpt.get(k) != v]
    if differ:
        raise IncompatibleCheckpoint(f"{path}: trained with a different config, keys differ: {'; '.join(differ)}. "
                                     "Re-run the train stage (dvc repro) or restore the matching params.")
    known = set(DetectorConfig.__dataclass_fields__)
    unknown, missing = set(ckpt["model_config"]) - known, {"num_classes"} - set(ckpt["model_config"])
    if unknown or missing:
        raise IncompatibleCheckpoint(f"{path}: model_config keys differ from this code's: unknown "
                                     f"{sorted(unknown)}, missing {sorted(missing)}")
    model = Detector(DetectorConfig(**ckpt["model_config"]))
    mine = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    theirs = {k: tuple(v.shape) for k, v in ckpt["model_state"].items()}
    if mine != theirs:
        keys = sorted(k for k in set(mine) | set(theirs) if mine.get(k) != theirs.get(k))
        raise IncompatibleCheckpoint(f"{path}: weights do not fit this code's model, {len(keys)} keys differ, "
                                     f"e.g. {', '.join(f'{k} {theirs.get(k)} vs {mine.get(k)}' for k in keys[:3])}")
    model.load_state_dict(ckpt["model_state"])
    return model.eval(), ckpt
