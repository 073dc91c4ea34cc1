"""DeepPCB's protocol on hand-computed cases (pcb_aoi.evaluation.deeppcb)."""
import numpy as np
import pytest

from pcb_aoi.evaluation import deeppcb
from pcb_aoi.evaluation.metrics import coco_metrics

OPEN, SHORT = 0, 1
CLASSES = ("open", "short")


def gt(*boxes):
    """Ground truth of one image from (label, box) pairs."""
    return {"boxes": np.array([b for _, b in boxes], float).reshape(-1, 4),
            "labels": np.array([c for c, _ in boxes], int)}


def det(*dets):
    """Detections of one image from (label, score, box) triples."""
    return {"boxes": np.array([b for _, _, b in dets], float).reshape(-1, 4),
            "scores": np.array([s for _, s, _ in dets], float), "labels": np.array([c for c, _, _ in dets], int)}


def test_the_issue_example_wrong_class_first_takes_the_defect():
    # open [0,0,10,10]; short 0.9 on it, open 0.8 [0,0,10,9]: the short takes the defect.
    g = {"a": gt((OPEN, [0, 0, 10, 10]))}
    p = {"a": det((SHORT, 0.9, [0, 0, 10, 10]), (OPEN, 0.8, [0, 0, 10, 9]))}
    r = deeppcb.protocol(g, p, 0.5, CLASSES)
    assert r["ap"] == 0.0
    assert (r["correct"], r["detections"], r["precision"], r["recall"], r["fscore"]) == (0, 2, 0.0, 0.0, 0.0)
    # not an escape (the board is stopped by the short), but the open at 0.8 is a false call
    assert (r["escapes"], r["false_calls"]) == (0, 1)
    assert r["per_class_recall"] == {"open": 0.0, "short": None}
    # COCO's AP at IoU 0.33 matches per class and counts the open: 1.0. Not the same metric.
    assert coco_metrics(g, p, CLASSES)["map33"] == pytest.approx(1.0)


def test_iou_must_exceed_033():
    g = {"a": gt((OPEN, [0, 0, 100, 10]))}
    exactly = {"a": det((OPEN, 0.9, [0, 0, 33, 10]))}  # IoU 330 / 1000 = 0.33: no match
    above = {"a": det((OPEN, 0.9, [0, 0, 34, 10]))}  # 0.34: a match
    assert deeppcb.iou(g["a"]["boxes"], exactly["a"]["boxes"])[0, 0] == 0.33
    assert deeppcb.protocol(g, exactly, 0.5)["ap"] == 0.0
    assert deeppcb.protocol(g, above, 0.5)["ap"] == 1.0


def test_boxes_are_float_not_rounded():
    g = {"a": gt((OPEN, [0, 0, 100, 10]))}
    p = {"a": det((OPEN, 0.9, [0, 0, 33.2, 10]))}  # 0.332 > 0.33; rounding to 33 px would lose it
    assert deeppcb.protocol(g, p, 0.5)["ap"] == 1.0


def test_ground_truths_take_detections_in_file_order():
    # Both detections overlap both defects. The first defect (open) takes the best-scored one (a
    # short): wrong class, used up; the second (short) takes the open: wrong class too.
    first = (OPEN, [0, 0, 10, 10])
    second = (SHORT, [0, 0, 10, 12])
    p = {"a": det((SHORT, 0.9, [0, 0, 10, 11]), (OPEN, 0.8, [0, 0, 10, 10]))}
    assert deeppcb.protocol({"a": gt(first, second)}, p, 0.5)["ap"] == 0.0
    # the other file order: each defect gets the detection of its class
    assert deeppcb.protocol({"a": gt(second, first)}, p, 0.5)["ap"] == 1.0


def test_ap_pools_images_by_score_and_counts_an_image_without_detections():
    g = {"a": gt((OPEN, [0, 0, 10, 10]), (SHORT, [50, 50, 60, 60])), "b": gt((OPEN, [0, 0, 10, 10])),
         "c": gt()}
    p = {"a": det((OPEN, 0.9, [0, 0, 10, 10]), (SHORT, 0.7, [50, 50, 60, 60])),
         "c": det((OPEN, 0.8, [20, 20, 30, 30]))}  # "b": no detections; "c": a false call only
    # pooled ranking: 0.9 correct, 0.8 false, 0.7 correct -> (1/1 + 2/3) / 3 ground truths
    r = deeppcb.protocol(g, p, 0.75, CLASSES, boards={"a": "x", "b": "x", "c": "y"})
    assert r["ap"] == pytest.approx((1 + 2 / 3) / 3, abs=1e-6)
    # at 0.75: detections 0.9 (correct) and 0.8 (false call) are submitted
    assert (r["detections"], r["correct"], r["escapes"], r["false_calls"]) == (2, 1, 2, 1)
    assert r["precision"] == 0.5 and r["recall"] == pytest.approx(1 / 3, abs=1e-6)
    assert r["fscore"] == pytest.approx(2 * 0.5 * (1 / 3) / (0.5 + 1 / 3), abs=1e-6)
    assert r["escape_rate"] == pytest.approx(2 / 3, abs=1e-6)
    assert r["false_calls_per_image"] == pytest.approx(1 / 3, abs=1e-6)
    assert (r["boards"], r["false_calls_per_board"]) == (2, 0.5)
    assert r["per_class_recall"] == {"open": 0.5, "short": 0.0}


