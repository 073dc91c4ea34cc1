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

from ..pipeline.config import SplitConfig, board_key
from .dataset import Dataset, atomic_dir, per_class_counts


def _carve(ids: np.ndarray, y: np.ndarray, groups: np.ndarray, fraction: float, seed: int, what: str) -> np.ndarray:
    """Boolean mask of ~``fraction`` of the items, whole groups only (``what``: the split, for the error)."""
    n_groups = len(np.unique(groups))
    if n_groups < 2:  # one group cannot be both held out and kept
        raise ValueError(f"split: {n_groups} board(s) left to carve the {what} split from, need at least 2; "
                         "name fewer boards in split.val_groups / split.test_groups")
    n_splits = min(max(2, round(1 / fraction)), n_groups)
    try:
        with warnings.catch_warnings():  # "least populated class has only n members": expected, rare classes
            warnings.simplefilter("ignore", UserWarning)
            _, held = next(StratifiedGroupKFold(n_splits, shuffle=True, random_state=seed).split(ids, y, groups))
    except ValueError:  # every class has fewer images than folds: stratifying is impossible, group only
        _, held = next(GroupKFold(n_splits, shuffle=True, random_state=seed).split(ids, y, groups))
    mask = np.zeros(len(ids), bool)
    mask[held] = True
    return mask


def resolve_boards(key: str, wanted: tuple[str, ...], boards: np.ndarray, where: str | Path) -> set[str]:
    """The board ids of ``boards`` that ``wanted`` (params ``key``) names; an id that names none, or more
    than one, is an error naming the key and listing the boards there are.

    An all-digit id also matches a zero-padded one (params ``41`` -> DeepPCB group ``00041``).
    """
    known = sorted(set(boards.tolist()))
    out = set()
    for want in wanted:
        hits = [b for b in known if b == want] or [b for b in known if board_key(b) == board_key(want)]
        if len(hits) != 1:
            problem = "does not exist" if not hits else f"matches several boards ({', '.join(hits)})"
            # YAML 1.1 (PyYAML) reads an unquoted 00041 as the octal number 33: say so when that is what happened
            octal = [b for b in known if want.isdigit() and len(b) > 1 and b[0] == "0" and set(b) <= set("01234567")
                     and int(b, 8) == int(want)]
            hint = (f"; was it {octal[0]} unquoted? YAML reads {octal[0]} as the octal number {int(want)}: "
                    f"write it quoted, '{octal[0]}'" if octal else "")
            raise ValueError(f"{key}: board {want!r} {problem}; boards in {where}: {', '.join(known)}{hint}")
        out.add(hits[0])
    return out


def assign(ds: Dataset, cfg: SplitConfig, seed: int) -> pd.DataFrame:
    """Frame ``image_id, board_id, split`` with split in {train, val, test}.

    ``grouped``: whole boards per split: ``split.test_groups`` / ``split.val_groups`` when given, else
    boards carved at random (stratified by class) to ``split.test_fraction`` / ``split.val_fraction``.
    ``random``: images independently (each its own group).
    ``official``: the source's own lists (``source_split``: test stays test, val stays val,
    train/trainval gives val by board, ``split.val_groups`` or carved, when the source has no val list).
    """
    images = ds.images[["image_id", "board_id", "source_split"]].reset_index(drop=True)
    dominant = ds.boxes.groupby("image_id")["class_name"].agg(lambda s: s.value_counts().index[0])
    y = images["image_id"].map(dominant).fillna("none").to_numpy()
    ids = images["image_id"].to_numpy()
    boards = images["board_id"].to_numpy()
    groups = ids if cfg.strategy == "random" else boards
    val = np.isin(boards, list(resolve_boards("split.val_groups", cfg.val_groups, boards, ds.root)))
    split = np.full(len(ids), "train", dtype=object)
    if cfg.strategy == "official":
        src = images["source_split"].to_numpy()
        if not (src == "test").any():
            raise ValueError("split.strategy=official: the source has no official test list; "
                             "use split.strategy=grouped (boards held out) instead")
        test = src == "test"
        if cfg.val_groups and (src == "val").any():
            raise ValueError("split.val_groups: the source has its own val list (split.strategy: official); "
                             "use split.strategy: grouped to choose the validation boards")
        shared = sorted(set(boards[val & test]))
        if shared:
            raise ValueError(f"split.val_groups: board {shared[0]!r} has images in the source's test list; "
                             "validation and test boards must be different boards")
        val |= src == "val"
        carve_val = not val.any()
        val_fraction = cfg.val_fraction
    else:
        if len(np.unique(groups)) < 3:
            raise ValueError(f"split.strategy={cfg.strategy} needs at least 3 boards, the dataset has "
                             f"{len(np.unique(groups))}; set ingest.board_regex or use split.strategy=random")
        if cfg.test_groups:
            test = np.isin(boards, list(resolve_boards("split.test_groups", cfg.test_groups, boards, ds.root)))
        else:  # carved from the boards not named for val, test_fraction of the whole dataset
            rest = np.flatnonzero(~val)
            test = np.zeros(len(ids), bool)
            test[rest[_carve(ids[rest], y[rest], groups[rest], cfg.test_fraction / (1 - val.mean()), seed,
                             "test")]] = True
        carve_val = not cfg.val_groups
        val_fraction = cfg.val_fraction / (1 - (test.mean() if cfg.test_groups else cfg.test_fraction))
    split[test] = "test"
    split[val & ~test] = "val"
    if carve_val and cfg.val_fraction > 0:  # 0 (split.allow_no_val): no validation split, every non-test board trains
        rest = np.flatnonzero(~test)
        split[rest[_carve(ids[rest], y[rest], groups[rest], val_fraction, seed + 1, "val")]] = "val"
    for name in ("train", "test") if cfg.allow_no_val else ("train", "val", "test"):
        if not (split == name).any():
            raise ValueError(f"split: the {name} split is empty ({cfg.strategy} split of {len(np.unique(groups))} "
                             f"boards, split.val_groups {list(cfg.val_groups)}, split.test_groups "
                             f"{list(cfg.test_groups)}); hold out fewer boards")
    images["split"] = split
    return images.drop(columns="source_split")


def run(cfg: SplitConfig, seed: int, classes: tuple[str, ...], src: str | Path, out: str | Path) -> dict:
    """Write ``split.parquet``; return the ``reports/split.json`` summary: per split its images, boards
    (count and sorted ids: a reviewer sees which boards validate and which test) and boxes per class."""
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
            "board_ids": sorted(part["board_id"].unique().tolist()),
            "per_class": per_class_counts(ds.boxes[ds.boxes["image_id"].isin(part["image_id"])], classes),
        }
    return summary
