import sys

import numpy as np
import pandas as pd
import pytest
import yaml
from PIL import Image

from pcb_aoi.data import augment, etl, split
from pcb_aoi.data.dataset import Dataset, make_boxes_frame, make_images_frame
from pcb_aoi.pipeline.config import CLASSES, AugmentConfig, EtlConfig, SplitConfig, load_params
from conftest import ROOT

SHARED = ROOT.parent / "shared" / "datasets"


def test_split_keeps_boards_apart(tiny_pipeline):
    d, _ = tiny_pipeline
    table = pd.read_parquet(d / "split" / "split.parquet")
    assert set(table["split"]) == {"train", "val", "test"}
    assert table.groupby("board_id")["split"].nunique().max() == 1
    assert len(table) == len(Dataset.load(d / "clean").images)


BOARDS = ("00041", "13000", "20085", "44000", "50600")  # DeepPCB-like group ids, one zero-padded


def _boards(tmp_path, per_board=3):
    """Manifests only (the split stage reads no pixels): ``per_board`` images on each of BOARDS, one box each."""
    root = tmp_path / "clean"
    root.mkdir()
    images = [dict(image_id=f"{b}_{i}", path=f"images/{b}_{i}.png", template_path="", width=64, height=64,
                   board_id=b, source_split="") for b in BOARDS for i in range(per_board)]
    boxes = [dict(image_id=r["image_id"], class_name=CLASSES[k % len(CLASSES)], x1=1, y1=1, x2=9, y2=9)
             for k, r in enumerate(images)]
    Dataset(root, make_images_frame(images), make_boxes_frame(boxes)).save(root)
    return root


def test_named_boards_are_exactly_the_val_and_test_splits_and_the_report_lists_them(tmp_path):
    cfg = SplitConfig.model_validate({"val_groups": [41], "test_groups": ["20085"]})  # 41: YAML's unquoted 41
    report = split.run(cfg, 0, CLASSES, _boards(tmp_path), tmp_path / "split")
    assert report["val"]["board_ids"] == ["00041"] and report["test"]["board_ids"] == ["20085"]
    assert report["train"]["board_ids"] == ["13000", "44000", "50600"]
    assert [report[s]["images"] for s in ("train", "val", "test")] == [9, 3, 3]
    table = pd.read_parquet(tmp_path / "split/split.parquet")
    assert set(table.loc[table.split == "val", "image_id"]) == {"00041_0", "00041_1", "00041_2"}


def test_val_boards_named_test_boards_carved_from_the_others(tmp_path):
    report = split.run(SplitConfig(val_groups=("20085",)), 0, CLASSES, _boards(tmp_path), tmp_path / "split")
    assert report["val"]["board_ids"] == ["20085"]
    # test_fraction 0.15 of 5 boards, carved from the 4 left: 0.15 / 0.8 -> 4 folds of one board, one held out
    assert len(report["test"]["board_ids"]) == 1 and report["test"]["board_ids"][0] != "20085"
    assert sorted(sum((report[s]["board_ids"] for s in ("train", "val", "test")), [])) == list(BOARDS)


@pytest.mark.parametrize("cfg, message", [
    (SplitConfig(val_groups=("20086",)),
     "split.val_groups: board '20086' does not exist; boards in {root}: 00041, 13000, 20085, 44000, 50600"),
    (SplitConfig(test_groups=("33",)),  # what PyYAML makes of an unquoted 00041 (octal)
     "split.test_groups: board '33' does not exist; boards in {root}: 00041, 13000, 20085, 44000, 50600; "
     "was it 00041 unquoted? YAML reads 00041 as the octal number 33: write it quoted, '00041'"),
    (SplitConfig(val_groups=("00041", "13000"), test_groups=("20085", "44000", "50600")),
     "split: the train split is empty"),
])
def test_named_boards_that_cannot_be_used_stop_the_split_stage(tmp_path, cfg, message):
    root = _boards(tmp_path)
    with pytest.raises(ValueError) as e:
        split.run(cfg, 0, CLASSES, root, tmp_path / "split")
    assert str(e.value).startswith(message.format(root=root)), str(e.value)
    assert not (tmp_path / "split").exists()


@pytest.mark.skipif(not (SHARED / "deeppcb-trainval").is_dir(), reason="../shared/datasets/deeppcb-trainval absent")
def test_deeppcb_preset_holds_out_a_val_board_other_than_the_test_board(tmp_path):
    sys.path.insert(0, str(ROOT / "benchmarks"))
    from repro_timing import PRESETS, apply_overrides

    from pcb_aoi.data.readers import read_deeppcb

    params = tmp_path / "params.yaml"
    params.write_text((ROOT / "params.yaml").read_text())
    apply_overrides(params, PRESETS["deeppcb"] + [f"ingest.uri={SHARED / 'deeppcb-trainval'}"])
    p = load_params(params)
    # the reader's manifests, without copying 2000 images: etl keeps all 1000 DeepPCB pairs (README), and the
    # split reads only board ids and classes
    images, boxes = read_deeppcb(SHARED / "deeppcb-trainval")
    table = split.assign(Dataset(tmp_path, make_images_frame(images), make_boxes_frame(boxes)), p.split, p.seed)
    boards = {s: set(table.loc[table.split == s, "board_id"]) for s in ("train", "val", "test")}
    assert boards["val"] and not boards["val"] & boards["test"] and not boards["train"] & (boards["val"] | boards["test"])
    assert boards == {"test": {"20085"}, "val": {"00041"}, "train": {"13000", "44000", "50600", "77000", "92000"}}
    assert yaml.safe_load(params.read_text())["split"].get("val_fraction") == 0.15  # the preset keeps the default


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
