import numpy as np
import pytest

from pcb_aoi.evaluation.metrics import coco_metrics, operating_point

CLASSES = ("open", "short")


def test_ap_of_a_known_ranking():
    """2 true boxes; ranked hit (0.9), false alarm (0.8), hit (0.7).

    Precision is 1 up to recall 0.5 and 2/3 up to recall 1; COCO's 101-point interpolation gives
    AP = (51 * 1 + 50 * 2/3) / 101.
    """
    gt = {"a": {"boxes": np.array([[10, 10, 30, 30], [50, 50, 70, 70]], float), "labels": np.array([0, 0])}}
    pred = {"a": {"boxes": np.array([[10, 10, 30, 30], [100, 100, 120, 120], [50, 50, 70, 70]], float),
                  "scores": np.array([0.9, 0.8, 0.7]), "labels": np.array([0, 0, 0])}}
    m = coco_metrics(gt, pred, CLASSES)
    expected = (51 + 50 * 2 / 3) / 101
    assert m["map50"] == pytest.approx(expected, abs=1e-6)
    assert m["map"] == pytest.approx(expected, abs=1e-6)  # exact boxes: same AP at every IoU
    assert m["ap50"]["open"] == pytest.approx(expected, abs=1e-6) and np.isnan(m["ap50"]["short"])


def test_iou_033_counts_a_loose_box_that_050_does_not():
    gt = {"a": {"boxes": np.array([[0, 0, 20, 20]], float), "labels": np.array([1])}}
    pred = {"a": {"boxes": np.array([[0, 0, 20, 8]], float), "scores": np.array([0.9]), "labels": np.array([1])}}
    m = coco_metrics(gt, pred, CLASSES)  # IoU = 160 / 400 = 0.4
    assert m["map33"] == pytest.approx(1.0) and m["map50"] == pytest.approx(0.0)


def test_wrong_class_is_not_a_hit_and_shows_in_confusion():
    gt = {"a": {"boxes": np.array([[0, 0, 20, 20], [40, 40, 60, 60]], float), "labels": np.array([0, 1])},
          "b": {"boxes": np.zeros((0, 4)), "labels": np.zeros(0, int)}}
    pred = {"a": {"boxes": np.array([[0, 0, 20, 20], [40, 40, 60, 60]], float), "scores": np.array([0.9, 0.2]),
                  "labels": np.array([1, 1])},
            "b": {"boxes": np.array([[5, 5, 9, 9]], float), "scores": np.array([0.8]), "labels": np.array([0])}}
    found, total, conf = operating_point(gt, pred, 2, score_threshold=0.5)
    assert list(found) == [0, 0] and list(total) == [1, 1]
    # rows: actual open, short, background; columns: predicted open, short, background
    assert conf.tolist() == [[0, 1, 0], [0, 0, 1], [1, 0, 0]]


def test_no_detections_gives_zero():
    gt = {"a": {"boxes": np.array([[0, 0, 20, 20]], float), "labels": np.array([0])}}
    m = coco_metrics(gt, {}, CLASSES)
    assert m["map"] == m["map50"] == m["map33"] == 0.0
