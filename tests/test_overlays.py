"""Overlay pictures on hand-made boxes: what is drawn where, and which images are picked."""
import numpy as np

from pcb_aoi.evaluation.overlays import FALSE_ALARM, FOUND, HEADER, MISSED, PREDICTED, draw, errors, pick, scale_of

CLASSES = ("open", "short")


def at(img, x, y, s):
    """Overlay pixel of image pixel (x, y)."""
    return img.getpixel((int(x * s), int(y * s) + HEADER))


def case():
    image = np.full((64, 64), 255, np.uint8)
    gt = {"boxes": np.array([[10, 10, 20, 20], [40, 40, 50, 50]], float), "labels": np.array([0, 1])}
    pred = {"boxes": np.array([[10, 10, 20, 20], [40, 5, 50, 15], [40, 40, 50, 50]], float),
            "scores": np.array([0.9, 0.8, 0.1]), "labels": np.array([0, 1, 1])}
    return image, gt, pred


def test_found_missed_and_false_alarm_have_their_colours():
    image, gt, pred = case()  # box 0 found; box 1 only found at score 0.1 < threshold: missed; pred 1: false alarm
    img = draw(image, gt, pred, CLASSES, 0.5, "a")
    s = scale_of(64, 64)
    assert s == 8 and img.size == (64 * s, 64 * s + HEADER)
    assert at(img, 10, 10, s) == PREDICTED  # the detection's outline on the found defect
    assert img.getpixel((10 * s - 2, 15 * s + HEADER)) == FOUND  # the true box, just outside it
    assert img.getpixel((40 * s - 3, 45 * s + HEADER)) == MISSED  # the missed defect, thick outline
    assert img.getpixel((50 * s, 12 * s + HEADER)) == FALSE_ALARM  # right edge of the false alarm
    assert at(img, 30, 30, s) == (255, 255, 255)  # away from every box: the image itself
    assert errors(gt, pred, 0.5) == (1, 1) and errors(gt, pred, 0.05) == (0, 1)


def test_wrong_class_is_a_miss():
    image, gt, pred = case()
    pred["labels"] = np.array([1, 1, 1])  # the hit on box 0 now has the wrong class
    assert errors(gt, pred, 0.5) == (2, 1)


def test_sample_is_fixed_and_worst_are_misses_first():
    ids = [f"i{k}" for k in range(10)]
    one = {"boxes": np.array([[0, 0, 8, 8]], float), "labels": np.array([0])}
    gt = {i: one for i in ids}
    hit = {"boxes": np.array([[0, 0, 8, 8]], float), "scores": np.array([0.9]), "labels": np.array([0])}
    fa = {"boxes": np.array([[0, 0, 8, 8], [20, 20, 28, 28]], float), "scores": np.array([0.9, 0.9]),
          "labels": np.array([0, 0])}
    preds = {i: hit for i in ids} | {"i3": fa, "i7": fa}  # i5, i9: missed (no prediction); i3, i7: false alarm
    del preds["i5"], preds["i9"]
    sample, worst = pick(ids, gt, preds, 0.5, samples=4, worst=3)
    assert sample == ["i0", "i2", "i5", "i7"]  # k * 10 // 4: evenly spaced over the sorted ids, whatever the model does
    assert pick(ids, gt, {}, 0.5, samples=4, worst=0)[0] == sample
    assert worst == ["i5", "i9", "i3"]  # misses first, then false alarms, ties by id
    assert pick(ids, gt, preds, 0.5, samples=50, worst=50) == (sorted(ids), ["i5", "i9", "i3", "i7"])