def test_detections_below_001_do_not_count():
    g = {"a": gt((OPEN, [0, 0, 10, 10]))}
    assert deeppcb.protocol(g, {"a": det((OPEN, 0.009, [0, 0, 10, 10]))}, 0.0)["ap"] == 0.0
    assert deeppcb.protocol(g, {"a": det((OPEN, 0.01, [0, 0, 10, 10]))}, 0.0)["ap"] == 1.0


def test_no_detections_at_all():
    r = deeppcb.protocol({"a": gt((OPEN, [0, 0, 10, 10]))}, {}, 0.3)
    assert (r["ap"], r["precision"], r["recall"], r["fscore"], r["escape_rate"]) == (0.0, None, 0.0, 0.0, 1.0)


def test_operating_point_is_the_highest_threshold_within_the_escape_limit():
    boxes = [[i * 20, 0, i * 20 + 10, 10] for i in range(4)]
    g = {"a": gt(*[(OPEN, b) for b in boxes])}
    p = {"a": det(*[(OPEN, s, b) for s, b in zip([0.9, 0.6, 0.4, 0.2], boxes)],
                  (OPEN, 0.5, [200, 200, 210, 210]), (OPEN, 0.3, [300, 300, 310, 310]))}
    m = deeppcb.Matches.of(g, p)
    # no escape allowed: every defect, down to the one found at 0.2; both false calls come with it
    t, n = deeppcb.operating_point(m, 0.0)
    assert t == 0.2 and (n["escapes"], n["false_calls"]) == (0, 2)
    # one of four may escape (25 %): the threshold rises to 0.4, and the false call at 0.3 goes
    t, n = deeppcb.operating_point(m, 0.25)
    assert t == 0.4 and (n["escapes"], n["false_calls"]) == (1, 1)
    # 0.2 allows none of four (0.8 defects): the same as 0
    assert deeppcb.operating_point(m, 0.2)[0] == 0.2


def test_operating_point_says_what_is_reachable():
    g = {"a": gt((OPEN, [0, 0, 10, 10]), (OPEN, [50, 50, 60, 60]))}
    p = {"a": det((OPEN, 0.9, [0, 0, 10, 10]))}  # the second defect is never detected
    with pytest.raises(ValueError, match=r"best reachable is 0.5000 \(1 of 2 defects"):
        deeppcb.operating_point(deeppcb.Matches.of(g, p), 0.01)


def test_threshold_is_floored_to_keep_its_detection():
    g = {"a": gt((OPEN, [0, 0, 10, 10]))}
    p = {"a": det((OPEN, 0.123456, [0, 0, 10, 10]))}
    t, n = deeppcb.operating_point(deeppcb.Matches.of(g, p), 0.0)
    assert t == 0.1234 and n["escapes"] == 0


def test_board_verdicts_by_hand():
    # Five boards at threshold 0.5:
    #  a: defect found (0.9)                          -> defective, fails: caught
    #  b: defect, only a 0.4 detection on it          -> defective, passes: a board escape
    #  c: defect missed, a 0.7 false call elsewhere   -> defective, fails on a false call only (not an escape)
    #  d: no defect, a 0.6 false call                 -> defect-free, fails: a board false call
    #  e: no defect, a 0.2 detection                  -> defect-free, passes
    g = {"a": gt((OPEN, [0, 0, 10, 10])), "b": gt((SHORT, [0, 0, 10, 10])), "c": gt((OPEN, [0, 0, 10, 10])),
         "d": gt(), "e": gt()}
    p = {"a": det((SHORT, 0.9, [0, 0, 10, 10])), "b": det((SHORT, 0.4, [0, 0, 10, 10])),
         "c": det((OPEN, 0.7, [50, 50, 60, 60])), "d": det((OPEN, 0.6, [5, 5, 9, 9])), "e": det((OPEN, 0.2, [1, 1, 4, 4]))}
    v = deeppcb.protocol(g, p, 0.5)["board_verdicts"]
    assert v == {"boards": 5, "defective": 3, "defect_free": 2, "failed": 3, "escapes": 1, "escape_rate": 0.333333,
                 "false_calls": 1, "false_call_rate": 0.5, "failed_on_false_calls_only": 2}
    # at 0.3 board b is caught too; at 0.95 nothing fails: every defective board escapes
    assert deeppcb.protocol(g, p, 0.3)["board_verdicts"]["escapes"] == 0
    v = deeppcb.protocol(g, p, 0.95)["board_verdicts"]
    assert (v["failed"], v["escape_rate"], v["false_call_rate"], v["failed_on_false_calls_only"]) == (0, 1.0, 0.0, 0)
    # a split without defect-free boards has no board false-call rate, but still counts the wasted stops
    v = deeppcb.protocol({k: g[k] for k in "abc"}, p, 0.5)["board_verdicts"]
    assert (v["defect_free"], v["false_calls"], v["false_call_rate"], v["failed_on_false_calls_only"]) == (0, 0, None, 1)
