import numpy as np
import pandas as pd
import pytest
from PIL import Image

from pcb_aoi.data import augment, etl
from pcb_aoi.data.dataset import Dataset, make_boxes_frame, make_images_frame
from pcb_aoi.pipeline.config import CLASSES, AugmentConfig, EtlConfig


def test_split_keeps_boards_apart(tiny_pipeline):
    d, _ = tiny_pipeline
    table = pd.read_parquet(d / "split" / "split.parquet")
    assert set(table["split"]) == {"train", "val", "test"}
    assert table.groupby("board_id")["split"].nunique().max() == 1
    assert len(table) == len(Dataset.load(d / "clean").images)


def test_augmented_set_is_train_only_with_valid_boxes(tiny_pipeline):
    d, p = tiny_pipeline
    table = pd.read_parquet(d / "split" / "split.parquet")
    aug = Dataset.load(d / "augmented")
    originals = aug.images["image_id"].str.replace(r"_aug\d+$", "", regex=True)
    assert set(originals) == set(table.loc[table["split"] == "train", "image_id"])
    assert len(aug.images) == len(set(originals)) * (1 + p.augment.copies)
    b = aug.boxes.merge(aug.images, on="image_id")
    assert ((b.x1 >= 0) & (b.y1 >= 0) & (b.x2 <= b.width) & (b.y2 <= b.height)).all()
    assert ((b.x2 > b.x1) & (b.y2 > b.y1)).all()


def test_augmentation_moves_boxes_with_pixels():
    """A dark square in a white image: after any transform the box still bounds the dark pixels."""
    tf = augment.build(AugmentConfig(hflip_p=1, vflip_p=0.5, rot90_p=1, noise_p=0, brightness_contrast_p=0), seed=1)
    img = np.full((96, 128), 255, np.uint8)
    img[10:30, 70:100] = 0
    template = img.copy()
    for _ in range(5):
        t, tp, boxes, labels = augment.apply(tf, img, template, np.array([[70, 10, 100, 30]], np.float32), ["spur"])
        ys, xs = np.nonzero(t < 128)
        assert labels == ["spur"]
        np.testing.assert_allclose(boxes[0], [xs.min(), ys.min(), xs.max() + 1, ys.max() + 1])
        assert (t == tp).all(), "the template must get the same transform"


def _dataset(tmp_path, boxes, corrupt=False):
    root = tmp_path / "raw"
    (root / "images").mkdir(parents=True)
    Image.fromarray(np.full((64, 64), 255, np.uint8)).save(root / "images/a.png")
    Image.fromarray(np.full((64, 64), 254, np.uint8)).save(root / "images/b.png")  # not a duplicate of a
    if corrupt:
        (root / "images/b.png").write_bytes(b"\x89PNG\r\n\x1a\n truncated")
    rows = [dict(image_id=i, path=f"images/{i}.png", template_path="", width=64, height=64, board_id="x",
                 source_split="") for i in ("a", "b")]
    Dataset(root, make_images_frame(rows), make_boxes_frame(boxes)).save(root)
    return root


@pytest.mark.parametrize("box, reason", [
    (dict(class_name="scratch", x1=1, y1=1, x2=9, y2=9), "unknown class 'scratch'"),
    (dict(class_name="open", x1=50, y1=50, x2=70, y2=60), "outside the 64x64 image"),
    (dict(class_name="open", x1=9, y1=1, x2=3, y2=9), "degenerate box"),
])
def test_etl_rejects_bad_boxes_with_reason(tmp_path, box, reason):
    root = _dataset(tmp_path, [dict(image_id="a", class_name="open", x1=1, y1=1, x2=9, y2=9),
                               dict(image_id="b", **box)])
    report = etl.run(EtlConfig(), CLASSES, root, tmp_path / "clean")
    assert report["images"] == 1 and report["rejected_images"] == 1
    assert report["rejected"][0]["image_id"] == "b" and reason in report["rejected"][0]["reason"]
    assert list(Dataset.load(tmp_path / "clean").boxes["image_id"]) == ["a"]


def test_etl_rejects_corrupt_image_naming_the_file(tmp_path):
    root = _dataset(tmp_path, [], corrupt=True)
    report = etl.run(EtlConfig(), CLASSES, root, tmp_path / "clean")
    assert report["rejected"][0]["file"] == "images/b.png"
    assert "cannot decode" in report["rejected"][0]["reason"] and "b.png" in report["rejected"][0]["reason"]


def test_failed_stage_leaves_previous_output(tmp_path):
    root = _dataset(tmp_path, [])
    out = tmp_path / "clean"
    etl.run(EtlConfig(), CLASSES, root, out)
    before = sorted(p.name for p in out.rglob("*"))
    (root / "boxes.parquet").write_bytes(b"not parquet")
    with pytest.raises(Exception):
        etl.run(EtlConfig(), CLASSES, root, out)
    assert sorted(p.name for p in out.rglob("*")) == before
    assert not [p for p in tmp_path.iterdir() if ".tmp-" in p.name], "temp folder left behind"


def test_etl_registers_templates_lists_the_moves_and_records_the_setting(tmp_path):
    from pcb_aoi.data.dataset import registration_px
    from pcb_aoi.data.synth import SynthConfig, board_samples
    from pcb_aoi.edge.preprocess import read_grey
    root = tmp_path / "raw"
    (root / "images").mkdir(parents=True)
    rows, originals = [], {}
    for i, (dx, dy) in enumerate([(0, 0), (4, -3)]):
        s = board_samples(SynthConfig(image_size=128, images_per_board=1, max_shift_px=0.0), 0, i)[0]
        Image.fromarray(s.test).save(root / f"images/{i}_test.png")
        Image.fromarray(np.roll(s.template, (dy, dx), axis=(0, 1))).save(root / f"images/{i}_temp.png")
        originals[str(i)] = s.template
        rows.append(dict(image_id=str(i), path=f"images/{i}_test.png", template_path=f"images/{i}_temp.png",
                         width=128, height=128, board_id=str(i), source_split=""))
    Dataset(root, make_images_frame(rows), make_boxes_frame([])).save(root)
    report = etl.run(EtlConfig(register_max_px=6), CLASSES, root, tmp_path / "clean")
    assert report["registered_pairs_moved"] == 1
    assert report["registration_moves"] == [{"image_id": "1", "dx": -4, "dy": 3}]
    clean = Dataset.load(tmp_path / "clean")
    registered = read_grey(clean.root / clean.images.set_index("image_id").loc["1", "template_path"])
    assert np.array_equal(registered[6:-6, 6:-6], originals["1"][6:-6, 6:-6])
    assert registration_px(tmp_path / "clean") == 6
    etl.run(EtlConfig(), CLASSES, root, tmp_path / "as_given")
    assert registration_px(tmp_path / "as_given") == 0
