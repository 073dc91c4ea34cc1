"""The evaluate stage: the operating threshold is chosen on validation boards only; the test boards
are only reported (DeepPCB's protocol beside COCO's)."""
import hashlib
import json
import shutil

import numpy as np
import pandas as pd
import pytest
import torch

from pcb_aoi.data.dataset import Dataset, split_ids
from pcb_aoi.evaluation import deeppcb, evaluate
from pcb_aoi.model import checkpoint, training
from pcb_aoi.model.inference import predict, torch_runner
from pcb_aoi.pipeline.config import EvaluateConfig

LEARN = {"epochs": 10, "lr": 0.01}  # enough for the tiny model to find some validation defects


@pytest.fixture(scope="module")
def trained(tiny_pipeline, tmp_path_factory):
    d, p = tiny_pipeline
    out = tmp_path_factory.mktemp("trained")
    summary = training.run(p.train.model_copy(update=LEARN), p.seed, p.classes, d / "augmented", d / "clean",
                           d / "split", out / "model.pt", out / "live")
    return d, p, out, summary


@pytest.fixture(scope="module")
def shuffled_test_labels(trained, tmp_path_factory):
    """A copy of the clean dataset whose test images carry other test images' boxes, classes permuted."""
    d, p, _, _ = trained
    clean = tmp_path_factory.mktemp("shuffled") / "clean"
    shutil.copytree(d / "clean", clean)
    boxes = pd.read_parquet(clean / "boxes.parquet")
    test = split_ids(d / "split", "test")
    rng = np.random.default_rng(0)
    is_test = boxes["image_id"].isin(test)
    boxes.loc[is_test, "image_id"] = boxes.loc[is_test, "image_id"].map(dict(zip(test, np.roll(test, 1))))
    boxes.loc[is_test, "class_name"] = rng.permutation(boxes.loc[is_test, "class_name"].to_numpy())
    boxes.to_parquet(clean / "boxes.parquet", index=False)
    return clean


def weights_digest(path) -> str:
    state = torch.load(path, weights_only=False)["model_state"]
    return hashlib.sha256(b"".join(state[k].numpy().tobytes() for k in sorted(state))).hexdigest()


def run(cfg, d, model, out, clean=None):
    m = evaluate.run(cfg, model, clean or d / "clean", d / "split", out / "metrics.json", out / "plots",
                     out / "operating_point.json")
    return m, json.loads((out / "operating_point.json").read_text())


def test_auto_threshold_is_chosen_on_validation(trained, tmp_path):
    d, p, out, _ = trained
    m, op = run(EvaluateConfig(operating_point="auto", max_escape_rate=0.8), d, out / "model.pt", tmp_path)
    assert op["operating_point"] == "auto" and op["chosen_on"] == "val"
    assert op["val"]["escapes"] / op["val"]["ground_truths"] <= 0.8
    # the test metrics are reported at that threshold
    assert m["deeppcb"]["score_threshold"] == m["score_threshold"] == op["score_threshold"]
    assert {"ap", "precision", "recall", "fscore", "escape_rate", "false_calls_per_image",
            "false_calls_per_board", "per_class_recall", "board_verdicts"} <= set(m["deeppcb"])
    v = json.loads((tmp_path / "metrics.json").read_text())["deeppcb"]["board_verdicts"]  # one image = one board
    assert v["boards"] == m["test_images"] == v["defective"] + v["defect_free"] and v["escapes"] <= v["defective"]
    # the threshold is the highest one within the limit: one step above it escapes more than 80 %
    ds = Dataset.load(d / "clean")
    val = split_ids(d / "split", "val")
    model, ckpt = checkpoint.load(out / "model.pt")
    matches = deeppcb.Matches.of(ds.annotations(val, tuple(ckpt["classes"])), predict(torch_runner(model), ds, val, True))
    above = matches.gt_found_at[matches.gt_found_at > op["score_threshold"] + 1e-4]
    assert (len(matches.gt_labels) - len(above)) / len(matches.gt_labels) > 0.8


def test_test_labels_change_neither_the_threshold_nor_the_kept_epoch(trained, shuffled_test_labels, tmp_path):
    d, p, out, summary = trained
    cfg = EvaluateConfig(operating_point="auto", max_escape_rate=0.8)
    m, op = run(cfg, d, out / "model.pt", tmp_path / "a")
    m2, op2 = run(cfg, d, out / "model.pt", tmp_path / "b", clean=shuffled_test_labels)
    assert op2 == op  # the same threshold, from the same validation counts
    assert m2["deeppcb"] != m["deeppcb"]  # while the test scores did see the shuffled labels
    # training with the shuffled test labels keeps the same epoch and writes the same weights
    again = training.run(p.train.model_copy(update=LEARN), p.seed, p.classes, d / "augmented", shuffled_test_labels,
                         d / "split", tmp_path / "model.pt", tmp_path / "live")
    assert again["best_epoch"] == summary["best_epoch"]
    assert weights_digest(tmp_path / "model.pt") == weights_digest(out / "model.pt")


def test_unreachable_escape_limit_names_the_best_reachable(trained, tmp_path):
    d, _, out, _ = trained
    with pytest.raises(ValueError, match=r"evaluate.max_escape_rate: no threshold reaches escape rate <= 0.0: "
                                         r"the best reachable is 0\.\d+"):
        run(EvaluateConfig(operating_point="auto", max_escape_rate=0.0), d, out / "model.pt", tmp_path)
    assert not (tmp_path / "operating_point.json").exists() and not (tmp_path / "metrics.json").exists()


def test_auto_needs_a_validation_split(trained, tmp_path):
    d, _, out, _ = trained
    split = pd.read_parquet(d / "split" / "split.parquet")
    (tmp_path / "split").mkdir()
    split.assign(split=split["split"].replace("val", "train")).to_parquet(tmp_path / "split" / "split.parquet")
    with pytest.raises(ValueError, match="operating_point: auto chooses the threshold on the validation split"):
        evaluate.run(EvaluateConfig(operating_point="auto"), out / "model.pt", d / "clean", tmp_path / "split",
                     tmp_path / "m.json", tmp_path / "plots", tmp_path / "op.json")
    # fixed works without one, and says no split was used to choose
    evaluate.run(EvaluateConfig(operating_point="fixed", score_threshold=0.2), out / "model.pt", d / "clean",
                 tmp_path / "split", tmp_path / "m.json", tmp_path / "plots", tmp_path / "op.json")
    assert json.loads((tmp_path / "op.json").read_text()) == {"operating_point": "fixed", "score_threshold": 0.2,
                                                              "chosen_on": None}
