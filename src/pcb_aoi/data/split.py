"""split: train/val/test by board (no board in two splits; default), at random, or the source's
official lists, stratified by defect class where the groups allow it.

scikit-learn's StratifiedGroupKFold does the grouping; the label it stratifies on is each image's
most frequent defect class, the closest single label to "class mix" that it accepts.
"""
from __future__ import annotations

import warnings
from pathlib import Path

import numpy as np
import pandas as pd
from sklearn.model_selection import GroupKFold, StratifiedGroupKFold

from ..pipeline.config import SplitConfig
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
    """Frame ``image_id, board_id, split`` with split in {train, val, test}.

    ``grouped``: whole boards per split. ``random``: images independently (each its own group).
    ``official``: the source's own lists (``source_split``: test stays test, val stays val,
    train/trainval gives val by board when the source has no val list).
    """
    images = ds.images[["image_id", "board_id", "source_split"]].reset_index(drop=True)
    dominant = ds.boxes.groupby("image_id")["class_name"].agg(lambda s: s.value_counts().index[0])
    y = images["image_id"].map(dominant).fillna("none").to_numpy()
    ids = images["image_id"].to_numpy()
    groups = ids if cfg.strategy == "random" else images["board_id"].to_numpy()
    split = np.full(len(ids), "train", dtype=object)
    if cfg.strategy == "official":
        src = images["source_split"].to_numpy()
        if not (src == "test").any():
            raise ValueError("split.strategy=official: the source has no official test list; "
                             "use split.strategy=grouped (boards held out) instead")
        test = src == "test"
        split[src == "val"] = "val"
        carve_val = not (src == "val").any()
        val_fraction = cfg.val_fraction
    else:
        if len(np.unique(groups)) < 3:
            raise ValueError(f"split.strategy={cfg.strategy} needs at least 3 boards, the dataset has "
                             f"{len(np.unique(groups))}; set ingest.board_regex or use split.strategy=random")
        test = _carve(ids, y, groups, cfg.test_fraction, seed)
        carve_val, val_fraction = True, cfg.val_fraction / (1 - cfg.test_fraction)
    split[test] = "test"
    if carve_val and val_fraction > 0:  # 0: no validation split, every non-test board trains
        rest = np.flatnonzero(~test)
        split[rest[_carve(ids[rest], y[rest], groups[rest], val_fraction, seed + 1)]] = "val"
    images["split"] = split
    return images.drop(columns="source_split")


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
