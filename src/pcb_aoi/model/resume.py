"""Resume points: every epoch the training state goes to ``<model dir>/checkpoints/last.pt``; a later run
with the same fingerprint (train params that change the result, seed, classes, data, processes, the
content of ``train.init_from``) continues after its epoch instead of starting over, and an incompatible
one is ignored, saying which keys differ."""
from __future__ import annotations

import hashlib
import json
from pathlib import Path

import torch

from ..data.dataset import atomic_file
from ..pipeline.config import TrainConfig, to_dict
from .network import Detector

RESUME_FORMAT = "pcb-aoi-resume/1"
NOT_IN_FINGERPRINT = ("device", "threads", "workers", "cache_mb", "resume")  # how to run, not what is trained


def fingerprint(cfg: TrainConfig, seed: int, classes: tuple[str, ...], train_dir: Path, val_ids: list[str],
                world: int, init_sha256: str | None = None) -> dict:
    """What a resumed run must share with the interrupted one to continue it; ``init_sha256`` is the
    content of ``train.init_from`` (a run started from other weights is another run, same path or not)."""
    data = hashlib.sha256()
    for name in ("images.parquet", "boxes.parquet"):
        data.update((train_dir / name).read_bytes())
    data.update("\n".join(val_ids).encode())
    train = {k: v for k, v in to_dict(cfg).items() if k not in NOT_IN_FINGERPRINT}
    return {"train": train, "seed": seed, "classes": list(classes), "data_sha256": data.hexdigest(),
            "processes": world, "init_sha256": init_sha256}


def differing_keys(a: dict, b: dict, prefix: str = "") -> list[str]:
    """Dotted keys whose values differ between two nested dicts, with both values."""
    out = []
    for k in sorted(set(a) | set(b)):
        va, vb, key = a.get(k), b.get(k), f"{prefix}{k}"
        if isinstance(va, dict) and isinstance(vb, dict):
            out += differing_keys(va, vb, key + ".")
        elif va != vb:
            out.append(f"{key} ({json.dumps(va)} -> {json.dumps(vb)})")
    return out


def load_resume(path: Path, fp: dict) -> dict | None:
    """The resume state at ``path`` if it continues this run; None (saying why) otherwise."""
    if not path.is_file():
        return None
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # a truncated file from a kill during the write cannot happen (atomic), but be safe
        print(f"train: ignoring {path}: unreadable ({e}); starting over")
        return None
    if not isinstance(state, dict) or state.get("format") != RESUME_FORMAT:
        print(f"train: ignoring {path}: not a {RESUME_FORMAT} file; starting over")
        return None
    diff = differing_keys(state["fingerprint"], fp)
    if diff:
        print(f"train: not resuming from {path} (epoch {state['epoch']}): incompatible, keys differ: "
              f"{'; '.join(diff)}. Starting over.")
        return None
    return state


def save_resume(path: Path, fp: dict, net: Detector, ema, opt, sched, epoch: int, best: dict, best_epoch: int,
                history: list[dict], epoch_s: list[float]) -> None:
    state = {"format": RESUME_FORMAT, "fingerprint": fp, "epoch": epoch, "model_state": net.state_dict(),
             "ema_state": ema.state_dict() if ema else None,
             "optimizer": opt.state_dict(), "scheduler": sched.state_dict(), "best": best,
             "best_epoch": best_epoch, "history": history, "epoch_seconds": epoch_s}
    with atomic_file(path) as tmp:
        torch.save(state, tmp)
