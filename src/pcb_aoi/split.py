"""split: train/val/test grouped by board (no board in two splits), stratified by defect class.

scikit-learn's StratifiedGroupKFold does the grouping; the label it stratifies on is each image's
most frequent defect class, the closest single label to "class mix" that it accepts.
"""
from __future__ import annotations

import warnings
from pathlib import Path

import numpy as np
import pandas as pd
from sklearn.model_selection import GroupKFold, StratifiedGroupKFold

from .config import SplitConfig
from .dataset import Dataset, atomic_dir, per_class_counts


def _carve(ids: np.ndarray, y: np.ndarray, groups: np.ndarray, fraction: float, seed: int) -> np.ndarray:
    """Boolean mask of ~``fraction`` of the items, whole groups only."""
    n_splits = min(max(2, round(1 / fraction)), len(np.unique(groups)))
    try:
        with warnings.catch_warnings():  # "least populated class has only n members": expected, rare classes
            warnings.simplefilter("ignore", UserWarning)
            _, held = next(StratifiedGroupKFold(n_splits, shuffle=True, random_state=seed).split(ids, y, groups))
    except ValueError:  # every class has fewer images than folds: stratifying is impossible, group only
        _, held = next(GroupKFold(n_splits, shuffle=True, random_state=seed).split(ids, y, groups))
    mask = np.zeros(len(ids), bool)
    mask[held] = True
    return mask


def assign(ds: Dataset, cfg: SplitConfig, seed: int) -> pd.DataFrame:
    """Frame ``image_id, board_id, split`` with split in {train, val, test}."""
    images = ds.images[["image_id", "board_id"]].reset_index(drop=True)
    dominant = ds.boxes.groupby("image_id")["class_name"].agg(lambda s: s.value_counts().index[0])
    y = images["image_id"].map(dominant).fillna("none").to_numpy()
    ids, groups = images["image_id"].to_numpy(), images["board_id"].to_numpy()
    if len(np.unique(groups)) < 3:
        raise ValueError(f"grouped split needs at least 3 boards, the dataset has {len(np.unique(groups))}")
    test = _carve(ids, y, groups, cfg.test_fraction, seed)
    rest = np.flatnonzero(~test)
    val_in_rest = _carve(ids[rest], y[rest], groups[rest], cfg.val_fraction / (1 - cfg.test_fraction), seed + 1)
    split = np.full(len(ids), "train", dtype=object)
    split[test] = "test"
    split[rest[val_in_rest]] = "val"
    images["split"] = split
    return images


def run(cfg: SplitConfig, seed: int, classes: tuple[str, ...], src: str | Path, out: str | Path) -> dict:
    ds = Dataset.load(src)
    table = assign(ds, cfg, seed)
    with atomic_dir(out) as tmp:
        table.to_parquet(tmp / "split.parquet", index=False)
    summary = {}
    for name in ("train", "val", "test"):
        part = table[table["split"] == name]
        summary[name] = {
            "images": int(len(part)),
            "boards": int(part["board_id"].nunique()),
            "per_class": per_class_counts(ds.boxes[ds.boxes["image_id"].isin(part["image_id"])], classes),
        }
    return summary
